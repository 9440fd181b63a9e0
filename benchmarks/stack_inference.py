"""Stack inference: sequential vs batched, and the memory of a stack vs its base model alone.

Runs each mode in its own subprocess so peak RSS (VmHWM) is measured cleanly:

* ``sequential``: the default 4-stage stack with a LoRA adapter on every stage, one question at a time;
* ``batched``:    the same stack, all questions at once (on the engine: continuous, each question moving to its
  next stage as soon as a stage ends, so rows of different stages, under different adapters, share steps);
* ``base``:       the base model alone (no peft, no adapters) generating the same stage prompts, batched;
* ``batched_hf``, ``base_hf``: the same two on transformers' ``generate`` (``engine: hf``, stage by stage);
* ``alternating``: ``base`` and ``batched`` in one process, in turn ``--repeats`` times, each one's best wall time
  (the separate runs' ratio moves with this VM's speed from minute to minute; this one puts both under the same);
* ``lora_cost``: what the engine's LoRA costs in ``batched``, against its floor. Three forms of the same run, in
  turn in one process: the engine as it is (each row under its stage's adapter, mixed in steps), every token under
  one adapter (the single-adapter form: two of torch's products a projection, the least any mix of adapters can
  cost when built from them), and LoRA skipped. The adapters' B = 0, so all three generate the same text in the
  same steps; each step's best time over ``--repeats`` turns, summed per form.

The adapters are freshly initialised peft LoRA adapters (r=8 on every attention and MLP projection,
B = 0 as peft initialises them), so the text equals the untrained stack's while every token pays
the adapter cost. Writes JSON and prints a table.

    python benchmarks/stack_inference.py --data ../shared/data/arc_easy/arc_easy.jsonl --n 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def proc_status_mb(field: str, pid: int | str = "self") -> float:
    """A memory field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``, ...) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return proc_status_mb("VmHWM")


def load_questions(path: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["query"].removeprefix("Question: ").strip() for r in rows[:n]]


def make_adapters(out: Path, stages: list[str], rank: int) -> dict[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model

    from slmstack.arch import get_arch
    from slmstack.models import load_model

    paths = {}
    for i, name in enumerate(stages):
        torch.manual_seed(i)
        lm = load_model("default", device="cpu")
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=get_arch(lm.model).lora_targets)
        get_peft_model(lm.model, cfg).save_pretrained(out / name)
        paths[name] = str(out / name)
    return paths


def child(args: argparse.Namespace) -> None:
    import torch

    from slmstack.stack.runtime import Stack

    torch.set_num_threads(args.threads)
    questions = load_questions(args.data, args.n)
    stack = Stack.from_config(args.stack, ["engine=hf"] if args.mode.endswith("_hf") else [])
    start = time.perf_counter()
    if args.mode == "sequential":
        results = [stack(q) for q in questions]
    else:
        results = stack.run_batch(questions, batch_size=args.batch_size)
    wall = time.perf_counter() - start
    tokens = sum(t.tokens_out for r in results for t in r.trace)
    report = {
        "mode": args.mode, "questions": len(questions), "generated_tokens": tokens, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
        "answers": [r.answer for r in results],
    }  # fmt: skip
    print(json.dumps(report))


def child_alternating(args: argparse.Namespace) -> None:
    """The bare base and the stack in one process, run in turn ``--repeats`` times: each one's best wall time.

    This VM's speed drifts by several percent between minutes, which the separate runs above see as noise in their
    ratio; alternating in one process puts both under the same drift.
    """
    import torch

    from slmstack.stack.runtime import Stack

    torch.set_num_threads(args.threads)
    questions = load_questions(args.data, args.n)
    stacks = {"base": Stack.from_config(args.stack.with_name("base.yaml"), []),
              "batched": Stack.from_config(args.stack, [])}  # fmt: skip
    walls: dict[str, list[float]] = {mode: [] for mode in stacks}
    tokens: dict[str, int] = {}
    for stack in stacks.values():  # warm-up
        stack.run_batch(questions[:4], batch_size=args.batch_size)
    for _ in range(args.repeats):
        for mode, stack in stacks.items():
            start = time.perf_counter()
            results = stack.run_batch(questions, batch_size=args.batch_size)
            walls[mode].append(round(time.perf_counter() - start, 2))
            tokens[mode] = sum(t.tokens_out for r in results for t in r.trace)
    best = {mode: min(w) for mode, w in walls.items()}
    rate = {mode: tokens[mode] / best[mode] for mode in stacks}
    print(json.dumps({"mode": "alternating", "repeats": args.repeats, "walls_s": walls, "best_s": best,
                      "generated_tokens": tokens,
                      "stack_over_base_tokens_per_s": round(rate["batched"] / rate["base"], 3)}))  # fmt: skip


