"""What a GGUF file stores, read without dequantizing: each weight's block type, and 4-bit blocks as int4 groups.

A model loaded from a GGUF file (:func:`slmstack.models.load_model`) runs on transformers in float32, dequantized
once into a safetensors cache. The engine's ``int4-weights`` format keeps a linear layer in 4-bit groups of 32
inputs with a scale and an offset, which is exactly what GGUF's 4-bit block types store:

- ``Q4_0``: 32 values ``d·(q - 8)`` (``scale = d``, ``low = -8d``);
- ``Q4_1``: 32 values ``d·q + m`` (``scale = d``, ``low = m``);
- ``Q4_K``: super-blocks of 8 × 32 values ``d·sc_j·q - dmin·m_j``, with 6-bit ``sc_j`` and ``m_j`` per group
  (``scale = d·sc_j``, ``low = -dmin·m_j``).

So the engine takes these blocks straight from the file (:meth:`GGUFSource.int4_groups`, kept once in the model's
cache beside the dequantized weights), with no float32 round trip and no search for each group's grid. Wider block
types (``Q5_0``, ``Q6_K``, ``Q8_0``...) do not fit 4 bits; under the default format their projections stay in
float32 (:func:`slmstack.engine.weights.read_weights`).
The unpacking uses gguf's own block layouts (``gguf.quants``), and every tensor read this way is checked against
the weight transformers loaded from the same file before the engine uses it.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "EIGHT_BIT",
    "FOUR_BIT",
    "GGUFSource",
    "Int4Groups",
    "attach_gguf_source",
    "gguf_arch",
    "gguf_source",
    "unpack_4bit",
    "unpack_8bit",
]

FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")  # the block types that are 4-bit groups of 32 with a scale and an offset
EIGHT_BIT = ("Q8_0",)  # 8-bit groups of 32 with a scale
GROUP = 32

_SOURCES: weakref.WeakKeyDictionary[Any, GGUFSource] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Int4Groups:
    """A weight (out, in) as ``low + q·scale`` in groups of 32 inputs.

    q is (out, in) uint8 in 0..15; scale and low are (out, in / 32) float32.
    """

    q: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these groups hold."""
        out, width = self.q.shape
        groups = self.q.float().reshape(out, width // GROUP, GROUP)
        return (self.low[..., None] + groups * self.scale[..., None]).reshape(out, width)


def unpack_4bit(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row's (or rows') 4-bit blocks as ``(q, scale, low)``, in gguf's byte layout for ``kind``.

    Args:
        kind: ``Q4_0``, ``Q4_1`` or ``Q4_K``.
        blocks: (n_blocks, bytes per block) uint8.

    Returns:
        q (n_groups, 32) uint8, scale and low (n_groups,) float32, groups in the order of the values.
    """
    from gguf import quants

    n = blocks.shape[0]
    if kind in ("Q4_0", "Q4_1"):
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        if kind == "Q4_0":
            low, qs = -8.0 * d, blocks[:, 2:]
        else:
            low, qs = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0], blocks[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # low nibbles are values 0..15, high ones 16..31
        return q.astype(np.uint8), d, low.astype(np.float32)
    if kind == "Q4_K":
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = quants.Q4_K.get_scale_min(blocks[:, 4 : 4 + quants.Q4_K.K_SCALE_SIZE].copy())
        qs = blocks[:, 4 + quants.Q4_K.K_SCALE_SIZE :].reshape(n, 4, 32)  # each 32 bytes: two groups of 32 values
        q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n * 8, GROUP)
        scale = (d * sc.astype(np.float32)).reshape(-1)
        low = -(dmin * m.astype(np.float32)).reshape(-1)
        return q.astype(np.uint8), scale, low
    raise ValueError(f"{kind} is not a 4-bit block type ({', '.join(FOUR_BIT)})")


def unpack_8bit(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 blocks (n_blocks, 34 bytes: a float16 scale, then 32 signed bytes): q (n, 32) int8, scale (n,) float32."""
    return blocks[:, 2:].copy().view(np.int8), blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]


BLOCKS_FILE = "gguf-groups.safetensors"  # beside the dequantized weights in the model cache


def gguf_arch(config: Any) -> tuple[Any, str]:
    """The gguf package's architecture enum and name for a transformers config.

    Raises:
        ConfigError: llama.cpp has no such architecture.
    """
    from gguf import MODEL_ARCH_NAMES

    from slmstack.errors import ConfigError

    name = {"gemma3_text": "gemma3", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}.get(
        config.model_type, config.model_type
    )
    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == name), None)
    if arch is None:
        raise ConfigError(f"llama.cpp has no architecture {name!r}")
    return arch, name


