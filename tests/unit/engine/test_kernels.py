"""The engine's Triton kernels (the mixed-LoRA delta; RoPE with the cache write) equal sums done by hand, the torch
forms and peft's forward.

On a GPU the kernels run as the engine runs them. Without one they run under Triton's interpreter
(``TRITON_INTERPRET=1``, set in a child process before Triton is imported) where Triton is installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)")


def check_sums_by_hand(device: str) -> None:
    from slmstack.engine.kernels import bgmv_add_

    # Prepare: 3 rows (adapter 1, the bare base, adapter 2), in 2, rank padded to 2, out 3
    x = torch.tensor([[1.0, 2.0], [5.0, 5.0], [3.0, -1.0]], device=device)
    a = torch.zeros(3, 2, 2, device=device)
    a[1] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # adapter 1, rank 1: h = x0 + x1
    a[2] = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # adapter 2, rank 2: h = (x0, 2 x1)
    b = torch.zeros(3, 2, 3, device=device)
    b[1, 0] = torch.tensor([1.0, -1.0, 0.5])
    b[2] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    out = torch.ones(3, 3, device=device)
    # Execute
    bgmv_add_(out, x, a, b, torch.tensor([1, 0, 2], device=device))
    # Assert: row 0: h = 3 -> 1 + (3, -3, 1.5); row 1 untouched; row 2: h = (3, -2) -> 1 + (3, -2, -2)
    expected = torch.tensor([[4.0, -2.0, 2.5], [1.0, 1.0, 1.0], [4.0, -1.0, -1.0]], device=device)
    torch.testing.assert_close(out, expected)

    # and at sizes over one block of inputs and outputs, against the same sum in torch
    torch.manual_seed(0)
    x, out = torch.randn(5, 150, device=device), torch.randn(5, 300, device=device)
    a, b, ids = torch.randn(4, 150, 8, device=device), torch.randn(4, 8, 300, device=device), [3, 0, 1, 1, 2]
    expected = out.clone()
    for i, aid in enumerate(ids):
        if aid:
            expected[i] += (x[i] @ a[aid]) @ b[aid]
    bgmv_add_(out, x, a, b, torch.tensor(ids, device=device))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


def check_mixed_batch_equals_peft(device: str) -> None:
    from tests.unit.engine.test_lora import check_mixed_batch_equals_peft as check

    check(device, kernel=True)


def check_rope_store(device: str) -> None:
    from slmstack.engine.kernels import rope_store_
    from slmstack.engine.layers import rope_

    # Prepare, by hand: head_dim 2, one q, one k and one v head; position 1 turns by 90 degrees
    cos = torch.tensor([[1.0, 1.0], [0.0, 0.0]], device=device)
    sin = torch.tensor([[0.0, 0.0], [-1.0, 1.0]], device=device)  # signed: the first half negated
    qkv = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], device=device)
    cache = torch.zeros(3, 1, 2, 4, 2, device=device)  # (slots, KV, 2, T, hd)
    # Execute: token 0 at position 0 into slot 2, token 1 at position 1 into slot 0
    rope_store_(qkv, cos, sin, torch.tensor([0, 1], device=device), torch.tensor([2, 0], device=device), cache, 1, 1)
    # Assert: position 0 is unchanged, position 1 maps (a, b) to (-b, a); k and v land in their slots
    expected = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [-2.0, 1.0, -4.0, 3.0, 5.0, 6.0]], device=device)
    torch.testing.assert_close(qkv, expected)
    torch.testing.assert_close(cache[2, 0, :, 0], torch.tensor([[3.0, 4.0], [5.0, 6.0]], device=device))
    torch.testing.assert_close(cache[0, 0, :, 1], torch.tensor([[-4.0, 3.0], [5.0, 6.0]], device=device))
    assert int((cache != 0).sum()) == 8

    # and at a real shape (4 q and 2 kv heads of 16), against the torch forms
    from slmstack.engine.layers import rope_tables

    torch.manual_seed(0)
    cos, sin = rope_tables(1.0 / (10000 ** (torch.arange(0, 16, 2, device=device) / 16)), 1.0, 32)
    qkv = torch.randn(5, (4 + 4) * 16, device=device)
    positions, slots = torch.tensor([0, 7, 3, 31, 8], device=device), torch.tensor([1, 0, 3, 2, 1], device=device)
    cache, reference = torch.zeros(4, 2, 2, 32, 16, device=device), torch.zeros(4, 2, 2, 32, 16, device=device)
    ours = qkv.clone()
    rope_store_(ours, cos, sin, positions, slots, cache, 4, 2)
    rope_(qkv[:, : 6 * 16].view(-1, 6, 16), cos[positions][:, None, :], sin[positions][:, None, :])
    reference[slots, :, :, positions] = qkv[:, 4 * 16 :].view(-1, 2, 2, 16).transpose(1, 2)
    torch.testing.assert_close(ours, qkv)
    torch.testing.assert_close(cache, reference)


def check_generation_unchanged(device: str) -> None:
    """Greedy text through the kernels, in a continuous batch of mixed adapters, equals the torch forms' text."""
    from slmstack.engine import Engine
    from slmstack.stack.config import GenerationSettings
    from tests.conftest import build_tokenizer
    from tests.unit.engine.test_lora import _peft_model

    model, tok = _peft_model().to(device), build_tokenizer()
    texts = ["first prompt", "a second, longer prompt here", "third", "the fourth one?"]
    adapters = ["qv", "__base__", "all", "mlp"]

    from slmstack.engine.kernels import kernel_available
    from slmstack.engine.options import EngineOptions

    options = EngineOptions(max_batch=4, max_tokens_per_step=8, graphs="static" if device == "cpu" else "auto")

    def run() -> list[str]:
        engine = Engine(model, tok, options)
        handles = [engine.submit(tok(t)["input_ids"], a, GenerationSettings(max_new_tokens=10))
                   for t, a in zip(texts, adapters, strict=True)]  # fmt: skip
        engine.run()
        return [h.generated().text for h in handles]

    assert kernel_available(torch.device(device), "lora") and kernel_available(torch.device(device), "rope")
    assert options.kernel(torch.device(device), "lora") and options.kernel(torch.device(device), "rope")
    ours = run()
    with options.torch_forms():
        assert not options.kernel(torch.device(device), "lora")
        reference = run()
    assert options.kernel(torch.device(device), "rope")  # switched back on
    assert ours == reference and len(set(ours)) > 2


CHECKS = ("check_sums_by_hand", "check_rope_store", "check_mixed_batch_equals_peft", "check_generation_unchanged")


@TRITON
@pytest.mark.parametrize("check", CHECKS)
def test_the_kernels_under_triton_interpreter(check: str) -> None:
    code = f"from tests.unit.engine import test_kernels as t; t.{check}('cpu')"
    env = os.environ | {"TRITON_INTERPRET": "1"}
    env.pop("SLMSTACK_NO_TRITON", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@CUDA
@pytest.mark.parametrize("check", CHECKS)
def test_the_kernels_on_cuda(check: str) -> None:
    globals()[check]("cuda")
