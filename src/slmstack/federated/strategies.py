"""Aggregation strategies for LoRA updates of heterogeneous pruned blocks, on Flower's message-API ``FedAvg``.

Each strategy overrides only the arithmetic (:meth:`LoraFedAvg.combine`); Flower's ``FedAvg`` samples the
nodes, builds the messages and aggregates the metrics. Before anything is averaged, every reply is
checked: a client that failed, or whose update has the wrong names or shapes or a NaN/Inf, is rejected,
logged and counted, never averaged in (:attr:`LoraFedAvg.last_round`).

- ``fedavg`` (McMahan et al., arXiv 1602.05629): sample-weighted mean of A and B (every client dense).
- ``heterofl`` (Diao et al., arXiv 2010.01264; InclusiveFL's HeteAgg): each factor entry is averaged over
  the clients that hold it: ``A[:, j]`` if the client's block keeps any weight of input channel j,
  ``B[i, :]`` if it keeps any of output channel i.
- ``lego`` (LEGO, arXiv 2410.18287): each update ``ΔW_k = s·B_k A_k`` is masked by the client's pruning
  mask; the global ``ΔW`` is, per element, the sample-weighted mean over the clients whose mask keeps it
  (elements no client keeps keep the previous global value), then returned to rank r by truncated SVD
  (``rank_return: svd``), or A and B are averaged, each client weighted by each channel's kept share
  (``factors``, the default: lower held-out loss in the experiment, see ``docs/federated.md``).

Every strategy is one shape of arithmetic: each client contributes a *share* (:meth:`LoraFedAvg.share`:
its coverage-weighted values ``c_k ⊙ x_k`` and, where coverage varies, the coverage ``c_k`` itself), the
server takes the sample-weighted mean of the shares, and :meth:`LoraFedAvg.finish` divides the two and
returns to rank r. Because only that mean is needed, the same strategies run under secure aggregation
(:mod:`slmstack.federated.secure`), where the server never sees one client's share.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from slmstack.federated.lora import dense_update, factor_pairs, refactor_svd
from slmstack.registry import Registry

logger = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "HeteroFL", "Lego", "LoraFedAvg", "RoundLog", "build_strategy", "weighted_mean"]

Masks = dict[str, torch.Tensor]  # "<module>.weight" -> bool keep-mask (out, in)
STRATEGIES: Registry[type] = Registry("strategy")
CLIENT_KEY = "client-id"
WEIGHT_KEY = "num-examples"


@dataclass
class RoundLog:
    """What the last ``aggregate_train`` accepted and rejected, for the round's metrics."""

    ok: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    bytes_up: int = 0


HELD = ":held"  # suffix of a share's coverage (its denominator); absent: every client covers every entry
DELTA = ".delta"  # a lego-svd share's key: the module path plus this


def _covered(key: str, value: torch.Tensor, coverage: torch.Tensor) -> dict[str, torch.Tensor]:
    """A share entry: the covered values and their coverage."""
    return {key: value * coverage, key + HELD: coverage}


def _by_channel(state: dict[str, torch.Tensor], key_a: str, key_b: str, mask: torch.Tensor | None,
                reduce: str) -> dict[str, torch.Tensor]:  # fmt: skip
    """Share entries of A and B, covered per channel of the block's mask.

    ``reduce`` over A's input channels and B's output channels: ``amax`` (any weight kept) or ``mean``
    (the kept share); a dense block covers everything.
    """
    n_out, n_in = state[key_b].shape[0], state[key_a].shape[1]
    cols = getattr(mask.float(), reduce)(dim=0) if mask is not None else torch.ones(n_in)  # (in,)
    rows = getattr(mask.float(), reduce)(dim=1) if mask is not None else torch.ones(n_out)  # (out,)
    # (1, in) broadcasts over A's rank rows; (out, 1) over B's rank columns
    return {**_covered(key_a, state[key_a], cols[None, :]), **_covered(key_b, state[key_b], rows[:, None])}


def _mean_or_keep(total: torch.Tensor, norm: torch.Tensor | float, previous: torch.Tensor) -> torch.Tensor:
    """``total / norm`` where some client contributed, the previous value elsewhere."""
    norm = torch.as_tensor(norm, dtype=torch.float64)
    held = norm > 1e-12
    return torch.where(held, total.double() / norm.clamp_min(1e-300), previous.double()).float()


