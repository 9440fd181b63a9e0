"""Matrix products on GGUF's own block forms with float32 inputs (a small C++ kernel, built at first use).

torch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) rounds its inputs, scales and offsets to bfloat16, and
its float32 form is slow; it has no 8-bit grouped form. ``csrc/gguf_matmul.cpp`` multiplies float32 inputs by
4-bit groups (``low + q·scale``, GGUF's Q4_0 / Q4_1 / Q4_K) and 8-bit groups (``q·scale``, GGUF's Q8_0) and sums
in float32: the product of the very weights the file stores, up to the order of the sums, so that the engine's
default format gives float32's text (docs/engine.md). It is compiled once per machine with torch's
``cpp_extension`` (a C++ compiler and ninja needed) into torch's extension cache, named after the CPU's features;
where that fails, one warning, and the engine uses torch's kernels (``SLMSTACK_CPU_KERNELS=off`` chooses them).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from slmstack.cpu import cpu_features

logger = logging.getLogger(__name__)

__all__ = ["gguf_kernels", "pack_int4"]

SOURCE = Path(__file__).with_name("csrc") / "gguf_matmul.cpp"
OFF_ENV = "SLMSTACK_CPU_KERNELS"  # "off": torch's kernels only (checked in EngineOptions; benchmarks/engine.py)
_lock = threading.Lock()
_state: dict[str, Any] = {}


def gguf_kernels() -> Any | None:
    """The kernels (``int4_matmul(x, q, scale, low)``, ``int8_matmul(x, q, scale)``), or None where not built.

    They are plain functions, not torch operators: registered as ``torch.library`` custom ops they cost a dispatch
    each, and the default model decoded at 62 tokens/s instead of 70, while compiling its steps around them gave 54.
    """
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _build() -> Any | None:
    features = cpu_features()
    if features.machine not in ("x86_64", "AMD64") or os.environ.get(OFF_ENV, "").strip().lower() == "off":
        return None
    source = SOURCE.read_text()
    key = hashlib.sha256(f"{source}{features}{torch.__version__}".encode()).hexdigest()[:12]
    try:
        from torch.utils.cpp_extension import load

        logger.info("loading the engine's CPU kernels (built once per machine: 25-35 s the first time)")
        # -fopenmp: at::parallel_for splits the rows over torch's own OpenMP threads (libgomp.so.1, which torch has
        # loaded); without it the loop runs on one thread
        module = load(name=f"slmstack_gguf_{key}", sources=[str(SOURCE)],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                      verbose=False)  # fmt: skip
        _self_check(module)
        return module
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed check: torch's kernels run instead
        logger.warning("the engine's CPU kernels could not be built (%s); using torch's int4 kernel", exc)
        return None


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Q (out, in) in 0..15 as the kernel reads it: per group of 32, byte j holds value j and value j + 16."""
    out, width = q.shape
    groups = q.to(torch.uint8).reshape(out, width // 32, 2, 16)
    return (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(out, width // 2).contiguous()


def _self_check(module: Any) -> None:
    """The kernels against torch's float32 product on a tiny case (odd sizes), before the engine trusts them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    q = torch.randint(0, 16, (5, 64), generator=g)
    scale, low = torch.rand(5, 2, generator=g), torch.randn(5, 2, generator=g)
    w = (low[..., None] + q.reshape(5, 2, 32).float() * scale[..., None]).reshape(5, 64)
    got = module.int4_matmul(x, pack_int4(q), scale, low)
    q8 = torch.randint(-127, 128, (5, 64), generator=g, dtype=torch.int8)
    w8 = (q8.float().reshape(5, 2, 32) * scale[..., None]).reshape(5, 64)
    got8 = module.int8_matmul(x, q8, scale)
    if not (torch.allclose(got, x @ w.T, atol=1e-4, rtol=1e-5) and torch.allclose(got8, x @ w8.T, atol=1e-3,
                                                                                     rtol=1e-5)):  # fmt: skip
        raise RuntimeError("the built kernels disagree with torch's float32 product")
