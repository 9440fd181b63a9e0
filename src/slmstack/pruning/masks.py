"""Masks: which weights a pruner kept, selected by score, and saved compactly (bit-packed safetensors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slmstack.errors import ConfigError
from slmstack.io import check_input_file, guard_read

__all__ = ["load_masks", "parse_pattern", "row_mask", "save_masks", "nm_mask", "layer_mask"]


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4): zero N of every M consecutive input weights."""
    if pattern == "unstructured":
        return None
    n, sep, m = pattern.partition(":")
    if not sep or not n.isdigit() or not m.isdigit() or not 0 < int(n) < int(m):
        raise ConfigError(f"pattern {pattern!r}: use unstructured, or N:M with 0 < N < M (e.g. 2:4, 4:8)")
    return int(n), int(m)


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that zeros the ``sparsity`` share of lowest scores over the whole matrix (magnitude's rule)."""
    k = int(score.numel() * sparsity)
    mask = torch.ones_like(score, dtype=torch.bool)
    if k:
        idx = torch.topk(score.flatten(), k, largest=False).indices
        mask.view(-1)[idx] = False
    return mask


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that zeros the lowest ``sparsity`` share within each output row (Wanda's comparison group)."""
    k = int(score.shape[1] * sparsity)
    mask = torch.ones_like(score, dtype=torch.bool)
    if k:
        idx = torch.topk(score, k, dim=1, largest=False).indices  # (out, k)
        mask.scatter_(1, idx, False)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask that zeros the ``n`` lowest scores in every group of ``m`` consecutive inputs of a row."""
    out_features, in_features = score.shape
    if in_features % m:
        raise ConfigError(f"pattern {n}:{m} needs the input dimension to be a multiple of {m}; it is {in_features}")
    groups = score.reshape(out_features, in_features // m, m)  # (out, in/m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, False)
    return mask.reshape(out_features, in_features)


def save_masks(masks: dict[str, torch.Tensor], path: Path) -> Path:
    """Bit-pack each keep-mask (1 bit per weight) into one safetensors file; shapes go in its metadata."""
    tensors, shapes = {}, {}
    for name, mask in masks.items():
        bits = np.packbits(mask.detach().cpu().numpy().astype(bool).reshape(-1))
        tensors[name] = torch.from_numpy(bits)
        shapes[name] = list(mask.shape)
    save_file(tensors, str(path), metadata={"shapes": json.dumps(shapes), "format": "packbits-keep-mask"})
    return path


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_masks`: boolean keep-masks (True = the weight was kept)."""
    masks = {}
    path = check_input_file(Path(path), "masks file", "Point at a slmstack prune output directory.")
    with guard_read(path, "masks file", "Prune again to rewrite it."), safe_open(str(path), framework="pt") as fh:
        shapes = json.loads(fh.metadata()["shapes"])
        for name in fh.keys():
            shape = shapes[name]
            bits = np.unpackbits(fh.get_tensor(name).numpy())[: math.prod(shape)]
            masks[name] = torch.from_numpy(bits.astype(bool)).reshape(shape)
    return masks
