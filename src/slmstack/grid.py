"""A resumable grid of independent cells, run one after another or as Ray tasks (transfer and stacking studies).

Each cell's result is one JSON file, ``cells/<id>.json``, written atomically when the cell ends; a finished cell is
never redone, so a killed grid resumes where it stopped. Work that several cells share (a trained checkpoint) is
built once into a directory swapped in atomically, and reused. With ``executor="ray"`` the prerequisite waves
(:meth:`CellGrid.prerequisites`) and then the cells run as Ray tasks, which a Ray cluster spreads over its nodes
(``RAY_ADDRESS``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from slmstack.errors import InputError
from slmstack.io import check_json_shape, read_json

logger = logging.getLogger(__name__)

__all__ = ["CellGrid", "check_scores"]


class CellGrid:
    """The contract: ``out``, ``cells`` (each with an ``id``), :meth:`run_cell`; optionally :meth:`prerequisites`."""

    out: Path
    cells: list[Any]
    kind = "cell"  # for messages
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
            self._run_ray(todo)
        else:  # one after another: each cell builds what it needs when it needs it
            for cell in tqdm(todo, desc=f"{self.kind} cells", unit="cell"):
                self.run_cell(cell)
        return [self.run_cell(c) for c in cells]

    def _run_ray(self, todo: list[Any]) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)

        @ray.remote(num_cpus=1)
        def call(grid: CellGrid, name: str, args: tuple) -> None:
            getattr(grid, name)(*args)

        ref = ray.put(self)
        for wave in self.prerequisites(todo):
            ray.get([call.remote(ref, name, args) for name, args in wave])
        for _ in tqdm(ray.get([call.remote(ref, "run_cell", (c,)) for c in todo]), desc=f"{self.kind} cells"):
            pass


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
