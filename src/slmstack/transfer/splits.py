"""Held-out splits: which tasks are held out, what general and in-domain multi-task training may use.

A split holds out tasks (named, or every task of a category). General MTL trains on every other task
(or the split's ``train`` list); in-domain MTL on the training tasks of the split's domain (by default the
held-out tasks' category). No held-out task reaches training, and neither does any training example
whose input equals a held-out example's input (T0 templates of one dataset can share inputs). Each
held-out task's examples are cut once into a few-shot pool and a test set, the same for every seed.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from slmstack.errors import ConfigError
from slmstack.registry import did_you_mean
from slmstack.transfer.config import SplitConfig
from slmstack.transfer.examples import Example, Task

logger = logging.getLogger(__name__)

__all__ = ["Split", "make_split", "select_tasks"]


@dataclass
class Split:
    """A held-out split, ready for training and evaluation."""

    name: str
    domain: str
    heldout: list[Task]
    general: list[Task]  # training tasks, their leaking examples removed
    pool: dict[str, list[Example]]  # held-out task -> few-shot pool
    test: dict[str, list[Example]]  # held-out task -> test examples

    @property
    def in_domain(self) -> list[Task]:
        """The training tasks of the split's domain."""
        return [t for t in self.general if t.category == self.domain]


def _by_name(names: list[str], tasks: dict[str, Task], where: str) -> list[Task]:
    for name in names:
        if name not in tasks:
            raise ConfigError(f"{where}: unknown task {name!r}.{did_you_mean(name, list(tasks))}")
    return [tasks[n] for n in names]


def select_tasks(tasks: list[Task], names: list[str] | None) -> list[Task]:
    """The collection's tasks, or only those named (a did-you-mean for an unknown name)."""
    return tasks if not names else _by_name(names, {t.name: t for t in tasks}, "tasks")


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


def make_split(cfg: SplitConfig, tasks: list[Task], test_size: int, pool_size: int, few_shot: list[int],
               needs_domain: bool, instruction_ablation: bool) -> Split:  # fmt: skip
    """Build split ``cfg`` over ``tasks``; every bad setting is a :class:`ConfigError` naming the split.

    Args:
        cfg: the split's settings.
        tasks: every task of the study.
        test_size: test examples per held-out task.
        pool_size: few-shot pool per held-out task.
        few_shot: the k values; each must fit in every held-out task's pool.
        needs_domain: an in-domain mode is requested, so the domain must hold training tasks.
        instruction_ablation: train only on tasks whose instruction separates from the input.
    """
    where = f"split {cfg.name}"
    by_name = {t.name: t for t in tasks}
    categories = sorted({t.category for t in tasks})
    held = _by_name(cfg.heldout, by_name, f"{where}: heldout")
    if cfg.heldout_category:
        if cfg.heldout_category not in categories:
            hint = did_you_mean(cfg.heldout_category, categories)
            known = ", ".join(categories)
            raise ConfigError(f"{where}: unknown category {cfg.heldout_category!r}.{hint} Known: {known}")
        held += [t for t in tasks if t.category == cfg.heldout_category and t not in held]
    domain = cfg.domain or held[0].category
    if domain not in categories:
        raise ConfigError(f"{where}: unknown domain {domain!r}.{did_you_mean(domain, categories)}")
    held_names = {t.name for t in held}
    if cfg.train is not None:
        train = _by_name(cfg.train, by_name, f"{where}: train")
        overlap = sorted(held_names & {t.name for t in train})
        if overlap:
            raise ConfigError(f"{where}: {', '.join(overlap)} is both held out and in train; remove it from one")
    else:
        train = [t for t in tasks if t.name not in held_names]
    if instruction_ablation:
        dropped = [t.name for t in train if not t.instruction_split]
        train = [t for t in train if t.instruction_split]
        if dropped:
            logger.info("%s: %d training tasks without a reliable instruction split left out", where, len(dropped))
    heldout_inputs = {_key(e.input) for t in held for e in t.examples}
    clean = []
    for t in train:
        kept = [e for e in t.examples if _key(e.input) not in heldout_inputs]
        if len(kept) < len(t.examples):
            logger.info("%s: %d examples of %s share an input with a held-out task; left out", where,
                        len(t.examples) - len(kept), t.name)  # fmt: skip
        if kept:
            clean.append(Task(t.name, t.category, t.kind, t.metric, kept, t.wordings, t.labels, t.instruction_split))
    if not held:
        raise ConfigError(f"{where}: holds out no task")
    if not clean:
        raise ConfigError(f"{where}: no training task is left; hold out fewer tasks")
    split = Split(cfg.name, domain, held, clean, {}, {})
    if needs_domain and not split.in_domain:
        raise ConfigError(f"{where}: the domain {domain!r} has no training task (all held out?); hold out fewer "
                          "of its tasks or set domain")  # fmt: skip
    for t in held:
        order = list(range(len(t.examples)))
        random.Random(f"{cfg.name}/{t.name}").shuffle(order)
        test_n = min(test_size, len(order) // 2) if len(order) < test_size + 1 else test_size
        split.test[t.name] = [t.examples[i] for i in order[:test_n]]
        split.pool[t.name] = [t.examples[i] for i in order[test_n : test_n + pool_size]]
        for k in few_shot:
            if k > len(split.pool[t.name]):
                raise ConfigError(f"{where}: few_shot k={k} exceeds the {len(split.pool[t.name])} training examples "
                                  f"of {t.name}; lower k or raise eval.pool / collection.per_task")  # fmt: skip
    return split
