"""A real two-node Ray cluster on one machine, the second node unable to see the driver's output folder.

The second node runs inside its own mount namespace with a tmpfs over the run's folder (``unshare --mount``, as
root), so whatever its tasks write there lands on its own "disk". The cells ask for a custom resource only it has.
Every result must arrive at the driver, no cell may run twice (the runs are counted through marks written on the
second node's disk, read back by a task there), and the driver must run nothing itself. Both nodes are stopped by
their process groups at the end, even on failure. Marked slow (about a minute).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
RAY = shutil.which("ray", path=str(Path(sys.executable).parent))


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(RAY is None or not _can_unshare(), reason="needs the ray CLI and root for unshare --mount")
def test_cells_run_on_a_node_without_the_drivers_disk_and_come_back_once(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from slmstack.grid import RESOURCES_ENV
    from tests.unit.test_grid_ray import toy_grid

    runs = tmp_path / "runs"  # the driver's output folder; a private tmpfs on the second node
    runs.mkdir()
    # the cluster's own temp dir (short: Ray's socket paths must fit 107 bytes): nothing is left in /tmp/ray, where
    # a ray_current_cluster file would make every later ray.init() in this machine try to join a dead cluster
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    port = _port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--include-dashboard", "false", "--block", "--disable-usage-stats"]
    head = subprocess.Popen([RAY, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                             "--temp-dir", str(ray_tmp), *common, "--resources", json.dumps({"head": 1})], env=env,
                            start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    node2 = None
    try:
        second = " ".join([RAY, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                           *[c for c in common if c != "--include-dashboard" and c != "false"],
                           "--resources", "'" + json.dumps({"node2": 4}) + "'"])  # fmt: skip
        node2 = subprocess.Popen(["unshare", "--mount", "sh", "-c", f"mount -t tmpfs tmpfs {runs} && exec {second}"],
                                 env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)  # fmt: skip
        for _ in range(60):  # the head takes a few seconds to listen
            try:
                ray.init(address=f"127.0.0.1:{port}", include_dashboard=False, log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                time.sleep(0.5)
        deadline = time.monotonic() + 60
        while ray.cluster_resources().get("node2", 0) < 4 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.cluster_resources().get("node2", 0) == 4, ray.cluster_resources()
        node_of = {n["NodeID"]: ("second" if "node2" in n["Resources"] else "head") for n in ray.nodes() if n["Alive"]}
        # Execute: the grid's tasks may run only where "node2" is
        monkeypatch.setenv(RESOURCES_ENV, json.dumps({"node2": 1}))
        out, marks = runs / "grid", runs / "marks"
        results = toy_grid(out, marks).run("ray")

        @ray.remote(num_cpus=0, resources={"node2": 1})
        def look(folder: str) -> list[str]:
            path = Path(folder)
            return sorted(p.name.split(".")[0] for p in path.iterdir()) if path.is_dir() else []

        seen_there = ray.get(look.remote(str(marks)))
        placement = {r["cell"]["id"]: node_of.get(r["node"], r["node"]) for r in results}
        print("cell placement:", placement)
    finally:
        ray.shutdown()
        _signal([node2, head], signal.SIGTERM)
        time.sleep(2)
        _signal([node2, head], signal.SIGKILL)
        for proc in (node2, head):
            if proc is not None:
                proc.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # Assert: every result is on the driver's disk; the driver itself ran nothing; each cell ran once, there
    assert [r["value"] for r in results] == [f"shared-c{i}" for i in range(4)]
    assert sorted(p.name for p in (out / "cells").iterdir()) == [f"c{i}.json" for i in range(4)]
    assert (out / "shared" / "words" / "words.txt").read_text() == "shared-"
    assert not marks.exists()  # no mark on the driver's disk: nothing ran here
    assert seen_there == ["build", "run-c0", "run-c1", "run-c2", "run-c3"]
    assert set(placement.values()) == {"second"}


def _signal(procs: list, sig: int) -> None:
    """Send ``sig`` to each started process's group (a node and everything it started)."""
    for proc in procs:
        if proc is not None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
