"""Which models the engine runs, and their weights read out of a loaded Hugging Face model.

The engine runs one decoder loop (:mod:`slmstack.engine.model`) over every architecture that ``slmstack.arch``'s
table gives an engine form. A form (:data:`FORMS`) says where a model keeps its parts and how its layer differs
from Llama's; the model's config says the rest (sizes, activation, RoPE, sliding windows, soft-capping):

- ``llama``: Llama / SmolLM2, Qwen2 / Qwen2.5 (biases on q, k, v) and Mistral: RMSNorm, SiLU-gated MLP, RoPE.
- ``qwen3``: Llama plus an RMSNorm on each query and key head before RoPE.
- ``gemma3``: Gemma 3's text decoder: RMSNorm with ``(1 + w)``, a norm before and after both attention and the MLP,
  q/k norms, GeGLU (tanh GELU), embeddings times √d, sliding-window layers alternating with global ones (each
  with its own RoPE base), the attention scale ``query_pre_attn_scalar⁻½`` and the final logits' soft-capping
  where the config sets it. The config's ``attn_logit_softcapping`` is not applied: transformers' Gemma 3 (the
  reference) does not pass it to attention either (5.x), and a test holds the engine to transformers with it set.
- ``phi3``: Phi-3: q, k and v in one projection, gate and up in another (already fused, read as they are).
- ``gpt_neox``: Pythia: LayerNorm with bias, a parallel residual, rotary positions on part of each head, an
  ungated GELU MLP, and a fused ``query_key_value`` whose rows (per head: q, k, v) are reordered into q, k, v.

RoPE of any type transformers computes once (default, linear, llama3, yarn). Dynamic RoPE and every other model
fall back to transformers, which stays the reference. The weights are fused as they are read: q, k and v into one
``qkv`` projection and gate and up into one ``gate_up``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from slmstack.arch import ARCHITECTURES, get_decoder_layers
from slmstack.engine.cpu_kernels import gguf_kernels
from slmstack.engine.layers import INT8_GROUPS, Linear, rope_tables
from slmstack.errors import ConfigError
from slmstack.gguf_source import gguf_source

__all__ = [
    "FORMS",
    "DecoderShape",
    "DecoderWeights",
    "EngineForm",
    "EngineUnsupported",
    "LayerWeights",
    "base_linear",
    "engine_form",
    "engine_support",
    "engine_supports",
    "read_weights",
]

_LLAMA_MODULES = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


@dataclass(frozen=True)
class EngineForm:
    """Where an architecture keeps its parts, and how its layer differs from Llama's.

    Attributes:
        modules: each fused projection of the engine (``qkv``, ``o``, ``gate_up``, ``down``) -> the layer's
            projections, in the order their outputs are concatenated (weights and LoRA factors are read from them).
        decoder: the attribute of the ``*ForCausalLM`` that holds the decoder.
        embed, final_norm: the decoder's embedding and final norm.
        norms: the layer's norm before attention and before the MLP.
        post_norms: the norms after attention and after the MLP, before each residual add (Gemma).
        qk_norms: the per-head norms of the queries and keys (Qwen3, Gemma 3).
        norm: ``rms`` or ``layer`` (LayerNorm with a bias).
        norm_offset: the norm scales by ``offset + w`` (Gemma: 1).
        gated: the MLP is ``down(act(gate) * up)``; otherwise ``down(act(up))``.
        parallel: the MLP reads the layer's input, not the attention's output (GPT-NeoX's parallel residual; the
            config's ``use_parallel_residual`` can turn it off).
        interleaved_qkv: the fused qkv's rows are laid out head by head (q, k, v of head 0, then head 1...).
    """

    modules: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(_LLAMA_MODULES))
    decoder: str = "model"
    embed: str = "embed_tokens"
    final_norm: str = "norm"
    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    post_norms: tuple[str, str] | None = None
    qk_norms: tuple[str, str] | None = None
    norm: str = "rms"
    norm_offset: float = 0.0
    gated: bool = True
    parallel: bool = False
    interleaved_qkv: bool = False

    def qkv_rows(self, heads: int, head_dim: int) -> Tensor | None:
        """The order that turns the model's qkv rows into the engine's (all q, then all k, then all v)."""
        if not self.interleaved_qkv:
            return None
        return torch.arange(3 * heads * head_dim).view(heads, 3, head_dim).transpose(0, 1).reshape(-1)


FORMS: dict[str, EngineForm] = {
    "llama": EngineForm(),
    "qwen3": EngineForm(qk_norms=("self_attn.q_norm", "self_attn.k_norm")),
    "gemma3": EngineForm(
        norms=("input_layernorm", "pre_feedforward_layernorm"),
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
        norm_offset=1.0,
    ),
    "phi3": EngineForm(
        modules={
            "qkv": ("self_attn.qkv_proj",),
            "o": ("self_attn.o_proj",),
            "gate_up": ("mlp.gate_up_proj",),
            "down": ("mlp.down_proj",),
        },
    ),  # fmt: skip
    "gpt_neox": EngineForm(
        modules={
            "qkv": ("attention.query_key_value",),
            "o": ("attention.dense",),
            "gate_up": ("mlp.dense_h_to_4h",),
            "down": ("mlp.dense_4h_to_h",),
        },
        decoder="gpt_neox",
        embed="embed_in",
        final_norm="final_layer_norm",
        norm="layer",
        gated=False,
        parallel=True,
        interleaved_qkv=True,
    ),  # fmt: skip
}

ACTIVATIONS = {  # the config's activation name -> (torch function, its keyword arguments)
    "silu": ("silu", {}),
    "swish": ("silu", {}),
    "gelu": ("gelu", {}),
    "gelu_pytorch_tanh": ("gelu", {"approximate": "tanh"}),
    "gelu_new": ("gelu", {"approximate": "tanh"}),
}


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
    """The sizes and the per-model choices the forward pass needs (read from the config and the form)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    eps: float
    max_positions: int
    rotary: int = 0  # the leading dims of each head that RoPE turns (0: all of them)
    norm: str = "rms"  # or "layer"
    act: str = "silu"  # a torch.nn.functional name (ACTIVATIONS)
    act_kwargs: tuple[tuple[str, Any], ...] = ()
    gated: bool = True
    parallel: bool = False
    embed_scale: float = 1.0
    final_softcap: float | None = None


@dataclass
class LayerWeights:
    """One decoder layer: its norms, four (fused) projections and its attention's positions and window."""

    ln1: Tensor  # (C,)
    ln2: Tensor  # (C,)
    qkv: Linear  # C -> (H + 2 KV) hd
    o: Linear  # H hd -> C
    gate_up: Linear  # C -> 2 I (gated) or I
    down: Linear  # I -> C
    cos: Tensor  # (P, rotary) this layer's RoPE table (shared with the layers of its kind)
    sin: Tensor  # (P, rotary)
    ln1_bias: Tensor | None = None  # LayerNorm's biases
    ln2_bias: Tensor | None = None
    post_attn: Tensor | None = None  # Gemma's norms after attention and after the MLP
    post_mlp: Tensor | None = None
    qk_norm: Tensor | None = None  # (H + KV, hd): each query head's norm scale (times the attention scale), each key's
    window: int | None = None  # a sliding-window layer: each token sees its last ``window`` positions


@dataclass
class DecoderWeights:
    """Everything the forward pass reads."""

    shape: DecoderShape
    embed: Tensor  # (V, C)
    layers: list[LayerWeights]
    norm: Tensor  # (C,)
    lm_head: Linear  # C -> V
    norm_bias: Tensor | None = None

    def formats(self) -> dict[str, int]:
        """How many projections (the fused ones counted once, the output layer last) each weight format holds."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            for fmt in _formats(layer):
                counts[fmt] = counts.get(fmt, 0) + 1
        return counts

    def describe(self) -> str:
        """One line: the formats of the decoder's projections and of the output layer."""
        parts = ", ".join(f"{n} {fmt}" for fmt, n in sorted(self.formats().items(), key=lambda kv: -kv[1]))
        return f"{parts} projections; output layer {self.lm_head.fmt}"


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def engine_form(model: Any) -> EngineForm | None:
    """The engine's form for ``model``'s architecture, or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES or not ARCHITECTURES.get(model_type).engine:
        return None
    return FORMS[ARCHITECTURES.get(model_type).engine]


def _windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (None: it sees the whole row), as transformers' masks apply them."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return [None] * config.num_hidden_layers
    if types is not None:
        return [window if kind == "sliding_attention" else None for kind in types]
    return [window] * config.num_hidden_layers


def _rotary(model: Any, form: EngineForm) -> Any:
    return getattr(getattr(_base(model), form.decoder), "rotary_emb", None)


def engine_support(model: Any) -> str | None:
    """None when the engine can run ``model``, else the reason it cannot (it then falls back to transformers)."""
    config = getattr(model, "config", None)
    form = engine_form(model)
    if form is None:
        runs = ", ".join(sorted(n for n in ARCHITECTURES if ARCHITECTURES.get(n).engine))
        return f"architecture {getattr(config, 'model_type', None)!r} is not one the engine runs ({runs})"
    act = _activation(config)
    if act not in ACTIVATIONS:
        return f"activation {act!r} (the engine runs {', '.join(ACTIVATIONS)})"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    parameters = getattr(config, "rope_parameters", None) or {}
    per_type = parameters.values() if all(isinstance(v, dict) for v in parameters.values()) else [parameters]
    for params in per_type:  # one set, or one per layer type (Gemma 3)
        rope_type = (params or {}).get("rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            return f"RoPE type {rope_type!r}, which changes with the sequence length"
    rotary = _rotary(model, form)
    if rotary is None or not (hasattr(rotary, "inv_freq") or hasattr(rotary, "full_attention_inv_freq")):
        return "no rotary embedding found"
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and form.qk_norms is None and scalar != _head_dim(config):
        return f"an attention scale of query_pre_attn_scalar={scalar}⁻½ without q/k norms to fold it into"
    for layer in get_decoder_layers(model):
        for path in (form.modules["qkv"][0], form.modules["gate_up"][0]):
            module = base_linear(layer.get_submodule(path))
            if not isinstance(module, torch.nn.Linear):
                return f"a {type(module).__name__} projection (already converted or quantized)"
    return None


def base_linear(module: Any) -> Any:
    """The plain ``nn.Linear`` under a peft LoRA layer (or the module itself)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _int4_groups(linears: list[Any], source: Any, names: dict[int, str]) -> Any:
    """The 4-bit blocks a GGUF file stores for these projections, side by side; None unless every one has them."""
    from slmstack.gguf_source import Int4Groups

    parts = [source.int4_groups(names.get(id(m), "")) for m in linears] if source is not None else [None]
    if any(p is None for p in parts):
        return None
    return Int4Groups(*(torch.cat([getattr(p, k) for p in parts]) for k in ("q", "scale", "low")))


def _cat(modules: list[Any], fmt: str, dtype: torch.dtype, rows: Tensor | None = None, source: Any = None,
         names: dict[int, str] | None = None) -> Linear:  # fmt: skip
    """One ``Linear`` for projections that read the same input, their outputs concatenated (then ``rows`` picked).

    For ``dense`` weights already in ``dtype``, the transformers modules are then pointed at slices of the
    fused weight, so the engine and the model it came from share one copy of the weights. Under ``int4-weights``
    projections that ``source`` (the model's GGUF file) stores in 4-bit blocks take those blocks as they are;
    under ``auto`` they are ``int4-weights`` and every other projection is ``dense``.
    """
    linears = [base_linear(m) for m in modules]
    weights = [m.weight.detach() for m in linears]
    weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)  # (sum out, in)
    biases = [m.bias for m in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else torch.zeros(m.out_features, device=m.weight.device)
                          for b, m in zip(biases, linears, strict=True)])  # fmt: skip
    groups = _int4_groups(linears, source, names or {}) if fmt in ("auto", "int4-weights") else None
    if fmt == "auto":
        fmt = "dense" if groups is None else "int4-weights"
    if rows is not None:
        weight, bias = weight[rows.to(weight.device)], None if bias is None else bias[rows.to(bias.device)]
        if groups is not None:
            groups = type(groups)(*(getattr(groups, k)[rows] for k in ("q", "scale", "low")))
    linear = Linear(weight, bias, fmt, dtype, groups=groups)
    kept = getattr(linear, "weight", None)  # dense, and int4 with slmstack's kernel (its many-row path)
    if kept is None or rows is not None or kept.dtype != weights[0].dtype:
        return linear
    if fmt != "dense":  # the values the groups hold: shared with the model only where they are its own weights
        if not torch.equal(kept, weight):
            return linear
        if len(linears) == 1:
            linear.weight = weights[0].contiguous()
    if len(linears) > 1:
        start = 0
        for m in linears:
            m.weight.data = linear.weight[start : start + m.out_features]
            start += m.out_features
    return linear


