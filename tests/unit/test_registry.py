from __future__ import annotations

import pytest

from slmstack.errors import ConfigError
from slmstack.registry import Registry


def test_register_get_and_list() -> None:
    reg: Registry[int] = Registry("thing")

    @reg.register("beta", config_cls=dict)
    def beta() -> int:
        return 2

    reg.add("alpha", 1)
    assert reg.get("alpha") == 1 and reg.get("beta") is beta
    assert list(reg) == ["alpha", "beta"] and len(reg) == 2 and "alpha" in reg
    assert reg.entry("beta").config_cls is dict


def test_names_are_lowercase_and_unique() -> None:
    reg: Registry[int] = Registry("thing")
    reg.add("one", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("one", 2)
    with pytest.raises(ValueError, match="lowercase"):
        reg.add("Two", 2)


def test_unknown_name_suggests_and_lists() -> None:
    reg: Registry[int] = Registry("pruner")
    reg.add("wanda", 1)
    reg.add("magnitude", 2)
    with pytest.raises(ConfigError, match=r"unknown pruner 'wand'. Did you mean 'wanda'\? Known: magnitude, wanda"):
        reg.get("wand")
