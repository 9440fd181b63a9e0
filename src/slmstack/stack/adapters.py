"""Attach LoRA adapters (peft format) to one shared base model as named adapters.

Each adapter is checked against the base before peft sees it: the weights must be safetensors
(never pickle), every targeted module must exist, and every LoRA matrix must fit its module's
shape. A mismatch raises :class:`AdapterMismatchError` naming the stage, the file and the fix.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from torch import nn

from slmstack.errors import AdapterMismatchError
from slmstack.io import guard_read, read_json

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "attach_adapters", "check_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# base_model.model.<module path>.lora_A[.<adapter>].weight
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_adapter(base: nn.Module, path: Path, label: str, base_ref: str | None = None) -> dict[str, Any]:
    """Validate an adapter directory against ``base`` and return its ``adapter_config.json``.

    Raises:
        AdapterMismatchError: missing files, pickle weights, unknown modules or wrong shapes.
    """
    from safetensors import safe_open

    where = f"{label}: adapter {path}"
    if not path.is_dir():
        raise AdapterMismatchError(f"{where} does not exist. Train it (slmstack train) or remove 'adapter:'.")
    if not (path / ADAPTER_CONFIG).is_file():
        raise AdapterMismatchError(f"{where} has no {ADAPTER_CONFIG}; it is not a peft adapter directory.")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterMismatchError(
            f"{where} has no {ADAPTER_WEIGHTS}. slmstack loads weights only from safetensors, never pickle "
            "(.bin); re-save it with save_pretrained(safe_serialization=True)."
        )
    fix = "Re-save the adapter with save_pretrained, or retrain it (slmstack train)."
    config = read_json(path / ADAPTER_CONFIG, "adapter config", fix)
    if not isinstance(config, dict):
        raise AdapterMismatchError(f"{where}: {ADAPTER_CONFIG} is not a JSON object. {fix}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatchError(f"{where} is a {config.get('peft_type')} adapter; only LoRA is supported.")
    modules = dict(_unwrap(base).named_modules())
    weights = path / ADAPTER_WEIGHTS
    with guard_read(weights, "adapter weights (safetensors)", fix, error=AdapterMismatchError):
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {key: fh.get_slice(key).get_shape() for key in fh.keys()}
    for key, shape in shapes.items():
        _check_tensor(where, key, shape, modules)
    named = config.get("base_model_name_or_path")
    # peft records the directory the base was loaded from (for a GGUF: its cache entry)
    known = {base_ref, getattr(_unwrap(base), "name_or_path", None)}
    if base_ref and named and named not in known:
        logger.warning("%s was trained on %r; loading it on %r because the shapes fit", where, named, base_ref)
    return config


def _check_tensor(where: str, key: str, shape: list[int], modules: dict[str, nn.Module]) -> None:
    match = _LORA_KEY.match(key)
    if match is None:
        return  # e.g. modules_to_save; peft itself checks those
    name = match["module"]
    module = modules.get(name)
    if module is None or not hasattr(module, "weight"):
        raise AdapterMismatchError(
            f"{where}: tensor {key} targets module {name!r}, which the base model does not have. "
            "The adapter was trained on a different architecture; retrain it on this base model."
        )
    out_features, in_features = module.weight.shape[0], module.weight.shape[-1]
    expected_dim, actual_dim = (in_features, shape[1]) if match["ab"] == "A" else (out_features, shape[0])
    if expected_dim != actual_dim:
        raise AdapterMismatchError(
            f"{where}: tensor {key} has shape {tuple(shape)} but module {name!r} has weight shape "
            f"{tuple(module.weight.shape)}. The adapter belongs to a base model of another size; "
            "retrain it on this base model."
        )


def attach_adapters(base: nn.Module, adapters: dict[str, Path], base_ref: str | None = None) -> nn.Module:
    """Load each adapter onto ``base`` as a named peft adapter; no copy of the base is made.

    Args:
        base: the loaded causal LM (shared by all stages), or a peft model to add the adapters to.
        adapters: adapter name (the stage name) -> peft adapter directory.
        base_ref: the base model reference, to warn when an adapter names a different base.

    Returns:
        ``base`` itself when ``adapters`` is empty, else a ``PeftModel`` wrapping it in eval mode.

    Example:
        >>> model = attach_adapters(model, {"recall": Path("adapters/recall")})
        >>> model.generate(**batch, adapter_names=["recall", "__base__"])
    """
    if not adapters:
        return base
    from peft import PeftModel

    model: Any = base if hasattr(base, "peft_config") else None  # adding to another stack's wrapper
    for name, path in adapters.items():
        check_adapter(base, path, f"stage {name!r}", base_ref)
        if model is None:
            model = PeftModel.from_pretrained(base, str(path), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        logger.info("stage %s: loaded adapter %s", name, path)
    return model.eval()
