"""LoRA-train every stage of a stack on its distilled data, on one shared base model.

Each stage gets its own peft LoRA adapter on the same base (added, trained, saved, then unloaded so
the next stage starts from the clean base). Loss falls only on target tokens; batches are
length-grouped; the run is seeded, checkpointed atomically every N steps, and resumable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from slmstack.arch import get_arch
from slmstack.config import check_range, check_target_modules_given, dataclass_to_dict, require_at_least_one
from slmstack.errors import ConfigError, SlmstackError
from slmstack.io import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    guard_read,
    jsonl_lines,
    read_json,
    read_text,
    save_figure,
)
from slmstack.models import load_model, resolve_precision
from slmstack.ownership import LEGACY, check_dir_ours, claim_dir
from slmstack.stack.config import StackConfig, StageConfig, save_stack_config
from slmstack.training.checkpoint import load_latest, restore_rng, save_checkpoint
from slmstack.training.distributed import Processes, processes
from slmstack.training.train_data import collate, load_stage_records, make_batches, tokenize_example

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainingDivergedError", "eval_loss", "train_lora_steps", "train_stack"]

RUN_FILE = "run.json"


@dataclass(kw_only=True)
class TrainConfig:
    """LoRA training settings, shared by every stage."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = field(default=None, metadata={"help": "default: attention + MLP"})
    lr: float = 2e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int | None = field(default=None, metadata={"help": "overrides epochs"})
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    eval_fraction: float = 0.1
    eval_every: int = field(default=0, metadata={"help": "steps between eval losses; 0 = only at the end"})
    checkpoint_every: int = 50
    group_by_length: bool = True
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata={"help": "bf16 autocast (LoRA weights stay fp32); auto = where native"}
    )
    seed: int = 0
    skip_bad: bool = False

    def __post_init__(self) -> None:
        require_at_least_one(self, ("rank", "alpha", "epochs", "batch_size", "grad_accum", "checkpoint_every"))
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 8:
            raise ConfigError(f"max_length must be >= 8, got {self.max_length}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise ConfigError("warmup_steps and eval_every must be >= 0")
        check_range(self, "seed", 0)
        check_target_modules_given(self.target_modules)


def check_target_modules(model: Any, targets: list[str] | None, label: str = "target_modules") -> None:
    """Every name in ``targets`` must be the last part of some module of ``model`` (what peft matches on).

    Raises:
        ConfigError: naming the field, the missing names, and the names that exist.
    """
    if targets is None:
        return
    from torch import nn

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"{label}: {', '.join(map(repr, missing))} is not a linear layer of this model; "
                          f"it has {', '.join(sorted(names))}")  # fmt: skip


def _sha_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        if p.is_file():
            with guard_read(p, "training data file"):
                digest.update(p.read_bytes())
        else:
            digest.update(b"<missing>")
    return digest.hexdigest()


def _claim_out_dir(out: Path, run: dict[str, Any], resume: bool, overwrite: bool) -> None:
    check_dir_ours(out, "train", "training output (--out)", legacy=LEGACY["train"])
    path = out / RUN_FILE
    if path.is_file() and not overwrite:
        old = read_json(path, "training run record", "Use another --out, or pass --overwrite.")
        if old != run:
            raise ConfigError(
                f"{out} already holds a different training run (stack, data or settings differ). "
                "Use another --out, or pass --overwrite to replace it."
            )
        if not resume:
            raise ConfigError(
                f"{out} already holds this run. Pass --resume to continue it, or --overwrite to restart."
            )
    elif path.is_file() and overwrite:
        shutil.rmtree(out)
    claim_dir(out, "train", "training output (--out)")
    atomic_write_json(path, run)


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _masked_loss(model: Any, batch: dict[str, torch.Tensor], precision: str = "fp32") -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over target tokens, computing the LM head only where a label is set.

    Prompt positions carry no loss, so their (B, T, vocab) logits would be wasted work: with a 49k
    vocabulary the head is about a fifth of the model's FLOPs.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device_type = batch["input_ids"].device.type
    if "decoder_labels" in batch:  # encoder-decoder: the model's own loss over the decoder targets
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["decoder_labels"])  # fmt: skip
        return out.loss.float(), int((batch["decoder_labels"] != -100).sum())
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = hidden.last_hidden_state  # (B, T, C)
        # position t predicts token t+1, so shift labels left by one
        labels = batch["labels"][:, 1:]  # (B, T-1)
        keep = labels != -100  # (B, T-1)
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V), N = target tokens
    cap = getattr(base.config, "final_logit_softcapping", None)  # gemma
    if cap:
        logits = torch.tanh(logits / cap) * cap
    n = int(keep.sum())
    loss = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="sum")
    return loss / max(n, 1), n


