"""Every switch of the engine in one dataclass, with the environment read once, when the options are made."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slmstack.errors import ConfigError
from slmstack.formats import LINEAR_FORMATS

if TYPE_CHECKING:
    import torch

__all__ = ["ENGINE_MODES", "GRAPHS", "EngineOptions"]

ENGINE_MODES = ("auto", "native", "compiled", "hf")  # compiled: native, decode steps through torch.compile (CPU)
GRAPHS = ("auto", "capture", "off", "static", "compile")
DECODE_KERNELS = ("auto", "sdpa", "matmul")
TRITON_KERNELS = ("lora", "rope")
ENGINE_ENV = "SLMSTACK_ENGINE"  # hf: every stack of the process generates with transformers (the tests run both)
CPU_KERNELS_ENV = "SLMSTACK_CPU_KERNELS"  # off: torch's int4 kernel rather than slmstack's (engine/cpu_kernels.py)
NO_TRITON_ENV = "SLMSTACK_NO_TRITON"  # Triton kernels turned off: "lora", "rope" or "all", comma-separated


def _env_mode() -> str:
    return os.environ.get(ENGINE_ENV, "auto")


def _env_no_triton() -> frozenset[str]:
    parts = {p.strip() for p in os.environ.get(NO_TRITON_ENV, "").split(",") if p.strip()}
    return frozenset(TRITON_KERNELS) if "all" in parts else frozenset(parts)


@dataclass
class EngineOptions:
    """How the engine runs.

    Attributes:
        mode: ``auto`` (the engine where it runs this model, else transformers), ``native`` (the engine or an
            error), ``compiled`` (native, decode steps through ``torch.compile``) or ``hf`` (transformers always).
            ``auto`` takes ``SLMSTACK_ENGINE`` from the environment.
        weights: the linear layers' format (:data:`slmstack.formats.LINEAR_FORMATS`), or ``auto``: on a CPU,
            ``int4-weights`` for the projections the model's GGUF file stores in 4-bit blocks and ``dense`` for the
            rest (:func:`slmstack.engine.weights.read_weights`); ``dense`` on a GPU.
        max_batch: rows per step, which is also the number of cache slots.
        max_tokens_per_step: tokens per step; prompts are fed in chunks that fit beside the decoding rows.
            Default: 256 on a CPU, where a step's time grows with its tokens and the decoding rows wait for it;
            2048 on a GPU, where a step of a few hundred tokens is bound by kernel launches.
        max_lora_rank: the largest adapter rank accepted.
        max_length: the longest sequence (prompt + output); default: the model's context window.
        graphs: ``auto`` (CUDA graphs for decode steps on a GPU, none on a CPU), ``capture``, ``off``, ``static``
            (the graphs' static path run eagerly: what the CPU tests check), or ``compile``: on a CPU the static
            path through ``torch.compile`` (a C++ compiler needed; without one, a warning and eager steps), on a
            GPU ``capture``.
        prefix_slots: cache slots reserved for prompt prefixes shared across requests; 0 turns the reuse off.
        decode_kernel: decode attention as ``sdpa``, ``matmul``, or ``auto`` (``matmul`` on a GPU, ``sdpa``
            elsewhere; see :func:`slmstack.engine.layers.decode_attention`).
        no_triton: the Triton kernels (``lora``, ``rope``) turned off; default from ``SLMSTACK_NO_TRITON``.
        reuse_memory: on a CPU under glibc, keep large freed blocks for reuse (``mallopt``: mmap threshold 1 GiB,
            trim threshold 2 GiB, for the whole process; :func:`slmstack.engine.runner.reuse_freed_memory`). A
            step's logits (32 rows of Gemma 3's 262k vocabulary: 34 MB) otherwise land on fresh zero-filled pages
            every step: converting them from bfloat16 took 15.7 ms, 4.9 ms with it (2 cores).
    """

    mode: str = "auto"
    weights: str = "dense"
    max_batch: int = 16
    max_tokens_per_step: int | None = None
    max_lora_rank: int = 64
    max_length: int | None = None
    graphs: str = "auto"
    prefix_slots: int = 4
    decode_kernel: str = "auto"
    no_triton: frozenset[str] = field(default_factory=_env_no_triton)
    reuse_memory: bool = True

    def __post_init__(self) -> None:
        if self.mode == "auto":
            self.mode = _env_mode()
        for name, value, allowed in (("engine", self.mode, ENGINE_MODES), ("graphs", self.graphs, GRAPHS),
                                     ("weights", self.weights, ("auto", *LINEAR_FORMATS)),
                                     ("decode_kernel", self.decode_kernel, DECODE_KERNELS)):  # fmt: skip
            if value not in allowed:
                raise ConfigError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.mode == "compiled" and self.graphs == "auto":
            self.graphs = "compile"
        kernels = os.environ.get(CPU_KERNELS_ENV, "on").strip().lower() or "on"
        if kernels not in ("on", "off"):
            raise ConfigError(f"{CPU_KERNELS_ENV}={kernels!r}: use on (slmstack's CPU kernels where they build, the "
                              "default) or off (torch's int4 kernel)")  # fmt: skip
        unknown = set(self.no_triton) - set(TRITON_KERNELS)
        if unknown:
            raise ConfigError(f"{NO_TRITON_ENV}: {sorted(unknown)} are not kernels; use lora, rope or all")
        if self.max_batch < 1 or self.max_lora_rank < 1 or self.prefix_slots < 0:
            raise ConfigError("max_batch and max_lora_rank must be >= 1, prefix_slots >= 0")

    def tokens_per_step(self, device: torch.device) -> int:
        """``max_tokens_per_step``, or its default for ``device``."""
        return self.max_tokens_per_step or (2048 if device.type == "cuda" else 256)

    def kernel(self, device: torch.device, name: str) -> bool:
        """Whether Triton kernel ``name`` runs on ``device`` (it runs there, and is not turned off)."""
        from slmstack.engine.kernels import kernel_available

        return name not in self.no_triton and kernel_available(device, name)

    @contextmanager
    def torch_forms(self, *names: str) -> Iterator[None]:
        """Within the block the kernels ``names`` (default: both) are off and the torch forms run, for comparisons.

        Steps read the switch when they start; CUDA graphs captured inside the block keep the forms they recorded.
        """
        before = self.no_triton
        self.no_triton = before | frozenset(names or TRITON_KERNELS)
        try:
            yield
        finally:
            self.no_triton = before
