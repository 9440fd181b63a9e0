"""Run a transfer study: load the collection, build the splits, run the grid, write the report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from slmstack.config import dataclass_to_dict
from slmstack.errors import ConfigError
from slmstack.io import atomic_write_json, read_json
from slmstack.ownership import LEGACY, check_dir_ours, claim_dir
from slmstack.transfer.config import MODES, TransferConfig
from slmstack.transfer.grid import Grid
from slmstack.transfer.report import write_report
from slmstack.transfer.splits import make_split, select_tasks
from slmstack.transfer.tasks import load_collection

logger = logging.getLogger(__name__)

__all__ = ["prepare_grid", "transfer"]

STUDY = "study.json"


def prepare_grid(cfg: TransferConfig, out: Path) -> Grid:
    """The grid of ``cfg`` in ``out``; ``out`` must be empty or hold the same study (then it resumes)."""
    out = check_dir_ours(Path(out), "transfer", "transfer output (--out)", legacy=LEGACY["transfer"])
    # how and where it generates are not the study: a study resumes on another engine or device
    settings = {k: v for k, v in dataclass_to_dict(cfg).items() if k not in ("engine", "device")}
    if (out / STUDY).is_file():
        if read_json(out / STUDY, "transfer study record", expect=dict) != settings:
            raise ConfigError(f"{out} holds a different transfer study; use another --out")
    c = cfg.collection
    tasks = select_tasks(load_collection(c.name, cfg.resolve(c.path), c.per_task), cfg.tasks)
    needs_domain = any(MODES[m][0] == "in_domain" for m in cfg.modes)
    ablation = len(set(cfg.instructions)) > 1
    splits = [make_split(s, tasks, cfg.eval.examples, cfg.eval.pool, cfg.few_shot, needs_domain, ablation)
              for s in cfg.splits]  # fmt: skip
    claim_dir(out, "transfer", "transfer output (--out)")
    atomic_write_json(out / STUDY, settings)
    record = [{"name": s.name, "domain": s.domain, "heldout": [t.name for t in s.heldout],
               "general": [t.name for t in s.general], "in_domain": [t.name for t in s.in_domain],
               "test": {k: len(v) for k, v in s.test.items()}, "pool": {k: len(v) for k, v in s.pool.items()}}
              for s in splits]  # fmt: skip
    atomic_write_json(out / "splits.json", record)
    return Grid(cfg, splits, out)


def transfer(cfg: TransferConfig, out: str | Path, executor: str = "local") -> dict[str, Any]:
    """Run (or resume) every cell of the study in ``out`` and write results.json, results.md and the plots.

    Example:
        >>> transfer(load_transfer_config("recipes/transfer_smoke.yaml"), "runs/transfer")["relative"]
    """
    grid = prepare_grid(cfg, Path(out))
    cells = grid.run(executor)
    return write_report(Path(out), cells, dataclass_to_dict(cfg))