def _formats(layer: LayerWeights) -> list[str]:
    return [linear.fmt for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)]


def _parameter_names(base: Any) -> dict[int, str]:
    """Each plain linear module's weight name, as the model's state dict (and so its GGUF map) spells it."""
    return {id(m): f"{name.removesuffix('.base_layer')}.weight" for name, m in base.named_modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Embedding)}  # fmt: skip


def _activation(config: Any) -> str:
    """The MLP's activation name (Gemma's configs call it ``hidden_activation``)."""
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _norm(module: Any, form: EngineForm, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """A norm's scale (``offset + w``, computed in float32 as Gemma does) and bias."""
    weight = module.weight.detach().float() + form.norm_offset
    bias = getattr(module, "bias", None)
    return weight.to(dtype), None if bias is None else bias.detach().to(dtype)


def _rope(model: Any, form: EngineForm, kind: str | None, max_positions: int) -> tuple[Tensor, Tensor]:
    """RoPE tables for layers of ``kind`` (a model with one rotary embedding for every layer: None)."""
    rotary = _rotary(model, form)
    prefix = f"{kind}_" if kind and hasattr(rotary, f"{kind}_inv_freq") else ""
    inv_freq = getattr(rotary, f"{prefix}inv_freq")
    scaling = getattr(rotary, f"{prefix}attention_scaling", 1.0)
    return rope_tables(inv_freq, float(scaling), max_positions)


@torch.no_grad()
def read_weights(model: Any, fmt: str = "dense", dtype: torch.dtype = torch.float32,
                 max_positions: int | None = None) -> DecoderWeights:  # fmt: skip
    """The engine's copy of ``model``'s weights (LoRA adapters are read separately, see :mod:`.lora`).

    Args:
        model: a loaded causal LM of a supported architecture, optionally wrapped by peft.
        fmt: the linear layers' weight format (:data:`slmstack.engine.layers.LINEAR_FORMATS`), or ``auto``:
            ``int4-weights`` for the projections the model's GGUF file stores in 4-bit blocks (taken as they are,
            :mod:`slmstack.gguf_source`), ``dense`` for the rest.
        dtype: the compute dtype (activations, norms, dense weights).
        max_positions: the longest sequence the RoPE tables cover (default: the model's context).
    """
    form = engine_form(model)
    base = _base(model)
    config = base.config
    decoder = getattr(base, form.decoder)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = _head_dim(config)
    act, act_kwargs = ACTIVATIONS[_activation(config)]
    eps = getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_eps", None) or 1e-6
    max_positions = max_positions or config.max_position_embeddings
    scalar = getattr(config, "query_pre_attn_scalar", None)
    embed = getattr(decoder, form.embed)
    tables: dict[str | None, tuple[Tensor, Tensor]] = {}
    types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    for kind in set(types):
        cos, sin = _rope(model, form, kind, max_positions)
        tables[kind] = (cos.to(dtype), sin.to(dtype))
    rotary = tables[types[0]][0].shape[-1]
    shape = DecoderShape(
        hidden=config.hidden_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=config.intermediate_size, vocab=config.vocab_size, layers=config.num_hidden_layers,
        eps=float(eps), max_positions=max_positions, rotary=0 if rotary == head_dim else rotary, norm=form.norm,
        act=act, act_kwargs=tuple(act_kwargs.items()), gated=form.gated,
        parallel=form.parallel and getattr(config, "use_parallel_residual", True),
        embed_scale=float(getattr(embed, "scalar_embed_scale", None) or getattr(embed, "embed_scale", 1.0)),
        final_softcap=getattr(config, "final_logit_softcapping", None),
    )  # fmt: skip
    # the attention scale, folded into each query head's norm: SDPA's own scale is head_dim⁻½
    q_scale = 1.0 if scalar is None else (scalar**-0.5) / (head_dim**-0.5)
    rows = form.qkv_rows(heads, head_dim)
    windows = _windows(config)
    source = gguf_source(base) if fmt in ("auto", "int4-weights") else None
    names = _parameter_names(base) if source is not None else {}
    cat = partial(_cat, dtype=dtype, source=source, names=names)
    layers = []
    for i, layer in enumerate(get_decoder_layers(model)):
        parts = {name: [layer.get_submodule(p) for p in paths] for name, paths in form.modules.items()}
        (ln1, ln1_bias), (ln2, ln2_bias) = (_norm(layer.get_submodule(n), form, dtype) for n in form.norms)
        post = [_norm(layer.get_submodule(n), form, dtype)[0] for n in form.post_norms or ()]
        qk_norm = None
        if form.qk_norms:
            q_norm, k_norm = (_norm(layer.get_submodule(n), form, dtype)[0].float() for n in form.qk_norms)
            qk_norm = torch.cat([(q_norm * q_scale).expand(heads, head_dim), k_norm.expand(kv_heads, head_dim)])
            qk_norm = qk_norm.to(dtype).contiguous()
        cos, sin = tables[types[i]]
        layers.append(LayerWeights(
            ln1=ln1, ln2=ln2, ln1_bias=ln1_bias, ln2_bias=ln2_bias,
            qkv=cat(parts["qkv"], fmt, rows=rows), o=cat(parts["o"], fmt), gate_up=cat(parts["gate_up"], fmt),
            down=cat(parts["down"], fmt),
            cos=cos, sin=sin, post_attn=post[0] if post else None, post_mlp=post[1] if post else None,
            qk_norm=qk_norm, window=windows[i] if windows[i] and windows[i] < max_positions else None,
        ))  # fmt: skip
    head = base.get_output_embeddings()
    norm, norm_bias = _norm(getattr(decoder, form.final_norm), form, dtype)
    if fmt == "auto":  # the output layer as under int4-weights once any projection is int4
        fmt = "int4-weights" if any(f == "int4-weights" for x in layers for f in _formats(x)) else "dense"
    return DecoderWeights(
        shape=shape, embed=embed.weight.detach().to(dtype), layers=layers, norm=norm, norm_bias=norm_bias,
        lm_head=_output_layer(head, embed, fmt, dtype, source, names),
    )  # fmt: skip


def _output_layer(head: Any, embed: Any, fmt: str, dtype: torch.dtype, source: Any, names: dict[int, str]) -> Linear:
    """The output layer: the GGUF file's own Q8_0 blocks or :func:`output_format`.

    Under ``int4-weights`` the file's Q8_0 blocks are taken where it stores the layer so (tied to the embeddings, as
    the default model's are) and slmstack's kernel runs.
    """
    if fmt == "int4-weights" and source is not None and dtype == torch.float32 and gguf_kernels() is not None:
        name = names.get(id(embed if head.weight is embed.weight else head))
        groups = source.int8_groups(name) if name else None
        if groups is not None:
            return Linear(head.weight.detach(), None, INT8_GROUPS, dtype, groups=groups)
    return _cat([head], output_format(fmt), dtype)


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
