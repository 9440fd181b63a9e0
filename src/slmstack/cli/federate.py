"""``slmstack federate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slmstack.cli.common import VERBS


def _federate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="federation YAML (see recipes/federate_smoke.yaml)")
    p.add_argument("--out", type=Path, required=True, help="run directory: plan, checkpoints, adapters, metrics")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set rounds=3 --set strategy=heterofl")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished round")
    p.add_argument("--prepare-only", action="store_true",
                   help="write blocks, partitions and plan.json, then stop (for flwr run)")  # fmt: skip


def federate_cmd(args: argparse.Namespace) -> int:
    """Prune the blocks, partition the data, and run federated LoRA on Flower's simulation engine."""
    from slmstack.federated.config import load_federate_config, require_flwr
    from slmstack.federated.plan import PLAN, load_plan
    from slmstack.ownership import LEGACY, check_dir_ours

    cfg = load_federate_config(args.config, args.overrides)
    check_dir_ours(args.out, "federate", "--out run directory", legacy=LEGACY["federate"])
    from slmstack.federated.run import check_inputs, federate, prepare

    if args.resume and (args.out / PLAN).is_file():
        load_plan(args.out)  # a damaged plan is named before Flower is needed
    else:
        check_inputs(cfg)  # the data, its column and the blocks, before Flower is needed
    require_flwr()

    if args.prepare_only:
        plan = prepare(cfg, args.out, resume=args.resume)
        print(json.dumps({"run_dir": str(args.out.resolve()), "clients": len(plan.clients), "rounds": plan.rounds}))
        return 0
    metrics = federate(cfg, args.out, resume=args.resume)
    last = metrics["rounds"][-1]
    print(json.dumps({"strategy": metrics["strategy"], "rounds": last["round"], "eval_loss": last["eval_loss"],
                      "eval_loss_round_0": metrics["rounds"][0]["eval_loss"],
                      "bytes_up_per_round": last.get("bytes_up"), "full_model_bytes": metrics["full_model_bytes"],
                      "global_adapter": str(args.out / "global_adapter"),
                      "stack": str(args.out / "recombined_stack.yaml")}, indent=2))  # fmt: skip
    return 0


VERBS.add("federate", (_federate_args, federate_cmd, "federated LoRA fine-tuning of pruned blocks on Flower"))
