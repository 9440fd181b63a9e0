from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slmstack.cli import main
from slmstack.errors import ConfigError, InputError
from slmstack.pruning.base import PRUNERS, LayerStats, PruneConfig
from slmstack.pruning.engine import load_calibration, prune
from slmstack.pruning.masks import load_masks, nm_mask, save_masks
from slmstack.pruning.methods import reconstruction_error
from tests.conftest import build_tiny_llama, build_tokenizer

W = torch.tensor([[1.0, -2.0, 3.0, -8.0], [6.0, 5.0, -4.0, 7.0]])  # (out=2, in=4)
SCALES = torch.tensor([10.0, 1.0, 1.0, 0.1])  # calibration: one token per input feature, e_j * s_j


def _stats(hessian: bool) -> LayerStats:
    stats = LayerStats(4, hessian=hessian)
    stats.add(torch.diag(SCALES))  # 4 tokens; H = 2/4 * diag(s^2), mean x_j^2 = s_j^2 / 4
    return stats


@pytest.mark.parametrize(
    ("method", "zeroed"),
    [
        # |W| over the whole layer: the four smallest are 1, 2, 3 (row 0) and 4 (row 1)
        ("magnitude", [(0, 0), (0, 1), (0, 2), (1, 2)]),
        # |W| * ||X_j|| per row: row 0 scores 10, 2, 3, 0.8; row 1 scores 60, 5, 4, 0.7 (norms up to 1/2)
        ("wanda", [(0, 1), (0, 3), (1, 2), (1, 3)]),
        # w^2 * (H_jj + damp) with H diagonal (no compensation): row 0 50.1, 2.51, 5.65, 8.48;
        # row 1 1805, 15.7, 10.0, 6.49 -> the four smallest over the block
        ("sparsegpt", [(0, 1), (0, 2), (0, 3), (1, 3)]),
    ],
)
def test_hand_computed_two_by_four(method: str, zeroed: list[tuple[int, int]]) -> None:
    # Prepare
    weight = W.clone()
    pruner = PRUNERS.get(method)(PruneConfig(method=method, sparsity=0.5))
    # Execute
    mask = pruner.prune(weight, _stats(hessian=method == "sparsegpt"), None)
    # Assert
    assert sorted(map(tuple, (~mask).nonzero().tolist())) == zeroed
    assert torch.equal(weight, W * mask)  # diagonal Hessian: kept weights are not changed


def test_sparsegpt_compensates_and_beats_magnitude_on_reconstruction() -> None:
    torch.manual_seed(0)
    weight = torch.randn(32, 128)
    mix = torch.randn(128, 128) * 0.1 + torch.eye(128)
    x = torch.randn(1024, 128) @ mix  # correlated inputs, so compensation matters
    stats = LayerStats(128, hessian=True)
    stats.add(x)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        w = weight.clone()
        PRUNERS.get(method)(PruneConfig(method=method, sparsity=0.5, blocksize=32)).prune(w, stats, None)
        assert (w == 0).float().mean() == pytest.approx(0.5)
        errors[method] = reconstruction_error(weight, w, stats)
    assert errors["sparsegpt"] <= errors["magnitude"]
    assert errors["sparsegpt"] <= errors["wanda"]
    # the error really is ||(W - W')X||^2 / N
    direct = float(((x @ (weight - w).T) ** 2).sum() / 1024)
    assert errors["sparsegpt"] == pytest.approx(direct, rel=1e-4)


