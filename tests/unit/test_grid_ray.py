"""Grids on Ray without a shared disk: results and shared folders come back through Ray; nothing is redone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from slmstack.errors import ConfigError
from slmstack.grid import RESOURCES_ENV, CellGrid, GridError, pack_folder, ray_options, unpack_folder
from slmstack.io import atomic_write_json


def toy_grid(out: Path, marks: Path, fail: str | None = None) -> CellGrid:
    """Cells that read a shared folder built by a prerequisite; every run and build leaves a mark in ``marks``.

    Defined in a function so that Ray ships the classes by value to its workers (no test module to import there).
    Each result names the Ray node that ran it.
    """

    @dataclass(frozen=True)
    class Cell:
        id: str

    class Toy(CellGrid):
        kind = "toy"
        result_fields = {"cell": dict, "value": str}

        def __init__(self) -> None:
            self.out, self.marks, self.fail = out, marks, fail
            self.cells = [Cell(f"c{i}") for i in range(4)]

        def _mark(self, name: str) -> None:
            self.marks.mkdir(parents=True, exist_ok=True)
            (self.marks / f"{name}.{os.getpid()}.{len(list(self.marks.iterdir()))}").touch()

        def ensure_shared(self) -> Path:
            folder = self.out / "shared" / "words"
            if not (folder / "words.txt").is_file():
                self._mark("build")
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "words.txt").write_text("shared-")
            return folder

        def prerequisites(self, todo):
            return [[("ensure_shared", ())]]

        def run_cell(self, cell: Cell) -> dict:
            path = self.cell_path(cell)
            if path.is_file():
                return self.read_cell(path)
            self._mark(f"run-{cell.id}")
            if cell.id == self.fail:
                raise RuntimeError(f"cell {cell.id} broke")
            node = None
            try:
                import ray

                node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
            except ImportError:
                pass
            result = {"cell": {"id": cell.id}, "value": (self.ensure_shared() / "words.txt").read_text() + cell.id,
                      "node": node}  # fmt: skip
            atomic_write_json(path, result)
            return result

    return Toy()


@pytest.fixture
def ray_apart(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray whose workers run in a folder of their own: a relative ``out`` is then another disk there."""
    ray = pytest.importorskip("ray")
    empty = tmp_path_factory.mktemp("worker-dir")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"working_dir": str(empty)})  # fmt: skip
    yield ray
    ray.shutdown()


def test_results_and_shared_folders_come_back_through_ray(ray_apart, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    driver_marks, worker_marks = tmp_path / "driver-marks", tmp_path / "worker-marks"
    grid = toy_grid(Path("run"), worker_marks)
    results = grid.run("ray")
    # every result is on the driver's disk, though the workers wrote into their own "run" folder
    assert [r["value"] for r in results] == [f"shared-c{i}" for i in range(4)]
    assert all(r["node"] for r in results)  # each ran in a Ray task
    assert all((tmp_path / "run" / "cells" / f"c{i}.json").is_file() for i in range(4))
    assert (tmp_path / "run" / "shared" / "words" / "words.txt").read_text() == "shared-"  # unpacked here too
    marks = sorted(p.name.split(".")[0] for p in worker_marks.iterdir())
    assert marks == ["build", "run-c0", "run-c1", "run-c2", "run-c3"]  # built once, each cell run once
    # run again: everything is read back, nothing runs anywhere (the driver's own run would leave a mark)
    again = toy_grid(Path("run"), driver_marks).run("ray")
    assert again == results and not driver_marks.exists()


def test_a_result_that_does_not_come_back_stops_the_grid_naming_the_cell(ray_apart, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    marks = tmp_path / "marks"
    grid = toy_grid(Path("run"), marks, fail="c2")
    with pytest.raises(GridError, match=r"toy c2: its result did not come back .*cell c2 broke.*nothing was rerun"):
        grid.run("ray")
    # the cells that came back are kept; the broken one ran once (on a worker) and was not redone here
    assert sorted(p.name for p in (tmp_path / "run" / "cells").iterdir()) == ["c0.json", "c1.json", "c3.json"]
    assert sorted(p.name.split(".")[0] for p in marks.iterdir()).count("run-c2") == 1


def test_a_packed_folder_unpacks_whole_and_never_over_an_existing_one(tmp_path: Path) -> None:
    src = tmp_path / "a" / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"\x00\x01")
    (src / "sub" / "c.json").write_text("{}")
    data = pack_folder(src)
    unpack_folder(tmp_path / "b", "x/adapter", data)
    assert (tmp_path / "b" / "x" / "adapter" / "w.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b" / "x" / "adapter" / "sub" / "c.json").read_text() == "{}"
    (tmp_path / "b" / "x" / "adapter" / "w.bin").write_bytes(b"mine")
    unpack_folder(tmp_path / "b", "x/adapter", data)  # already there: left alone
    assert (tmp_path / "b" / "x" / "adapter" / "w.bin").read_bytes() == b"mine"


@pytest.mark.parametrize(
    ("device", "cluster", "env", "expected"),
    [
        ("cpu", {"CPU": 4, "GPU": 2}, None, {"num_cpus": 1, "num_gpus": 0}),
        ("auto", {"CPU": 4}, None, {"num_cpus": 1, "num_gpus": 0}),
        ("auto", {"CPU": 4, "GPU": 1}, None, {"num_cpus": 1, "num_gpus": 1}),
        ("cuda", {"CPU": 4, "GPU": 1}, '{"node2": 1}', {"num_cpus": 1, "num_gpus": 1, "resources": {"node2": 1}}),
        ("cuda", {"CPU": 4}, None, "has no GPU"),
        ("cpu", {"CPU": 4}, "node2", "JSON object of positive numbers"),
        ("cpu", {"CPU": 4}, '{"node2": 0}', "JSON object of positive numbers"),
    ],
)
def test_a_task_asks_for_what_the_device_and_the_resources_variable_say(device, cluster, env, expected,
                                                                        monkeypatch) -> None:  # fmt: skip
    if env is None:
        monkeypatch.delenv(RESOURCES_ENV, raising=False)
    else:
        monkeypatch.setenv(RESOURCES_ENV, env)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            ray_options(device, cluster)
    else:
        assert ray_options(device, cluster) == expected
