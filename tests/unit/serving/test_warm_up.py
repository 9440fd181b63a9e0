"""``serve`` builds compiled decode steps before it reports ready (issue #35)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import stack_dict, write_yaml


def test_serve_compiles_every_batch_size_before_it_is_ready(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from slmstack.engine.runner import _can_compile
    from slmstack.serving.server import stack_configs, start_engines
    from slmstack.serving.settings import ServeSettings
    from slmstack.stack.runtime import Stack

    if not _can_compile():
        pytest.skip("torch.compile needs a C++ compiler here")
    monkeypatch.delenv("SLMSTACK_ENGINE", raising=False)  # about the engine: on in CI's SLMSTACK_ENGINE=hf pass too
    stack = write_yaml(tmp_path / "s.yaml", stack_dict(tiny_model_dir, max_new=4))
    configs = stack_configs([str(stack)], [], engine="compiled")
    stacks = {c.name: s for c, s in zip(configs, Stack.sharing_bases(configs), strict=True)}
    # Execute: what serve does before it binds the app
    start_engines(stacks, ServeSettings(max_batch_size=2))
    # Assert: both batch sizes' compiled steps exist at the warmed cache length, and a request of each size now
    # replays them without building anything
    engine = next(iter(stacks.values())).backend.engine
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.compiled and set(graphs.graphs) == {1, 2}
    assert engine.cache.length >= 512
    built = dict(graphs.graphs)
    from slmstack.stack.config import GenerationSettings

    handles = [engine.submit([1, 2, 3], None, GenerationSettings(max_new_tokens=3)) for _ in range(2)]
    engine.run()
    assert all(h.done.is_set() for h in handles) and graphs.graphs == built
