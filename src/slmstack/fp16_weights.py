"""float16 weights with float32 arithmetic for generation on an x86 CPU (``dtype: float16-weights``).

Decoding one row at a time on a CPU is bound by memory bandwidth: every step reads every weight once.
Keeping the ``Linear`` weights in float16 halves those bytes, while activations and accumulation stay
float32 (torch's fbgemm kernel ``quantized::linear_dynamic_fp16`` widens the weights on the fly). No
activation is quantized, so a row's result never depends on the other rows of its batch. The model is
converted in place the first time a stack generates, after every adapter is attached; LoRA factors
stay float32 and embeddings are left alone.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from slmstack.errors import ConfigError
from slmstack.formats import FP16_WEIGHTS

logger = logging.getLogger(__name__)

__all__ = ["Float16WeightLinear", "check_available", "use_float16_weights"]

_SKIP = {"lora_A", "lora_B"}  # peft's adapter factors: small, and read directly by the fused LoRA path


def check_available(device: torch.device, dtype: str = FP16_WEIGHTS) -> None:
    """Raise :class:`ConfigError` unless the CPU weight format ``dtype`` can run here.

    ``float16-weights`` needs torch's fbgemm (x86); ``bfloat16-weights`` oneDNN's bfloat16 kernels;
    ``int8-weights`` a CPU; ``int4-weights`` torch's int4 CPU kernel. The last three run on slmstack's engine only.
    """
    ok = device.type == "cpu"
    if dtype == FP16_WEIGHTS:
        ok = ok and "fbgemm" in torch.backends.quantized.supported_engines
    elif dtype == "bfloat16-weights":
        ok = ok and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    elif dtype == "int4-weights":
        ok = ok and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    if not ok:
        raise ConfigError(
            f"dtype {dtype!r} needs a CPU with the kernels for it (an x86 CPU for float16-weights, oneDNN bfloat16 "
            f"for bfloat16-weights, torch's int4 CPU kernel for int4-weights); on {device.type} use dtype: "
            "float32, bfloat16 or float16."
        )


class Float16WeightLinear(nn.Module):
    """A ``Linear`` whose weight is packed as float16 for fbgemm; input and output stay float32."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weightᵀ + bias`` in float32 arithmetic."""
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self._packed).to(x.dtype)

    def extra_repr(self) -> str:
        """Shown in ``print(model)``."""
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=float16"


def use_float16_weights(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` in ``model`` (LoRA factors excepted) in place; returns how many."""
    targets = [name for name, m in model.named_modules()
               if type(m) is nn.Linear and not _SKIP.intersection(name.split("."))]  # fmt: skip
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Float16WeightLinear(getattr(parent, child)))
    if targets:
        logger.info("float16 weights: %d linear layers converted", len(targets))
    return len(targets)
