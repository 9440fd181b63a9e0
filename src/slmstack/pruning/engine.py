"""The shared pruning engine: calibration capture, the sequential layer loop, hooks and masks.

Calibration is sequential, as in SparseGPT and Wanda: the calibration batch's inputs to the first
decoder layer are captured once; then, layer by layer, forward hooks collect each linear layer's input
statistics, the layer is pruned, and the *pruned* layer's outputs become the next layer's inputs.
Embeddings and the LM head are never pruned.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slmstack.arch import get_arch, get_decoder_layers
from slmstack.errors import ConfigError, InputError
from slmstack.io import read_text
from slmstack.models import resolve_precision
from slmstack.pruning import methods  # noqa: F401  (registers the methods)
from slmstack.pruning.base import PRUNERS, LayerStats, PruneConfig
from slmstack.pruning.masks import parse_pattern

logger = logging.getLogger(__name__)

__all__ = ["PruneResult", "load_calibration", "prune", "sparsity_report"]


@dataclass
class PruneResult:
    """The pruned model (pruned in place), its keep-masks by weight name, and a report."""

    model: Any
    masks: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)


class _Stop(Exception):
    pass


_CHUNK = 8  # calibration sequences per forward pass


def load_calibration(tokenizer: Any, path: str | Path, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` non-overlapping windows of ``seqlen`` tokens from a text file, chosen with ``seed``.

    Raises:
        InputError: the file is missing, or holds fewer than ``nsamples * seqlen`` tokens (says how many).
    """
    path = Path(path)
    text = read_text(path, "calibration file", "Pass a plain-text file (e.g. a slice of a corpus).")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = nsamples * seqlen
    if len(ids) < need:
        raise InputError(
            f"{path}: holds {len(ids)} tokens, fewer than the {need} requested ({nsamples} samples x {seqlen}). "
            "Use a longer text, or lower --nsamples/--seqlen."
        )
    windows = len(ids) // seqlen
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[:nsamples].tolist()
    return torch.tensor([ids[w * seqlen : (w + 1) * seqlen] for w in order], dtype=torch.long)  # (nsamples, seqlen)


