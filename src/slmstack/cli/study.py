"""``slmstack study``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slmstack.cli.common import VERBS


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="study YAML (see recipes/stack_study.yaml)")
    p.add_argument("--out", type=Path, required=True, help="study directory: adapters, cells, results, attribution")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set seeds=[0] --set train.token_budget=50000")  # fmt: skip
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="cells one after another (local), or as Ray tasks (ray; RAY_ADDRESS: a cluster)")  # fmt: skip
    p.add_argument("--report", action="store_true",
                   help="run nothing: write the report from the cells finished so far, naming the rest")  # fmt: skip


def study_cmd(args: argparse.Namespace) -> int:
    """Run (or resume) the stacking study and print where its report is."""
    from slmstack.study.config import load_study_config
    from slmstack.study.run import run_study

    cfg = load_study_config(args.config, args.overrides)
    summary = run_study(cfg, args.out, args.executor, report_only=args.report)
    means = {arm: round(s["mean"]["mean"], 4) for arm, s in summary["scores"].items()}
    print(json.dumps({"results": str(args.out / "results.md"), "mean_accuracy": means, "best": summary["best"]},
                     indent=2))  # fmt: skip
    return 0


VERBS.add("study", (_study_args, study_cmd, "does stacking help? arms A0-A3 and a two-stage stack, same budget"))
