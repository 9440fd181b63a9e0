"""``slmstack attribute``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slmstack.cli.common import VERBS, add_stack_args
from slmstack.errors import InputError


def _attribute_args(p: argparse.ArgumentParser) -> None:
    add_stack_args(p)
    p.add_argument("--tasks", required=True, help="comma-separated multiple-choice tasks, e.g. ecqa,qasc")
    p.add_argument("--data-dir", type=Path, help="folder with the tasks' local files (e.g. ../shared/data)")
    p.add_argument("--subset", choices=["tiny", "full"], help="tiny = a fixed, seeded subset per task")
    p.add_argument("--limit", type=int, help="at most N items per task")
    p.add_argument("--stages", help="upstream stages to attribute (default: all)")
    p.add_argument("--interventions", help="comma-separated: skip, placebo, base, oracle (default: all that apply)")
    p.add_argument("--seed", type=int, default=0, help="the placebo's derangement and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95 %% intervals")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, required=True, help="folder for attribution.json, .md and .png")


def _names(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise InputError(f"{flag} is empty; name at least one")
    return names


def attribute_cmd(args: argparse.Namespace) -> int:
    """Replace each upstream stage's output in turn and report what the final stage's score does."""
    from slmstack.evaluation.attribution import attribute, markdown, plot
    from slmstack.evaluation.tasks import get_task
    from slmstack.io import atomic_write_json, atomic_write_text
    from slmstack.ownership import LEGACY, check_dir_ours, claim_dir

    tasks = _names(args.tasks, "--tasks")
    for task in tasks:  # unknown tasks fail before any model loads
        get_task(task)
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--bootstrap", args.bootstrap)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: must be at least 1")
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: must be >= 0")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise InputError(f"{args.data_dir}: --data-dir is not a directory; pass the folder holding the tasks' files")
    out = check_dir_ours(args.out, "attribute", "--out folder", legacy=LEGACY["attribute"])
    from slmstack.evaluation.attribution import check_request, default_interventions
    from slmstack.stack.config import load_stack_config
    from slmstack.stack.runtime import Stack

    config = load_stack_config(args.stack, args.overrides)
    interventions = _names(args.interventions, "--interventions")
    specs = [get_task(t) for t in tasks]
    check_request(config, specs, _names(args.stages, "--stages"), interventions or default_interventions(specs))

    stack = Stack(config)
    report = attribute(stack, tasks, args.data_dir, args.limit, args.subset, _names(args.stages, "--stages"),
                       interventions, args.seed, args.bootstrap, args.batch_size)  # fmt: skip
    claim_dir(out, "attribute", "--out folder")
    atomic_write_json(out / "attribution.json", report)
    atomic_write_text(out / "attribution.md", markdown(report))
    plot(report, out / "attribution.png")
    print(markdown(report))
    print(json.dumps({"out": str(out), "files": ["attribution.json", "attribution.md", "attribution.png"]}))
    return 0


VERBS.add("attribute", (_attribute_args, attribute_cmd, "what each upstream stage of a stack contributes to a task"))
