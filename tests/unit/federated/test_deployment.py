"""Deployment runtime on loopback: a real SuperLink and 2 SuperNodes as separate processes, then `flwr run`.

The same ServerApp and ClientApp as the simulation (``recipes/flower_app``), one round, a tiny model.
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

pytest.importorskip("flwr")

from slmstack.cli import main  # noqa: E402
from tests.unit.federated.test_federate import _config  # noqa: E402

APP = Path(__file__).resolve().parents[3] / "recipes" / "flower_app"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_superlink_and_two_supernodes_complete_a_round(tiny_model_dir: Path, tmp_path: Path) -> None:
    if not (BIN / "flower-superlink").exists() or shutil.which("flwr", path=str(BIN)) is None:
        pytest.skip("Flower's command-line tools are not installed in this environment")
    # Prepare: the run directory, a Flower home with a loopback connection, free ports
    run = tmp_path / "run"
    config = _config(tmp_path, tiny_model_dir, rounds=1, clients=[{"sparsity": 0.0}, {"sparsity": 0.5}])
    assert main(["federate", "--config", str(config), "--out", str(run), "--prepare-only"]) == 0
    home = tmp_path / "flwr-home"
    home.mkdir()
    link = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')  # fmt: skip
    env = {**os.environ, "FLWR_HOME": str(home)}
    procs = [_start([str(BIN / "flower-superlink"), "--insecure", "--port", str(link)], tmp_path / "link.log", env)]
    try:
        time.sleep(3)
        for k in range(2):
            procs.append(_start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                                 "--node-config", f"partition-id={k}", "--port", str(_free_port())],
                                tmp_path / f"node{k}.log", env))  # fmt: skip
        # Execute
        out = subprocess.run([str(BIN / "flwr"), "run", str(APP), "loopback", "--run-config",
                              f"run-dir='{run}'", "--stream"], env=env, capture_output=True, text=True,
                             timeout=240)  # fmt: skip
        # Assert: the run finished its round on both nodes and wrote the outputs
        logs = out.stdout + out.stderr + "".join(p.read_text() for p in tmp_path.glob("*.log"))
        assert (run / "metrics.json").is_file(), logs[-3000:]
        last = json.loads((run / "metrics.json").read_text())["rounds"][-1]
        assert last["round"] == 1 and last["clients_ok"] == 2 and last["clients_failed"] == 0
        assert set(last["client_eval_loss"]) == {"0", "1"}
        assert (run / "global_adapter" / "adapter_model.safetensors").is_file()
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
