"""Secure aggregation with Flower's SecAgg+: the server learns only the weighted mean of the clients' shares.

Every strategy needs from the clients only ``Σ n_k share_k / Σ n_k`` (see :mod:`slmstack.federated.strategies`),
which is exactly what SecAgg+ (Bell et al., CCS 2020, as implemented by Flower) computes: each client
quantises its share, adds pairwise masks that cancel in the sum and a private mask whose seed is
secret-shared, and the server can unmask only the sum. Flower 1.41 ships SecAgg+ as a server workflow
(``flwr.server.workflow.SecAggPlusWorkflow``) and a client mod (``flwr.client.mod.secaggplus_mod``) that
speak the legacy ``FitIns``/``FitRes`` records, so a secure round drives Flower's workflow through a small
legacy-strategy face (:class:`_SharesStrategy`) while evaluation stays on the message API.

What this costs and changes (``docs/federated.md``):

- values are quantised to ``quantization_range`` levels over ``[-clipping_range, clipping_range]``
  (stochastic rounding, unbiased); a client whose share leaves that range fails the round rather than
  being clipped silently;
- the server cannot validate one client's update (that is the point): each client checks its own share
  for NaN/Inf before masking;
- ``lego`` with ``rank_return: svd`` uploads the masked dense ``ΔW`` and the mask per module (the server
  cannot multiply factors it never sees), far more bytes than the factors;
- the server never holds a client's update, so each client writes ``clients/<id>/adapter`` itself.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from slmstack.federated.strategies import CLIENT_KEY, LoraFedAvg, RoundLog

logger = logging.getLogger(__name__)

__all__ = ["QUANTIZATION_RANGE", "client_reply", "received_global", "secure_mod", "secure_train_round"]

QUANTIZATION_RANGE = 2**28  # levels over [-clip, clip]; Flower rounds into int32, so below 2**31
MODULUS_RANGE = 2**40  # a power of two; the sum of up to 2**12 clients' quantised values fits


def secure_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a secure round; every other message passes through."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def received_global(content: RecordDict, keys: list[str]) -> tuple[dict[str, torch.Tensor], int] | None:
    """In a secure round, the global adapter (legacy ``FitIns``, arrays in sorted-key order) and the round."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    if "fitins.parameters" not in content.array_records:
        return None
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(keys):
        raise ValueError(f"secure round: {len(arrays)} global arrays received, the adapter has {len(keys)}")
    state = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in zip(sorted(keys), arrays, strict=True)}
    return state, int(fitins.config["server-round"])


def client_reply(msg: Message, share: dict[str, torch.Tensor], num_examples: int, metrics: dict[str, Any],
                 clipping_range: float) -> Message:  # fmt: skip
    """The legacy ``FitRes`` that ``secaggplus_mod`` masks: the share's arrays in sorted-name order.

    Raises:
        ValueError: the share holds NaN/Inf or leaves ``[-clipping_range, clipping_range]`` (the client
            then counts as dropped; SecAgg+ removes its masks).
    """
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    for name, value in share.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"secure round: {name} holds NaN or Inf; the update is not sent")
        peak = float(value.abs().max()) if value.numel() else 0.0
        if peak > clipping_range:
            raise ValueError(f"secure round: {name} reaches {peak:.3g}, outside secure_aggregation.clipping_range "
                             f"{clipping_range}; raise it")  # fmt: skip
    parameters = ndarrays_to_parameters([share[n].double().numpy() for n in sorted(share)])
    fitres = FitRes(Status(Code.OK, ""), parameters, num_examples, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


class _SharesStrategy:
    """The legacy-strategy face that ``SecAggPlusWorkflow`` calls.

    It sends the global adapter to every sampled node, and receives the unmasked weighted mean of the
    shares, from which the strategy finishes.
    """

    def __init__(self, strategy: LoraFedAvg, node_ids: list[int], min_clients: int) -> None:
        self.strategy, self.node_ids, self.min_clients = strategy, node_ids, min_clients
        self.result: dict[str, torch.Tensor] | None = None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
        from flwr.common import FitIns

        fitins = FitIns(parameters, {"server-round": server_round})
        return [(SimpleNamespace(node_id=node), fitins) for node in self.node_ids]

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]],
                      failures: list[Any]) -> tuple[None, dict]:  # fmt: skip
        from flwr.common import parameters_to_ndarrays

        log = self.strategy.last_round
        log.ok = sorted(int(fitres.metrics[CLIENT_KEY]) for _, fitres in results)
        reasons = list(dict.fromkeys(str(f) for f in failures))  # the workflow may report a failure twice
        missing = len(self.node_ids) - len(results)
        log.failed = [f"secure round: a client dropped out ({reasons[i] if i < len(reasons) else 'no reply'})"
                      for i in range(missing)]  # fmt: skip
        for problem in log.failed:
            logger.warning("round %d: %s", server_round, problem)
        if len(results) < self.min_clients:
            logger.warning("round %d: %d clients finished, fewer than min_clients=%d; the global adapter is kept",
                           server_round, len(results), self.min_clients)  # fmt: skip
            return None, {}
        names = sorted(self.strategy.share(self.strategy.current, -1))  # a dense client's share: same names
        arrays = parameters_to_ndarrays(results[0][1].parameters)  # the workflow gives every result the mean
        if len(arrays) != len(names):
            raise RuntimeError(f"secure round: {len(arrays)} aggregated arrays for {len(names)} share entries")
        mean = {name: torch.from_numpy(np.asarray(a, dtype=np.float64)) for name, a in zip(names, arrays, strict=True)}
        self.result = self.strategy.finish(mean)
        log.bytes_up = 8 * (1 + sum(a.size for a in arrays)) * len(results)  # masked int64: weight + share
        return None, {}


def secure_train_round(grid: Grid, strategy: LoraFedAvg, arrays: ArrayRecord, server_round: int, n_clients: int,
                       settings: dict[str, Any], max_weight: float, min_clients: int,
                       timeout: float) -> ArrayRecord | None:  # fmt: skip
    """One training round under SecAgg+; returns the new global adapter (None: keep the old one).

    ``strategy.last_round`` holds the clients that finished and those that dropped out.
    """
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    state = {k: v.float() for k, v in arrays.to_torch_state_dict().items()}
    strategy.current, strategy.last_round = state, RoundLog()
    node_ids, _ = sample_nodes(grid, n_clients, n_clients)
    face = _SharesStrategy(strategy, node_ids, min_clients)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=face)  # type: ignore[arg-type]  # fmt: skip
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    parameters = ndarrays_to_parameters([state[k].numpy() for k in sorted(state)])
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, True)
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=settings["reconstruction_threshold"],
                                  max_weight=max_weight, clipping_range=settings["clipping_range"],
                                  quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE,
                                  timeout=timeout)  # fmt: skip
    workflow(grid, context)
    if face.result is None and not strategy.last_round.failed and not strategy.last_round.ok:
        strategy.last_round.failed.append("secure round: SecAgg+ halted (too few clients left to unmask)")
    return ArrayRecord(face.result) if face.result is not None else None