def child_lora_cost(args: argparse.Namespace) -> None:
    """The stack's decoder time with its LoRA adapters mixed as the engine runs them, all on one adapter, and off.

    Measurement only: it swaps the engine's ``lora_add`` and ``StepAdapters.for_tokens`` for the other two forms.
    """
    import torch

    from slmstack.engine import lora as engine_lora
    from slmstack.engine import model as engine_model
    from slmstack.stack.runtime import Stack

    torch.set_num_threads(args.threads)
    questions = load_questions(args.data, args.n)
    stack = Stack.from_config(args.stack, [])
    stack.run_batch(questions[:4], batch_size=args.batch_size)  # warm-up (and the engine is built)
    real_forward, real_add, real_for_tokens = (engine_model.Decoder.forward, engine_model.lora_add,
                                               engine_lora.StepAdapters.__dict__["for_tokens"])  # fmt: skip

    def one_adapter(
        cls: type, adapters: list[int], n_decode: int, device: torch.device, kernel: bool = False
    ) -> object:
        return cls(single=1)

    def skipped(*_: object) -> None:
        return None

    forms = {"mixed": (real_add, real_for_tokens), "one_adapter": (real_add, classmethod(one_adapter)),
             "off": (skipped, real_for_tokens)}  # fmt: skip
    step_times: list[float] = []

    def timed(self: object, step: object) -> object:
        start = time.perf_counter()
        out = real_forward(self, step)
        step_times.append(time.perf_counter() - start)
        return out

    runs: dict[str, list[list[float]]] = {form: [] for form in forms}
    answers: dict[str, list[str]] = {}
    engine_model.Decoder.forward = timed
    try:
        for _ in range(args.repeats):
            for form, (add, for_tokens) in forms.items():
                engine_model.lora_add, engine_lora.StepAdapters.for_tokens = add, for_tokens
                step_times.clear()
                answers[form] = [r.answer for r in stack.run_batch(questions, batch_size=args.batch_size)]
                runs[form].append(list(step_times))
    finally:
        engine_model.Decoder.forward, engine_model.lora_add = real_forward, real_add
        engine_lora.StepAdapters.for_tokens = real_for_tokens
    steps = {form: {len(r) for r in times} for form, times in runs.items()}
    if any(s != steps["off"] or len(s) != 1 for s in steps.values()):
        raise SystemExit(f"the forms ran different steps: {steps}; the adapters must have B = 0")
    best = {form: sum(min(step) for step in zip(*times, strict=True)) for form, times in runs.items()}
    print(json.dumps({"mode": "lora_cost", "repeats": args.repeats, "steps": len(runs["off"][0]),
                      "decoder_s": {form: round(s, 2) for form, s in best.items()},
                      "same_answers": all(a == answers["off"] for a in answers.values()),
                      "mixed_over_off": round(best["off"] / best["mixed"], 3),
                      "one_adapter_over_off": round(best["off"] / best["one_adapter"], 3)}))  # fmt: skip


