"""``slmstack transfer``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slmstack.cli.common import VERBS, add_engine_arg


def _transfer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="study YAML (see recipes/transfer_smoke.yaml)")
    p.add_argument("--out", type=Path, required=True, help="study directory: checkpoints, cells, results")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set seeds=[0] --set train.steps=20")  # fmt: skip
    add_engine_arg(p)
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="cells one after another (local), or as Ray tasks (ray; RAY_ADDRESS: a cluster)")  # fmt: skip


def transfer_cmd(args: argparse.Namespace) -> int:
    """Run the transfer grid (resuming what --out holds) and print the headline comparisons."""
    from slmstack.transfer.config import load_transfer_config
    from slmstack.transfer.run import transfer

    cfg = load_transfer_config(args.config, args.overrides)
    if args.engine != "auto":
        cfg.engine = args.engine
    summary = transfer(cfg, args.out, args.executor)
    rows = [{"comparison": r["comparison"], "split": r["split"], "instructions": r["instructions"], "k": r["k"],
             "relative_percent": round(r["relative_percent"]["mean"], 2)} for r in summary["relative"]]  # fmt: skip
    print(json.dumps({"results": str(args.out / "results.md"), "relative": rows}, indent=2))
    return 0


VERBS.add("transfer", (_transfer_args, transfer_cmd, "multi-task, instruction and few-shot transfer study"))
