"""``slmstack export``: merged models equal base + adapter through peft; GGUF LoRA files read back as llama.cpp
loads them (transformers' own GGUF fix-ups undo our row order); the vLLM layout serves the weights trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slmstack.cli import main
from slmstack.stack.config import load_stack_config
from tests.conftest import save_random_adapter, save_tiny_model, stack_dict, write_yaml


@pytest.fixture(scope="module")
def adapted(tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    return write_yaml(root / "stack.yaml", stack_dict(tiny_model_dir, tiny_adapters, max_new=4))


def test_merged_models_give_base_plus_adapter_logits(adapted: Path, tiny_model_dir: Path, tiny_adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["export", "--stack", str(adapted), "--format", "merged", "--out", str(tmp_path / "m")]) == 0
    manifest = json.loads((tmp_path / "m" / "export.json").read_text())
    assert manifest["stages"] == {"first": "first", "second": "base", "third": "third"}
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    for stage in ("first", "third"):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / stage)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        reference = PeftModel.from_pretrained(base, str(tiny_adapters[stage]))
        with torch.no_grad():
            got, want = merged(input_ids=ids).logits, reference(input_ids=ids).logits
            bare = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got, bare, atol=1e-3)  # the adapter was merged, not dropped
    # a second export into its own folder is allowed; the folder is replaced whole
    assert main(["export", "--stack", str(adapted), "--format", "merged", "--out", str(tmp_path / "m")]) == 0


def test_gguf_lora_files_hold_the_adapter_as_llama_cpp_reads_it(adapted: Path, tiny_model_dir: Path,
                                                                 tiny_adapters, tmp_path) -> None:  # fmt: skip
    from gguf import GGUFReader
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    assert main(["export", "--stack", str(adapted), "--format", "gguf-lora", "--out", str(tmp_path / "g")]) == 0
    out = tmp_path / "g"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    processor = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                             "num_key_value_heads": config.num_key_value_heads})  # fmt: skip
    for stage in ("first", "third"):
        reader = GGUFReader(str(out / f"{stage}.gguf"))
        fields = {f.name: f for f in reader.fields.values()}
        assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
        assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
        cfg = json.loads((tiny_adapters[stage] / "adapter_config.json").read_text())
        assert float(fields["adapter.lora.alpha"].parts[-1][0]) == cfg["lora_alpha"]
        tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
        peft = load_file(str(tiny_adapters[stage] / "adapter_model.safetensors"))
        assert len(tensors) == len(peft)
        for key, value in peft.items():
            layer = key.split(".layers.")[1].split(".")[0]
            module = key.split(".lora_")[0].rsplit(".", 1)[-1]
            gguf_name = {"q_proj": "attn_q", "v_proj": "attn_v", "down_proj": "ffn_down"}[module]
            name = f"blk.{layer}.{gguf_name}.weight.lora_{'a' if '.lora_A.' in key else 'b'}"
            theirs = tensors[name]
            if name.endswith("lora_b"):  # transformers' GGUF loader turns llama.cpp's row order back into HF's
                theirs = processor.process(theirs, name).weights
            np.testing.assert_array_equal(theirs, value.numpy())
    command = (out / "launch.sh").read_text()
    assert "--lora first.gguf --lora third.gguf" in command and "--lora-init-without-apply" in command
    backend = load_stack_config(out / "stack.yaml")
    assert backend.backend.type == "llamacpp" and backend.backend.models == {"first": "first.gguf",
                                                                               "third": "third.gguf"}  # fmt: skip
    assert all(s.adapter is None for s in backend.stages)


def test_the_q_and_k_rows_are_permuted_as_llama_cpp_permutes_its_weights() -> None:
    # llama.cpp's convert_hf_to_gguf.py LoraTorchTensor: permute(W) = permute(B) A; transformers undoes it on load
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from slmstack.export.gguf_lora import llama_cpp_rows

    b = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)  # 4 heads of 4 rows, rank 3
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, rows in (("blk.0.attn_q.weight", 16), ("blk.0.attn_k.weight", 8)):
        ours = llama_cpp_rows(b[:rows], name, "llama", 4, 2)
        np.testing.assert_array_equal(processor.process(ours, name).weights, b[:rows])
        assert not np.array_equal(ours, b[:rows])
    np.testing.assert_array_equal(llama_cpp_rows(b, "blk.0.attn_v.weight", "llama", 4, 2), b)
    np.testing.assert_array_equal(llama_cpp_rows(b, "blk.0.attn_q.weight", "gemma3", 4, 2), b)


def test_the_vllm_layout_holds_the_trained_base_and_each_adapter(adapted: Path, tiny_model_dir: Path, tiny_adapters,
                                                                 tmp_path) -> None:  # fmt: skip
    from safetensors.torch import load_file

    assert main(["export", "--stack", str(adapted), "--format", "vllm", "--out", str(tmp_path / "v")]) == 0
    out = tmp_path / "v"
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    ours = load_file(str(out / "base" / "model.safetensors"))
    assert base.keys() == ours.keys() and all(torch.equal(base[k], ours[k]) for k in base)
    for stage in ("first", "third"):
        assert (out / "loras" / stage / "adapter_config.json").read_text() == (
            tiny_adapters[stage] / "adapter_config.json").read_text()  # fmt: skip
    command = (out / "launch.sh").read_text()
    assert "vllm serve base --served-model-name base" in command and "--enable-lora" in command
    assert "--lora-modules first=loras/first third=loras/third" in command
    stack = yaml.safe_load((out / "stack.yaml").read_text())
    assert stack["backend"] == {"type": "vllm", "url": "http://127.0.0.1:8001/v1", "base_model": "base",
                                "models": {"first": "first", "third": "third"}}  # fmt: skip


def test_an_adapter_llama_cpp_cannot_load_is_refused(tmp_path: Path) -> None:
    from slmstack.errors import ConfigError
    from slmstack.export import export_stack

    model = save_tiny_model(tmp_path / "m")
    adapter = save_random_adapter(model, tmp_path / "a", seed=1)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    config = load_stack_config(write_yaml(tmp_path / "s.yaml", stack_dict(model, {"first": adapter})))
    with pytest.raises(ConfigError, match="rsLoRA"):
        export_stack(config, "gguf-lora", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
