"""A live slmstack server on loopback with a tiny 2-model setup (a 3-stage stack and a plain model)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from slmstack.serving.settings import ServeSettings
from tests.conftest import stack_dict, write_yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(stacks, settings: ServeSettings):
    import uvicorn

    from slmstack.serving.app import build_app

    app = build_app(stacks, settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            return server, thread, app
        time.sleep(0.05)
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def stacks(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from slmstack.serving.server import load_stacks

    root = tmp_path_factory.mktemp("serve")
    stack = write_yaml(root / "stack.yaml", {**stack_dict(tiny_model_dir, max_new=4), "name": "tiny-stack"})
    return load_stacks([str(stack)], [f"plain={tiny_model_dir}"])


@pytest.fixture(scope="module")
def live(stacks):
    settings = ServeSettings(port=free_port(), max_batch_size=16, max_wait_ms=200, max_prompt_tokens=200,
                             max_tokens=64, max_body_bytes=20_000)  # fmt: skip
    server, thread, app = start_server(stacks, settings)
    yield f"http://127.0.0.1:{settings.port}", app
    server.should_exit = True
    thread.join(timeout=10)
