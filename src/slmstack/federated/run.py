"""Prepare a federated run (blocks, partitions, plan) and run it on Flower's simulation engine.

:func:`prepare` prunes each client's block from the large model (or takes it from a ``slmstack prune``
output with its masks), splits the data into a held-out set and seeded client partitions, and writes
``plan.json``. :func:`federate` then runs the ServerApp and the ClientApps with
``flwr.simulation.run_simulation``; the same apps run unchanged under ``flwr run`` (see
``docs/federated.md``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slmstack.errors import ConfigError, InputError, SlmstackError
from slmstack.federated.config import FederateConfig
from slmstack.federated.data import (
    check_partition,
    load_records,
    partition_records,
    plot_partitions,
    split_heldout,
    write_records,
)
from slmstack.federated.plan import PLAN, Plan, load_plan, save_plan
from slmstack.io import check_input_file, read_json
from slmstack.ownership import LEGACY, check_dir_ours, claim_dir

logger = logging.getLogger(__name__)

__all__ = ["check_inputs", "federate", "prepare"]


class FederationFailedError(SlmstackError):
    """A federated run finished without accepting a single client update."""


def _given_block(cfg: FederateConfig, spec: Any) -> dict[str, Any]:
    """A client block taken from a ``slmstack prune`` output: its directory, masks and sparsity."""
    from slmstack.pruning.export import read_report

    block = cfg.resolve(spec.block)
    fix = "A block directory must be a slmstack prune output (it holds masks.safetensors)."
    masks = check_input_file(block / "masks.safetensors", "block masks", fix)
    sparsity = read_report(block).get("actual_sparsity", spec.sparsity)
    return {"model": str(block.resolve()), "masks": str(masks.resolve()), "sparsity": sparsity}


def check_inputs(cfg: FederateConfig) -> list[dict[str, Any]]:
    """Check what the config points at, without Flower: the data, its column, the blocks, given LoRA targets.

    Returns:
        The records (so :func:`prepare` reads them once).
    """
    data = cfg.data
    records = load_records(cfg.resolve(data.path), data.limit, cfg.seed)
    check_partition(records, len(cfg.clients), data.partition, data.column)
    for spec in cfg.clients:
        if spec.block is not None:
            _given_block(cfg, spec)
    if cfg.calibration is not None:
        check_input_file(cfg.resolve(cfg.calibration), "calibration file")
    if cfg.train.target_modules is not None:  # given by the user: each must name a linear layer, as train checks
        from slmstack.models import load_model
        from slmstack.training.trainer import check_target_modules

        model = load_model(cfg.model, device="cpu", dtype="float32").model
        check_target_modules(model, cfg.train.target_modules, "train.target_modules")
    return records


def _blocks(cfg: FederateConfig, out: Path) -> list[dict[str, Any]]:
    """Each client's model (a block directory or the dense model) and masks, pruning what is missing."""
    from slmstack.models import load_model
    from slmstack.pruning.engine import load_calibration, prune
    from slmstack.pruning.export import save_pruned

    blocks = []
    calibration_path = cfg.resolve(cfg.calibration)
    for i, spec in enumerate(cfg.clients):
        if spec.block is not None:
            blocks.append(_given_block(cfg, spec))
        elif spec.sparsity == 0:
            blocks.append({"model": cfg.model, "masks": None, "sparsity": 0.0})
        else:
            target = out / "blocks" / f"client_{i}"
            if not (target / "masks.safetensors").is_file():
                lm = load_model(cfg.model, device="cpu", dtype="float32")
                calibration = None
                if calibration_path is not None:
                    calibration = load_calibration(lm.tokenizer, calibration_path, 16, 128, cfg.seed)
                result = prune(lm.model, cfg.pruning_method, spec.sparsity, calibration=calibration)
                save_pruned(result, lm.tokenizer, target, overwrite=True)
            blocks.append({"model": str(target.resolve()), "masks": str((target / "masks.safetensors").resolve()),
                           "sparsity": spec.sparsity})  # fmt: skip
    return blocks


