from __future__ import annotations

from pathlib import Path

import pytest

from slmstack.errors import ConfigError
from slmstack.stack.config import default_stack_path, load_stack_config, save_stack_config, template_fields
from tests.conftest import stack_dict, write_yaml


def test_default_stack_has_four_stages_on_the_default_model() -> None:
    cfg = load_stack_config()
    assert [s.name for s in cfg.stages] == ["restate", "recall", "reason", "answer"]
    assert cfg.model == "default" and all(s.adapter is None for s in cfg.stages)
    assert cfg.source == default_stack_path().resolve()


def test_yaml_round_trips(tmp_path: Path) -> None:
    # Prepare
    data = stack_dict("some/model", {"first": Path("adapters/first")})
    data["stages"][1]["generation"] = {"max_new_tokens": 5, "do_sample": True, "seed": 3, "stop": ["\n\n"]}
    cfg = load_stack_config(write_yaml(tmp_path / "a.yaml", data))
    # Execute
    save_stack_config(cfg, tmp_path / "b.yaml")
    again = load_stack_config(tmp_path / "b.yaml")
    # Assert
    assert again == cfg
    assert again.stages[1].generation.stop == ["\n\n"]
    assert again.adapter_path(again.stages[0]) == tmp_path / "adapters/first"


def test_default_stack_round_trips(tmp_path: Path) -> None:
    cfg = load_stack_config()
    save_stack_config(cfg, tmp_path / "d.yaml")
    assert load_stack_config(tmp_path / "d.yaml") == cfg


def test_later_stage_reference_is_caught_at_load_time(tmp_path: Path) -> None:
    data = stack_dict("m")
    data["stages"][0]["template"] = "Q: {input} {third}"
    with pytest.raises(
        ConfigError, match=r"s.yaml: .*stages\[0\].template \(first\) refers to \{third\}, a later stage"
    ):
        load_stack_config(write_yaml(tmp_path / "s.yaml", data))


def test_unknown_stage_reference_lists_allowed_fields(tmp_path: Path) -> None:
    data = stack_dict("m")
    data["stages"][2]["template"] = "{frist}"
    with pytest.raises(ConfigError, match=r"unknown field \{frist\}; allowed here: \{input\}, \{first\}, \{second\}"):
        load_stack_config(write_yaml(tmp_path / "s.yaml", data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(modle="x"), "modle: unknown field. Did you mean 'model'"),
        (lambda d: d["stages"][0].pop("template"), r"stages\[0\].template: required field is missing"),
        (lambda d: d["stages"][1]["generation"].update(max_new_tokens="ten"), "max_new_tokens: expected int"),
        (lambda d: d["stages"][1]["generation"].update(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (lambda d: d["stages"][1].update(name="first"), "duplicate stage name 'first'"),
        (lambda d: d["stages"][1].update(name="two words"), "must be a Python identifier"),
        (lambda d: d.update(stages=[]), "at least one stage"),
        (lambda d: d.update(on_overflow="drop"), "on_overflow: 'drop' is not allowed"),
        (lambda d: d["stages"][0].update(template="{input"), "not a valid format string"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, edit, message: str) -> None:
    data = stack_dict("m")
    edit(data)
    with pytest.raises(ConfigError, match=message):
        load_stack_config(write_yaml(tmp_path / "s.yaml", data))


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", stack_dict("m"))
    cfg = load_stack_config(path, ["stages.2.generation.max_new_tokens=3", "batch_size=2"])
    assert cfg.stages[2].generation.max_new_tokens == 3 and cfg.batch_size == 2


def test_template_fields() -> None:
    assert template_fields("a {input} {{literal}} {x}") == ["input", "x"]


@pytest.mark.parametrize("path", sorted(default_stack_path().parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_packaged_config_loads(path: Path) -> None:
    assert load_stack_config(path).stages