@pytest.fixture()
def calibration() -> torch.Tensor:
    return torch.randint(6, 90, (4, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", list(PRUNERS))
def test_end_to_end_per_method(method: str, calibration: torch.Tensor) -> None:
    model = build_tiny_llama()
    embed = model.model.embed_tokens.weight.clone()
    head = model.lm_head.weight.clone()
    result = prune(model, method, 0.5, calibration=calibration)
    assert result.report["actual_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, head)
    assert len(result.masks) == 2 * 7
    for name, mask in result.masks.items():
        weight = model.get_parameter(name)
        assert torch.equal(weight == 0, ~mask), name  # the masks are exactly the zeros
    assert torch.isfinite(model(input_ids=calibration[:1]).logits).all()


def test_wanda_rows_are_exact_and_nm_groups_hold(calibration: torch.Tensor) -> None:
    model = build_tiny_llama()
    result = prune(model, "wanda", 0.25, calibration=calibration)
    for mask in result.masks.values():
        assert ((~mask).sum(1) == int(mask.shape[1] * 0.25)).all()  # every row: exactly 25 % zeros
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = build_tiny_llama()
        result = prune(model, method, calibration=calibration, pattern="2:4", sparsity=0.0)
        for mask in result.masks.values():
            groups = mask.reshape(mask.shape[0], -1, 4)
            assert (groups.sum(-1) == 2).all(), method


def test_masks_round_trip_bit_packed(tmp_path: Path) -> None:
    masks = {"a.weight": torch.rand(5, 7) > 0.5, "b.weight": torch.rand(3, 16) > 0.3}
    path = save_masks(masks, tmp_path / "masks.safetensors")
    assert path.stat().st_size < 200 + 8 * 64  # 1 bit per weight (plus header)
    loaded = load_masks(path)
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)
    assert nm_mask(torch.tensor([[4.0, 1, 3, 2]]), 2, 4).tolist() == [[True, False, True, False]]


def test_bad_inputs(calibration: torch.Tensor, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        PruneConfig(sparsity=1.0)
    with pytest.raises(ConfigError, match="not a multiple of 5"):
        prune(build_tiny_llama(), "magnitude", pattern="3:5", sparsity=0.0)
    with pytest.raises(ConfigError, match="needs calibration data"):
        prune(build_tiny_llama(), "wanda", 0.5)
    text = tmp_path / "calib.txt"
    text.write_text("abc " * 10)
    with pytest.raises(InputError, match=r"holds 40 tokens, fewer than the 96 requested \(4 samples x 24\)"):
        load_calibration(build_tokenizer(), text, 4, 24)
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ConfigError, match="unsupported architecture 'gpt2': looked for a list of decoder layers"):
        prune(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)), "magnitude", 0.5)


def test_cli_prune_writes_loadable_dirs(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    argv = ["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.25", "0.5",
            "--calibration", str(calib), "--nsamples", "4", "--seqlen", "32", "--eval-text", str(calib),
            "--out", str(tmp_path / "blocks")]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["actual_sparsity"] for r in out["runs"]] == [0.25, 0.5]
    report = json.loads((tmp_path / "blocks" / "wanda-50" / "prune_report.json").read_text())
    assert report["perplexity_after"] > 0 and report["perplexity_before"] == out["perplexity_before"]
    from slmstack.stack.runtime import Stack
    from tests.conftest import stack_dict, write_yaml

    stack = Stack.from_config(write_yaml(tmp_path / "s.yaml", stack_dict(tmp_path / "blocks" / "wanda-50", max_new=3)))
    assert len(stack("hi").trace) == 3  # a pruned block is a base model for a stack
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err


def test_structured_ratio_zero_is_identical_and_half_is_smaller(calibration: torch.Tensor, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from slmstack.pruning.structured import prune_structured

    model = build_tiny_llama()
    x = calibration[:2]
    with torch.no_grad():
        reference = model(input_ids=x).logits
        same, _ = prune_structured(model, 0.0, calibration)
        torch.testing.assert_close(same(input_ids=x).logits, reference, atol=1e-6, rtol=0)
        half, report = prune_structured(model, 0.5, calibration)
    assert report["parameters_after"] < report["parameters_before"]
    assert (
        report["kv_heads"] == [2, 1]
        and report["attention_heads"] == [4, 2]
        and report["intermediate_size"] == [64, 32]
    )
    half.save_pretrained(tmp_path / "half")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "half")
    assert sum(p.numel() for p in loaded.parameters()) == report["parameters_after"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, half(input_ids=x).logits)


