"""A small name -> implementation registry shared by every extension point.

Modelled on lm-eval's ``Registry`` (decorator, did-you-mean errors) and PEFT's pairing of a method
name with its config class.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from slmstack.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered implementation and the config class it is built from (if any)."""

    name: str
    obj: T
    config_cls: type | None = None


class Registry(Generic[T]):
    """Maps lowercase names to implementations.

    Example:
        >>> ARCHS: Registry[dict] = Registry("architecture")
        >>> ARCHS.add("llama", {"layers": "model.layers"})
        >>> ARCHS.get("llama")["layers"]
        'model.layers'
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, obj: T, config_cls: type | None = None) -> T:
        """Register ``obj`` under ``name``; names are lowercase and unique."""
        if not name or name != name.lower():
            raise ValueError(f"{self.kind} names must be lowercase, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, obj, config_cls)
        return obj

    def register(self, name: str, config_cls: type | None = None) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorator(obj: T) -> T:
            return self.add(name, obj, config_cls)

        return decorator

    def entry(self, name: str) -> Entry[T]:
        """Return the entry for ``name`` or raise a :class:`ConfigError` that lists the known names."""
        try:
            return self._entries[name]
        except KeyError:
            hint = did_you_mean(str(name), list(self._entries))
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise ConfigError(f"unknown {self.kind} {name!r}.{hint} Known: {known}.") from None

    def get(self, name: str) -> T:
        """Return the implementation registered under ``name``."""
        return self.entry(name).obj

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, Any]]:
        """Sorted (name, implementation) pairs."""
        return [(name, self._entries[name].obj) for name in self]


def did_you_mean(name: str, known: list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``known`` to ``name``, or an empty string."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