def weighted_mean(shares: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Per entry ``Σ w_k share_k / Σ w_k``: what the server needs from the clients (secure aggregation's output)."""
    total = sum(weights)
    return {key: sum((w / total) * s[key].double() for s, w in zip(shares, weights, strict=True))
            for key in shares[0]}  # fmt: skip


@STRATEGIES.register("fedavg")
class LoraFedAvg(FedAvg):
    """FedAvg of LoRA factors, with reply validation and failure accounting.

    Implementation based on https://arxiv.org/abs/1602.05629

    Args:
        masks: client index -> keep-masks of its block (absent or None: a dense block).
        scaling: LoRA ``alpha / r``; rank: LoRA ``r``.
        min_clients: fewer accepted replies than this keep the previous global adapter.
        **kwargs: passed to Flower's ``FedAvg`` (fractions, minimum node counts).
    """

    def __init__(self, masks: dict[int, Masks | None], scaling: float, rank: int, min_clients: int = 1,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(weighted_by_key=WEIGHT_KEY, **kwargs)
        self.masks, self.scaling, self.rank, self.min_clients = masks, scaling, rank, min_clients
        self.current: dict[str, torch.Tensor] = {}
        self.last_round = RoundLog()
        self.last_updates: dict[int, dict[str, torch.Tensor]] = {}  # client -> its last accepted update

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:  # fmt: skip
        """Remember the global adapter sent out, then let ``FedAvg`` sample nodes and build the messages."""
        self.current = {k: v.float() for k, v in arrays.to_torch_state_dict().items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, then :meth:`combine` the accepted updates."""
        self.last_round = log = RoundLog()
        accepted, states = [], []
        for msg in replies:
            state, problem = self._checked(msg)
            if problem:
                log.failed.append(problem)
                logger.warning("round %d: rejected a reply: %s", server_round, problem)
                continue
            accepted.append(msg)
            states.append(state)
            log.bytes_up += msg.content["arrays"].count_bytes()
        log.ok = [int(m.content["metrics"][CLIENT_KEY]) for m in accepted]
        if len(accepted) < self.min_clients:
            logger.warning("round %d: %d accepted updates, fewer than min_clients=%d; the global adapter is kept",
                           server_round, len(accepted), self.min_clients)  # fmt: skip
            return None, None
        self.last_updates.update(zip(log.ok, states, strict=True))
        weights = [float(m.content["metrics"][WEIGHT_KEY]) for m in accepted]
        merged = self.combine(states, weights, log.ok)
        metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        return ArrayRecord(merged), metrics

    def _checked(self, msg: Message) -> tuple[dict[str, torch.Tensor], str | None]:
        """The reply's update as float tensors, and why it cannot be averaged in (None when it can)."""
        problem = self._problem(msg)
        if problem:
            return {}, problem
        state = {k: v.float() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        return state, self._state_problem(state, msg.content["metrics"][CLIENT_KEY])

    def _problem(self, msg: Message) -> str | None:
        """Why a reply's records cannot be used, or None."""
        if msg.has_error():
            return f"node {msg.metadata.src_node_id} failed: {msg.error.reason}"
        content = msg.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return f"node {msg.metadata.src_node_id}: reply lacks its 'arrays' or 'metrics' record"
        metrics = content["metrics"]
        if WEIGHT_KEY not in metrics or CLIENT_KEY not in metrics or not metrics[WEIGHT_KEY] > 0:
            return f"node {msg.metadata.src_node_id}: metrics lack a positive {WEIGHT_KEY!r} or {CLIENT_KEY!r}"
        return None

    def _state_problem(self, state: dict[str, torch.Tensor], client: Any) -> str | None:
        """Wrong names or shapes, or NaN/Inf, against the global adapter sent out."""
        if set(state) != set(self.current):
            extra, missing = sorted(set(state) - set(self.current)), sorted(set(self.current) - set(state))
            return f"client {client}: update names differ (extra {extra[:2]}, missing {missing[:2]})"
        for key, value in state.items():
            if tuple(value.shape) != tuple(self.current[key].shape):
                return f"client {client}: {key} has shape {tuple(value.shape)}, expected " \
                       f"{tuple(self.current[key].shape)}"  # fmt: skip
            if not torch.isfinite(value).all():
                return f"client {client}: {key} holds NaN or Inf"
        return None

    def combine(self, states: list[dict[str, torch.Tensor]], weights: list[float],
                clients: list[int]) -> dict[str, torch.Tensor]:  # fmt: skip
        """The new global adapter: :meth:`finish` of the sample-weighted mean of the clients' shares."""
        return self.finish(weighted_mean([self.share(s, c) for s, c in zip(states, clients, strict=True)], weights))

    def share(self, state: dict[str, torch.Tensor], client: int) -> dict[str, torch.Tensor]:
        """Client ``client``'s contribution to the weighted mean: here the factors themselves."""
        return dict(state)

    def finish(self, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new global factors from the weighted mean of the shares: each ``x`` is ``mean[x] / mean[x:held]``."""
        return {key: _mean_or_keep(mean[key], mean.get(key + HELD, 1.0), self.current[key]) for key in self.current}

    def mask(self, client: int, module: str) -> torch.Tensor | None:
        """Client ``client``'s keep-mask of ``module`` (None: it keeps every weight)."""
        masks = self.masks.get(client)
        return None if masks is None else masks.get(f"{module}.weight")


@STRATEGIES.register("heterofl")
class HeteroFL(LoraFedAvg):
    """Each factor entry averaged over the clients whose block holds its channel.

    Implementation based on https://arxiv.org/abs/2010.01264 (HeteroFL) and InclusiveFL's HeteAgg.
    """

    def share(self, state: dict[str, torch.Tensor], client: int) -> dict[str, torch.Tensor]:
        """A's input channels and B's output channels count only where the client's block keeps them."""
        out = {}
        for module, (key_a, key_b) in factor_pairs(state).items():
            out.update(_by_channel(state, key_a, key_b, self.mask(client, module), "amax"))
        return out


@STRATEGIES.register("lego")
class Lego(LoraFedAvg):
    """Masked aggregation of the dense updates ``M_k ⊙ s·B_k A_k``, then back to rank r.

    Implementation based on https://arxiv.org/abs/2410.18287 (LEGO; HeteAgg as claimed in US-20260010799-A1).

    Args:
        rank_return: ``svd`` (truncated SVD of the aggregated ΔW) or ``factors`` (A and B averaged with
            each client's weight scaled by the kept share of the channel).
    """

    def __init__(self, *args: Any, rank_return: str = "factors", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if rank_return not in ("svd", "factors"):
            raise ValueError(f"rank_return must be svd or factors, got {rank_return!r}")
        self.rank_return = rank_return

    def share(self, state: dict[str, torch.Tensor], client: int) -> dict[str, torch.Tensor]:
        """``svd``: the masked dense update ``M_k ⊙ ΔW_k`` and ``M_k``; ``factors``: A and B by kept share."""
        out = {}
        for module, (key_a, key_b) in factor_pairs(state).items():
            mask = self.mask(client, module)
            if self.rank_return == "svd":
                delta = dense_update(state[key_a], state[key_b], self.scaling).float()  # (out, in)
                keep = mask.float() if mask is not None else torch.ones_like(delta)
                out.update(_covered(module + DELTA, delta, keep))
            else:
                out.update(_by_channel(state, key_a, key_b, mask, "mean"))
        return out

    def finish(self, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``svd``: the masked mean of ``ΔW`` (the previous ``ΔW`` where no client keeps an element), refactored."""
        if self.rank_return == "factors":
            return super().finish(mean)
        out = {}
        for module, (key_a, key_b) in factor_pairs(self.current).items():
            previous = dense_update(self.current[key_a], self.current[key_b], self.scaling)  # (out, in)
            merged = _mean_or_keep(mean[module + DELTA], mean[module + DELTA + HELD], previous)
            out[key_a], out[key_b] = refactor_svd(merged, self.rank, self.scaling)
        return out


def build_strategy(name: str, masks: dict[int, Masks | None], scaling: float, rank: int, *, n_clients: int,
                   min_clients: int, rank_return: str = "factors") -> LoraFedAvg:  # fmt: skip
    """The registered strategy ``name``, sampling every client each round (a did-you-mean error otherwise)."""
    cls = STRATEGIES.get(name)
    extra = {"rank_return": rank_return} if cls is Lego else {}
    return cls(masks, scaling, rank, min_clients=min_clients, min_train_nodes=n_clients,
               min_evaluate_nodes=n_clients, min_available_nodes=n_clients, **extra)  # fmt: skip