def test_structured_keeps_the_most_active_channels(calibration: torch.Tensor) -> None:
    from slmstack.pruning.structured import prune_structured

    model = build_tiny_llama(layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :32] *= 100  # channels 0..31 dominate ||W_down[:, j]||
        small, _ = prune_structured(model, 0.5, calibration)
    torch.testing.assert_close(
        small.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight[:, :32]
    )


def test_calibration_chunking_does_not_change_the_result(monkeypatch) -> None:
    import slmstack.pruning.engine as engine

    calib = torch.randint(6, 90, (10, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for chunk in (1, 8):  # 8 gives chunks of 8 and 2 sequences
        monkeypatch.setattr(engine, "_CHUNK", chunk)
        torch.manual_seed(3)
        cfg = PruneConfig(method="sparsegpt", sparsity=0.5, precision="fp32")  # bf16 rounding depends on shapes
        results.append(prune(build_tiny_llama(), config=cfg, calibration=calib).masks)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_dampening_is_raised_until_the_hessian_factorises() -> None:
    from slmstack.pruning.methods import _damped_inverse_cholesky

    H = torch.diag(torch.tensor([1.0, 1.0, -0.05], dtype=torch.float64))  # mean diag 0.65: 1% damp is too little
    U = _damped_inverse_cholesky(H, 0.01)
    expected = torch.diag(1 / torch.sqrt(torch.tensor([1.065, 1.065, 0.015], dtype=torch.float64)))  # 10% damp
    torch.testing.assert_close(U, expected)
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        _damped_inverse_cholesky(-torch.eye(3, dtype=torch.float64), 0.01)


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
def test_other_architectures_through_the_same_table(arch: str) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    if arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, vocab_size=64))  # fmt: skip
    else:
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=64))  # fmt: skip
    for method in PRUNERS:
        result = prune(model.eval(), method, 0.5, calibration=calib)
        assert result.report["actual_sparsity"] == pytest.approx(0.5, abs=0.01), method
    if arch == "qwen2":  # q/k/v carry biases: they are sliced with their rows
        from slmstack.pruning.structured import prune_structured

        small, report = prune_structured(model, 0.5, calib)
        assert report["kv_heads"] == [2, 1] and torch.isfinite(small(input_ids=calib[:1]).logits).all()


def test_cli_structured_reports_size_and_speed(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 5)
    argv = ["prune", "--model", str(tiny_model_dir), "--method", "structured", "--sparsity", "0.5", "--calibration",
            str(calib), "--nsamples", "2", "--seqlen", "16", "--out", str(tmp_path / "s")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "s" / "structured-50" / "prune_report.json").read_text())
    assert report["parameters_after"] < report["parameters_before"]
    assert len(report["decode_tokens_per_s"]) == 2 and min(report["decode_tokens_per_s"]) > 0
    assert main(argv[:7] + ["--out", str(tmp_path / "t")]) == 2  # structured needs calibration


def test_layer_by_layer_replay_gives_every_layer_its_own_mask_and_rope() -> None:
    from slmstack.arch import get_decoder_layers
    from slmstack.pruning.engine import _capture_inputs, _run_layer
    from tests.conftest import tiny_model

    # Prepare: Gemma 3's local (window 6, RoPE base 10k) and global layers; 20 tokens, past the window
    model = tiny_model("gemma3")
    layers = get_decoder_layers(model)
    calibration = torch.randint(6, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
             for layer in layers]  # fmt: skip
    with torch.no_grad():
        model(input_ids=calibration, use_cache=False)
    for h in hooks:
        h.remove()
    # Execute: the replay that wanda, sparsegpt and structured pruning use
    hidden, kwargs = _capture_inputs(model, layers, calibration)
    replayed = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            hidden = _run_layer(layer, hidden, kwargs[i])
            replayed.append(hidden[0])
    # Assert: each layer's output equals the model's own forward (the global layer too)
    for ours, reference in zip(replayed, seen, strict=True):
        torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-5)
