"""The federation YAML: model, clients (one pruned block each), data partitioning, local training, strategy.

Example (``recipes/federate_smoke.yaml``)::

    model: default
    rounds: 1
    strategy: lego
    clients: [{sparsity: 0.0}, {sparsity: 0.5}]
    data: {path: ../shared/data/t0_multitask, limit: 64}
    train: {steps: 2, batch_size: 4}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slmstack.config import check_range, check_target_modules_given, load_config_file, require_at_least_one
from slmstack.errors import ConfigError
from slmstack.registry import did_you_mean

__all__ = ["ClientSpec", "DataConfig", "FederateConfig", "LocalTrainConfig", "PrivacyConfig",
           "SecureAggregationConfig", "load_federate_config", "require_flwr"]  # fmt: skip


# The names ``slmstack.federated.strategies.STRATEGIES`` registers (a test keeps the two equal): known here so
# that a config is checked without importing Flower.
STRATEGY_NAMES = ["fedavg", "heterofl", "lego"]


@dataclass(kw_only=True)
class ClientSpec:
    """One client: the sparsity of its block, or a ``slmstack prune`` output directory to read it from."""

    sparsity: float = field(default=0.0, metadata={"help": "share of weights pruned, in [0, 1)"})
    block: str | None = field(default=None, metadata={"help": "a slmstack prune output dir (with masks)"})

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")


@dataclass(kw_only=True)
class DataConfig:
    """The private data: records with prompt and completion, split into a held-out set and client partitions."""

    path: str = field(metadata={"help": "JSONL of {prompt, completion, ...}, or a collection dir with tasks.csv"})
    limit: int | None = field(default=None, metadata={"help": "records used (seeded sample), before splitting"})
    partition: Literal["iid", "dirichlet", "task"] = "iid"
    column: str = field(default="category", metadata={"help": "label column for dirichlet; task column for task"})
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration"})
    eval_fraction: float = field(default=0.1, metadata={"help": "held-out share for the global eval loss"})

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"data.limit must be >= 2, got {self.limit}")
        if not self.alpha > 0:
            raise ConfigError(f"data.alpha must be > 0, got {self.alpha}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}")


@dataclass(kw_only=True)
class LocalTrainConfig:
    """LoRA training on each client for ``steps`` optimizer steps per round (the existing trainer's loss)."""

    steps: int = 4
    batch_size: int = 4
    lr: float = 2e-4
    rank: int = 8
    alpha: int = 16
    max_length: int = 256
    target_modules: list[str] | None = field(default=None, metadata={"help": "default: attention + MLP"})

    def __post_init__(self) -> None:
        require_at_least_one(self, ("steps", "batch_size", "rank", "alpha"), "train.")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.max_length < 8:
            raise ConfigError(f"train.max_length must be >= 8, got {self.max_length}")
        check_target_modules_given(self.target_modules, "train.")


@dataclass(kw_only=True)
class PrivacyConfig:
    """Optional differential privacy: Flower's server-side fixed clipping with Gaussian noise."""

    enabled: bool = False
    clipping_norm: float = field(default=1.0, metadata={"help": "L2 norm each update is clipped to (> 0)"})
    noise_multiplier: float = field(default=0.1, metadata={"help": "Gaussian noise std / clipping_norm (>= 0)"})

    def __post_init__(self) -> None:
        check_range(self, "clipping_norm", 0, low_open=True, prefix="privacy.")
        check_range(self, "noise_multiplier", 0, prefix="privacy.")


@dataclass(kw_only=True)
class SecureAggregationConfig:
    """Optional secure aggregation: Flower's SecAgg+ (the server learns only the weighted mean of the shares)."""

    enabled: bool = False
    clipping_range: float = field(default=4.0, metadata={"help": "shares must lie in [-this, this]"})
    reconstruction_threshold: float = field(default=0.5, metadata={"help": "share of clients needed to unmask"})

    def __post_init__(self) -> None:
        if not self.clipping_range > 0:
            raise ConfigError(f"secure_aggregation.clipping_range must be > 0, got {self.clipping_range}")
        if not 0 < self.reconstruction_threshold <= 1:
            raise ConfigError(
                f"secure_aggregation.reconstruction_threshold must be in (0, 1], got {self.reconstruction_threshold}"
            )


@dataclass(kw_only=True)
class FederateConfig:
    """A federated run. ``--set key=value`` overrides any field, as in the other verbs."""

    model: str = field(default="default", metadata={"help": "the large model the blocks are pruned from"})
    rounds: int = 1
    strategy: str = field(default="lego", metadata={"help": "fedavg, heterofl or lego"})
    rank_return: Literal["svd", "factors"] = field(default="factors", metadata={"help": "lego: back to rank r"})
    pruning_method: str = field(default="magnitude", metadata={"help": "magnitude, wanda or sparsegpt"})
    calibration: str | None = field(default=None, metadata={"help": "text file for wanda/sparsegpt"})
    clients: list[ClientSpec] = field(default_factory=lambda: [ClientSpec(sparsity=0.0), ClientSpec(sparsity=0.5)])
    min_clients: int = field(default=1, metadata={"help": "fewer accepted updates keep the global adapter"})
    data: DataConfig
    train: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    round_timeout: float = field(default=3600.0, metadata={"help": "seconds to wait for client replies"})
    seed: int = 0
    device: str = field(
        default="auto", metadata={"help": "where clients train: auto (a GPU where there is one), cpu or cuda"}
    )
    source: Path | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        check_range(self, "round_timeout", 0, low_open=True)
        check_range(self, "seed", 0)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device {self.device!r} is not valid. Use auto, cpu, cuda or cuda:N.")
        if self.strategy not in STRATEGY_NAMES:
            hint = did_you_mean(self.strategy, STRATEGY_NAMES)
            raise ConfigError(
                f"strategy: unknown strategy {self.strategy!r}.{hint} Known: {', '.join(STRATEGY_NAMES)}."
            )
        from slmstack.pruning.methods import PRUNERS

        try:
            PRUNERS.get(self.pruning_method)
        except ConfigError as exc:
            raise ConfigError(f"pruning_method: {exc}") from None
        if not self.clients:
            raise ConfigError("clients: give at least one client, e.g. [{sparsity: 0.0}, {sparsity: 0.5}]")
        if not 1 <= self.min_clients <= len(self.clients):
            raise ConfigError(
                f"min_clients is {self.min_clients} but there are {len(self.clients)} clients; "
                f"use 1 to {len(self.clients)}, or add clients"
            )
        if self.strategy == "fedavg" and any(c.sparsity > 0 or c.block for c in self.clients):
            raise ConfigError("strategy fedavg needs dense clients (sparsity 0); use heterofl or lego for blocks")
        if self.secure_aggregation.enabled and len(self.clients) < 2:
            raise ConfigError("secure_aggregation needs at least 2 clients (it hides one update among the others)")
        if self.secure_aggregation.enabled and self.privacy.enabled:
            raise ConfigError("privacy.enabled (server-side clipping sees each update) and secure_aggregation.enabled "
                              "exclude each other; turn one off")  # fmt: skip

    def resolve(self, path: str | None) -> Path | None:
        """A path from the YAML, relative to the YAML's folder."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.source is None else self.source.parent / p


def load_federate_config(path: str | Path, overrides: list[str] | None = None) -> FederateConfig:
    """Read and validate a federation YAML (strict: unknown fields are errors naming the file).

    Raises:
        ConfigError: a bad field (with a did-you-mean for an unknown strategy). Flower is not needed to check
            a config: :func:`require_flwr` runs once the inputs are known to be good.
    """
    return load_config_file(FederateConfig, path, overrides)


def require_flwr() -> None:
    """Raise one clear line when Flower is missing: federation needs the ``federated`` extra."""
    import importlib.util

    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("flwr_datasets") is None:
        raise ConfigError("federation needs Flower: pip install 'slmstack[federated]' (flwr and flwr-datasets)")
