"""The engine's forward equals transformers' (and peft's LoRA) on tiny random models of every supported layout."""

from __future__ import annotations

import pytest
import torch

from slmstack.engine import Engine, engine_supports
from slmstack.engine.scheduler import Request, Row, StepPlan
from tests.conftest import build_tiny_llama, build_tokenizer, tiny_model
from tests.unit.engine.test_lora import step_equals_peft

PROMPT = "hello there, how are you today? fine."


def _tiny(kind: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "vocab_size": 96, "max_position_embeddings": 256, "initializer_range": 0.2,
              "bos_token_id": 1, "eos_token_id": 5, "pad_token_id": 0}  # fmt: skip
    torch.manual_seed(0)
    if kind == "llama":
        return build_tiny_llama()
    if kind == "llama-rope-scaled":  # llama3-style RoPE scaling, tied embeddings, MHA
        cfg = LlamaConfig(**{**common, "num_key_value_heads": 4}, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64})  # fmt: skip
        return LlamaForCausalLM(cfg).eval()
    if kind == "qwen2":  # biases on q, k and v
        model = Qwen2ForCausalLM(Qwen2Config(**common)).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        return model
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    return tiny_model(kind)


NEW_FORMS = ["mistral-window", "gemma3", "gemma3-softcap", "qwen3", "phi3", "gpt_neox", "gpt_neox-sequential"]


