"""What this CPU offers, and the generation defaults that follow from it (read once, at start-up).

The fastest engine format differs by CPU (``benchmarks/engine.py``): torch's int4 kernel is vectorised for AVX2
and AVX-512 and is the fastest format on both x86 CPUs measured (an Intel Xeon with AMX, an AMD EPYC Zen 4 without);
elsewhere it falls back to scalar code, so the default there is float32. Compiled decode steps helped on the AMX
machine and not on the AMD one (docs/engine.md), so ``serve`` compiles at start-up only where AMX is present.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from functools import cache

import torch

__all__ = ["CpuFeatures", "cpu_features"]


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction sets the engine's choices depend on.

    Attributes:
        machine: ``platform.machine()`` (``x86_64``, ``aarch64``...).
        capability: torch's dispatch level (``AVX512``, ``AVX2``, ``DEFAULT``...).
        avx2, avx512, avx512_bf16, amx: what the CPU offers, as torch reads it.
    """

    machine: str
    capability: str
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx: bool

    @property
    def fast_int4(self) -> bool:
        """Whether torch's int4 weight kernel runs vectorised here (AVX2 or AVX-512)."""
        return self.avx2 or self.avx512

    @property
    def compile_helps(self) -> bool:
        """Whether compiled decode steps were measured faster than eager ones on a CPU like this (AMX)."""
        return self.amx

    def to_dict(self) -> dict[str, object]:
        """The features and the choices they make, for ``--json``."""
        return {**asdict(self), "fast_int4": self.fast_int4, "compile_helps": self.compile_helps}


def _probe(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


@cache
def cpu_features() -> CpuFeatures:
    """This machine's :class:`CpuFeatures` (read once per process)."""
    return CpuFeatures(
        machine=platform.machine(), capability=torch.backends.cpu.get_cpu_capability(),
        avx2=_probe("_is_avx2_supported"), avx512=_probe("_is_avx512_supported"),
        avx512_bf16=_probe("_is_avx512_bf16_supported"), amx=_probe("_is_amx_tile_supported"),
    )  # fmt: skip
