"""The pruner contract and its registry. A method is a score rule (or, for SparseGPT, a weight update)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from slmstack.config import check_range
from slmstack.errors import ConfigError
from slmstack.pruning.masks import layer_mask, nm_mask, row_mask
from slmstack.registry import Registry

__all__ = ["PRUNERS", "LayerStats", "PruneConfig", "Pruner"]


@dataclass(kw_only=True)
class PruneConfig:
    """Settings shared by every method."""

    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str = field(default="unstructured", metadata={"help": "unstructured, or N:M such as 2:4"})
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    blocksize: int = field(default=128, metadata={"help": "SparseGPT column block"})
    percdamp: float = field(default=0.01, metadata={"help": "SparseGPT dampening, share of the mean Hessian diagonal"})
    precision: str = field(
        default="auto", metadata={"help": "calibration forwards: auto (bf16 autocast where native), fp32, bf16"}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise ConfigError(f"nsamples must be >= 1 and seqlen >= 2, got {self.nsamples} and {self.seqlen}")
        check_range(self, "seed", 0)
        check_range(self, "blocksize", 1)
        check_range(self, "percdamp", 0, 1, low_open=True)


class LayerStats:
    """Calibration statistics of one linear layer's inputs, accumulated over tokens by a forward hook.

    ``norm_sq[j]`` is the mean of x_j^2 (Wanda's squared input-feature norm, up to a constant);
    ``hessian`` is 2/N * sum x x^T (SparseGPT's layer Hessian), kept only when a method needs it.
    """

    def __init__(self, in_features: int, hessian: bool) -> None:
        self.norm_sq = torch.zeros(in_features, dtype=torch.float64)
        # float64 running sum of float32 chunk products: fast matmuls, no drift across many chunks
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64) if hessian else None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of inputs ``x`` of shape (..., in_features)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (N, in)
        n = x.shape[0]
        total = self.tokens + n
        self.norm_sq.mul_(self.tokens / total).add_((x**2).sum(0) / total)
        if self.hessian is not None:
            self.hessian.mul_(self.tokens / total)
            scaled = x.float() * (2.0 / total) ** 0.5
            self.hessian.add_((scaled.T @ scaled).double())
        self.tokens = total


class Pruner(ABC):
    """A pruning method. ``stats`` says what calibration it needs: ``none``, ``norms`` or ``hessian``."""

    stats: ClassVar[str] = "none"
    per_row: ClassVar[bool] = True  # compare scores within each output row (else across the whole matrix)

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    @abstractmethod
    def score(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        """Importance of each weight (higher = keep); ``weight`` is (out, in)."""

    def prune(self, weight: torch.Tensor, stats: LayerStats | None, nm: tuple[int, int] | None) -> torch.Tensor:
        """Zero the weights the method drops, in place, and return the keep-mask."""
        score = self.score(weight.float(), stats)
        if nm is not None:
            mask = nm_mask(score, *nm)
        elif self.per_row:
            mask = row_mask(score, self.config.sparsity)
        else:
            mask = layer_mask(score, self.config.sparsity)
        weight.mul_(mask.to(weight.dtype))
        return mask


PRUNERS: Registry[type[Pruner]] = Registry("pruning method")
