"""The unstructured pruning methods: each is a few lines over the shared engine."""

from __future__ import annotations

import math

import torch

from slmstack.pruning.base import PRUNERS, LayerStats, PruneConfig, Pruner

__all__ = ["MagnitudePruner", "SparseGPTPruner", "WandaPruner"]


@PRUNERS.register("magnitude", config_cls=PruneConfig)
class MagnitudePruner(Pruner):
    """The baseline: drop the smallest |W| across the whole layer (as in the Wanda repository's baseline)."""

    per_row = False

    def score(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:  # noqa: D102
        return weight.abs()


@PRUNERS.register("wanda", config_cls=PruneConfig)
class WandaPruner(Pruner):
    """Implementation based on https://arxiv.org/abs/2306.11695 (Sun et al., 2023).

    Score |W_ij| * ||X_j||_2 and compare weights within each output row.
    """

    stats = "norms"

    def score(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:  # noqa: D102
        assert stats is not None
        return weight.abs() * stats.norm_sq.sqrt().to(weight.dtype)[None, :]  # (out, in) * (1, in)


@PRUNERS.register("sparsegpt", config_cls=PruneConfig)
class SparseGPTPruner(Pruner):
    """Implementation based on https://arxiv.org/abs/2301.00774 (Frantar and Alistarh, 2023).

    OBS-style pruning with the layer Hessian H = 2 X X^T: columns are processed in blocks; within a block
    the mask is chosen adaptively by w^2 / [H^-1]_jj^2, and each pruned weight's error is spread over the
    not-yet-processed columns (lazy batch updates), with dampening for stability.
    """

    stats = "hessian"

    def score(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:  # noqa: D102
        return weight.abs()  # unused: prune() below chooses masks block by block

    def prune(self, weight: torch.Tensor, stats: LayerStats | None, nm: tuple[int, int] | None) -> torch.Tensor:
        """Prune ``weight`` in place with error compensation; returns the keep-mask."""
        assert stats is not None and stats.hessian is not None
        W = weight.detach().to(torch.float64).clone()  # (out, in)
        H = stats.hessian.clone()  # (in, in), float64
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        Hinv = _damped_inverse_cholesky(H, self.config.percdamp)
        out_features, cols = W.shape
        keep = torch.ones_like(W, dtype=torch.bool)
        block = self.config.blocksize
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)  # True = prune
            if nm is None:
                metric = W1**2 / torch.diag(Hinv1)[None, :] ** 2
                k = int(metric.numel() * self.config.sparsity)
                if k:
                    mask1.view(-1)[torch.topk(metric.flatten(), k, largest=False).indices] = True
            for i in range(i2 - i1):
                w, d = W1[:, i], Hinv1[i, i]
                if nm is not None and i % nm[1] == 0:
                    metric = W1[:, i : i + nm[1]] ** 2 / torch.diag(Hinv1)[i : i + nm[1]][None, :] ** 2
                    idx = torch.topk(metric, nm[0], dim=1, largest=False).indices
                    mask1[:, i : i + nm[1]].scatter_(1, idx, True)
                q = w.clone()
                q[mask1[:, i]] = 0.0
                err = (w - q) / d  # (out,)
                W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
                W1[:, i] = q
                Err1[:, i] = err
            W[:, i1:i2] = W1
            keep[:, i1:i2] = ~mask1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        W[~keep] = 0.0
        weight.copy_(W.to(weight.dtype))
        return keep


def _damped_inverse_cholesky(H: torch.Tensor, percdamp: float, tries: int = 5) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1; row i says what column i's error does to later columns.

    Dampening is ``percdamp`` times the mean diagonal; if H is still not numerically positive definite
    (models with massive activations), it is raised tenfold, as SparseGPT implementations do.
    """
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(tries):
        try:
            damped = H + percdamp * 10**attempt * mean_diag * eye
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with dampening {percdamp * 10 ** (tries - 1)}")


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, stats: LayerStats) -> float:
    """||W X - W' X||_F^2 / N, computed from the Hessian: tr((W - W') H (W - W')^T) / 2."""
    assert stats.hessian is not None
    delta = (weight - pruned).to(torch.float64)
    hessian = stats.hessian.to(torch.float64)
    return float(torch.trace(delta @ hessian @ delta.T) / 2) if math.isfinite(float(delta.sum())) else math.inf
