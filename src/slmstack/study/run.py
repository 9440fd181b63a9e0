"""Run the stacking study: a resumable grid of (arm, seed) cells on the shared cell runner (:mod:`slmstack.grid`).

A cell trains the adapters its arm needs (cached under ``adapters/``, each built once and swapped in atomically),
loads the arm's stack, and scores it on every evaluation task, keeping each item's 0/1 score for the paired tests.
First every arm runs its first seed; then the ``best`` arms (highest mean over the tasks) run the extra seeds;
then ``slmstack attribute`` runs on S2. A killed study resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmstack.config import dataclass_to_dict
from slmstack.errors import ConfigError, InputError
from slmstack.grid import CellGrid, check_scores
from slmstack.io import atomic_dir, atomic_write_json, atomic_write_text, read_json
from slmstack.ownership import LEGACY, check_dir_ours, claim_dir
from slmstack.study.arms import ARMS, AdapterPlan
from slmstack.study.config import StudyConfig
from slmstack.study.data import StudyData

logger = logging.getLogger(__name__)

__all__ = ["Study", "StudyCell", "run_study"]

STUDY = "study.json"


@dataclass(frozen=True)
class StudyCell:
    """One arm with one seed."""

    arm: str
    seed: int

    @property
    def id(self) -> str:
        """A file-safe name."""
        return f"{self.arm}__s{self.seed}"


def cell_order(cfg: StudyConfig) -> list[StudyCell]:
    """The order the cells run in.

    Protocol 2 runs seed by seed, the primary contrast's arms first, then the secondary contrasts' arms, then the rest
    in the recipe's order: a study stopped part-way has whole seeds, and its primary contrast as early as possible.
    The reference arms (another base) run after all of those, seed by seed.
    Protocol 1 runs arm by arm, as it always did.
    """
    if cfg.protocol == 1:
        return [StudyCell(arm, seed) for arm in cfg.arms for seed in cfg.seeds]
    named = [arm for pair in [cfg.primary or [], *cfg.secondary] for arm in pair]
    arms = sorted(cfg.arms, key=lambda a: (named.index(a) if a in named else len(named), cfg.arms.index(a)))
    # the reference arms (another base) after every cell of the study's own arms
    return [StudyCell(arm, seed) for group in (arms, cfg.reference) for seed in cfg.seeds for arm in group]


class Study(StudyData, CellGrid):
    """The cells of a :class:`StudyConfig`, with the adapters they need."""

    kind = "study"
    result_fields = {"cell": dict, "tasks": dict, "train": dict}

    def check_result(self, result: dict[str, Any], where: str) -> None:
        """Each evaluation task's score, item count and 0/1 items (the paired tests read every item)."""
        fields = {"metric": str, "score": (int, float), "n": int, "items": list}
        check_scores(result["tasks"], list(self.cfg.eval), fields, where)
        for name, task in result["tasks"].items():
            if len(task["items"]) != task["n"] or not all(v in (0, 1) for v in task["items"]):
                raise InputError(f"{where}, task {name!r}: 'items' must hold n = {task['n']} scores of 0 or 1. "
                                 "Delete it to rerun the cell.")  # fmt: skip

    def __init__(self, cfg: StudyConfig, out: Path) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.data_dir = cfg.resolve(cfg.data_dir)
        self.cells = cell_order(cfg)
        self._pool: list[dict[str, Any]] | None = None

    # ---- adapters
    def adapter_dir(self, cell: StudyCell, name: str) -> Path:
        """Where one adapter of an arm and seed lives."""
        return self.out / "adapters" / f"{cell.arm}-{name}-s{cell.seed}"

    @property
    def device(self) -> str:  # type: ignore[override]
        """The config's device: where cells load models, and whether a Ray task asks for a GPU."""
        return self.cfg.device

    def ensure_adapters(self, cell: StudyCell) -> dict[str, Path]:
        """Every adapter of the cell's arm, trained now if not cached (a plan's ``after`` first)."""
        arm = ARMS[cell.arm]
        done: dict[str, Path] = {}

        def ensure(name: str) -> Path:
            path = self.adapter_dir(cell, name)
            plan = arm.adapters[name]
            if plan.after:
                ensure(plan.after)
            if not (path / "adapter_model.safetensors").is_file():
                self._train(cell, name, plan, path)
            done[name] = path
            return path

        for name in arm.adapters:
            ensure(name)
        return done

    def _train(self, cell: StudyCell, name: str, plan: AdapterPlan, path: Path) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        from slmstack.arch import get_arch
        from slmstack.models import load_model
        from slmstack.training.train_data import tokenize_example
        from slmstack.training.trainer import train_lora_steps

        t = self.cfg.train
        lm = load_model(self.model_for(cell), device=self.cfg.device, dtype="float32")
        start = time.perf_counter()
        examples = self.examples(cell, plan, lm.tokenizer)  # S2's, RS2's answer stage: written by its stage here
        data_seconds = time.perf_counter() - start
        chat = bool(getattr(lm.tokenizer, "chat_template", None))
        tokenized = [
            tokenize_example(lm.tokenizer, role, prompt, completion, t.max_length, chat)
            for role, prompt, completion in examples
        ]
        rank = max(1, round(t.rank * plan.share))
        steps = train_steps(tokenized, t, plan.share, self.cfg.protocol)
        torch.manual_seed(cell.seed)
        lora = LoraConfig(
            r=rank,
            lora_alpha=t.alpha_per_rank * rank,
            lora_dropout=t.dropout,
            target_modules=get_arch(lm.model).lora_targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(lm.model, lora)
        logger.info(
            "study %s: training adapter %r (r=%d) for %d steps on %d examples",
            cell.id,
            name,
            rank,
            steps,
            len(tokenized),
        )
        stats = train_lora_steps(
            model,
            lm.tokenizer.pad_token_id,
            tokenized,
            steps,
            t.batch_size,
            t.lr,
            seed=cell.seed,
            precision=t.precision,
            show_progress=True,
        )
        record = {
            "arm": cell.arm,
            "seed": cell.seed,
            "adapter": name,
            "rank": rank,
            "steps": steps,
            "examples": len(tokenized),
            "data": list(plan.data),
            **stats,
            "data_seconds": round(data_seconds, 2),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            atomic_write_json(tmp / "train.json", record)

        atomic_dir(path, write)

    # ---- cells
    def stack_config(self, cell: StudyCell, adapters: dict[str, Path]) -> Any:
        """The arm's stack, its stages under their adapters."""
        from slmstack.stack.config import StackConfig

        arm = ARMS[cell.arm]
        if arm.retrieves:
            self.ensure_index()
        stages = self._stages(cell)
        for stage in stages:
            if stage.name in arm.stage_adapter:
                stage.adapter = str(adapters[arm.stage_adapter[stage.name]])
        inputs = ["options"] if self.cfg.protocol == 2 else []  # what the writing stages list
        return StackConfig(name=f"study-{cell.id}", model=self.model_for(cell), device=self.cfg.device, stages=stages,
                           batch_size=self.cfg.batch_size, inputs=inputs, dtype=self.cfg.dtype)  # fmt: skip

    def write_stack(self, cell: StudyCell) -> Path:
        """``stacks/<cell>.yaml``: the arm's trained stack, for ``slmstack run/eval/attribute --stack``."""
        import os

        from slmstack.stack.config import save_stack_config

        path = self.out / "stacks" / f"{cell.id}.yaml"
        adapters = {k: Path(os.path.relpath(v.resolve(), path.parent.resolve()))
                    for k, v in self.ensure_adapters(cell).items()}  # fmt: skip
        config = self.stack_config(cell, adapters)
        if Path(config.model).exists():  # a local model folder, read relative to the working directory
            config.model = str(Path(config.model).resolve())
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_stack_config(config, path)

    def run_cell(self, cell: StudyCell) -> dict[str, Any]:
        """Train what the arm needs, then score its stack on every evaluation task (each item kept)."""
        from slmstack.evaluation.harness import MAIN_METRIC, multiple_choice_items
        from slmstack.evaluation.targets import StackTarget
        from slmstack.evaluation.tasks import get_task, load_docs, select_subset
        from slmstack.stack.runtime import Stack

        path = self.cell_path(cell)
        if path.is_file():
            return self.read_cell(path)
        start = time.perf_counter()
        adapters = self.ensure_adapters(cell)
        train = {
            name: read_json(p / "train.json", "adapter training record", expect=dict) for name, p in adapters.items()
        }
        stack = Stack(self.stack_config(cell, adapters))
        tasks = {}
        partial = self.out / "partial" / cell.id  # one file per finished task: a stopped cell resumes at its next task
        for name, n in self.cfg.eval.items():
            done = partial / f"{name}.json"
            if done.is_file():
                tasks[name] = read_json(
                    done, f"{cell.id}'s {name} result", "Delete it to score the task again.", expect=dict
                )
                logger.info("study %s: %s already scored (%s)", cell.id, name, done)
                continue
            spec = get_task(name)
            docs = select_subset(load_docs(spec, self.data_dir), None, n or None)
            target = StackTarget(stack)
            t0 = time.perf_counter()
            metric = next(m for m in MAIN_METRIC if m in spec.metrics)
            items = multiple_choice_items(spec, docs, target, target.scorer(self.cfg.batch_size))[metric]
            tasks[name] = {
                "metric": metric,
                "score": sum(items) / len(items),
                "n": len(items),
                "items": items,
                "seconds": round(time.perf_counter() - t0, 2),
                "generated_tokens": target.upstream_generated,
            }
            logger.info("study %s: %s %s = %.3f (%d items)", cell.id, name, metric, tasks[name]["score"], len(items))
            atomic_write_json(done, tasks[name])
        result = {
            "cell": asdict(cell),
            "tasks": tasks,
            "train": train,
            "seconds": round(time.perf_counter() - start, 1),
        }
        atomic_write_json(path, result)
        return result

    def prerequisites(self, todo: list[StudyCell]) -> list[list[tuple[str, tuple]]]:
        """On Ray: the passage index, then every cell's adapters (each cell's in one task: a stage after another)."""
        index = [[("ensure_index", ())]] if any(ARMS[c.arm].retrieves for c in todo) else []
        return index + [[("ensure_adapters", (cell,)) for cell in todo if ARMS[cell.arm].adapters]]


def prepare_study(cfg: StudyConfig, out: Path, check_data: bool = True) -> Study:
    """The study in ``out``; ``out`` must be empty or hold the same study (then it resumes)."""
    out = check_dir_ours(Path(out), "study", "study output (--out)", legacy=LEGACY["study"])
    settings = dataclass_to_dict(cfg)
    if (out / STUDY).is_file():
        # a study may gain reference arms (they run after its own cells); everything else must be the same
        # a study recorded before its dtype field existed generated in float32
        recorded = {"dtype": "float32", **read_json(out / STUDY, "study record", expect=dict)}
        if {k: v for k, v in recorded.items() if k != "reference"} != {k: v for k, v in settings.items()
                                                                       if k != "reference"}:  # fmt: skip
            raise ConfigError(f"{out} holds a different study; use another --out")
    study = Study(cfg, out)
    if check_data:
        study.check_data()  # before any model loads, and before anything is written
        claim_dir(out, "study", "study output (--out)")
        study.pool()  # builds the passage index where an arm retrieves
    atomic_write_json(out / STUDY, settings)
    return study


def train_steps(tokenized: list[Any], t: Any, share: float, protocol: int) -> int:
    """Optimizer steps for one adapter.

    Protocol 2: ``epochs`` passes over its examples, so that every answer adapter sees the same number of answer
    examples whatever else it learns. Protocol 1 (as the first study ran): a token budget over whole examples,
    prompt tokens included, so arms whose prompts carry a rationale got fewer steps.
    """
    if protocol == 2:
        return max(1, math.ceil(len(tokenized) * t.epochs / t.batch_size))
    mean_len = sum(len(e.input_ids) for e in tokenized) / len(tokenized)
    return max(1, math.ceil(t.token_budget * share / (t.batch_size * mean_len)))


def _mean_score(result: dict[str, Any]) -> float:
    return sum(t["score"] for t in result["tasks"].values()) / len(result["tasks"])


def run_study(cfg: StudyConfig, out: str | Path, executor: str = "local", report_only: bool = False) -> dict[str, Any]:
    """Every arm's first seed, the extra seeds of the best arms, S2's attribution, and the report.

    ``report_only``: run nothing; write the report (and the trained arms' stack YAMLs) from the cells finished so
    far, naming the cells still to run, and take the attribution only if it is already there.
    """
    from slmstack.study.report import write_report

    if report_only and not (Path(out) / STUDY).is_file():
        raise ConfigError(f"{out} holds no study yet, so there is nothing to report; run the study first")
    study = prepare_study(cfg, Path(out), check_data=not report_only)
    if report_only:
        finished = [study.read_cell(path) for path in sorted(study.out.glob("cells/*.json"))]
        done = {(r["cell"]["arm"], r["cell"]["seed"]): r for r in finished}
        first = [done[(arm, seed)] for arm in cfg.arms for seed in cfg.seeds if (arm, seed) in done]
        if not first:
            raise ConfigError(f"{out}: no cell has finished yet, so there is nothing to report; run the study first")
        complete = len(first) == len(cfg.arms) * len(cfg.seeds)
        best = _best(first, cfg.best) if complete else []
        planned = [(c.arm, c.seed) for c in study.cells] + [(a, s) for a in best for s in cfg.extra_seeds]
        later = cfg.protocol == 1 and cfg.extra_seeds and not complete  # protocol 1 picks them once seed 1 is done
        pending = [f"{a}__s{s}" for a, s in planned if (a, s) not in done] + (["the extra seeds"] if later else [])
        results = list(done.values())
    else:
        first = study.run(executor)
        best, pending = (_best(first, cfg.best) if cfg.protocol == 1 else []), []
        extra = [StudyCell(arm, seed) for arm in best for seed in cfg.extra_seeds if seed not in cfg.seeds]
        results = first + (study.run(executor, extra) if extra else [])
    for result in results:
        cell = StudyCell(result["cell"]["arm"], result["cell"]["seed"])
        if ARMS[cell.arm].adapters:
            study.write_stack(cell)
    attribution = _attribute(study, compute=not report_only) if cfg.attributed_arm else None
    return write_report(study.out, cfg, results, best, attribution, pending)


def _best(first: list[dict[str, Any]], n: int) -> list[str]:
    """The ``n`` arms with the highest mean over the tasks on their first seed."""
    return [r["cell"]["arm"] for r in sorted(first, key=_mean_score, reverse=True)[:n]]


def _attribute(study: Study, compute: bool = True) -> dict[str, Any] | None:
    """S2's attribution: read back when it is there, else run (or None when ``compute`` is off)."""
    from slmstack.evaluation.attribution import attribute, markdown, plot
    from slmstack.stack.runtime import Stack

    folder = study.out / "attribution"
    if (folder / "attribution.json").is_file():
        return read_json(folder / "attribution.json", "attribution report", expect=dict)
    if not compute:
        return None
    a = study.cfg.attribute
    cell = StudyCell(study.cfg.attributed_arm, study.cfg.seeds[0])
    stack = Stack(study.stack_config(cell, study.ensure_adapters(cell)))
    start = time.perf_counter()
    report = attribute(stack, [a.task], study.data_dir, limit=a.limit)
    report["seconds"] = round(time.perf_counter() - start, 1)
    folder.mkdir(parents=True, exist_ok=True)
    plot(report, folder / "attribution.png")
    atomic_write_text(folder / "attribution.md", markdown(report))
    atomic_write_json(folder / "attribution.json", report)
    return json.loads(json.dumps(report))
