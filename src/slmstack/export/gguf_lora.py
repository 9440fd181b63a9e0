"""``gguf-lora``: each stage's adapter as a GGUF LoRA file for llama.cpp (``llama-server --lora FILE``).

The file is what llama.cpp's own ``convert_lora_to_gguf.py`` writes: ``general.type`` ``adapter``,
``adapter.type`` ``lora``, ``adapter.lora.alpha``, and for each adapted projection the tensors
``<gguf name>.lora_a`` (rank x in) and ``.lora_b`` (out x rank), float32, named with gguf's own tensor-name table.
Where llama.cpp stores a weight's rows in another order (Llama's q and k projections are permuted for its RoPE),
``lora_b``'s rows get the same permutation, since (P B) A = P (B A). llama.cpp scales each adapter by
``alpha / rank``, as peft does; rsLoRA, DoRA and adapters on the embeddings or the output layer are refused.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmstack.export.base import EXPORTERS
from slmstack.export.common import adapter_stages, backend_stack, write_launch

__all__ = ["llama_cpp_rows", "write_adapter_gguf", "write_gguf_lora"]

PORT = 8080


def llama_cpp_rows(weights: np.ndarray, gguf_name: str, arch_name: str, heads: int, kv_heads: int) -> np.ndarray:
    """``weights``' rows in llama.cpp's order (the inverse of transformers' GGUF loader's per-architecture fix-up).

    For Llama's ``attn_q`` and ``attn_k``: ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``; other weights as
    they are.
    """
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor

    if TENSOR_PROCESSORS.get(arch_name) is not LlamaTensorProcessor:
        return weights
    if ".attn_q." in gguf_name:
        n = heads
    elif ".attn_k." in gguf_name:
        n = kv_heads
    else:
        return weights
    return weights.reshape(n, 2, weights.shape[0] // n // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_adapter_gguf(base: Any, adapter_dir: Path, path: Path) -> int:
    """Write the peft adapter in ``adapter_dir`` (for the loaded ``base``) as a GGUF LoRA file; its tensor count.

    Raises:
        ConfigError: an adapter llama.cpp cannot load as a plain LoRA.
    """
    from gguf import GGUFType, GGUFWriter, Keys, get_tensor_name_map
    from safetensors.torch import load_file

    from slmstack.errors import ConfigError
    from slmstack.gguf_source import gguf_arch

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ConfigError(f"{adapter_dir}: rsLoRA, DoRA and per-module ranks have no GGUF LoRA form; retrain "
                          "with plain LoRA")  # fmt: skip
    config = base.config
    arch, arch_name = gguf_arch(config)
    table = get_tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        stem, _, side = key.removeprefix("base_model.model.").rpartition(".lora_")
        if not side.startswith(("A.", "B.")):
            raise ConfigError(f"{adapter_dir}: tensor {key} is not a LoRA A or B matrix; only plain LoRA exports")
        pairs.setdefault(stem, {})[side[0]] = tensor
    writer = GGUFWriter(str(path), arch_name)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))
    for stem, ab in sorted(pairs.items()):
        name = table.get_name(stem)
        if name is None or "blk." not in name or set(ab) != {"A", "B"}:
            raise ConfigError(f"{adapter_dir}: LoRA on {stem} has no place in llama.cpp's LoRA (only the decoder "
                              "layers' projections export)")  # fmt: skip
        a = ab["A"].float().numpy()
        b = llama_cpp_rows(ab["B"].float().numpy(), f"{name}.weight", arch_name, heads, kv_heads)
        writer.add_tensor(f"{name}.weight.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{name}.weight.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return 2 * len(pairs)


def write_gguf_lora(config: Any, out: Path) -> dict[str, Any]:
    """``out/<stage>.gguf`` per adapter stage, ``launch.sh`` and ``stack.yaml`` (``backend: {type: llamacpp}``)."""
    from slmstack.errors import ConfigError
    from slmstack.models import load_model, resolve_model_ref
    from slmstack.stack.adapters import check_adapter

    adapters = adapter_stages(config)
    if not adapters:
        raise ConfigError(f"stack {config.name!r} has no stage with an adapter: serve the base GGUF directly")
    base = load_model(config.model, device="cpu", dtype="float32").model
    files = {}
    for name, adapter in adapters.items():
        check_adapter(base, adapter, f"stage {name!r}", config.model)
        write_adapter_gguf(base, adapter, out / f"{name}.gguf")
        files[name] = f"{name}.gguf"
    resolved = resolve_model_ref(config.model)
    gguf = resolved.location if resolved.kind == "gguf" else "BASE.gguf"
    loras = " ".join(f"--lora {shlex.quote(f)}" for f in files.values())
    command = (f"llama-server -m {shlex.quote(gguf)} {loras} --lora-init-without-apply --port {PORT} "
               f"--ctx-size {getattr(base.config, 'max_position_embeddings', 2048)}")  # fmt: skip
    if resolved.kind != "gguf":
        command = "# convert the base model to BASE.gguf first (llama.cpp's convert_hf_to_gguf.py)\n" + command
    write_launch(out, command)
    backend = {"type": "llamacpp", "url": f"http://127.0.0.1:{PORT}/v1", "base_model": "base", "models": files}
    backend_stack(config, backend, out / "stack.yaml")
    return {"stages": {s.name: files.get(s.name, "base") for s in config.stages}, "command": command,
            "backend_stack": "stack.yaml"}  # fmt: skip


EXPORTERS.add("gguf-lora", write_gguf_lora)
