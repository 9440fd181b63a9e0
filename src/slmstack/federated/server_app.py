"""The Flower ServerApp: rounds of masked-adapter aggregation, a per-round checkpoint, and the run's outputs.

Each round the strategy samples every client, sends the global LoRA factors, validates and aggregates
the replies (with ``secure_aggregation``, Flower's SecAgg+ workflow runs instead and the server learns
only their weighted mean), asks every client for its eval loss (its block with the global adapter
masked to it), and scores the recombined global model (the dense base with the global adapter) on the
held-out set. The round's metrics and the global adapter are checkpointed atomically, so a killed run
resumes after the last finished round. When the last round ends the outputs are written (see
:func:`write_outputs`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from slmstack.federated.outputs import GlobalModel, load_checkpoint, save_checkpoint, write_outputs
from slmstack.federated.plan import Plan, load_plan
from slmstack.federated.strategies import LoraFedAvg, build_strategy

logger = logging.getLogger(__name__)

__all__ = ["app", "build_server_app", "run_rounds"]


def _strategy(plan: Plan) -> LoraFedAvg:
    from slmstack.pruning.masks import load_masks

    masks = {i: load_masks(Path(c["masks"])) if c.get("masks") else None for i, c in enumerate(plan.clients)}
    strategy = build_strategy(plan.strategy, masks, plan.scaling, plan.train["rank"], n_clients=len(plan.clients),
                              min_clients=plan.min_clients, rank_return=plan.rank_return)  # fmt: skip
    return strategy


def _privacy(strategy: LoraFedAvg, plan: Plan) -> Any:
    """Wrap ``strategy`` in Flower's server-side fixed-clipping DP when the plan asks for it."""
    if not plan.privacy.get("enabled"):
        return strategy
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    return DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=plan.privacy["noise_multiplier"],
                                                      clipping_norm=plan.privacy["clipping_norm"],
                                                      num_sampled_clients=len(plan.clients))  # fmt: skip


def _secure_round(grid: Grid, strategy: LoraFedAvg, arrays: ArrayRecord, rnd: int, plan: Plan) -> ArrayRecord | None:
    """A training round under Flower's SecAgg+ (see :mod:`slmstack.federated.secure`)."""
    from slmstack.federated.secure import secure_train_round

    max_weight = max(float(c.get("records", 1)) for c in plan.clients)  # so each client's weight ratio is <= 1
    return secure_train_round(grid, strategy, arrays, rnd, len(plan.clients), plan.secure, max_weight,
                              plan.min_clients, plan.round_timeout)  # fmt: skip


def run_rounds(grid: Grid, run_dir: Path) -> list[dict[str, Any]]:
    """Run (or resume) every round of the plan in ``run_dir``; returns the per-round metrics."""
    plan = load_plan(run_dir)
    inner = _strategy(plan)
    strategy = _privacy(inner, plan)
    model = GlobalModel(plan)
    state, history = load_checkpoint(run_dir) or (model.initial_state(), [])
    arrays = ArrayRecord(state)
    if not history:
        history.append({"round": 0, "eval_loss": model.loss(state)})
    for rnd in range(len(history), plan.rounds + 1):
        start = time.perf_counter()
        if plan.secure.get("enabled"):
            new = _secure_round(grid, inner, arrays, rnd, plan)
            bytes_down = arrays.count_bytes() * len(plan.clients)
        else:
            messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
            bytes_down = arrays.count_bytes() * len(messages)
            new, _ = strategy.aggregate_train(rnd, grid.send_and_receive(messages, timeout=plan.round_timeout))
        log = inner.last_round
        if new is not None:
            arrays = new
        evals = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
        bytes_down += arrays.count_bytes() * len(evals)
        client_eval, own_other = {}, {}
        for reply in grid.send_and_receive(evals, timeout=plan.round_timeout):
            if not reply.has_error():
                metrics, client = reply.content["metrics"], str(int(reply.content["metrics"]["client-id"]))
                client_eval[client] = float(metrics["eval-loss"])
                own_other[client] = {k: float(metrics[f"eval-loss-{k}"]) for k in ("own", "other")
                                     if float(metrics[f"eval-loss-{k}"]) >= 0}  # fmt: skip
        state = {k: v.float() for k, v in arrays.to_torch_state_dict().items()}
        history.append({"round": rnd, "eval_loss": model.loss(state), "client_eval_loss": client_eval,
                        "client_eval_own_other": own_other,
                        "bytes_up": log.bytes_up, "bytes_down": bytes_down, "clients_ok": len(log.ok),
                        "clients_failed": len(log.failed), "failures": log.failed,
                        "seconds": round(time.perf_counter() - start, 2)})  # fmt: skip
        save_checkpoint(run_dir, state, history, inner.last_updates)
        logger.info("round %d: eval loss %.4f, %d ok, %d failed", rnd, history[-1]["eval_loss"], len(log.ok),
                    len(log.failed))  # fmt: skip
    write_outputs(run_dir, plan, model, state, history)
    return history


def build_server_app(run_dir: str | None = None) -> ServerApp:
    """A ServerApp for the run in ``run_dir`` (None: ``run-dir`` from the run config, as under ``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        run_rounds(grid, Path(run_dir or str(context.run_config["run-dir"])))

    return app


app = build_server_app()
