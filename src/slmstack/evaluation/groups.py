"""Groups of tasks, scored as lm-eval scores them: a group's metric is the mean of its members', by size.

A group names tasks (or other groups). ``weight_by_size: true`` weights each member by its number of items
(lm-eval's ``aggregate_subtask_metrics``) and pools the standard errors (``pooled_sample_stderr``); ``false``
takes the plain mean of the members' means and ``sqrt(sum se²) / k`` (``unweighted_mean_stderr``). Nested groups
are scored innermost first, as lm-eval does (MMLU: subjects -> four categories -> ``mmlu``).

A user declares a group in YAML and passes its path to ``--tasks``::

    group: my_group
    tasks: [arc_easy, my_task.yaml]
    weight_by_size: true
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmstack.config import build_dataclass, load_yaml
from slmstack.errors import ConfigError
from slmstack.registry import Registry

__all__ = ["GROUPS", "GroupSpec", "aggregate", "expand", "load_group_file", "score_groups"]


@dataclass(kw_only=True)
class GroupSpec:
    """Tasks (or groups) reported together."""

    group: str
    tasks: list[str] = field(metadata={"help": "task names, task YAML paths or group names"})
    weight_by_size: bool = True
    metrics: list[str] = field(default_factory=lambda: ["acc"])
    alias: str | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError(f"group {self.group!r}: tasks must name at least one task")


GROUPS: Registry[GroupSpec] = Registry("task group")


def load_group_file(path: str | Path) -> GroupSpec:
    """A group YAML (strict: unknown fields are errors naming the file)."""
    return build_dataclass(GroupSpec, load_yaml(path), source=path)


def is_group_file(path: str) -> bool:
    """Whether a task YAML path declares a group (a top-level ``group:`` key)."""
    return path.endswith((".yaml", ".yml")) and "group" in load_yaml(path)


def group_of(name: str) -> GroupSpec | None:
    """The group ``name`` refers to (a registered name or a group YAML path), or None for a task."""
    if name in GROUPS:
        return GROUPS.get(name)
    if name.endswith((".yaml", ".yml")) and Path(name).is_file() and is_group_file(name):
        return load_group_file(name)
    return None


def expand(names: list[str]) -> tuple[list[str], list[GroupSpec]]:
    """The tasks ``names`` come to (groups opened, each task once, in order) and every group met, innermost first."""
    tasks: list[str] = []
    groups: list[GroupSpec] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        spec = group_of(name)
        if spec is None:
            if name not in tasks:
                tasks.append(name)
            return
        if spec.group in path:
            raise ConfigError(f"task group {spec.group!r} contains itself (through {' -> '.join(path)})")
        for member in spec.tasks:
            visit(member, (*path, spec.group))
        if all(g.group != spec.group for g in groups):
            groups.append(spec)

    for name in names:
        visit(name, ())
    return tasks, groups


def aggregate(
    values: list[float], stderrs: list[float], sizes: list[int], weight_by_size: bool
) -> tuple[float, float]:
    """A group's metric and its standard error from its members' (lm-eval's formulas, see the module docstring)."""
    if weight_by_size:
        mean = sum(v * n for v, n in zip(values, sizes, strict=True)) / sum(sizes)
        dof = sum(sizes) - len(sizes)
        pooled = sum((n - 1) * se**2 * n for se, n in zip(stderrs, sizes, strict=True)) / dof if dof > 0 else math.nan
        return mean, math.sqrt(pooled / sum(sizes))
    return sum(values) / len(values), math.sqrt(sum(se**2 for se in stderrs)) / len(stderrs)


def score_groups(groups: list[GroupSpec], results: dict[str, Any], task_name: Callable[[str], str]) -> dict[str, Any]:
    """Each group's metrics from the task results (``results[task][metric]``, ``_stderr`` and ``n``)."""
    scored: dict[str, Any] = {}
    for spec in groups:  # innermost first, so a member group is already scored
        members = [scored.get(m) or results.get(m) or results.get(Path(m).stem) for m in _names(spec, task_name)]
        out: dict[str, Any] = {"n": sum(m["n"] for m in members), "tasks": len(members)}
        if spec.alias:
            out["alias"] = spec.alias
        for metric in spec.metrics:
            have = [m for m in members if metric in m]
            if len(have) == len(members):
                out[metric], out[f"{metric}_stderr"] = aggregate(
                    [m[metric] for m in have], [m[f"{metric}_stderr"] for m in have], [m["n"] for m in have],
                    spec.weight_by_size,
                )  # fmt: skip
        scored[spec.group] = out
    return scored


def _names(spec: GroupSpec, task_name: Callable[[str], str]) -> list[str]:
    names = []
    for member in spec.tasks:
        group = group_of(member)
        names.append(group.group if group is not None else task_name(member))
    return names
