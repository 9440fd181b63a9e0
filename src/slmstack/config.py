"""YAML -> dataclass loading with strict, located error messages.

Unknown keys, missing required keys and wrong types are errors that name the file and the dotted
field path (``stack.yaml: stages[1].generation.max_new_tokens``), in the spirit of nanoGPT's
``Unknown config key`` and PEFT's ``__post_init__`` checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from slmstack.errors import ConfigError
from slmstack.io import read_text

T = TypeVar("T")

__all__ = [
    "apply_overrides",
    "build_dataclass",
    "check_range",
    "check_target_modules_given",
    "dataclass_to_dict",
    "load_config_file",
    "load_yaml",
    "require_at_least_one",
    "require_unique",
]


def require_at_least_one(obj: Any, names: tuple[str, ...], prefix: str = "") -> None:
    """Raise a :class:`ConfigError` for the first of ``names`` below 1 on ``obj`` (``prefix``: its section)."""
    for name in names:
        if getattr(obj, name) < 1:
            raise ConfigError(f"{prefix}{name} must be >= 1, got {getattr(obj, name)}")


def require_unique(obj: Any, names: tuple[str, ...], prefix: str = "") -> None:
    """Raise a :class:`ConfigError` naming the first list among ``names`` that holds a value twice.

    A repeated arm, seed or mode would run the same cell twice (or once, silently): the config cannot mean that.
    """
    for name in names:
        values = getattr(obj, name) or []
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise ConfigError(f"{prefix}{name} lists {repeated[0]!r} twice; give each value once")


def check_range(obj: Any, name: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, prefix: str = "") -> None:  # fmt: skip
    """Raise a :class:`ConfigError` unless ``obj.name`` (None: not set, allowed) lies in the interval.

    Example:
        >>> check_range(settings, "top_p", 0, 1, low_open=True)  # top_p in (0, 1]
    """
    value = getattr(obj, name)
    if value is None:
        return
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above or value != value:  # value != value: NaN
        if high is None:
            allowed = f"{'>' if low_open else '>='} {low}"
        elif low is None:
            allowed = f"{'<' if high_open else '<='} {high}"
        else:
            allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{prefix}{name} must be {allowed}, got {value}")


def check_target_modules_given(targets: list[str] | None, prefix: str = "") -> None:
    """A given ``target_modules`` list must name at least one module, each a non-empty name.

    Whether the names exist is checked against the model once it is loaded
    (:func:`slmstack.training.trainer.check_target_modules`).
    """
    if targets is not None and (not targets or any(not t.strip() for t in targets)):
        raise ConfigError(f"{prefix}target_modules must list module names (e.g. [q_proj, v_proj]), got {targets}")


def load_yaml(path: str | Path, optional: bool = True) -> dict[str, Any]:
    """Read a YAML mapping from ``path``; raise :class:`ConfigError` naming the file otherwise.

    ``optional``: the option that named the file may be left out (the message then says so).
    """
    path = Path(path)
    if not path.exists():
        hint = ", or omit the option to use the default" if optional else ""
        raise ConfigError(f"{path}: config file not found. Check the path{hint}.")
    text = read_text(path, "config file (YAML)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}). Fix the file.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}.")
    return data


def load_config_file(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """A required YAML (``--config``) with ``key.path=value`` overrides, built into ``cls``; ``source`` is set.

    Raises:
        ConfigError: the file is missing or not YAML, or a field is unknown, missing or out of range.
    """
    data = apply_overrides(load_yaml(path, optional=False), overrides or [])
    config = build_dataclass(cls, data, source=path)
    config.source = Path(path).resolve()
    return config


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply torchtune-style ``a.b.0.c=value`` overrides; values are parsed as YAML scalars.

    Example:
        >>> apply_overrides({"a": {"b": 1}}, ["a.b=2"])
        {'a': {'b': 2}}
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r}: expected key.path=value, e.g. stages.0.generation.max_new_tokens=32"
            )
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = _child(node, part, key)
        last = parts[-1]
        value = yaml.safe_load(raw) if raw else ""
        if isinstance(node, list):
            node[_index(node, last, key)] = value
        else:
            node[last] = value
    return data


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if isinstance(node, dict):
        return node.setdefault(part, {})
    raise ConfigError(f"override {key!r}: {part!r} is inside a value that is not a mapping or list")


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def build_dataclass(cls: type[T], data: Any, where: str = "", source: str | Path | None = None) -> T:
    """Build dataclass ``cls`` from plain data, recursively and strictly.

    Args:
        cls: the dataclass type to build.
        data: a mapping (from YAML or JSON).
        where: dotted path of ``data`` inside the file, used in error messages.
        source: the file the data came from, used in error messages.

    Raises:
        ConfigError: naming the file, the field and the fix.
    """
    prefix = f"{source}: " if source else ""
    try:
        return _build(cls, data, where)
    except ConfigError as exc:
        if prefix and not str(exc).startswith(prefix):
            raise ConfigError(prefix + str(exc)) from None
        raise
    except (ValueError, TypeError) as exc:  # raised by __post_init__ checks
        raise ConfigError(f"{prefix}{exc}") from None


def _build(cls: type, data: Any, where: str) -> Any:
    label = where or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{_join(where, key)}: unknown field.{hint} Allowed fields: {', '.join(fields)}.")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required field is missing. {_help(f)}".rstrip())
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{label}: {exc}") from None


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help")
    return f"({text})" if text else ""


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not allowed; use one of {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_convert(item_tp, v, _join(where, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(key_tp, k, where): _convert(val_tp, v, _join(where, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    return _scalar(tp, value, where)


def _scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got a boolean {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def dataclass_to_dict(obj: Any) -> Any:
    """Turn a dataclass tree back into plain YAML-safe data (the inverse of :func:`build_dataclass`)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: dataclass_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, list | tuple):
        return [dataclass_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dataclass_to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
