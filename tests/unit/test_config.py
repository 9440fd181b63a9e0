from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from slmstack.config import apply_overrides, build_dataclass, dataclass_to_dict, load_yaml
from slmstack.errors import ConfigError


@dataclass(kw_only=True)
class Inner:
    steps: int = 1
    rate: float = 0.5


@dataclass(kw_only=True)
class Outer:
    name: str
    mode: Literal["a", "b"] = "a"
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)


def test_builds_nested_dataclasses_and_coerces_int_to_float() -> None:
    cfg = build_dataclass(Outer, {"name": "x", "inner": {"rate": 2}, "items": [{"steps": 3}]})
    assert cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float)
    assert cfg.items[0].steps == 3 and cfg.limit is None


def test_unknown_field_names_path_and_suggests() -> None:
    with pytest.raises(ConfigError, match=r"f.yaml: items\[0\].stpes: unknown field. Did you mean 'steps'"):
        build_dataclass(Outer, {"name": "x", "items": [{"stpes": 3}]}, source="f.yaml")


def test_missing_required_field() -> None:
    with pytest.raises(ConfigError, match="name: required field is missing"):
        build_dataclass(Outer, {})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": 3}, "name: expected str, got int 3"),
        ({"name": "x", "inner": {"steps": "many"}}, "inner.steps: expected int, got str 'many'"),
        ({"name": "x", "inner": {"steps": True}}, "inner.steps: expected int, got a boolean"),
        ({"name": "x", "mode": "c"}, "mode: 'c' is not allowed; use one of 'a', 'b'"),
        ({"name": "x", "items": {"steps": 1}}, "items: expected a list"),
        ({"name": "x", "limit": "ten"}, "limit: expected int, got str 'ten'"),
    ],
)
def test_wrong_types_are_located(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_dataclass(Outer, data)


def test_overrides_parse_yaml_values_and_index_lists() -> None:
    data = {"name": "x", "items": [{"steps": 1}, {"steps": 2}]}
    apply_overrides(data, ["items.1.steps=7", "inner.rate=0.25", "mode=b"])
    cfg = build_dataclass(Outer, data)
    assert (cfg.items[1].steps, cfg.inner.rate, cfg.mode) == (7, 0.25, "b")
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(data, ["items.5.steps=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(data, ["items"])


def test_round_trip_to_dict() -> None:
    cfg = build_dataclass(Outer, {"name": "x", "items": [{"steps": 3}]})
    assert build_dataclass(Outer, dataclass_to_dict(cfg)) == cfg


def test_load_yaml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:1: not valid YAML \(expected .,. or .\]., but got"):
        load_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        load_yaml(bad)