def prepare(cfg: FederateConfig, out: str | Path, resume: bool = False) -> Plan:
    """Write the blocks, the partitions (and their histogram PNG) and ``plan.json`` into ``out``.

    Raises:
        ConfigError: ``out`` holds another run (without ``resume``), or a bad partition setting.
    """
    out = check_dir_ours(Path(out), "federate", "federation output (--out)", legacy=LEGACY["federate"])
    if (out / PLAN).is_file() and not resume:
        raise ConfigError(f"{out} already holds a federated run. Pass --resume to continue it, or use another --out.")
    if resume and (out / PLAN).is_file():
        return load_plan(out)
    data = cfg.data
    records = check_inputs(cfg)
    claim_dir(out, "federate", "federation output (--out)")  # an interrupted prepare's own files are redone
    train, heldout = split_heldout(records, data.eval_fraction, cfg.seed)
    parts = partition_records(train, len(cfg.clients), data.partition, data.column, data.alpha, cfg.seed)
    blocks = _blocks(cfg, out)  # checks given blocks, prunes the others
    for i, part in enumerate(parts):
        write_records(out / "partitions" / f"client_{i}.jsonl", part)
    write_records(out / "partitions" / "heldout.jsonl", heldout)
    plot_partitions(parts, data.column, out / "partitions.png")
    clients = [{**b, "data": str((out / "partitions" / f"client_{i}.jsonl").resolve()), "records": len(parts[i])}
               for i, b in enumerate(blocks)]  # fmt: skip
    plan = Plan(model=cfg.model, clients=clients, heldout_path=str((out / "partitions" / "heldout.jsonl").resolve()),
                train=asdict(cfg.train), strategy=cfg.strategy, rank_return=cfg.rank_return, rounds=cfg.rounds,
                min_clients=cfg.min_clients, seed=cfg.seed, round_timeout=cfg.round_timeout,
                privacy=asdict(cfg.privacy), column=data.column,
                secure=asdict(cfg.secure_aggregation), device=cfg.device)  # fmt: skip
    save_plan(plan, out)
    return plan


def simulation_backend(plan: Plan) -> dict[str, Any]:
    """Flower's simulation resources: a CPU per client, and a share of the GPUs when clients train on CUDA.

    Clients on CUDA ask for ``1 / clients`` of a GPU each, so every client of a round fits on one GPU at once (Ray
    spreads them over several GPUs where there are more).
    """
    import torch

    cuda = plan.device.startswith("cuda") or (plan.device == "auto" and torch.cuda.is_available())
    gpus = round(1.0 / len(plan.clients), 4) if cuda else 0.0
    init: dict[str, Any] = {"num_cpus": max(1, min(len(plan.clients), os.cpu_count() or 1)),
                            "include_dashboard": False, "log_to_driver": False}  # fmt: skip
    if cuda:
        init["num_gpus"] = max(1, torch.cuda.device_count())
    return {"client_resources": {"num_cpus": 1, "num_gpus": gpus}, "init_args": init}


def federate(cfg: FederateConfig, out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Prepare and run a federated LoRA fine-tuning of pruned blocks in Flower's simulation engine.

    Args:
        cfg: the federation config (see :class:`FederateConfig`).
        out: the run directory; holds the plan, checkpoints and every output.
        resume: continue the run in ``out`` after its last finished round.

    Returns:
        The contents of ``out/metrics.json``.

    Example:
        >>> federate(load_federate_config("recipes/federate_smoke.yaml"), "runs/fed")["rounds"][-1]["eval_loss"]
    """
    from flwr.simulation import run_simulation

    from slmstack.federated.client_app import build_client_app
    from slmstack.federated.server_app import build_server_app

    out = Path(out)
    plan = prepare(cfg, out, resume)
    run_dir = str(out.resolve())
    backend = simulation_backend(plan)
    run_simulation(server_app=build_server_app(run_dir), client_app=build_client_app(run_dir),
                   num_supernodes=len(plan.clients), backend_config=backend)  # fmt: skip
    metrics = out / "metrics.json"
    if not metrics.is_file():
        raise InputError(f"{out}: the federated run ended without writing metrics.json; see the log above")
    result = read_json(metrics, "federation metrics", expect={"rounds": list, "strategy": str})
    rounds = [r for r in result["rounds"] if r.get("round", 0) >= 1]
    if rounds and not any(r.get("clients_ok", 0) for r in rounds):
        failures = sorted({str(f) for r in rounds for f in r.get("failures", [])})[:3]
        raise FederationFailedError(
            f"no round accepted a client update ({len(rounds)} round(s), every update failed or was rejected: "
            f"{'; '.join(failures) or 'no replies'}), so the global adapter is unchanged. Check round_timeout and "
            f"the clients' log, then rerun (see {metrics})."
        )
    return result
