"""Training throughput: slmstack's stage trainer vs a naive HF Trainer baseline.

Both train the same LoRA config (r=8, every attention and MLP projection) on the default model, on
the same prompt/completion pairs (GPTeacher role-play: instruction -> response, loss on the response
only), with the same batch size and number of optimizer steps. The baseline is HF ``Trainer`` with
every example padded to ``max_length``; slmstack groups by length, pads to the batch's longest row and
computes the LM head only at target positions. The figure is non-padding tokens trained per second.

    python benchmarks/train_throughput.py --n 64 --steps 8 --batch-size 8 --max-length 256

With ``--nproc N``: ``slmstack train`` as one process, then as N processes under ``torchrun`` (data parallel, gloo on
a CPU), at the same global batch; the figure is the N-process run's tokens per second over the one-process run's.
On a 2-core machine two processes share the cores the one process already used, so this shows that the path runs,
not a speed-up.

    python benchmarks/train_throughput.py --nproc 2 --n 32 --steps 4 --batch-size 8 --max-length 128
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_stage_data(src: Path, n: int, out: Path) -> Path:
    rows = json.loads(src.read_text())[:n]
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": i, "prompt": r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""),
                         "completion": r["response"]}) for i, r in enumerate(rows)]  # fmt: skip
    (out / "answer.jsonl").write_text("\n".join(lines) + "\n")
    return out


def run_ours(data: Path, work: Path, args: argparse.Namespace, precision: str) -> dict:
    from slmstack.stack.config import GenerationSettings, StackConfig, StageConfig
    from slmstack.training.trainer import TrainConfig, train_stack

    stack = StackConfig(model="default", stages=[StageConfig(name="answer", role="", template="{input}",
                                                             generation=GenerationSettings())])  # fmt: skip
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, rank=8, alpha=16,
                      dropout=0.0, eval_fraction=0.0, target_modules=TARGETS, precision=precision,
                      checkpoint_every=10_000)  # fmt: skip
    out = work / f"ours-{precision}"
    train_stack(stack, data, out, cfg, overwrite=True)
    done = json.loads((out / "answer" / "done.json").read_text())
    return {"trainer": f"slmstack ({precision})", "tokens": done["tokens"], "seconds": done["train_seconds"]}


def run_hf(data: Path, work: Path, args: argparse.Namespace, precision: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from slmstack.models import load_model
    from slmstack.training.train_data import collate, load_stage_records, tokenize_example

    lm = load_model("default", device="cpu", dtype="float32")
    records = load_stage_records(data / "answer.jsonl")
    chat = bool(lm.tokenizer.chat_template)
    rows = [tokenize_example(lm.tokenizer, "", r.prompt, r.completion, args.max_length, chat) for r in records]
    counted = {"tokens": 0}

    def pad_to_max(batch):  # the naive baseline: every row padded to max_length
        out = collate(batch, lm.tokenizer.pad_token_id, pad_to=args.max_length)
        counted["tokens"] += int(out["attention_mask"].sum())
        return out

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.start

    torch.manual_seed(0)
    model = get_peft_model(lm.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"))  # fmt: skip
    targs = TrainingArguments(output_dir=str(work / f"hf-{precision}"), per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps, learning_rate=2e-4, logging_steps=1000, save_strategy="no",
                              report_to=[], bf16=precision == "bf16", use_cpu=True, dataloader_num_workers=0,
                              remove_unused_columns=False, disable_tqdm=True)  # fmt: skip
    timer = Timer()
    Trainer(model=model, args=targs, train_dataset=rows, data_collator=pad_to_max, callbacks=[timer]).train()
    return {"trainer": f"HF Trainer, pad to max_length ({precision})", "tokens": counted["tokens"],
            "seconds": round(timer.seconds, 2)}  # fmt: skip


def run_processes(data: Path, work: Path, args: argparse.Namespace, nproc: int) -> dict:
    """``slmstack train`` on ``nproc`` processes (torchrun from 2 up), fp32; its tokens and train seconds."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml

    stack = work / "stack.yaml"
    stack.write_text(yaml.safe_dump({"name": "bench", "model": "default",
                                     "stages": [{"name": "answer", "template": "{input}"}]}))  # fmt: skip
    out = work / f"procs-{nproc}"
    bin_dir = Path(sys.executable).parent
    argv = [str(bin_dir / "slmstack"), "train", "--stack", str(stack), "--data", str(data), "--out", str(out),
            "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
            str(args.max_length), "--rank", "8", "--alpha", "16", "--dropout", "0", "--eval-fraction", "0",
            "--precision", "fp32", "--checkpoint-every", "10000"]  # fmt: skip
    if nproc > 1:
        torchrun = shutil.which("torchrun", path=str(bin_dir)) or "torchrun"
        argv = [torchrun, "--standalone", "--nproc_per_node", str(nproc), *argv]
    threads = max(1, (os.cpu_count() or 1) // nproc)  # the cores shared out, not oversubscribed
    subprocess.run(argv, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    done = json.loads((out / "answer" / "done.json").read_text())
    return {"trainer": f"slmstack train, {nproc} process{'es' if nproc > 1 else ''}", "tokens": done["tokens"],
            "seconds": done["train_seconds"], "threads_per_process": threads}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        type=Path,
        default=HERE.parent.parent / "shared/data/gpteacher/roleplay-simple-deduped-roleplay-instruct.json",
    )
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--nproc", type=int, default=0, help="compare slmstack train on 1 and N processes (torchrun)")
    args = p.parse_args()

    from slmstack.io import atomic_write_json

    work = Path(tempfile.mkdtemp(prefix="slmstack-train-bench-"))
    data = write_stage_data(args.data, args.n, work / "data")
    if args.nproc > 1:
        runs = [run_processes(data, work, args, 1), run_processes(data, work, args, args.nproc)]
        for r in runs:
            r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
        ratio = round(runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"], 2)
        out = args.out or HERE / "results" / "train_throughput_ddp.json"
        atomic_write_json(out, {"benchmark": "train_throughput_ddp", "model": "default (SmolLM2-135M-Instruct, fp32)",
                                "settings": {k: getattr(args, k) for k in ("n", "steps", "batch_size", "max_length",
                                                                          "nproc")},
                                "cpu_count": __import__("os").cpu_count(), "runs": runs,
                                f"{args.nproc}_processes_over_1": ratio})  # fmt: skip
        print(f"{'run':<36}{'non-pad tokens':>15}{'seconds':>9}{'tokens/s':>10}")
        for r in runs:
            print(f"{r['trainer']:<36}{r['tokens']:>15}{r['seconds']:>9}{r['tokens_per_s']:>10}")
        print(f"{args.nproc} processes / 1 process (tokens per second, same global batch): {ratio}\nwrote {out}")
        return
    runs, ratios = [], {}
    for precision in args.precisions.split(","):
        hf, ours = run_hf(data, work, args, precision), run_ours(data, work, args, precision)
        for r in (hf, ours):
            r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
        runs += [hf, ours]
        ratios[precision] = round(ours["tokens_per_s"] / hf["tokens_per_s"], 2)
    report = {"benchmark": "train_throughput", "model": "default (SmolLM2-135M-Instruct, fp32 weights)",
              "settings": {k: getattr(args, k) for k in ("n", "steps", "batch_size", "max_length")},
              "runs": runs, "slmstack_over_hf_trainer": ratios}  # fmt: skip
    args.out = args.out or HERE / "results" / "train_throughput.json"
    atomic_write_json(args.out, report)
    print(f"{'trainer':<42}{'non-pad tokens':>15}{'seconds':>9}{'tokens/s':>10}")
    for r in runs:
        print(f"{r['trainer']:<42}{r['tokens']:>15}{r['seconds']:>9}{r['tokens_per_s']:>10}")
    print(f"slmstack / HF Trainer (non-padding tokens per second): {ratios}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
