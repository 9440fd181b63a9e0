"""GGUF's 4-bit blocks read as they are (slmstack.gguf_source), the float32-input CPU kernels, and the engine's
``auto`` format: int4 exactly where the file stores 4-bit blocks, float32 elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmstack.engine import Engine
from tests.conftest import build_tiny_llama, build_tokenizer
from tests.unit.engine.test_model import PROMPT, _logits

gguf = pytest.importorskip("gguf")


def _blocks(kind: str, values: np.ndarray) -> np.ndarray:
    """gguf's own quantizer's blocks of ``values`` (rows of whole blocks), as raw bytes per block."""
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(values.astype(np.float32), qtype)
    return raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_4bit_blocks_unpack_to_exactly_what_ggufs_own_dequantizer_gives(kind: str) -> None:
    from slmstack.gguf_source import unpack_4bit

    # Prepare: 4 rows of 64 values, quantized by gguf's own quantizer
    values = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    blocks = _blocks(kind, values)
    # Execute
    q, scale, low = unpack_4bit(kind, blocks)
    # Assert: low + q * scale is gguf's own dequantized value, bit for bit, and q stays in 0..15
    reference = gguf.quants.dequantize(blocks.reshape(4, -1), gguf.GGMLQuantizationType[kind]).reshape(-1, 32)
    np.testing.assert_array_equal(low[:, None] + q.astype(np.float32) * scale[:, None], reference)
    assert q.min() >= 0 and q.max() <= 15


def test_q8_0_blocks_unpack_to_exactly_what_ggufs_own_dequantizer_gives() -> None:
    from slmstack.gguf_source import unpack_8bit

    values = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    blocks = _blocks("Q8_0", values)
    q, scale = unpack_8bit(blocks)
    reference = gguf.quants.dequantize(blocks.reshape(3, -1), gguf.GGMLQuantizationType.Q8_0).reshape(-1, 32)
    np.testing.assert_array_equal(q.astype(np.float32) * scale[:, None], reference)
    assert q.dtype == np.int8 and np.abs(q).max() == 127  # each block's largest value sets its scale


def test_q4_k_super_blocks_unpack_by_hand_and_as_ggufs_dequantizer_gives() -> None:
    from slmstack.gguf_source import unpack_4bit

    # Prepare: one Q4_K super-block built by hand: d = 0.5, dmin = 0.25, group 0 scale 3 / min 2, group 5 scale 40
    # (6 bits: its top two bits in byte 1) / min 33; values q = j % 16 in every group
    d, dmin = np.array([0.5], np.float16).view(np.uint8), np.array([0.25], np.float16).view(np.uint8)
    sc, m = [3, 1, 1, 1, 1, 40, 1, 1], [2, 0, 0, 0, 0, 33, 0, 0]
    scales = np.zeros(12, dtype=np.uint8)
    for j in range(8):
        if j < 4:
            scales[j], scales[j + 4] = sc[j], m[j]
        else:  # low 4 bits in bytes 8..11, high 2 bits in the top of bytes 0..3 (scale) and 4..7 (min)
            scales[j + 4] = (sc[j] & 0x0F) | ((m[j] & 0x0F) << 4)
            scales[j - 4] |= (sc[j] >> 4) << 6
            scales[j] |= (m[j] >> 4) << 6
    q_values = np.tile(np.arange(32) % 16, 8).astype(np.uint8)  # 256 values, group by group
    qs = np.zeros(128, dtype=np.uint8)
    for chunk in range(4):  # 32 bytes per 64 values: group 2c in the low nibbles, group 2c + 1 in the high ones
        qs[32 * chunk : 32 * chunk + 32] = q_values[64 * chunk : 64 * chunk + 32] | (
            q_values[64 * chunk + 32 : 64 * chunk + 64] << 4
        )
    block = np.concatenate([d, dmin, scales, qs])[None]
    # Execute
    q, scale, low = unpack_4bit("Q4_K", block)
    # Assert: by hand, and against gguf's own dequantizer
    assert scale[0] == 1.5 and low[0] == -0.5 and scale[5] == 20.0 and low[5] == -8.25
    assert q[0].tolist() == (np.arange(32) % 16).tolist()
    reference = gguf.quants.dequantize(block, gguf.GGMLQuantizationType.Q4_K).reshape(8, 32)
    np.testing.assert_array_equal(low[:, None] + q.astype(np.float32) * scale[:, None], reference)


def _kernels():
    from slmstack.engine.cpu_kernels import gguf_kernels

    kernels = gguf_kernels()
    if kernels is None:
        pytest.skip("the CPU kernels cannot be built here (not x86, or no C++ compiler / ninja)")
    return kernels


def test_pack_int4_lays_a_group_out_as_gguf_does() -> None:
    from slmstack.engine.cpu_kernels import pack_int4

    packed = pack_int4((torch.arange(32) % 16).reshape(1, 32))
    # byte j: value j in the low nibble, value j + 16 in the high one (here q_j = j % 16, so both are j % 16)
    assert packed.tolist() == [[j | (j << 4) for j in range(16)]]
    q = torch.tensor([list(range(16)) + [15 - j for j in range(16)]])
    assert pack_int4(q)[0, :3].tolist() == [0 | (15 << 4), 1 | (14 << 4), 2 | (13 << 4)]


@pytest.mark.parametrize(("rows", "out", "width"), [(1, 16, 32), (3, 17, 96), (20, 5, 64), (2, 48, 1536)])
def test_cpu_kernels_equal_the_float32_product_on_odd_shapes(rows: int, out: int, width: int) -> None:
    from slmstack.engine.cpu_kernels import pack_int4

    kernels = _kernels()
    g = torch.Generator().manual_seed(rows * out)
    x = torch.randn(rows, width, generator=g)
    q = torch.randint(0, 16, (out, width), generator=g)
    scale, low = torch.rand(out, width // 32, generator=g) * 0.1, torch.randn(out, width // 32, generator=g) * 0.1
    weight = (low[..., None] + q.reshape(out, -1, 32).float() * scale[..., None]).reshape(out, width)
    q8 = torch.randint(-127, 128, (out, width), generator=g, dtype=torch.int8)
    weight8 = (q8.float().reshape(out, -1, 32) * scale[..., None]).reshape(out, width)
    # the sums in another order than torch's: float32 rounding apart, nothing more
    torch.testing.assert_close(kernels.int4_matmul(x, pack_int4(q), scale, low), x @ weight.T, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kernels.int8_matmul(x, q8, scale), x @ weight8.T, atol=1e-3, rtol=1e-5)


class _Source:
    """A stand-in for a model's GGUF file: the given weights stored in 4-bit blocks, every other one wider."""

    def __init__(self, groups: dict, groups8: dict | None = None) -> None:
        self.groups, self.groups8 = groups, groups8 or {}

    def int4_groups(self, name: str):
        return self.groups.get(name)

    def int8_groups(self, name: str):
        return self.groups8.get(name)