def _logits(engine: Engine, ids: list[int], chunk: int) -> torch.Tensor:
    """Every position's logits, the prompt fed in chunks of ``chunk`` tokens (one slot)."""
    engine.cache.ensure(len(ids))
    request = Request(ids)
    request.slot = 0
    out = []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        step = engine.runner.step_input(StepPlan([], [Row(request, start, part, True)]))
        step.sample = torch.arange(len(part))  # every token's logits
        out.append(engine.runner.decoder.forward(step))
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["llama", "llama-rope-scaled", "qwen2", "mistral", *NEW_FORMS])
@pytest.mark.parametrize("chunk", [64, 5, 1])
def test_logits_equal_transformers_in_float32(kind: str, chunk: int) -> None:
    # Prepare
    model, tok = _tiny(kind), build_tokenizer()
    assert engine_supports(model) is None
    ids = tok(PROMPT)["input_ids"]
    # Execute: the whole prompt at once, in chunks of 5 (chunked prefill), one token at a time (decode)
    ours = _logits(Engine(model, tok, max_batch=2), ids, chunk)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0]
    # Assert
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_unsupported_models_and_adapters_are_named() -> None:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    gemma = Gemma3ForConditionalGeneration(Gemma3Config(text_config={"hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "num_hidden_layers": 2,
        "vocab_size": 96}, vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": 28, "patch_size": 14}, mm_tokens_per_image=4))  # fmt: skip
    assert "'gemma3' is not one the engine runs (gemma3_text, gpt_neox, llama, mistral, phi3, qwen2, qwen3)" in (
        engine_supports(gemma)
    )
    bidirectional = tiny_model("gemma3")
    bidirectional.config.use_bidirectional_attention = True
    assert engine_supports(bidirectional) == "bidirectional attention"
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(build_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert "DoRA" in engine_supports(dora)


@pytest.mark.parametrize(("fmt", "tolerance"), [("float16-weights", 2e-3), ("bfloat16-weights", 3e-2),
                                                 ("int8-weights", 5e-2)])  # fmt: skip
def test_smaller_weight_formats_stay_close_to_float32(fmt: str, tolerance: float) -> None:
    from slmstack.errors import ConfigError
    from slmstack.fp16_weights import check_available

    try:
        check_available(torch.device("cpu"), fmt)
    except ConfigError as exc:
        pytest.skip(str(exc))
    model, tok = _tiny("llama"), build_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    dense = _logits(Engine(model, tok), ids, 64)
    small = _logits(Engine(model, tok, weights=fmt), ids, 64)
    assert not torch.equal(small, dense)  # it really used other weights
    scale = dense.abs().max().item()
    assert (small - dense).abs().max().item() <= tolerance * scale


def test_int4_grid_recovers_q4_1_blocks_exactly_even_when_a_block_uses_part_of_its_range() -> None:
    from slmstack.engine.layers import int4_grid

    # Prepare: 16 rows of one group of 32. Row 0: a Q4_1 block (low -0.5, step 0.0625) using q = 0..15; row 1 the
    # same grid using only q = 2, 4 and 6; row 2 values on no 4-bit grid (0, 1, then 0.3 + irrational steps)
    weight = torch.zeros(16, 32)
    weight[0] = -0.5 + 0.0625 * (torch.arange(32) % 16)
    weight[1] = -0.5 + 0.0625 * torch.tensor([2, 4, 6, 4] * 8)
    weight[2] = 0.3 + 0.01 * torch.arange(32) * 2**0.5
    weight[2, 0], weight[2, 1] = 0.0, 1.0
    # Execute
    q, scale, low, exact = int4_grid(weight)
    rebuilt = low + q.reshape(16, 1, 32) * scale
    # Assert: rows 0 and 1 exactly, row 1 on its own coarsest grid (step 2 x 0.0625 = 0.125 from -0.375: q 0, 1, 2),
    # where 15 steps over its range (0.375 / 15) would put 4 x 0.0625 at 7.5 steps and move it; row 2 rounded
    assert exact[:2].all() and not exact[2].any()
    torch.testing.assert_close(rebuilt[:2].reshape(2, 32), weight[:2], atol=1e-6, rtol=0)
    assert scale[1].item() == pytest.approx(0.125) and low[1].item() == pytest.approx(-0.375)
    assert q[1, :4].tolist() == [0, 1, 2, 1]
    assert scale[2].item() == pytest.approx(1 / 15)
    assert (rebuilt[2].reshape(32) - weight[2]).abs().max().item() <= scale[2].item() / 2 + 1e-6
    assert 0 < (rebuilt[2].reshape(32) - weight[2]).abs().max().item()


def test_int4_weights_on_q4_1_grids_stay_close_to_float32_and_odd_shapes_are_refused() -> None:
    from slmstack.engine.layers import Linear
    from slmstack.errors import ConfigError
    from slmstack.fp16_weights import check_available

    try:
        check_available(torch.device("cpu"), "int4-weights")
    except ConfigError as exc:
        pytest.skip(str(exc))
    # Prepare: the tiny model's projections moved onto Q4_1 blocks (32 inputs, q 0..15, float16 step and low), as
    # the default model's are after dequantization
    model, tok = _tiny("llama"), build_tokenizer()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                out_features, in_features = param.shape
                groups = param.view(out_features, in_features // 32, 32)
                low = groups.amin(-1, keepdim=True).half().float()
                step = ((groups.amax(-1, keepdim=True) - low) / 15).half().float()
                param.copy_((low + torch.round((groups - low) / step).clamp(0, 15) * step).view_as(param))
    ids = tok(PROMPT)["input_ids"]
    # Execute
    dense = _logits(Engine(model, tok), ids, 64)
    int4 = _logits(Engine(model, tok, weights="int4-weights"), ids, 64)
    # Assert: other kernels (bfloat16 inputs, scales and offsets), within bfloat16-weights' tolerance
    assert not torch.equal(int4, dense)
    assert (int4 - dense).abs().max().item() <= 3e-2 * dense.abs().max().item()
    with pytest.raises(ConfigError, match="multiples of 32.*int8-weights"):
        Linear(torch.randn(16, 40), None, "int4-weights")


def test_both_decode_attention_kernels_agree_with_scattered_slots_and_ragged_lengths() -> None:
    from slmstack.engine.layers import decode_attention, decode_mask

    # Prepare: 3 rows in slots 4, 0, 2 of a 5-slot cache (4 query heads over 2 key/value heads), lengths 7, 3, 16
    torch.manual_seed(0)
    kv_cache = torch.randn(5, 2, 2, 16, 8)  # (S, KV, 2, T, hd)
    q = torch.randn(3, 4, 8)
    slots, lens = torch.tensor([4, 0, 2]), torch.tensor([7, 3, 16])
    mask = decode_mask(lens, 16, torch.float32)
    # Execute
    sdpa = decode_attention(q, kv_cache, slots, mask, 16, kernel="sdpa")
    matmul = decode_attention(q, kv_cache, slots, mask, 16, kernel="matmul")
    # Assert: the same, and row 1 (3 keys) equals attention written out by hand over its slot's first 3 keys
    torch.testing.assert_close(matmul, sdpa, atol=1e-5, rtol=1e-5)
    keys, values = kv_cache[0, :, 0, :3], kv_cache[0, :, 1, :3]  # (KV, 3, hd)
    for head in range(4):
        kv = head // 2
        weights = torch.softmax(keys[kv] @ q[1, head] / 8**0.5, dim=0)
        torch.testing.assert_close(matmul[1, head * 8 : (head + 1) * 8], weights @ values[kv], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", NEW_FORMS)
def test_greedy_text_over_32_tokens_equals_transformers_generate(kind: str) -> None:
    from slmstack.engine.hf import generate_batch
    from slmstack.engine.text import GenerationSettings

    # Prepare: prompts of different lengths, each longer than the sliding windows once decoding
    model, tok = tiny_model(kind), build_tokenizer()
    texts = [PROMPT, "a short one", "and a third prompt, of middling length"]
    settings = GenerationSettings(max_new_tokens=32)
    # Execute
    engine = Engine(model, tok, max_batch=4)
    handles = [engine.submit(tok(t)["input_ids"], None, settings) for t in texts]
    engine.run()
    # Assert
    reference = generate_batch(model, tok, texts, settings, chat=False)
    assert [h.generated() for h in handles] == reference  # text, tokens in and out
    # every row's prompt is longer than a window (6), so each decode step reads a windowed mask
    assert min(r.tokens_out for r in reference) > 1 and max(r.tokens_out for r in reference) == 32


@pytest.mark.parametrize("kind", NEW_FORMS)
def test_a_lora_adapter_on_every_projection_gives_peft_logits_beside_a_bare_row(kind: str) -> None:
    from peft import LoraConfig, get_peft_model

    from slmstack.arch import get_arch

    # Prepare: one adapter on every projection the table names, with factors far from zero
    model = tiny_model(kind)
    targets = get_arch(model).lora_targets
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
                           adapter_name="a")  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.eval()
    # Execute and assert: both rows in one step, each with peft's logits under its adapter
    step_equals_peft(model, build_tokenizer(), [PROMPT, "a second prompt"], ["a", "__base__"], tolerance=1e-4)
