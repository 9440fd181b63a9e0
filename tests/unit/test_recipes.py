"""Every recipe YAML loads into its config (the style guide's torchtune ``test_configs.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _loader(path: Path):
    from slmstack.federated.config import load_federate_config
    from slmstack.study.config import load_study_config
    from slmstack.transfer.config import load_transfer_config

    name = path.name
    return {"stack": load_study_config, "trans": load_transfer_config, "feder": load_federate_config}[name[:5]]


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path: Path) -> None:
    config = _loader(path)(path)
    assert config is not None


def test_the_second_study_names_its_contrast_and_runs_every_seed() -> None:
    from slmstack.study.config import load_study_config

    cfg = load_study_config(RECIPES / "stack_study_v2.yaml")
    assert (cfg.protocol, cfg.primary, cfg.seeds, cfg.extra_seeds) == (2, ["RS2", "R1"], [0, 1, 2], [])
    assert {"R1", "RS2"} <= set(cfg.arms) and cfg.attributed_arm == "RS2"
