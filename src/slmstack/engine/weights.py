"""Which models the engine runs, and their weights read out of a loaded Hugging Face model.

The engine runs decoders with the Llama layout (``slmstack.arch``'s table marks them ``engine=True``):
SmolLM2 / Llama, Qwen2 / Qwen2.5 and Mistral, with SiLU-gated MLPs, RMSNorm and rotary positions of any
type transformers computes once (default, linear, llama3, yarn). Biases are read where a model has them
(Qwen2's q/k/v). Sliding-window attention shorter than the context, dynamic RoPE and every other model fall
back to transformers, which stays the reference. The weights are fused as they are read: q, k and v into one
``qkv`` projection and gate and up into one ``gate_up``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from slmstack.arch import ARCHITECTURES, get_decoder_layers
from slmstack.engine.layers import Linear, rope_tables
from slmstack.errors import ConfigError

__all__ = [
    "DecoderShape",
    "DecoderWeights",
    "EngineUnsupported",
    "LayerWeights",
    "base_linear",
    "engine_support",
    "engine_supports",
    "read_weights",
]


def output_format(fmt: str) -> str:
    """The output layer's weight format under ``fmt``.

    Under ``int4-weights`` it is ``float16-weights`` (``int8-weights`` without fbgemm): GGUF files keep the
    output layer at 8 bits, not 4, and on the default model an int8 output layer (one scale per row) behind
    int4 projections changed a greedy token in 49 where float16 changed none (``benchmarks/engine.py``).
    """
    if fmt != "int4-weights":
        return fmt
    return "float16-weights" if "fbgemm" in torch.backends.quantized.supported_engines else "int8-weights"


@dataclass(frozen=True)
class DecoderShape:
    """The sizes the forward pass needs."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    eps: float
    max_positions: int


@dataclass
class LayerWeights:
    """One decoder layer: two norms and four (fused) projections."""

    ln1: Tensor  # (C,)
    ln2: Tensor  # (C,)
    qkv: Linear  # C -> (H + 2 KV) hd
    o: Linear  # H hd -> C
    gate_up: Linear  # C -> 2 I
    down: Linear  # I -> C


@dataclass
class DecoderWeights:
    """Everything the forward pass reads."""

    shape: DecoderShape
    embed: Tensor  # (V, C)
    layers: list[LayerWeights]
    norm: Tensor  # (C,)
    lm_head: Linear  # C -> V
    cos: Tensor  # (P, hd)
    sin: Tensor  # (P, hd)


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def engine_support(model: Any) -> str | None:
    """None when the engine can run ``model``, else the reason it cannot (it then falls back to transformers)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES or not ARCHITECTURES.get(model_type).engine:
        return f"architecture {model_type!r} is not one the engine runs (llama, qwen2, mistral)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the engine runs SiLU-gated MLPs)"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        return f"sliding-window attention ({window} tokens)"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        return f"RoPE type {rope_type!r}, which changes with the sequence length"
    rotary = getattr(_base(model).model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return "no rotary embedding found"
    for layer in get_decoder_layers(model):
        for module in (layer.self_attn.q_proj, layer.mlp.gate_proj):
            if not isinstance(base_linear(module), torch.nn.Linear):
                return f"a {type(base_linear(module)).__name__} projection (already converted or quantized)"
    return None


def base_linear(module: Any) -> Any:
    """The plain ``nn.Linear`` under a peft LoRA layer (or the module itself)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _cat(modules: list[Any], fmt: str, dtype: torch.dtype) -> Linear:
    """One ``Linear`` for projections that read the same input, their outputs concatenated.

    For ``dense`` weights already in ``dtype``, the transformers modules are then pointed at slices of the
    fused weight, so the engine and the model it came from share one copy of the weights.
    """
    linears = [base_linear(m) for m in modules]
    weights = [m.weight.detach() for m in linears]
    weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)  # (sum out, in)
    biases = [m.bias for m in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else torch.zeros(m.out_features, device=m.weight.device)
                          for b, m in zip(biases, linears, strict=True)])  # fmt: skip
    linear = Linear(weight, bias, fmt, dtype)
    if fmt == "dense" and len(linears) > 1 and linear.weight.dtype == weights[0].dtype:
        start = 0
        for m in linears:
            m.weight.data = linear.weight[start : start + m.out_features]
            start += m.out_features
    return linear


@torch.no_grad()
def read_weights(model: Any, fmt: str = "dense", dtype: torch.dtype = torch.float32,
                 max_positions: int | None = None) -> DecoderWeights:  # fmt: skip
    """The engine's copy of ``model``'s weights (LoRA adapters are read separately, see :mod:`.lora`).

    Args:
        model: a loaded causal LM of a supported architecture, optionally wrapped by peft.
        fmt: the linear layers' weight format (:data:`slmstack.engine.layers.LINEAR_FORMATS`).
        dtype: the compute dtype (activations, norms, dense weights).
        max_positions: the longest sequence the RoPE tables cover (default: the model's context).
    """
    base = _base(model)
    config = base.config
    decoder = base.model
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = DecoderShape(
        hidden=config.hidden_size, heads=heads, kv_heads=getattr(config, "num_key_value_heads", heads),
        head_dim=head_dim, intermediate=config.intermediate_size, vocab=config.vocab_size,
        layers=config.num_hidden_layers, eps=float(config.rms_norm_eps),
        max_positions=max_positions or config.max_position_embeddings,
    )  # fmt: skip
    layers = []
    for layer in get_decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(LayerWeights(
            ln1=layer.input_layernorm.weight.detach().to(dtype),
            ln2=layer.post_attention_layernorm.weight.detach().to(dtype),
            qkv=_cat([attn.q_proj, attn.k_proj, attn.v_proj], fmt, dtype), o=_cat([attn.o_proj], fmt, dtype),
            gate_up=_cat([mlp.gate_proj, mlp.up_proj], fmt, dtype), down=_cat([mlp.down_proj], fmt, dtype),
        ))  # fmt: skip
    head = base.get_output_embeddings()
    cos, sin = rope_tables(decoder.rotary_emb.inv_freq, float(decoder.rotary_emb.attention_scaling),
                           shape.max_positions)  # fmt: skip
    return DecoderWeights(
        shape=shape, embed=decoder.embed_tokens.weight.detach().to(dtype), layers=layers,
        norm=decoder.norm.weight.detach().to(dtype), lm_head=_cat([head], output_format(fmt), dtype),
        cos=cos.to(dtype), sin=sin.to(dtype),
    )  # fmt: skip


class EngineUnsupported(ConfigError):
    """The engine cannot run this model or adapter (the caller falls back to transformers)."""


def engine_supports(model: Any) -> str | None:
    """None when the engine can run ``model`` (adapters included), else why not."""
    reason = engine_support(model)
    if reason is None and hasattr(model, "peft_config"):
        for name, cfg in model.peft_config.items():
            if (
                getattr(cfg, "peft_type", None) is not None
                and str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA"
            ):
                return f"adapter {name!r} is a {cfg.peft_type} adapter"
            if getattr(cfg, "use_dora", False):
                return f"adapter {name!r} uses DoRA"
    return reason
