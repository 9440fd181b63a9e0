"""A resumable grid of independent cells, run one after another or as Ray tasks (transfer and stacking studies).

Each cell's result is one JSON file, ``cells/<id>.json``, written atomically when the cell ends; a finished cell is
never redone, so a killed grid resumes where it stopped. Work that several cells share (a trained checkpoint, a
stage's adapter, a passage index) is built once into a directory swapped in atomically, and reused.

With ``executor="ray"`` the prerequisite waves (:meth:`CellGrid.prerequisites`) and then the cells run as Ray tasks,
which a Ray cluster (``RAY_ADDRESS``) spreads over its nodes. No disk is assumed shared: a task works in its node's
own copy of the output folder, and everything comes back through Ray's object store. A prerequisite's folders
(every path under ``out`` its job returns) are packed, returned and unpacked into the driver's ``out``; each later
task gets every folder built so far and unpacks the ones its node lacks; a cell's result is the task's return
value, written by the driver into its own ``cells/``. The driver never runs a cell itself on Ray: a result that
does not come back stops the grid with one line naming the cell. Tasks ask for a GPU when the grid's ``device`` is
``cuda`` (or ``auto`` on a cluster that has GPUs), and for the custom resources ``SLMSTACK_RAY_RESOURCES`` names
(a JSON object, e.g. ``{"gpu_node": 1}``), so cells can be kept to chosen nodes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from slmstack.errors import ConfigError, InputError, SlmstackError
from slmstack.io import atomic_dir, atomic_write_json, check_json_shape, read_json

logger = logging.getLogger(__name__)

__all__ = ["RESOURCES_ENV", "CellGrid", "GridError", "check_scores", "pack_folder", "ray_options", "unpack_folder"]


class CellGrid:
    """The contract: ``out``, ``cells`` (each with an ``id``), :meth:`run_cell`; optionally :meth:`prerequisites`."""

    out: Path
    cells: list[Any]
    kind = "cell"  # for messages
    device = "cpu"  # where cells load models (auto, cpu, cuda): on Ray, whether a task asks for a GPU
    result_fields: dict[str, Any] = {"cell": dict}  # what a finished cell's JSON must hold

    def run_cell(self, cell: Any) -> dict[str, Any]:
        """Run (or read back) one cell."""
        raise NotImplementedError

    def prerequisites(self, todo: list[Any]) -> list[list[tuple[str, tuple]]]:
        """Waves of ``(method name, args)`` jobs Ray runs before ``todo``'s cells (each wave's jobs in parallel).

        Locally a cell builds what it needs itself; on Ray, shared work runs first so that no two tasks build it.
        """
        return []

    def cell_path(self, cell: Any) -> Path:
        """Where a cell's result lives."""
        return self.out / "cells" / f"{cell.id}.json"

    def read_cell(self, path: Path) -> dict[str, Any]:
        """A finished cell's result, checked to be one (a damaged file names itself and the fix)."""
        result = read_json(path, f"{self.kind} result", CELL_FIX, expect=self.result_fields)
        self.check_result(result, f"{path}: the {self.kind} result")
        return result

    def check_result(self, result: dict[str, Any], where: str) -> None:
        """Check what the report reads from a finished cell, beyond :attr:`result_fields` (raise InputError)."""

    def run(self, executor: str = "local", cells: list[Any] | None = None) -> list[dict[str, Any]]:
        """Every cell's result (of ``cells``, default all), running what is not cached yet."""
        cells = self.cells if cells is None else cells
        todo = [c for c in cells if not self.cell_path(c).is_file()]
        logger.info("%s grid: %d cells, %d to run", self.kind, len(cells), len(todo))
        if executor == "ray" and todo:
            self._run_ray(todo)  # every todo cell's result is on this disk now, or it raised
        else:  # one after another: each cell builds what it needs when it needs it
            for cell in tqdm(todo, desc=f"{self.kind} cells", unit="cell"):
                self.run_cell(cell)
        return [self.run_cell(c) for c in cells]

    def _run_ray(self, todo: list[Any]) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        options = ray_options(self.device, ray.cluster_resources())
        call = ray.remote(_call).options(**options)
        ref = ray.put(self)
        built: dict[str, bytes] = {}  # folder (relative to out) -> its files, packed
        for wave in self.prerequisites(todo):
            bundle = ray.put(built)
            tasks = [call.remote(ref, name, args, bundle) for name, args in wave]
            for packed in self._gather(tasks, [f"{name}{args}" for name, args in wave]):
                for folder, data in packed.items():
                    built.setdefault(folder, data)
                    unpack_folder(self.out, folder, data)
        bundle = ray.put(built)
        tasks = [call.remote(ref, "run_cell", (c,), bundle) for c in todo]
        self._gather(tasks, [f"{self.kind} {c.id}" for c in todo], progress=True, keep=todo)

    def _gather(self, tasks: list[Any], names: list[str], progress: bool = False,
                keep: list[Any] | None = None) -> list[Any]:  # fmt: skip
        """Each task's value, in order (with ``keep``, cells: each result written here as it arrives).

        Raises:
            GridError: naming the first task whose value could not be had, once every other task has ended (the
                results that did come back are kept).
        """
        import ray

        out, failed = [], []
        for i, (name, task) in enumerate(tqdm(list(zip(names, tasks, strict=True)), desc=f"{self.kind} cells",
                                              disable=not progress)):  # fmt: skip
            try:
                value = ray.get(task)
            except Exception as exc:  # noqa: BLE001 - a task error, a lost node, a lost object: all one line
                text = str(exc).strip()
                failed.append((name, text.splitlines()[-1][:300] if text else type(exc).__name__))
                out.append(None)
                continue
            out.append(value)
            if keep is not None and not self.cell_path(keep[i]).is_file():
                atomic_write_json(self.cell_path(keep[i]), value)
        if failed:
            name, reason = failed[0]
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise GridError(
                f"{name}{more}: its result did not come back from its Ray task ({reason}); nothing was "
                "rerun here. Fix the cause and run the grid again: the results that came back are kept"
            )
        return out