def _read_gguf(path: Path, model: Any) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Each of ``model``'s weights' block type in ``path``, and its 4-bit blocks as packed int4 groups.

    The names are mapped with gguf's own tensor-name table (what transformers uses when it loads a GGUF), and
    transformers' own per-architecture fix-ups (Llama's q/k rows are permuted in GGUF) are applied to the groups'
    rows. 4-bit groups are returned as ``{name}.q`` (out, in / 2) uint8, two values a byte (low nibble first),
    ``{name}.scale`` and ``{name}.low`` (out, in / 32) float32; Q8_0 groups as ``{name}.q8`` (out, in) int8 and
    ``{name}.scale``.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    config = model.config
    arch, arch_name = gguf_arch(config)
    table = get_tensor_name_map(arch, config.num_hidden_layers)
    processor = TENSOR_PROCESSORS.get(arch_name, TensorProcessor)(config={
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    })  # fmt: skip
    names = {}
    for hf_name in model.state_dict():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(stem)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    types, groups = {}, {}
    for tensor in GGUFReader(str(path)).tensors:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            continue
        kind = types[hf_name] = tensor.tensor_type.name
        if kind not in FOUR_BIT + EIGHT_BIT:
            continue
        rows = np.asarray(tensor.data)  # (out, bytes per row)
        out = rows.shape[0]
        if kind in EIGHT_BIT:
            q8, scale = unpack_8bit(rows.reshape(-1, 34))
            q8, scale = (processor.process(a.reshape(out, -1), tensor.name).weights for a in (q8, scale))
            groups[f"{hf_name}.q8"] = torch.from_numpy(np.ascontiguousarray(q8))
            groups[f"{hf_name}.scale"] = torch.from_numpy(np.ascontiguousarray(scale))
            continue
        q, scale, low = unpack_4bit(kind, rows.reshape(-1, GGML_QUANT_SIZES[GGMLQuantizationType[kind]][1]))
        q, scale, low = (processor.process(a.reshape(out, -1), tensor.name).weights for a in (q, scale, low))
        groups[f"{hf_name}.q"] = torch.from_numpy(np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4)))
        groups[f"{hf_name}.scale"] = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32))
        groups[f"{hf_name}.low"] = torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32))
    return types, groups


class GGUFSource:
    """The GGUF file a loaded model came from: each weight's block type, and its 4-bit weights' blocks.

    Read from the file once and kept in the model's cache folder (:data:`BLOCKS_FILE`, written atomically), so
    later loads read the types from its header and each weight's groups when the engine asks for them.
    """

    def __init__(self, gguf: Path, cache_dir: Path, model: Any) -> None:
        self.gguf, self.cache_dir = Path(gguf), Path(cache_dir)
        self._model = weakref.ref(model)
        self._types: dict[str, str] | None = None
        self._groups: dict[str, torch.Tensor] | None = None  # in memory where the cache could not be written

    @property
    def file(self) -> Path:
        """The cached groups and types (written at the first use)."""
        return self.cache_dir / BLOCKS_FILE

    def _ensure(self) -> None:
        if self._types is not None:
            return
        from safetensors import safe_open
        from safetensors.torch import save_file

        if not self.file.is_file():
            logger.info("reading the 4- and 8-bit blocks of %s (once)", self.gguf.name)
            types, groups = _read_gguf(self.gguf, self._model())
            tmp = self.file.with_name(f".{BLOCKS_FILE}.{os.getpid()}.tmp")
            try:
                save_file(groups, str(tmp), metadata={"types": json.dumps(types)})
                os.replace(tmp, self.file)
            except OSError as exc:  # a read-only cache: this process keeps them in memory
                logger.warning("could not cache the GGUF blocks in %s (%s); they are read again next time", tmp, exc)
                tmp.unlink(missing_ok=True)
                self._types, self._groups = types, groups
                return
        with safe_open(str(self.file), "pt") as fh:
            self._types = json.loads(fh.metadata()["types"])

    def _tensor(self, key: str) -> torch.Tensor:
        if self._groups is not None:
            return self._groups[key]
        from safetensors import safe_open

        with safe_open(str(self.file), "pt") as fh:
            return fh.get_tensor(key)

    @property
    def types(self) -> dict[str, str]:
        """The block type of each of the model's weights, by transformers' parameter name (``Q4_1``, ``F32``)."""
        self._ensure()
        assert self._types is not None
        return self._types

    def int4_groups(self, name: str) -> Int4Groups | None:
        """Parameter ``name``'s 4-bit blocks as int4 groups, or None where it is not stored in a 4-bit type."""
        if self.types.get(name) not in FOUR_BIT:
            return None
        packed = self._tensor(f"{name}.q")
        q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        return Int4Groups(q, self._tensor(f"{name}.scale"), self._tensor(f"{name}.low"))

    def int8_groups(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Parameter ``name``'s Q8_0 blocks: q (out, in) int8 and scale (out, in / 32) float32; None otherwise."""
        if self.types.get(name) not in EIGHT_BIT:
            return None
        return self._tensor(f"{name}.q8"), self._tensor(f"{name}.scale")


def attach_gguf_source(model: Any, gguf: str | Path, cache_dir: str | Path) -> None:
    """Remember that ``model`` was loaded from ``gguf``, cached in ``cache_dir`` (read when the engine asks)."""
    _SOURCES[model] = GGUFSource(Path(gguf), Path(cache_dir), model)


def gguf_source(model: Any) -> GGUFSource | None:
    """The GGUF file a transformers model was loaded from (see :func:`attach_gguf_source`), if any."""
    return _SOURCES.get(model)
