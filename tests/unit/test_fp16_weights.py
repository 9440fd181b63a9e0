"""float16 weights with float32 arithmetic (``dtype: float16-weights``) on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slmstack.errors import ConfigError
from slmstack.fp16_weights import Float16WeightLinear, use_float16_weights
from slmstack.models import pick_dtype
from slmstack.stack.runtime import Stack
from tests.conftest import QUESTIONS, build_tiny_llama, stack_dict, write_yaml

pytestmark = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="float16 weights need fbgemm (x86)"
)


def test_a_layer_computes_with_float16_rounded_weights_in_float32() -> None:
    linear = nn.Linear(8, 5)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1 / 3] * 8] * 5))  # 1/3 is not a float16 number
        linear.bias.fill_(0.25)
    x = torch.ones(2, 8)
    out = Float16WeightLinear(linear)(x)
    third16 = float(torch.tensor(1 / 3).half())  # 0.333251953125
    assert third16 != pytest.approx(1 / 3, abs=1e-5)
    assert torch.allclose(out, torch.full((2, 5), 8 * third16 + 0.25), atol=1e-6)
    assert out.dtype == torch.float32


def test_every_plain_linear_is_converted_but_lora_factors_are_not(tiny_model_dir: Path, tiny_adapters) -> None:
    from transformers import AutoModelForCausalLM

    from slmstack.stack.adapters import attach_adapters

    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tiny_adapters)
    # 2 layers x 7 projections + lm_head
    assert use_float16_weights(model) == 15
    assert use_float16_weights(model) == 0  # nothing left to convert
    factors = [m for n, m in model.named_modules() if ".lora_A." in n or ".lora_B." in n]
    assert factors and all(type(m) is nn.Linear for m in factors)


def test_logits_stay_close_to_float32() -> None:
    torch.manual_seed(0)
    model = build_tiny_llama()
    ids = torch.randint(6, 90, (2, 10))
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
        use_float16_weights(model)
        half = model(input_ids=ids).logits
    assert not torch.equal(half, reference)  # it really changed the weights
    assert torch.allclose(half, reference, atol=5e-3 * reference.abs().max().item())


@pytest.mark.skipif(torch.cuda.is_available(), reason="device: auto picks CUDA, where float16-weights is refused")
@pytest.mark.parametrize("engine", ["hf", "native"])
def test_a_stack_converts_on_first_generate_and_batching_keeps_its_text(
    tiny_model_dir: Path, tiny_adapters, tmp_path: Path, engine: str
) -> None:
    config = stack_dict(tiny_model_dir, tiny_adapters) | {"dtype": "float16-weights", "engine": engine}
    stack = Stack.from_config(write_yaml(tmp_path / "stack.yaml", config))
    batched = stack.run_batch(QUESTIONS, batch_size=len(QUESTIONS))
    if engine == "hf":  # transformers' model converted in place
        assert any(isinstance(m, Float16WeightLinear) for m in stack.model.modules())
    else:  # the engine keeps its own float16 copy; the model itself stays float32 (for scoring, training)
        assert stack.backend.engine.weights.layers[0].qkv.fmt == "float16-weights"
        assert not any(isinstance(m, Float16WeightLinear) for m in stack.model.modules())
    single = [stack(q) for q in QUESTIONS]
    assert [[t.output for t in r.trace] for r in batched] == [[t.output for t in r.trace] for r in single]


def test_float16_weights_are_refused_off_cpu() -> None:
    with pytest.raises(ConfigError, match="x86 CPU"):
        pick_dtype("float16-weights", torch.device("cuda"))
    assert pick_dtype("float16-weights", torch.device("cpu")) == torch.float32
