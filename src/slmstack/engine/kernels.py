"""Two GPU kernels of the engine's step, written in Triton: the mixed-LoRA delta and RoPE with the cache write.

On a GPU a decode step of a model this size is a few hundred small kernels, bound by how many there are, not by
what each does. Two places launch more than they need to:

- **A mixed-LoRA step** (Punica's BGMV). The stacked, masked form (:func:`slmstack.engine.lora.lora_add`) adds
  four kernels to every projection that has an adapter: the shrink product (which cuBLAS splits in two for these
  shapes), the mask and the expand product. :func:`bgmv_add_` does a row's whole delta in one launch: program
  ``(row, block)`` reads the row's adapter id, returns at once for the bare base (id 0), computes
  ``h = x[row] @ Aᵀ[id]`` (R values) and adds ``h @ (s·Bᵀ)[id]`` to its block of ``out[row]``. Each row reads
  only its own adapter's factors, so no work is masked away. The factors live padded to one rank per projection
  (:meth:`slmstack.engine.lora.LoraBank.padded`).
- **RoPE and the cache write.** In torch, rotating q and k in place takes three kernels (the halves swapped, a
  multiply, a multiply-add) and writing the new keys and values into their slots one more, per layer.
  :func:`rope_store_` does all of it in one: program ``(token, head)`` rotates a q or k head by its position's
  angles, read straight from the tables, and writes k and v heads into the token's slot.

They run where Triton runs on the tensors' device: CUDA with Triton installed (PyTorch's CUDA wheels bring it),
or anywhere under Triton's interpreter (``TRITON_INTERPRET=1``), which is how they are tested without a GPU.
``SLMSTACK_NO_TRITON=lora`` (or ``rope``, or ``all``; read once, by :class:`slmstack.engine.options.EngineOptions`)
turns one or both off, for comparisons; the torch forms then run.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
from torch import Tensor

__all__ = ["bgmv_add_", "kernel_available", "rope_store_"]

logger = logging.getLogger(__name__)

SHRINK_TILE = 4096  # values of Aᵀ a LoRA program loads at a time (input features x rank)
BLOCK_N = 128  # output features per LoRA program


@functools.cache
def _kernels() -> Any:
    """Triton and the two kernels (compiled on first use); None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def bgmv(x_ptr, a_ptr, b_ptr, out_ptr, ids_ptr, stride_x, stride_out, in_features: tl.constexpr,
             out_features: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        aid = tl.load(ids_ptr + row)
        if aid == 0:
            return
        r = tl.arange(0, R)
        h = tl.zeros([R], dtype=tl.float32)
        a_base = a_ptr + aid * in_features * R
        for k0 in range(0, in_features, BK):
            k = k0 + tl.arange(0, BK)
            xk = tl.load(x_ptr + row * stride_x + k, mask=k < in_features, other=0.0).to(tl.float32)
            a = tl.load(a_base + k[:, None] * R + r[None, :], mask=k[:, None] < in_features, other=0.0)
            h += tl.sum(xk[:, None] * a.to(tl.float32), axis=0)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        b = tl.load(b_ptr + aid * R * out_features + r[:, None] * out_features + n[None, :],
                    mask=n[None, :] < out_features, other=0.0)  # fmt: skip
        delta = tl.sum(h[:, None] * b.to(tl.float32), axis=0)
        target = out_ptr + row * stride_out + n
        current = tl.load(target, mask=n < out_features, other=0.0)
        tl.store(target, (current.to(tl.float32) + delta).to(current.dtype), mask=n < out_features)

    @triton.jit
    def rope_store(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, cache_ptr, stride_qkv, s_slot, s_kv, s_two, s_t,
                   H: tl.constexpr, KV: tl.constexpr, HD: tl.constexpr):  # fmt: skip
        token = tl.program_id(0)
        head = tl.program_id(1)
        d = tl.arange(0, HD)
        pos = tl.load(pos_ptr + token)
        base = qkv_ptr + token * stride_qkv + head * HD
        raw = tl.load(base + d)
        x = raw.to(tl.float32)
        if head < H + KV:  # q or k: x·cos + [x₂, x₁]·signed_sin (see layers.rope_tables)
            swapped = tl.load(base + (d + HD // 2) % HD).to(tl.float32)
            cos = tl.load(cos_ptr + pos * HD + d).to(tl.float32)
            sin = tl.load(sin_ptr + pos * HD + d).to(tl.float32)
            x = x * cos + swapped * sin
            tl.store(base + d, x.to(raw.dtype))
        if head >= H:  # k or v: into the token's slot at its position
            slot = tl.load(slot_ptr + token)
            kv = head - H
            target = cache_ptr + slot * s_slot + (kv % KV) * s_kv + (kv // KV) * s_two + pos * s_t + d
            tl.store(target, x.to(cache_ptr.dtype.element_ty))

    return triton, bgmv, rope_store


def kernel_available(device: torch.device, name: str) -> bool:
    """Whether kernel ``name`` (``lora`` or ``rope``) runs on ``device``.

    Turning one off is an engine option (:attr:`slmstack.engine.options.EngineOptions.no_triton`). The first call
    on a device type compiles and runs both kernels once on tiny inputs: Triton builds its launcher with the
    machine's C compiler, and a machine without one (or a GPU Triton does not know) gets the
    torch forms, with a warning, instead of a failed step.
    """
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _works(device.type)


@functools.cache
def _works(device_type: str) -> bool:
    if _kernels() is None:
        return False
    if device_type == "cuda" and torch.cuda.is_current_stream_capturing():
        _works.cache_clear()  # cannot try inside a graph capture; the graphs' warm-up steps have tried already
        return False
    try:
        out = torch.zeros(2, 4, device=device_type)
        bgmv_add_(out, torch.ones(2, 4, device=device_type), torch.ones(2, 4, 1, device=device_type),
                  torch.ones(2, 1, 4, device=device_type), torch.tensor([0, 1], device=device_type))  # fmt: skip
        qkv, cache = torch.ones(1, 6, device=device_type), torch.zeros(1, 1, 2, 1, 2, device=device_type)
        table, zero = torch.ones(1, 2, device=device_type), torch.zeros(1, dtype=torch.long, device=device_type)
        rope_store_(qkv, table, table, zero, zero, cache, 1, 1)
        ok = out.tolist() == [[0.0] * 4, [4.0] * 4] and cache.sum().item() == 6.0
    except Exception as exc:  # noqa: BLE001 - any failure to build or run means: use the torch forms
        logger.warning("the engine's Triton kernels do not run here (%s); using torch's operations", exc)
        return False
    if not ok:
        logger.warning("the engine's Triton kernels gave wrong sums on a smoke test; using torch's operations")
    return ok


def bgmv_add_(out: Tensor, x: Tensor, a: Tensor, b: Tensor, ids: Tensor) -> None:
    """``out[i] += (x[i] @ a[ids[i]]) @ b[ids[i]]`` for every row ``i`` with ``ids[i] != 0``, in place.

    Args:
        out: (N, out), rows contiguous.
        x: (N, in).
        a: (ids, in, R), contiguous, R a power of two.
        b: (ids, R, out), contiguous.
        ids: (N,) adapter ids, int64.
    """
    triton, kernel, _ = _kernels()
    if out.stride(1) != 1:
        raise ValueError("bgmv_add_ writes rows of contiguous features; out is strided")
    x = x if x.stride(1) == 1 else x.contiguous()
    rows, out_features = out.shape
    grid = (rows, triton.cdiv(out_features, BLOCK_N))
    # few, wide loads: the shrink's loop is serial, each of its iterations a round trip to memory (on an H200, with
    # 64 input features a load the kernel took as long as the masked form's four kernels together)
    block_k = max(16, min(triton.next_power_of_2(x.shape[1]), SHRINK_TILE // a.shape[2]))
    kernel[grid](x, a, b, out, ids, x.stride(0), out.stride(0), in_features=x.shape[1], out_features=out_features,
                 R=a.shape[2], BK=block_k, BN=BLOCK_N)  # fmt: skip


def rope_store_(qkv: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, slots: Tensor, kv_cache: Tensor,
                heads: int, kv_heads: int) -> None:  # fmt: skip
    """Rotate each token's q and k heads in ``qkv`` in place, and write its k and v heads into ``kv_cache``.

    The same as :func:`slmstack.engine.layers.rope_` on q and k, then
    ``kv_cache[slots, :, :, positions] = (k, v)``.

    Args:
        qkv: (N, (H + 2 KV) hd), rows contiguous.
        cos: (P, hd), the cosine table of :func:`slmstack.engine.layers.rope_tables`, contiguous.
        sin: (P, hd), its signed sine table, contiguous.
        positions: (N,) each token's position, int64.
        slots: (N,) each token's cache slot, int64.
        kv_cache: (S, KV, 2, T, hd), a layer's cache, the last axis contiguous.
        heads: H, the query heads.
        kv_heads: KV, the key/value heads.
    """
    _, _, kernel = _kernels()
    head_dim = kv_cache.shape[-1]
    if qkv.stride(1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("rope_store_ needs rows of contiguous features")
    kernel[(qkv.shape[0], heads + 2 * kv_heads)](
        qkv, cos, sin, positions, slots, kv_cache, qkv.stride(0), kv_cache.stride(0), kv_cache.stride(1),
        kv_cache.stride(2), kv_cache.stride(3), H=heads, KV=kv_heads, HD=head_dim,
    )  # fmt: skip
