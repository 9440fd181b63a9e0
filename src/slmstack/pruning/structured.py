"""Structured pruning: remove whole MLP channels and attention KV-head groups, giving a smaller dense model.

Importance is activation-aware (Wanda's |W| * ||X|| rule lifted to structures): an MLP channel j scores
||X_j|| * ||W_down[:, j]||, where X is the input to ``down_proj`` over the calibration data; a KV group
scores the same sum over the ``o_proj`` columns of every query head that shares it, so grouped-query
attention stays consistent. Every layer keeps the same number of channels and groups, so the result is
an ordinary config that ``AutoModelForCausalLM`` loads as-is.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from slmstack.arch import get_arch, get_decoder_layers
from slmstack.errors import ConfigError
from slmstack.pruning.base import LayerStats
from slmstack.pruning.engine import _capture_inputs, _run_layer

__all__ = ["STRUCTURED_ARCHS", "decode_tokens_per_s", "prune_structured"]

STRUCTURED_ARCHS = ("llama", "qwen2", "gemma3_text")


def _collect(model: Any, calibration: torch.Tensor) -> list[dict[str, LayerStats]]:
    """Input statistics of every layer's ``down_proj`` and ``o_proj`` (the unpruned model, layer by layer)."""
    layers = get_decoder_layers(model)
    hidden, kwargs = _capture_inputs(model, layers, calibration)
    stats = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            entry = {"mlp": LayerStats(layer.mlp.down_proj.in_features, False),
                     "attn": LayerStats(layer.self_attn.o_proj.in_features, False)}  # fmt: skip
            hooks = [
                layer.mlp.down_proj.register_forward_hook(lambda m, a, o, s=entry["mlp"]: s.add(a[0])),
                layer.self_attn.o_proj.register_forward_hook(lambda m, a, o, s=entry["attn"]: s.add(a[0])),
            ]
            hidden = _run_layer(layer, hidden, kwargs[i])
            for h in hooks:
                h.remove()
            stats.append(entry)
    return stats


def _keep(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, n_keep).indices).values


def prune_structured(model: Any, ratio: float, calibration: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    """Return a smaller dense copy of ``model`` with ``ratio`` of MLP channels and KV groups removed per layer.

    Raises:
        ConfigError: an unsupported architecture or a ratio outside [0, 1).
    """
    from transformers import AutoModelForCausalLM

    if not 0 <= ratio < 1:
        raise ConfigError(f"structured ratio must be in [0, 1), got {ratio}")
    model_type = model.config.model_type
    if model_type not in STRUCTURED_ARCHS:
        raise ConfigError(f"structured pruning supports {', '.join(STRUCTURED_ARCHS)}; got {model_type!r}")
    start = time.perf_counter()
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rep = n_heads // n_kv
    keep_channels = max(1, round(cfg.intermediate_size * (1 - ratio)))
    keep_groups = max(1, round(n_kv * (1 - ratio)))
    stats = _collect(model, calibration)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = get_arch(model).layers
    for i, layer in enumerate(get_decoder_layers(model)):
        p = f"{prefix}.{i}"
        down = layer.mlp.down_proj.weight.float()  # (hidden, inter)
        mlp_score = stats[i]["mlp"].norm_sq.sqrt().float() * down.norm(dim=0)
        ch = _keep(mlp_score, keep_channels)
        for name in ("gate_proj", "up_proj"):
            _slice(state, f"{p}.mlp.{name}", ch, dim=0)
        _slice(state, f"{p}.mlp.down_proj", ch, dim=1)
        o = layer.self_attn.o_proj.weight.float()  # (hidden, heads * head_dim)
        col_score = stats[i]["attn"].norm_sq.sqrt().float() * o.norm(dim=0)  # (heads * head_dim,)
        group_score = col_score.reshape(n_kv, rep * head_dim).sum(1)
        groups = _keep(group_score, keep_groups)
        kv_cols = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in groups.tolist()])
        q_cols = torch.cat([torch.arange(g * rep * head_dim, (g + 1) * rep * head_dim) for g in groups.tolist()])
        _slice(state, f"{p}.self_attn.q_proj", q_cols, dim=0)
        _slice(state, f"{p}.self_attn.k_proj", kv_cols, dim=0)
        _slice(state, f"{p}.self_attn.v_proj", kv_cols, dim=0)
        _slice(state, f"{p}.self_attn.o_proj", q_cols, dim=1)
    new_cfg = copy.deepcopy(cfg)
    new_cfg.intermediate_size = keep_channels
    new_cfg.num_attention_heads = keep_groups * rep
    new_cfg.num_key_value_heads = keep_groups
    new_cfg.head_dim = head_dim
    small = AutoModelForCausalLM.from_config(new_cfg, dtype=next(model.parameters()).dtype)
    missing, unexpected = small.load_state_dict(state, strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise RuntimeError(f"structured pruning produced mismatched weights: {missing[:3]} {unexpected[:3]}")
    small.eval()
    params = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters()))
    report = {"method": "structured", "ratio": ratio, "parameters_before": params[0], "parameters_after": params[1],
              "intermediate_size": [cfg.intermediate_size, keep_channels], "kv_heads": [n_kv, keep_groups],
              "attention_heads": [n_heads, keep_groups * rep],
              "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    return small, report


def _slice(state: dict[str, torch.Tensor], module: str, index: torch.Tensor, dim: int) -> None:
    for suffix in ("weight", "bias"):
        key = f"{module}.{suffix}"
        if key in state and (suffix == "weight" or dim == 0):
            state[key] = state[key].index_select(dim, index).contiguous()


def decode_tokens_per_s(model: Any, tokenizer: Any, new_tokens: int = 32) -> float:
    """Greedy decode speed at batch 1 (after a short warm-up), for comparing a pruned model with its original."""
    ids = tokenizer("The history of the city begins", return_tensors="pt").input_ids.to(
        next(model.parameters()).device
    )
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return round((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start), 2)
