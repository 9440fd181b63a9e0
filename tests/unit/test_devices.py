"""Each verb loads its models on the device its config asks for (a spy on the loader), and asks Ray and Flower for
GPUs when that device is CUDA."""

from __future__ import annotations

import pytest


def _spy(monkeypatch, module) -> list[str]:
    """Record the device every ``load_model`` call asks for; load on the CPU whatever it asks (no GPU here)."""
    import slmstack.models

    seen: list[str] = []
    real = slmstack.models.load_model

    def load(ref, device="auto", dtype="auto"):
        seen.append(str(device))
        return real(ref, device="cpu", dtype=dtype)

    monkeypatch.setattr(slmstack.models, "load_model", load)
    if module is not None:
        monkeypatch.setattr(module, "load_model", load, raising=False)
    return seen


def test_a_federated_client_loads_its_block_on_the_configured_device(tiny_model_dir, tmp_path, monkeypatch) -> None:
    pytest.importorskip("flwr")
    from slmstack.federated import client_app
    from slmstack.federated.config import load_federate_config
    from slmstack.federated.run import prepare, simulation_backend
    from tests.unit.federated.test_federate import _config

    cfg = load_federate_config(_config(tmp_path, tiny_model_dir, rounds=1, device="cuda:1",
                                       clients=[{"sparsity": 0.0}, {"sparsity": 0.0}]))  # fmt: skip
    plan = prepare(cfg, tmp_path / "out")
    seen = _spy(monkeypatch, None)
    client_app._build(plan, 0)
    assert seen == ["cuda:1"] and plan.device == "cuda:1"
    assert simulation_backend(plan)["client_resources"] == {"num_cpus": 1, "num_gpus": 0.5}
    plan.device = "cpu"
    assert simulation_backend(plan)["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}


def test_a_transfer_cell_loads_its_model_on_the_configured_device(monkeypatch) -> None:
    from slmstack.transfer import lm

    seen: list[str] = []

    class Spy:
        def __init__(self, ref, max_length=256, device="auto", engine="auto") -> None:
            seen.append(device)

        def prepare(self, *args, **kwargs) -> None:
            pass

    monkeypatch.setattr(lm, "TransferModel", Spy)
    from slmstack.transfer.grid import Grid

    grid = Grid.__new__(Grid)
    grid.cfg = type("Cfg", (), {"device": "cuda", "model": "m", "engine": "auto",
                                "train": type("T", (), {"method": "lora", "max_length": 64, "rank": 4,
                                                        "alpha": 8})()})()  # fmt: skip
    grid._model(None)
    assert seen == ["cuda"] and grid.device == "cuda"


def test_a_study_loads_its_models_on_the_configured_device(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from slmstack.study.config import load_study_config
    from slmstack.study.run import Study
    from tests.unit.study.test_study import _config

    cfg = load_study_config(_config(tmp_path, tiny_model_dir), ["device=cuda"])
    study = Study(cfg, tmp_path / "out")
    seen = _spy(monkeypatch, None)
    cell = next(c for c in study.cells if c.arm == "A1")
    study.ensure_adapters(cell)  # trains the arm's adapter: its model is loaded once
    assert seen and set(seen) == {"cuda"} and study.device == "cuda"
    assert study.stack_config(cell, study.ensure_adapters(cell)).device == "cuda"  # every stack it scores too
