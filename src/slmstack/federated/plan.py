"""The federation plan: what the ServerApp and every ClientApp read from the run directory.

``slmstack federate`` prunes the blocks and partitions the data once, then writes ``plan.json``; the
apps read it, so the same apps run under the simulation engine and under ``flwr run`` (where each
SuperNode is told its ``partition-id`` and the run directory in its configs). Paths inside are absolute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmstack.config import build_dataclass
from slmstack.errors import ConfigError, InputError
from slmstack.io import atomic_write_json, iter_jsonl, read_json

__all__ = ["PLAN", "Plan", "load_plan", "save_plan"]

PLAN = "plan.json"


@dataclass
class Plan:
    """Everything a run needs besides the data itself."""

    model: str
    clients: list[dict[str, Any]]  # {"model": block dir or model ref, "masks": path | None, "sparsity", "data"}
    heldout_path: str
    train: dict[str, Any]
    strategy: str
    rank_return: str
    rounds: int
    min_clients: int
    seed: int
    round_timeout: float
    privacy: dict[str, Any]
    column: str = "category"  # the label column: a block's loss on its own labels and on the others
    secure: dict[str, Any] = field(default_factory=dict)  # SecAgg+ settings; {} or enabled False: off
    device: str = "cpu"  # where clients load their block and train (a plan written before the field: the CPU)

    def partition(self, index: int) -> list[dict[str, Any]]:
        """Client ``index``'s private records."""
        return [rec for _, rec in iter_jsonl(Path(self.clients[index]["data"]))]

    def heldout(self) -> list[dict[str, Any]]:
        """The shared held-out records (global and per-client eval loss)."""
        return [rec for _, rec in iter_jsonl(Path(self.heldout_path))]

    def lora_config(self, model: Any) -> Any:
        """The peft ``LoraConfig`` every client and the server use (no dropout: updates are compared exactly)."""
        from peft import LoraConfig

        from slmstack.arch import get_arch

        targets = self.train.get("target_modules") or get_arch(model).lora_targets
        return LoraConfig(r=self.train["rank"], lora_alpha=self.train["alpha"], lora_dropout=0.0,
                          target_modules=list(targets), task_type="CAUSAL_LM")  # fmt: skip

    @property
    def scaling(self) -> float:
        """LoRA ``alpha / r``."""
        return self.train["alpha"] / self.train["rank"]


def save_plan(plan: Plan, run_dir: Path) -> Path:
    """Write ``plan.json`` atomically."""
    return atomic_write_json(run_dir / PLAN, asdict(plan))


def load_plan(run_dir: Path) -> Plan:
    """Read ``plan.json`` from ``run_dir``."""
    path = run_dir / PLAN
    fix = "It is not a plan that slmstack federate wrote: use another --out, or remove the file to start over."
    data = read_json(path, "federation plan", fix, expect=dict)
    try:
        return build_dataclass(Plan, data, where="plan")
    except ConfigError as exc:
        raise InputError(f"{path}: not a federation plan ({exc}). {fix}") from None