def eval_loss(model: Any, examples: list, pad_id: int, batch_size: int = 8, precision: str = "fp32") -> float:
    """Mean cross-entropy per target token over tokenised ``examples`` (model left in eval mode)."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[s : s + batch_size], pad_id).items()}
            loss, n = _masked_loss(model, batch, precision)
            total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


def train_lora_steps(
    model: Any,
    pad_id: int,
    examples: list,
    steps: int,
    batch_size: int = 4,
    lr: float = 2e-4,
    seed: int = 0,
    precision: str = "auto",
    show_progress: bool = False,
) -> dict[str, float]:
    """Train the trainable (LoRA) parameters of ``model`` for ``steps`` AdamW steps: a federated client's round.

    Same loss, batching and precision as :func:`train_stack`; a fresh optimizer each call, as in FedAvg.

    Returns:
        ``{"loss": mean step loss, "tokens": non-padding tokens, "seconds": wall time}``.
    """
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lengths = [len(e.input_ids) for e in examples]
    n_batches = math.ceil(len(examples) / batch_size)
    order: dict[int, list[list[int]]] = {}
    losses, tokens, start = [], 0, time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc="local train", unit="step", disable=not show_progress):
        epoch, pos = divmod(step, n_batches)
        if epoch not in order:
            order = {epoch: make_batches(lengths, batch_size, seed, epoch)}
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in order[epoch][pos]], pad_id).items()}
        loss, _ = _masked_loss(model, batch, precision)
        check_finite(loss, "local training", step + 1, precision)
        loss.backward()
        check_finite(
            torch.nn.utils.clip_grad_norm_(params, 1.0), "local training", step + 1, precision, what="gradient"
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
    model.eval()
    return {"loss": sum(losses) / len(losses), "tokens": tokens, "seconds": time.perf_counter() - start}


class TrainingDivergedError(SlmstackError):
    """The loss (or the gradient) stopped being a finite number; the run stops before it corrupts the weights."""


def check_finite(value: torch.Tensor, where: str, step: int, precision: str, stage_dir: Path | None = None,
                 what: str = "loss") -> None:  # fmt: skip
    """Raise :class:`TrainingDivergedError` naming the step and the likely cause when ``value`` is NaN or inf."""
    if bool(torch.isfinite(value.detach()).all()):
        return
    kept = _checkpoint_step(stage_dir) if stage_dir is not None else None
    cause = ("bf16 overflow (set precision: fp32), or " if precision == "bf16" else "") + (
        "too high a learning rate (lower lr), or a bad data row"
    )
    kept_text = (f" The last good checkpoint (step {kept}) is kept; fix the cause and rerun with --resume."
                 if kept else " No checkpoint was written yet.")  # fmt: skip
    raise TrainingDivergedError(f"{where}: the {what} became {float(value.detach().float().sum())} at step {step}; "
                                f"training stopped. Likely cause: {cause}.{kept_text}")  # fmt: skip


def _checkpoint_step(stage_dir: Path) -> int | None:
    """The step of the latest complete checkpoint of a stage, if any."""
    pointer = stage_dir / "checkpoints" / "latest"
    try:
        name = pointer.read_text().strip() if pointer.is_file() else ""
    except (OSError, UnicodeDecodeError):  # only used to word an error message
        name = ""
    return int(name.split("-")[1]) if name.startswith("step-") and name.split("-")[1].isdigit() else None


class _StageTrainer:
    """Trains one stage's adapter; split out so :func:`train_stack` reads top to bottom."""

    def __init__(self, model: Any, tokenizer: Any, stage: StageConfig, cfg: TrainConfig, out: Path, chat: bool,
                 procs: Processes | None = None) -> None:  # fmt: skip
        self.model, self.tok, self.stage, self.cfg, self.out, self.chat = model, tokenizer, stage, cfg, out, chat
        self.procs = procs or Processes()
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(cfg.precision, self.device)

    def split(self, data_dir: Path) -> tuple[list, list]:
        records = load_stage_records(data_dir / f"{self.stage.name}.jsonl", skip_bad=self.cfg.skip_bad)
        examples = [tokenize_example(self.tok, self.stage.role, r.prompt, r.completion, self.cfg.max_length, self.chat)
                    for r in records]  # fmt: skip
        gen = torch.Generator().manual_seed(self.cfg.seed)
        order = torch.randperm(len(examples), generator=gen).tolist()
        n_eval = int(round(len(examples) * self.cfg.eval_fraction)) if len(examples) >= 5 else 0
        return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]

    def evaluate(self, examples: list) -> float | None:
        if not examples or not self.procs.main:  # rank 0 alone evaluates (and writes)
            return None
        loss = eval_loss(self.model, examples, self.tok.pad_token_id, self.cfg.batch_size, self.precision)
        self.model.train()
        return loss

    def run(self, data_dir: Path, resume: bool, on_step: Callable[[int], None] | None) -> dict[str, Any]:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        cfg, stage_dir = self.cfg, self.out / self.stage.name
        train, evals = self.split(data_dir)
        lengths = [len(e.input_ids) for e in train]
        n_batches = math.ceil(len(train) / cfg.batch_size)
        total = cfg.max_steps or cfg.epochs * math.ceil(n_batches / cfg.grad_accum)
        torch.manual_seed(cfg.seed)
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                          target_modules=cfg.target_modules or get_arch(self.model).lora_targets)  # fmt: skip
        self.model = peft = get_peft_model(self.model, lora)
        params = [p for p in peft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        scheduler = _scheduler(optimizer, cfg, total)
        start, tokens, elapsed = 0, 0, 0.0
        ckpt = load_latest(stage_dir / "checkpoints") if resume else None
        if ckpt is not None:
            set_peft_model_state_dict(peft, ckpt.adapter)
            optimizer.load_state_dict(ckpt.optimizer)
            scheduler.load_state_dict(ckpt.scheduler)
            restore_rng(ckpt.rng)
            start, tokens, elapsed = ckpt.step, ckpt.extra["tokens"], ckpt.extra["seconds"]
            logger.info("stage %s: resuming at step %d of %d", self.stage.name, start, total)
        procs = self.procs
        metrics = _Metrics(stage_dir, start, write=procs.main)
        if start == 0 and evals and procs.main:  # the untrained adapter's eval loss, so the curve shows the gain
            metrics.log({"step": 0, "eval_loss": self.evaluate(evals)})
        epoch_cache: dict[int, list[list[int]]] = {}
        peft.train()
        bar = tqdm(total=total, initial=start, desc=f"train {self.stage.name}", unit="step", disable=not procs.main)
        for step in range(start, total):
            t0 = time.perf_counter()
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                epoch, pos = divmod(step * cfg.grad_accum + micro, n_batches)
                if epoch not in epoch_cache:
                    epoch_cache = {epoch: make_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)}
                rows = procs.shard([train[i] for i in epoch_cache[epoch][pos]])
                batch = {k: v.to(self.device) for k, v in collate(rows, self.tok.pad_token_id).items()}
                loss, n = _masked_loss(peft, batch, self.precision)
                check_finite(loss, f"stage {self.stage.name!r}", step + 1, self.precision, stage_dir)
                # this process's share of the whole batch's mean: its tokens' loss over every process's tokens
                share = n / max(1, int(procs.sum(torch.tensor(float(n), device=self.device))))
                (loss * share / cfg.grad_accum).backward()
                step_loss += float(procs.sum(loss.detach() * share)) / cfg.grad_accum
                tokens += int(procs.sum(batch["attention_mask"].sum()))
            procs.sum_gradients(params)
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            check_finite(norm, f"stage {self.stage.name!r}", step + 1, self.precision, stage_dir, "gradient")
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed += time.perf_counter() - t0
            row: dict[str, Any] = {"step": step + 1, "loss": round(step_loss, 5), "lr": lr,
                                   "tokens": tokens, "seconds": round(elapsed, 3)}  # fmt: skip
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                row["eval_loss"] = self.evaluate(evals)
            metrics.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            if procs.main and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total):
                save_checkpoint(stage_dir / "checkpoints", step + 1, get_peft_model_state_dict(peft), optimizer,
                                scheduler, {"tokens": tokens, "seconds": elapsed})  # fmt: skip
            if on_step is not None:
                on_step(step + 1)
        bar.close()
        eval_loss = self.evaluate(evals)
        metrics.log({"step": total, "eval_loss": eval_loss, "final": True})
        if procs.main:
            peft.save_pretrained(stage_dir / "adapter", safe_serialization=True)
        metrics.plot(self.stage.name)
        summary = {"stage": self.stage.name, "steps": total, "precision": self.precision, "train_examples": len(train),
                   "eval_examples": len(evals), "final_loss": metrics.last_loss, "eval_loss": eval_loss,
                   "tokens": tokens, "train_seconds": round(elapsed, 2),
                   "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None}  # fmt: skip
        if procs.main:
            atomic_write_json(stage_dir / "done.json", summary)
        procs.barrier()  # the others go on once rank 0 has written the stage
        self.model = peft.unload()  # drop the LoRA layers; the clean base serves the next stage
        return summary


class _Metrics:
    """metrics.jsonl (rewritten up to the resume step, then appended), TensorBoard if installed, loss PNG."""

    def __init__(self, stage_dir: Path, start: int, write: bool = True) -> None:
        self.path, self.write = stage_dir / "metrics.jsonl", write
        self.rows = []
        self.writer = None
        if not write:  # a training process other than rank 0: rows kept in memory only
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and start:
            fix = "The metrics log is damaged: rerun with --overwrite to start over."
            with guard_read(self.path, "training metrics log", fix):
                rows = [json.loads(line) for line in jsonl_lines(read_text(self.path, "training metrics log"))]
                self.rows = [r for r in rows if r["step"] <= start and not r.get("final")]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.writer = _tensorboard(stage_dir / "tensorboard")

    @property
    def last_loss(self) -> float | None:
        losses = [r["loss"] for r in self.rows if "loss" in r]
        return losses[-1] if losses else None

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.write:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key in ("loss", "eval_loss", "lr"):
                if row.get(key) is not None:
                    self.writer.add_scalar(key, row[key], row["step"])

    def plot(self, name: str) -> None:
        if not self.write:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.warning("matplotlib is not installed; no loss curve for %s", name)
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if r.get("eval_loss") is not None]
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
        ax.set(xlabel="step", ylabel="loss (target tokens)", title=f"stage {name}")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, self.path.with_name("loss.png"))


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def train_stack(
    stack: StackConfig,
    data_dir: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    stages: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> Path:
    """Train a LoRA adapter for each (chosen) stage and write a stack YAML that uses them.

    Args:
        stack: the stack to train (its base model, roles and templates).
        data_dir: a directory with ``<stage>.jsonl`` files (``prompt``, ``completion``), e.g. from distill.
        out: output directory; ``<stage>/adapter`` per stage and ``trained_stack.yaml``.
        config: LoRA and optimisation settings.
        stages: train only these stages (default: all).
        resume: continue an interrupted run in ``out`` from its latest checkpoints.
        overwrite: replace whatever ``out`` holds.
        on_step: called with the global step after each optimiser step (and its checkpoint).

    Returns:
        The path of the new stack YAML, ready for ``slmstack run --stack``.
    """
    cfg = config or TrainConfig()
    out, data_dir = Path(out), Path(data_dir)
    chosen = [stack.stage(name) for name in stages] if stages else [s for s in stack.stages if s.kind != "retrieve"]
    untrainable = [s.name for s in chosen if s.kind == "retrieve"]
    if untrainable:
        raise ConfigError(f"stage {untrainable[0]!r} is a retrieve stage: it runs no model, so it has no adapter to "
                          "train; leave it out of --stages")  # fmt: skip
    files = [data_dir / f"{s.name}.jsonl" for s in chosen]
    run = {"stack": dataclass_to_dict(stack), "data": _sha_files(files), "stages": [s.name for s in chosen],
           "train": {k: v for k, v in dataclass_to_dict(cfg).items() if k != "skip_bad"}}  # fmt: skip
    for f in files:
        load_stage_records(f, skip_bad=cfg.skip_bad)  # fail on bad data before loading the model
    check_output_dir(out, "training output (--out)")
    procs = processes(stack.device)
    loaded = load_model(stack.model, device=procs.device(stack.device),
                        dtype="float32" if stack.dtype == "auto" else stack.dtype)  # fmt: skip
    check_target_modules(loaded.model, cfg.target_modules, "train.target_modules")
    if procs.main:
        _claim_out_dir(out, run, resume, overwrite)
    procs.barrier()
    chat = stack.chat_template and bool(getattr(loaded.tokenizer, "chat_template", None))
    model = loaded.model
    summaries = []
    for i, stage in enumerate(chosen):
        done = out / stage.name / "done.json"
        if done.is_file() and (out / stage.name / "adapter" / "adapter_model.safetensors").is_file():
            logger.info("stage %s: already trained, skipping", stage.name)
            summaries.append(
                read_json(done, "stage summary", "Delete it to retrain the stage.", expect={"stage": str})
            )
            continue
        trainer = _StageTrainer(model, loaded.tokenizer, stage, replace(cfg, seed=cfg.seed + i), out, chat, procs)
        summaries.append(trainer.run(data_dir, resume, on_step))
        model = trainer.model
    if not procs.main:
        procs.barrier()
        return out / "trained_stack.yaml"
    path = _write_trained_stack(stack, out, [s.name for s in chosen], summaries)
    procs.barrier()
    return path


def _write_trained_stack(stack: StackConfig, out: Path, trained: list[str], summaries: list[dict]) -> Path:
    new = replace(stack, stages=[replace(s, adapter=f"{s.name}/adapter" if s.name in trained else s.adapter)
                                 for s in stack.stages])  # fmt: skip
    for s in new.stages:  # adapters that were not trained here keep pointing where they did
        if s.name not in trained and s.adapter:
            s.adapter = str(stack.adapter_path(s))
    model_path = Path(stack.model).expanduser()
    if stack.source is not None and not model_path.is_absolute() and (stack.source.parent / model_path).exists():
        new.model = str((stack.source.parent / model_path).resolve())
    new.name = f"{stack.name}-trained"
    atomic_write_json(out / "train_summary.json", {"stages": summaries})
    return save_stack_config(new, out / "trained_stack.yaml")
