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

__all__ = ["ARCHITECTURES", "ArchSpec", "get_arch", "get_decoder_layers"]


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

    Raises:
        ConfigError: for an unsupported architecture, listing the supported ones.
    """
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    if model_type not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise ConfigError(
            f"unsupported architecture {model_type!r}. Supported: {supported}. "
            "Add an ArchSpec to slmstack.arch.ARCHITECTURES to support another."
        )
    return ARCHITECTURES.get(model_type)


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the decoder layer list of a causal LM (unwrapping a peft model if needed)."""
    spec = get_arch(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    node = base
    for part in spec.layers.split("."):
        node = getattr(node, part)
    return node