def _call(grid: CellGrid, name: str, args: tuple, built: dict[str, bytes]) -> Any:
    """A Ray task: unpack what this node lacks, run ``grid.name(*args)``; a cell's result, or packed folders."""
    for folder, data in built.items():
        unpack_folder(grid.out, folder, data)
    value = getattr(grid, name)(*args)
    if name == "run_cell":
        return value
    return {folder: pack_folder(grid.out / folder) for folder in _folders(value, grid.out)}


def _folders(value: Any, out: Path) -> list[str]:
    """The folders under ``out`` that a prerequisite returned (a path, or paths in a dict or list)."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else [value]
    folders = []
    for item in items:
        if isinstance(item, Path) and item.is_dir():
            try:
                folders.append(str(item.resolve().relative_to(out.resolve())))
            except ValueError:
                continue  # outside the output folder (an input): every node has its own
    return folders


def pack_folder(folder: Path) -> bytes:
    """A folder's files as one uncompressed tar archive (adapters and indexes are small)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=".")
    return buffer.getvalue()


def unpack_folder(out: Path, folder: str, data: bytes) -> None:
    """Write a packed folder at ``out/folder`` unless it is there already (atomically: whole, or not at all)."""
    target = out / folder
    if target.is_dir():
        return

    def write(tmp: Path) -> None:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(tmp, filter="data")

    atomic_dir(target, write)


def ray_options(device: str, cluster: dict[str, float]) -> dict[str, Any]:
    """A task's resources: a CPU, a GPU when ``device`` asks for one, and ``SLMSTACK_RAY_RESOURCES``.

    Raises:
        ConfigError: ``device`` is ``cuda`` on a cluster without GPUs, or the resources variable is not a JSON object
            of positive numbers.
    """
    gpus = cluster.get("GPU", 0)
    wants_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if device.startswith("cuda") and not gpus:
        raise ConfigError(f"device {device!r}: the Ray cluster has no GPU; use device: auto or cpu, or add GPU nodes")
    options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if wants_gpu else 0}
    raw = os.environ.get(RESOURCES_ENV)
    if raw:
        try:
            custom = json.loads(raw)
        except json.JSONDecodeError:
            custom = None
        if not isinstance(custom, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                                                   for v in custom.values()):  # fmt: skip
            raise ConfigError(f"{RESOURCES_ENV}={raw[:80]!r}: give a JSON object of positive numbers, e.g. "
                              '\'{"gpu_node": 1}\'')  # fmt: skip
        options["resources"] = custom
    return options


class GridError(SlmstackError):
    """A grid cannot go on (a Ray task's result did not come back)."""


RESOURCES_ENV = "SLMSTACK_RAY_RESOURCES"
CELL_FIX = "Delete it to rerun the cell."


def check_scores(entries: Any, expected: list[str], fields: dict[str, Any], where: str) -> None:
    """``entries`` maps exactly the ``expected`` names to objects holding ``fields`` (a resumed cell's scores).

    Raises:
        InputError: naming the file, the entry and the field, with the fix (delete the cell to rerun it).
    """
    if sorted(entries) != sorted(expected):
        raise InputError(f"{where} scores {sorted(entries)}, but this run scores {sorted(expected)}. {CELL_FIX}")
    for name, entry in entries.items():
        check_json_shape(entry, fields, f"{where}, entry {name!r}", f" {CELL_FIX}")
