"""LoRA factors as plain tensors: dense updates, pruning masks, masked merges and the return to rank r.

A peft LoRA module adds ``ΔW = s · B A`` to its weight (``A``: (r, in), ``B``: (out, r), ``s`` = alpha / r).
Clients train dense factors on their pruned blocks; masks live on the base weights (out, in), so the
masked aggregation of LEGO works on ``ΔW`` and then returns to rank r, either by truncated SVD of the
aggregated ``ΔW`` or by aggregating ``A`` and ``B`` separately.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["dense_update", "factor_pairs", "masked_merge", "module_of", "refactor_svd"]

# base_model.model.<module path>.lora_A.weight (peft state-dict keys, adapter name stripped)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def module_of(key: str) -> tuple[str, str]:
    """``(module path, "A" | "B")`` of a peft LoRA state-dict key; the module path is the mask's prefix."""
    match = _KEY.match(key)
    if match is None:
        raise KeyError(f"{key!r} is not a LoRA A/B weight key")
    return match["module"], match["ab"]


def factor_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Module path -> (key of A, key of B), for every LoRA module in ``state``."""
    pairs: dict[str, dict[str, str]] = {}
    for key in state:
        module, ab = module_of(key)
        pairs.setdefault(module, {})[ab] = key
    return {m: (p["A"], p["B"]) for m, p in sorted(pairs.items()) if set(p) == {"A", "B"}}


def dense_update(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``ΔW = s · B A``: (out, r) @ (r, in) -> (out, in)."""
    return scaling * (b.double() @ a.double())


def refactor_svd(delta: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(A, B)`` with ``s · B A`` the best rank-r approximation of ``delta`` (Eckart–Young).

    The singular values are split evenly, ``B = U √S / √s`` and ``A = √S Vᵀ / √s``, so both factors have
    the same scale, as freshly trained ones roughly do.
    """
    u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (out, k), (k,), (k, in)
    root = (sv[:rank] / scaling).sqrt()  # (r,)
    b = u[:, :rank] * root[None, :]  # (out, r)
    a = root[:, None] * vh[:rank]  # (r, in)
    return a.float(), b.float()


@contextmanager
def masked_merge(model: Any, masks: dict[str, torch.Tensor] | None) -> Iterator[Any]:
    """Inside the block, the active adapter is merged as ``W + M ⊙ s·BA`` and disabled; undone on exit.

    This is the client's view of the global adapter "masked to its block": the pruned weights stay zero.
    Without masks (a dense block) it is the ordinary merge.
    """
    saved = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or not module.active_adapters:
                continue
            adapter = module.active_adapters[0]
            if adapter not in module.lora_A:
                continue
            delta = dense_update(module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter])
            path = name.removeprefix("base_model.model.")
            mask = masks.get(f"{path}.weight") if masks else None
            if mask is not None:
                delta = delta * mask.to(delta.device)
            weight = module.base_layer.weight
            saved.append((weight, weight.detach().clone()))
            weight += delta.to(weight.dtype)
    try:
        with model.disable_adapter():
            yield model
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)