def run_child(mode: str, stack_yaml: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--stack", str(stack_yaml), "--data", str(args.data),
           "--n", str(args.n), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared/data/arc_easy/arc_easy.jsonl")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32, help="per stage, to bound the sequential run")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "stack_inference.json")
    p.add_argument("--modes", default="base,batched,sequential,base_hf,batched_hf,alternating,lora_cost",
                   help="which runs (a subset: only the ratios they give are reported)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="turns each of the alternating run")
    p.add_argument(
        "--child", choices=["sequential", "batched", "base", "batched_hf", "base_hf", "alternating", "lora_cost"]
    )
    p.add_argument("--stack", type=Path)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        children = {"alternating": child_alternating, "lora_cost": child_lora_cost}
        return children.get(args.child, child)(args)

    from slmstack.io import atomic_write_json
    from slmstack.stack.config import load_stack_config

    work = Path(tempfile.mkdtemp(prefix="slmstack-bench-"))
    base_cfg = yaml.safe_load(Path(load_stack_config().source).read_text())
    for stage in base_cfg["stages"]:
        stage["generation"]["max_new_tokens"] = args.max_new_tokens
    (work / "base.yaml").write_text(yaml.safe_dump(base_cfg))
    adapters = make_adapters(work / "adapters", [s["name"] for s in base_cfg["stages"]], args.rank)
    for stage in base_cfg["stages"]:
        stage["adapter"] = adapters[stage["name"]]
    (work / "stack.yaml").write_text(yaml.safe_dump(base_cfg))

    runs = {mode: run_child(mode, work / ("base.yaml" if mode.startswith("base") else "stack.yaml"), args)
            for mode in args.modes.split(",")}  # fmt: skip

    def ratio(a: str, b: str, field: str = "tokens_per_s", digits: int = 3) -> float | None:
        return round(runs[a][field] / runs[b][field], digits) if a in runs and b in runs else None

    def same(a: str, b: str) -> bool | None:
        return runs[a]["answers"] == runs[b]["answers"] if a in runs and b in runs else None

    summary = {
        "batched_over_sequential_tokens_per_s": ratio("batched", "sequential", digits=2),
        "stack_over_base_tokens_per_s": ratio("batched", "base"),
        "stack_over_base_alternating": runs.get("alternating", {}).get("stack_over_base_tokens_per_s"),
        "decoder_time_lora_off_over_mixed": runs.get("lora_cost", {}).get("mixed_over_off"),
        "decoder_time_lora_off_over_one_adapter": runs.get("lora_cost", {}).get("one_adapter_over_off"),
        "engine_over_hf_batched_stack": ratio("batched", "batched_hf", digits=2),
        "hf_stack_over_hf_base_tokens_per_s": ratio("batched_hf", "base_hf"),
        "stack_over_base_peak_rss": ratio("batched", "base", "peak_rss_mb"),
        "sequential_stack_over_base_peak_rss": ratio("sequential", "base", "peak_rss_mb"),
        "same_answers_batched_vs_sequential": same("batched", "sequential"),
        "same_answers_stack_vs_base": same("batched", "base"),
    }
    settings = {k: getattr(args, k) for k in ("n", "batch_size", "max_new_tokens", "rank", "threads")}
    report = {"benchmark": "stack_inference", "model": "default (SmolLM2-135M-Instruct Q4_1, dequantized fp32)",
              "data": str(args.data), "settings": settings, "runs": runs, "summary": summary}  # fmt: skip
    atomic_write_json(args.out, report)
    print(f"{'mode':<12}{'tokens':>8}{'wall s':>9}{'tok/s':>8}{'peak RSS MB':>13}")
    for mode, r in runs.items():
        if mode == "alternating":
            print(f"{mode:<12}{'':>8}{str(r['best_s']):>30}  (best of {r['repeats']} turns each)")
            continue
        if mode == "lora_cost":
            print(f"{mode:<12}{r['steps']:>8} steps, decoder s {r['decoder_s']} (per-step best of {r['repeats']})")
            continue
        print(f"{mode:<12}{r['generated_tokens']:>8}{r['wall_s']:>9}{r['tokens_per_s']:>8}{r['peak_rss_mb']:>13}")
    for key, value in summary.items():
        print(f"{key}: {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
