"""The one table of architecture differences.

Every place that needs to know where a model keeps its decoder layers, or what its attention and
MLP projections are called (LoRA targets, pruning, structured pruning), looks it up here, keyed by
``model.config.model_type`` as PEFT's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from slmstack.errors import ConfigError
from slmstack.registry import Registry

__all__ = ["ARCHITECTURES", "ArchSpec", "find_arch", "get_arch", "get_decoder_layers"]


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its parts.

    Attributes:
        layers: dotted attribute path from the ``*ForCausalLM`` model to the decoder layer list.
        attention: names of the attention projections inside one layer (relative paths).
        mlp: names of the MLP projections inside one layer (relative paths).
        embeddings: dotted path to the input embedding (never pruned).
        shared_inputs: groups of projections that read the same input (their calibration statistics are equal).
        engine: the generation engine's form for this architecture (``slmstack.engine.weights.FORMS``: how it
            reads the weights and runs the layer); empty where transformers generates.
    """

    layers: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    embeddings: str
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    engine: str = ""

    @property
    def lora_targets(self) -> list[str]:
        """Default LoRA target module names: every attention and MLP projection."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.attention + self.mlp})


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    embeddings="model.embed_tokens",
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
)

_FUSED = ArchSpec(  # Phi-3: q, k and v in one projection, gate and up in another
    layers="model.layers",
    attention=("self_attn.qkv_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_up_proj", "mlp.down_proj"),
    embeddings="model.embed_tokens",
)

ARCHITECTURES: Registry[ArchSpec] = Registry("architecture")
ARCHITECTURES.add("llama", replace(_LLAMA_LIKE, engine="llama"))
ARCHITECTURES.add("qwen2", replace(_LLAMA_LIKE, engine="llama"))
ARCHITECTURES.add("mistral", replace(_LLAMA_LIKE, engine="llama"))
ARCHITECTURES.add("qwen3", replace(_LLAMA_LIKE, engine="qwen3"))  # Llama plus q/k norms
ARCHITECTURES.add("gemma3_text", replace(_LLAMA_LIKE, engine="gemma3"))  # norms around each block, GeGLU, √d
ARCHITECTURES.add("phi3", replace(_FUSED, engine="phi3"))
# Gemma3ForConditionalGeneration wraps the same text decoder one level deeper (transformers generates).
ARCHITECTURES.add(
    "gemma3",
    ArchSpec(
        layers="model.language_model.layers",
        attention=_LLAMA_LIKE.attention,
        mlp=_LLAMA_LIKE.mlp,
        embeddings="model.language_model.embed_tokens",
        shared_inputs=_LLAMA_LIKE.shared_inputs,
    ),
)
ARCHITECTURES.add(
    "gpt_neox",
    ArchSpec(
        layers="gpt_neox.layers",
        attention=("attention.query_key_value", "attention.dense"),
        mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        embeddings="gpt_neox.embed_in",
        engine="gpt_neox",
    ),
)


def get_arch(model_or_type: nn.Module | str) -> ArchSpec:
    """Look up the :class:`ArchSpec` for a model (or a ``model_type`` string).

    A model of an architecture outside the table gets one found by name (:func:`find_arch`): transformers then
    generates for it, and training, pruning and evaluation read its projections from the spec found.

    Raises:
        ConfigError: for an architecture outside the table (a model whose layout cannot be found, or a bare
            ``model_type`` string), naming the supported ones and what was looked for.
    """
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    if model_type in ARCHITECTURES:
        return ARCHITECTURES.get(model_type)
    supported = ", ".join(ARCHITECTURES)
    if isinstance(model_or_type, str):
        raise ConfigError(f"unsupported architecture {model_type!r}. Supported: {supported}. Add an ArchSpec to "
                          "slmstack.arch.ARCHITECTURES to support another.")  # fmt: skip
    return find_arch(model_or_type)


_ATTENTION_WORDS = ("attn", "attention")


def find_arch(model: nn.Module) -> ArchSpec:
    """An :class:`ArchSpec` found by name in a model outside the table.

    The decoder layers are the longest ``nn.ModuleList`` of one block class; a layer's ``nn.Linear`` projections
    whose path has ``attn`` or ``attention`` in it are its attention, the others its MLP.

    Raises:
        ConfigError: when no such list holds both, naming what was looked for and what was found.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = base.config.model_type
    lists = [(name, m) for name, m in base.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1]  # fmt: skip
    found = "no list of decoder layers"
    for name, layers in sorted(lists, key=lambda item: -len(item[1])):
        linears = [n for n, m in layers[0].named_modules() if isinstance(m, nn.Linear) and n]
        attention = tuple(
            n for n in linears if any(w in part.lower() for part in n.split(".") for w in _ATTENTION_WORDS)
        )
        mlp = tuple(n for n in linears if n not in attention)
        if attention and mlp:
            embed = base.get_input_embeddings()
            embeddings = next(n for n, m in base.named_modules() if m is embed)
            return ArchSpec(layers=name, attention=attention, mlp=mlp, embeddings=embeddings)
        found = (f"{len(layers)} x {type(layers[0]).__name__} in {name!r} with nn.Linear projections "
                 f"{list(linears) or 'none'}")  # fmt: skip
    raise ConfigError(
        f"unsupported architecture {model_type!r}: looked for a list of decoder layers whose attention (a path with "
        f"'attn' or 'attention') and MLP are nn.Linear projections, and found {found}. Supported by name: "
        f"{', '.join(ARCHITECTURES)}; add an ArchSpec to slmstack.arch.ARCHITECTURES for another."
    )


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the decoder layer list of a causal LM (unwrapping a peft model if needed)."""
    spec = get_arch(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    node = base
    for part in spec.layers.split("."):
        node = getattr(node, part)
    return node