def _on_q4_1_blocks(model, names: list[str]) -> dict:
    """Move ``names`` onto Q4_1 blocks made by gguf's quantizer; their groups as the GGUF file would hold them."""
    from slmstack.gguf_source import Int4Groups, unpack_4bit

    groups = {}
    with torch.no_grad():
        for name in names:
            param = model.get_parameter(name)
            blocks = _blocks("Q4_1", param.detach().numpy())
            q, scale, low = unpack_4bit("Q4_1", blocks)
            out = param.shape[0]
            groups[name] = Int4Groups(torch.from_numpy(q.reshape(out, -1)), torch.from_numpy(scale.reshape(out, -1)),
                                      torch.from_numpy(low.reshape(out, -1)))  # fmt: skip
            param.copy_(groups[name].dequantize())
    return groups


def test_auto_runs_int4_exactly_where_the_gguf_stores_4_bit_blocks_and_float32_elsewhere() -> None:
    from slmstack.gguf_source import _SOURCES

    # Prepare: a tiny Llama whose q, k, v (layer 0) and gate, up (both layers) are Q4_1 blocks in its "file"; o and
    # down are stored wider, and so is layer 1's attention
    model, tok = build_tiny_llama(), build_tokenizer()
    four_bit = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"] + [
        f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up")
    ]
    _SOURCES[model] = _Source(_on_q4_1_blocks(model, four_bit))
    ids = tok(PROMPT)["input_ids"]
    # Execute
    auto = Engine(model, tok, weights="auto")
    dense = Engine(model, tok)
    # Assert: the fused projections all of whose parts are 4-bit run int4 (layer 0's qkv and both gate_up), the rest
    # float32; the output layer is float16 (as under int4-weights); the logits are float32's but for float16's
    # rounding of the output layer (and int4's own rounding where torch's bfloat16 kernel runs)
    formats = [(x.qkv.fmt, x.o.fmt, x.gate_up.fmt, x.down.fmt) for x in auto.weights.layers]
    assert formats == [("int4-weights", "dense", "int4-weights", "dense"), ("dense", "dense", "int4-weights", "dense")]
    assert auto.weights.formats() == {"int4-weights": 3, "dense": 5} and not auto.exact and dense.exact
    assert auto.weight_formats["output_layer"] in ("float16-weights", "int8-weights")
    got, ref = _logits(auto, ids, 64), _logits(dense, ids, 64)
    from slmstack.engine.cpu_kernels import gguf_kernels

    tolerance = 2e-3 if gguf_kernels() is not None else 3e-2
    assert (got - ref).abs().max().item() <= tolerance * ref.abs().max().item()


def test_auto_is_float32_for_a_model_without_a_gguf_file() -> None:
    model, tok = build_tiny_llama(), build_tokenizer()
    engine = Engine(model, tok, weights="auto")
    assert engine.exact and engine.weights.formats() == {"dense": 8}


def test_the_output_layer_takes_the_files_q8_0_blocks_exactly_under_auto() -> None:
    from slmstack.gguf_source import _SOURCES, unpack_8bit

    _kernels()
    # Prepare: every projection on Q4_1 blocks and the (untied) output layer on Q8_0 blocks, as a GGUF file holds them
    model, tok = build_tiny_llama(), build_tokenizer()
    names = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")]
    groups = _on_q4_1_blocks(model, names)
    with torch.no_grad():
        head = model.lm_head.weight
        q8, scale = unpack_8bit(_blocks("Q8_0", head.detach().numpy()))
        q8, scale = torch.from_numpy(q8.reshape(head.shape[0], -1)), torch.from_numpy(scale.reshape(head.shape[0], -1))
        head.copy_((q8.float().reshape(head.shape[0], -1, 32) * scale[..., None]).reshape(head.shape))
    _SOURCES[model] = _Source(groups, {"lm_head.weight": (q8, scale)})
    ids = tok(PROMPT)["input_ids"]
    # Execute
    auto, dense = Engine(model, tok, weights="auto"), Engine(model, tok)
    # Assert: int4 projections, the Q8_0 output layer, and float32's logits up to the order of the sums
    assert auto.weights.formats() == {"int4-weights": 8} and auto.weights.lm_head.fmt == "int8-groups"
    torch.testing.assert_close(_logits(auto, ids, 64), _logits(dense, ids, 64), atol=1e-4, rtol=1e-4)
