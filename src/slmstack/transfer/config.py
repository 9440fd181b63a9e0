"""The transfer-study YAML: model, task collection, held-out splits, training modes, few-shot sizes, seeds.

Example (``recipes/transfer_smoke.yaml``)::

    model: default
    collection: {name: t0, path: ../../shared/data/t0_multitask, per_task: 40}
    tasks: [amazon_polarity__Is_this_review, yelp_review_full__so_i_would]
    splits: [{name: sentiment, heldout: [amazon_polarity__Is_this_review]}]
    modes: [off_the_shelf, in_domain]
    few_shot: [8]
    seeds: [0]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slmstack.config import load_config_file, require_at_least_one, require_unique
from slmstack.errors import ConfigError
from slmstack.stack.config import ENGINES

__all__ = ["MODES", "CollectionConfig", "EvalSettings", "SplitConfig", "TrainSettings", "TransferConfig",
           "load_transfer_config"]  # fmt: skip

# mode -> (training pool, the mode it starts from); None: no training
MODES: dict[str, tuple[str | None, str | None]] = {
    "off_the_shelf": (None, None),
    "general": ("general", "off_the_shelf"),
    "in_domain": ("in_domain", "off_the_shelf"),
    "general_in_domain": ("in_domain", "general"),
}


@dataclass(kw_only=True)
class CollectionConfig:
    """Where the tasks come from: a registered collection (t0, dialogsum, yaml) and its folder."""

    name: str = "t0"
    path: str = field(metadata={"help": "the collection's folder (or a tasks.yaml for name: yaml)"})
    per_task: int | None = field(default=None, metadata={"help": "examples read per task (None: all)"})

    def __post_init__(self) -> None:
        if self.per_task is not None and self.per_task < 4:
            raise ConfigError(f"collection.per_task must be >= 4, got {self.per_task}")


@dataclass(kw_only=True)
class SplitConfig:
    """One held-out split: tasks held out (by name, or every task of a category) and the in-domain category."""

    name: str
    heldout: list[str] = field(default_factory=list, metadata={"help": "held-out task names"})
    heldout_category: str | None = field(default=None, metadata={"help": "hold out every task of this category"})
    domain: str | None = field(default=None, metadata={"help": "in-domain category (default: the held-out one)"})
    train: list[str] | None = field(default=None, metadata={"help": "training tasks (default: all the others)"})

    def __post_init__(self) -> None:
        if not self.heldout and not self.heldout_category:
            raise ConfigError(f"split {self.name}: give heldout (task names) or heldout_category")


@dataclass(kw_only=True)
class TrainSettings:
    """Multi-task and few-shot training, through the existing trainer."""

    method: Literal["lora", "full"] = "lora"
    steps: int = field(default=60, metadata={"help": "optimizer steps of each multi-task training"})
    few_shot_steps: int = field(default=16, metadata={"help": "optimizer steps of each few-shot fine-tuning"})
    batch_size: int = 4
    lr: float = 3e-4
    rank: int = 8
    alpha: int = 16
    max_length: int = 256
    per_task_train: int = field(default=64, metadata={"help": "training examples drawn from each task"})

    def __post_init__(self) -> None:
        require_at_least_one(
            self, ("steps", "few_shot_steps", "batch_size", "rank", "alpha", "per_task_train"), "train."
        )
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.max_length < 16:
            raise ConfigError(f"train.max_length must be >= 16, got {self.max_length}")


@dataclass(kw_only=True)
class EvalSettings:
    """Zero-shot (and few-shot) evaluation on each held-out task's test examples."""

    examples: int = field(default=40, metadata={"help": "test examples per held-out task"})
    pool: int = field(default=128, metadata={"help": "examples per held-out task kept for few-shot training"})
    max_new_tokens: int = 48
    wordings: Literal["all", "first"] = field(default="all", metadata={"help": "instruction wordings scored"})
    batch_size: int = 8

    def __post_init__(self) -> None:
        require_at_least_one(self, ("examples", "pool", "max_new_tokens", "batch_size"), "eval.")


@dataclass(kw_only=True)
class TransferConfig:
    """A transfer study: every (split, mode, instructions, seed, k) cell of the grid."""

    model: str = field(default="default", metadata={"help": "a causal or encoder-decoder model reference"})
    engine: str = field(default="auto", metadata={"help": "generation: auto (slmstack's engine where it runs the "
                                                          "model), native or hf"})  # fmt: skip
    device: str = field(default="auto", metadata={"help": "auto (a GPU where there is one), cpu or cuda"})
    collection: CollectionConfig
    tasks: list[str] | None = field(default=None, metadata={"help": "use only these tasks (default: all)"})
    splits: list[SplitConfig]
    modes: list[str] = field(default_factory=lambda: list(MODES))
    instructions: list[bool] = field(default_factory=lambda: [True, False])
    few_shot: list[int] = field(default_factory=lambda: [8, 32, 128])
    few_shot_modes: list[str] | None = field(default=None, metadata={"help": "modes few-shot follows (all)"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    source: Path | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from slmstack.registry import did_you_mean

        for mode in self.modes + (self.few_shot_modes or []):
            if mode not in MODES:
                raise ConfigError(f"modes: unknown mode {mode!r}{did_you_mean(mode, list(MODES))}")
        for mode in self.modes:
            start = MODES[mode][1]
            if start and start != "off_the_shelf" and start not in self.modes:
                raise ConfigError(f"modes: {mode} starts from {start}; add {start} to modes")
        if not self.splits:
            raise ConfigError("splits: give at least one held-out split")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device {self.device!r} is not valid. Use auto, cpu, cuda or cuda:N.")
        if len({s.name for s in self.splits}) != len(self.splits):
            raise ConfigError("splits: names must be unique")
        if not self.seeds or not self.instructions:
            raise ConfigError("seeds and instructions need at least one value each")
        if any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds: every seed must be >= 0, got {self.seeds}")
        if any(k < 1 for k in self.few_shot):
            raise ConfigError(f"few_shot: every k must be >= 1, got {self.few_shot}")
        require_unique(self, ("modes", "instructions", "few_shot", "few_shot_modes", "seeds", "tasks"))

    def resolve(self, path: str) -> Path:
        """A path from the YAML, relative to the YAML's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.source is None else self.source.parent / p


def load_transfer_config(path: str | Path, overrides: list[str] | None = None) -> TransferConfig:
    """Read and validate a transfer YAML (strict: unknown fields are errors naming the file)."""
    return load_config_file(TransferConfig, path, overrides)