def _linears(layer: torch.nn.Module, names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    modules = dict(layer.named_modules())
    return {name: modules[name] for name in names}


def _capture_inputs(model: Any, layers: Any, calibration: torch.Tensor) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The first decoder layer's inputs per chunk, and every layer's keyword arguments per chunk.

    The keyword arguments (attention masks, rotary embeddings) are each layer's own: in a model with local and
    global layers (Gemma 3) they differ by layer (a sliding-window mask, another RoPE base). They do not depend on
    the hidden states, so one pass of the unpruned model (up to the last layer) records them all.
    """
    hidden: list[torch.Tensor] = []
    captured: list[list[dict[str, Any]]] = [[] for _ in layers]

    def grab(index: int, module: Any, args: tuple, kwargs: dict) -> None:
        if index == 0:
            hidden.append(args[0] if args else kwargs["hidden_states"])
        skip = ("hidden_states", "past_key_values", "past_key_value", "cache")
        captured[index].append({k: v for k, v in kwargs.items() if k not in skip} | {"use_cache": False})
        if index == len(layers) - 1:
            raise _Stop

    handles = [layer.register_forward_pre_hook(functools.partial(grab, i), with_kwargs=True)
               for i, layer in enumerate(layers)]  # fmt: skip
    device = next(model.parameters()).device
    try:
        for start in range(0, calibration.shape[0], _CHUNK):  # a few sequences per pass: better matmuls
            try:
                model(input_ids=calibration[start : start + _CHUNK].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hidden, captured


def _run_layer(layer: Any, hidden: list[torch.Tensor], kwargs: list[dict], bf16: bool = False) -> list[torch.Tensor]:
    out = []
    device_type = hidden[0].device.type
    for h, kw in zip(hidden, kwargs, strict=True):
        # Calibration activations may run in bf16 (the papers used fp16 on GPUs); statistics and the
        # pruning maths themselves are accumulated in float64.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            result = layer(h, **kw)
        out.append((result[0] if isinstance(result, tuple) else result).float())
    return out


def prune(
    model: Any,
    method: str = "wanda",
    sparsity: float = 0.5,
    calibration: torch.Tensor | None = None,
    pattern: str = "unstructured",
    config: PruneConfig | None = None,
    show_progress: bool = False,
) -> PruneResult:
    """Prune every attention and MLP projection of ``model`` in memory.

    Args:
        model: a causal LM of a supported architecture (see ``slmstack.arch``).
        method: a name in ``PRUNERS``: magnitude, wanda, sparsegpt.
        sparsity: share of weights to zero in each projection, in [0, 1) (N:M patterns fix it at N/M).
        calibration: (nsamples, seqlen) token ids; needed by wanda and sparsegpt.
        pattern: ``unstructured`` or ``N:M`` (zero N of every M consecutive inputs).
        config: full settings (overrides method/sparsity/pattern when given).
        show_progress: progress bar over layers.

    Returns:
        A :class:`PruneResult` with keep-masks keyed by weight name and a sparsity report.

    Example:
        >>> result = prune(model, "wanda", 0.5, calibration=load_calibration(tok, "calib.txt", 128, 512))
        >>> result.report["actual_sparsity"]
    """
    cfg = config or PruneConfig(method=method, sparsity=sparsity, pattern=pattern)
    nm = parse_pattern(cfg.pattern)
    if nm is not None and cfg.sparsity not in (0.0, nm[0] / nm[1]):
        raise ConfigError(f"pattern {cfg.pattern} zeros {nm[0]}/{nm[1]} of the weights; drop --sparsity or set it to "
                          f"{nm[0] / nm[1]}")  # fmt: skip
    if nm is not None:
        cfg.sparsity = nm[0] / nm[1]
    pruner = PRUNERS.get(cfg.method)(cfg)
    spec = get_arch(model)
    layers = get_decoder_layers(model)
    names = spec.attention + spec.mlp
    if nm is not None:
        for name, lin in _linears(layers[0], names).items():
            if lin.weight.shape[1] % nm[1]:
                raise ConfigError(f"pattern {cfg.pattern}: {name} has {lin.weight.shape[1]} inputs, not a multiple "
                                  f"of {nm[1]}; use another pattern")  # fmt: skip
    if pruner.stats != "none" and calibration is None:
        raise ConfigError(f"method {cfg.method!r} needs calibration data: pass --calibration FILE (plain text)")
    start = time.perf_counter()
    masks: dict[str, torch.Tensor] = {}
    prefix = spec.layers
    bf16 = resolve_precision(cfg.precision, next(model.parameters()).device) == "bf16"
    with torch.no_grad():
        if pruner.stats != "none":
            hidden, kwargs = _capture_inputs(model, layers, calibration)
        for i, layer in enumerate(tqdm(layers, desc=f"pruning ({cfg.method})", disable=not show_progress)):
            linears = _linears(layer, names)
            stats: dict[str, LayerStats] = {}
            if pruner.stats != "none":
                hooks = []
                for name, lin in linears.items():
                    if name in stats:  # reads the same input as an earlier projection: share its statistics
                        continue
                    stats[name] = LayerStats(lin.weight.shape[1], hessian=pruner.stats == "hessian")
                    hooks.append(lin.register_forward_hook(lambda m, a, o, s=stats[name]: s.add(a[0])))
                    for group in spec.shared_inputs:
                        if name in group:
                            stats.update(dict.fromkeys(group, stats[name]))
                _run_layer(layer, hidden, kwargs[i], bf16)
                for h in hooks:
                    h.remove()
            for name, lin in linears.items():
                masks[f"{prefix}.{i}.{name}.weight"] = pruner.prune(lin.weight.data, stats.get(name), nm).cpu()
            if pruner.stats != "none":
                hidden = _run_layer(layer, hidden, kwargs[i], bf16)  # the pruned layer feeds the next one
    report = sparsity_report(masks)
    report.update(method=cfg.method, pattern=cfg.pattern, requested_sparsity=cfg.sparsity, bf16_calibration=bf16,
                  seconds=round(time.perf_counter() - start, 2),
                  calibration={"nsamples": int(calibration.shape[0]), "seqlen": int(calibration.shape[1])}
                  if calibration is not None else None)  # fmt: skip
    logger.info("%s: %.1f%% of the projection weights are zero", cfg.method, 100 * report["actual_sparsity"])
    return PruneResult(model, masks, report)


def sparsity_report(masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Overall and per-layer share of pruned weights."""
    per_layer: dict[str, list[int]] = {}
    for name, mask in masks.items():
        layer = ".".join(name.split(".")[:3])
        entry = per_layer.setdefault(layer, [0, 0])
        entry[0] += int((~mask).sum())
        entry[1] += mask.numel()
    zeros = sum(z for z, _ in per_layer.values())
    total = sum(n for _, n in per_layer.values())
    return {"actual_sparsity": zeros / total if total else 0.0,
            "per_layer": {k: round(z / n, 6) for k, (z, n) in per_layer.items()}}  # fmt: skip
