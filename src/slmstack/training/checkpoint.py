"""Crash-safe training checkpoints in safetensors (never pickle).

A checkpoint is a directory ``step-NNNNNN`` holding the adapter weights, the optimizer tensors, the
torch RNG states (the CPU generator and every CUDA device's: dropout on a GPU draws from the CUDA one)
and a JSON of the rest. It is written under a temp name and renamed into place; only
then does the ``latest`` pointer file move to it (atomically). A kill or a full disk at any moment
leaves ``latest`` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slmstack.errors import InputError
from slmstack.io import atomic_write_text, guard_read, read_json, read_text

__all__ = ["Checkpoint", "load_latest", "restore_rng", "rng_state", "save_checkpoint"]

LATEST = "latest"


@dataclass
class Checkpoint:
    """What a resumed run needs."""

    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]
    extra: dict[str, Any]


_CPU_RNG = "__rng__"
_CUDA_RNG = "__rng_cuda{}__"


def rng_state() -> dict[str, torch.Tensor]:
    """The torch generators a training step draws from: the CPU one, and each CUDA device's once CUDA is in use."""
    state = {_CPU_RNG: torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.update({_CUDA_RNG.format(i): torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())})
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    """Put the generators back as :func:`rng_state` found them, so a resumed run draws the same dropout masks.

    Raises:
        InputError: the checkpoint holds CUDA generator states but this machine has fewer CUDA devices.
    """
    torch.set_rng_state(state[_CPU_RNG])
    cuda = sorted(k for k in state if k != _CPU_RNG)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda) > devices:
        raise InputError(f"the checkpoint was written on {len(cuda)} CUDA device(s) and this machine has {devices}; "
                         "resume it where it started, or start over (--overwrite) to train here")  # fmt: skip
    for i in range(len(cuda)):
        torch.cuda.set_rng_state(state[_CUDA_RNG.format(i)], i)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                rest["state"].setdefault(str(pid), {})[key] = value
    return tensors, rest


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in rest["state"].items()}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    root: Path, step: int, adapter: dict[str, torch.Tensor], optimizer: Any, scheduler: Any, extra: dict[str, Any]
) -> Path:
    """Write checkpoint ``step`` under ``root`` and point ``latest`` at it; older ones are removed after."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
        opt_tensors, opt_rest = _flatten_optimizer(optimizer.state_dict())
        opt_tensors.update(rng_state())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        meta = {"step": step, "optimizer": opt_rest, "scheduler": scheduler.state_dict(), "extra": extra}
        (tmp / "state.json").write_text(json.dumps(meta))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(root / name, ignore_errors=True)
        os.rename(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, name)
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def load_latest(root: Path) -> Checkpoint | None:
    """The checkpoint ``latest`` points at, or None when there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    fix = "The checkpoint is damaged: rerun without --resume (or with --overwrite) to start over."
    name = read_text(pointer, "checkpoint pointer", fix).strip()
    path = root / name
    if not name.startswith("step-") or "/" in name or not path.is_dir():
        raise InputError(f"{pointer}: points at {name[:60]!r}, which is not a checkpoint here. {fix}")
    meta = read_json(path / "state.json", "checkpoint state", fix,
                     expect={"step": int, "optimizer": dict, "scheduler": dict, "extra": dict})  # fmt: skip
    with guard_read(path, "checkpoint", fix):
        tensors = load_file(str(path / "optimizer.safetensors"))
        rng = {key: tensors.pop(key) for key in [k for k in tensors if k.startswith("__rng")]}
        return Checkpoint(
            step=meta["step"], adapter=load_file(str(path / "adapter.safetensors")),
            optimizer=_unflatten_optimizer(tensors, meta["optimizer"]), scheduler=meta["scheduler"], rng=rng,
            extra=meta["extra"],
        )  # fmt: skip
