"""``slmstack eval`` and ``slmstack compare``."""

from __future__ import annotations

import argparse
from pathlib import Path

from slmstack.cli.common import VERBS, add_stack_args
from slmstack.errors import InputError
from slmstack.ownership import chart_proof, check_file_ours


def _eval_args(p: argparse.ArgumentParser) -> None:
    add_stack_args(p)
    p.add_argument("--model", help="evaluate a model reference instead of a stack")
    p.add_argument("--adapter", type=Path, help="a peft LoRA adapter to apply to --model")
    p.add_argument("--tasks", required=True, help="comma-separated task names or task YAML paths")
    p.add_argument("--data-dir", type=Path, help="folder with the tasks' local files (e.g. ../shared/data)")
    p.add_argument("--subset", choices=["tiny", "full"], help="tiny = a fixed, seeded 100-item subset per task")
    p.add_argument("--limit", type=int, help="at most N items per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, required=True, help="results JSON (a .md table is written beside it)")


def eval_cmd(args: argparse.Namespace) -> int:
    """Evaluate a model, model + adapter, or stack and write results."""
    from slmstack.evaluation.harness import check_results_paths, evaluate, markdown_table, write_results
    from slmstack.evaluation.targets import ModelTarget, StackTarget
    from slmstack.evaluation.tasks import get_task

    if args.adapter and not args.model:
        raise InputError("--adapter applies to --model; for a stack, set adapters in its YAML")
    if args.model and (args.stack or [o for o in args.overrides if not o.startswith("engine=")]):
        raise InputError("give either --model (with --adapter) or --stack, not both")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise InputError("--tasks is empty; name tasks such as arc_easy,hellaswag or task YAML paths")
    from slmstack.evaluation.groups import expand
    from slmstack.evaluation.tasks import ensure_builtins

    ensure_builtins()
    for task in expand(tasks)[0]:  # fail on unknown tasks and bad paths before loading a model
        get_task(task)
    check_results_paths(args.out)  # before any model loads: a foreign file there is refused, untouched
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise InputError(f"{args.data_dir}: --data-dir is not a directory; pass the folder holding the tasks' files")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: must be at least 1")
    if args.model:
        target = ModelTarget.from_ref(args.model, args.adapter, engine=args.engine)
    else:
        from slmstack.stack.runtime import Stack

        target = StackTarget(Stack.from_config(args.stack, args.overrides, job="score"))
    results = evaluate(target, tasks, args.data_dir, args.subset, args.limit, args.batch_size)
    out, md = write_results(results, args.out)
    print(markdown_table(results) + f"\nwrote {out} and {md}")
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="results JSON files from slmstack eval")
    p.add_argument("--png", type=Path, default=Path("compare.png"), help="bar chart output (default compare.png)")


def compare_cmd(args: argparse.Namespace) -> int:
    """Print a side-by-side table and write a bar chart."""
    from slmstack.evaluation.compare import compare_table, load_runs, plot_runs

    check_file_ours(args.png, "--png chart", chart_proof)
    if args.png.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise InputError(f"{args.png}: --png must end in .png, .pdf or .svg")
    runs = load_runs(args.runs)
    print(compare_table(runs))
    print(f"wrote {plot_runs(runs, args.png)}")
    return 0


VERBS.add("eval", (_eval_args, eval_cmd, "zero-shot benchmarks for a model, model + adapter, or stack"))
VERBS.add("compare", (_compare_args, compare_cmd, "compare eval result files side by side, with a bar chart"))
