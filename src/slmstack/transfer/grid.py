"""The transfer grid: cells (split × mode × instructions × seed × k), cached checkpoints, resumable, on Ray or not.

A multi-task checkpoint is trained once per (split, mode, instructions, seed) and cached under
``checkpoints/<hash>`` (the hash of everything that determines it: model, tasks, settings, and the
checkpoint it starts from). A cell's result is ``cells/<id>.json``; a finished cell is never redone, so a
killed grid resumes where it stopped. With ``executor="ray"`` each stage of independent jobs (the first
multi-task checkpoints, then those that start from them, then the cells) runs as Ray tasks, which a Ray
cluster spreads over its nodes (``RAY_ADDRESS``); otherwise jobs run one after another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmstack.grid import CellGrid, check_scores
from slmstack.io import atomic_dir, atomic_write_json
from slmstack.transfer.config import MODES, TransferConfig
from slmstack.transfer.examples import Task
from slmstack.transfer.splits import Split

logger = logging.getLogger(__name__)

__all__ = ["Cell", "Grid"]


@dataclass(frozen=True)
class Cell:
    """One independent job of the grid."""

    split: str
    mode: str
    instructions: bool
    seed: int
    k: int  # 0: zero-shot

    @property
    def id(self) -> str:
        """A file-safe name."""
        return f"{self.split}__{self.mode}__{'instr' if self.instructions else 'noinstr'}__s{self.seed}__k{self.k}"


def _prompt(task: Task, example: Any, instructions: bool) -> str:
    """A training prompt: with the task's first instruction wording, or the input alone."""
    return task.render(example, 0 if instructions and task.n_wordings else None)


def _pairs(tasks: list[Task], instructions: bool, per_task: int, rng: random.Random) -> list[tuple[str, str]]:
    """Training (prompt, target) pairs: up to ``per_task`` examples of each task, wording 0 or the input alone."""
    pairs = []
    for t in tasks:
        chosen = rng.sample(t.examples, min(per_task, len(t.examples)))
        pairs += [(_prompt(t, e, instructions), e.target) for e in chosen]
    rng.shuffle(pairs)
    return pairs


class Grid(CellGrid):
    """The cells of a :class:`TransferConfig` over its splits, with the checkpoints they need."""

    kind = "transfer"
    result_fields = {"cell": dict, "scores": dict, "seconds": (int, float)}

    def check_result(self, result: dict[str, Any], where: str) -> None:
        """Each held-out task's score, metric and category, as the report reads them."""
        split = self.splits.get(result["cell"].get("split"))
        expected = [t.name for t in split.heldout] if split is not None else list(result["scores"])
        check_scores(result["scores"], expected, {"score": (int, float), "metric": str, "category": str}, where)

    def __init__(self, cfg: TransferConfig, splits: list[Split], out: Path) -> None:
        self.cfg, self.splits, self.out = cfg, {s.name: s for s in splits}, out
        few_modes = cfg.few_shot_modes or cfg.modes
        self.cells = [Cell(s.name, m, i, seed, k) for s in splits for m in cfg.modes for i in cfg.instructions
                      for seed in cfg.seeds for k in [0] + [k for k in cfg.few_shot if m in few_modes]]  # fmt: skip

    @property
    def device(self) -> str:  # type: ignore[override]
        """The config's device: where cells load models, and whether a Ray task asks for a GPU."""
        return self.cfg.device

    # ---- checkpoints
    def checkpoint_key(self, split: str, mode: str, instructions: bool, seed: int) -> str | None:
        """The hash naming a multi-task checkpoint (None for off-the-shelf)."""
        pool, start = MODES[mode]
        if pool is None:
            return None
        s = self.splits[split]
        tasks = s.general if pool == "general" else s.in_domain
        spec = {"model": self.cfg.model, "pool": sorted(t.name for t in tasks), "instructions": instructions,
                "seed": seed, "train": asdict(self.cfg.train),
                "heldout": sorted(t.name for t in s.heldout),
                "start": self.checkpoint_key(split, start, instructions, seed) if start else None}  # fmt: skip
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def checkpoint_dir(self, key: str) -> Path:
        """Where checkpoint ``key`` lives."""
        return self.out / "checkpoints" / key

    def ensure_checkpoint(self, split: str, mode: str, instructions: bool, seed: int) -> Path | None:
        """The checkpoint for this mode, trained now (with the one it starts from) if not cached."""
        key = self.checkpoint_key(split, mode, instructions, seed)
        if key is None:
            return None
        final = self.checkpoint_dir(key)
        if (final / "train.json").is_file():
            return final
        pool, start = MODES[mode]
        start_dir = self.ensure_checkpoint(split, start, instructions, seed) if start else None
        s, t = self.splits[split], self.cfg.train
        tasks = s.general if pool == "general" else s.in_domain
        model = self._model(start_dir)
        pairs = _pairs(tasks, instructions, t.per_task_train, random.Random(f"{key}/{seed}"))
        logger.info("training %s (%s, %s instructions, seed %d): %d tasks, %d examples, %d steps", mode, split,
                    "with" if instructions else "without", seed, len(tasks), len(pairs), t.steps)  # fmt: skip
        stats = model.train(pairs, t.steps, t.batch_size, t.lr, seed)
        self._save(model, final, {"mode": mode, "split": split, "instructions": instructions, "seed": seed,
                                  "tasks": [x.name for x in tasks], "examples": len(pairs), **stats})  # fmt: skip
        return final

    def _model(self, checkpoint: Path | None) -> Any:
        from slmstack.transfer.lm import TransferModel

        t = self.cfg.train
        if t.method == "full":
            model = TransferModel(str(checkpoint) if checkpoint else self.cfg.model, t.max_length,
                                  device=self.cfg.device, engine=self.cfg.engine)  # fmt: skip
            model.prepare("full", t.rank, t.alpha)
        else:
            model = TransferModel(self.cfg.model, t.max_length, device=self.cfg.device, engine=self.cfg.engine)
            model.prepare("lora", t.rank, t.alpha, adapter=checkpoint)
        return model

    def _save(self, model: Any, final: Path, record: dict[str, Any]) -> None:
        def write(tmp: Path) -> None:
            model.save(tmp)
            atomic_write_json(tmp / "train.json", record)

        atomic_dir(final, write)

    # ---- cells
    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """Evaluate one cell (training what it needs); cached results are returned as they are."""
        path = self.cell_path(cell)
        if path.is_file():
            return self.read_cell(path)
        if cell.mode == "off_the_shelf" and not cell.k:  # no training: every seed scores the same
            twin = next((c for c in self.cells if c.mode == cell.mode and not c.k and c.split == cell.split
                         and c.instructions == cell.instructions and self.cell_path(c).is_file()), None)  # fmt: skip
            if twin is not None:
                result = {**self.read_cell(self.cell_path(twin)), "cell": asdict(cell),
                          "seconds": 0.0, "reused": twin.id}  # fmt: skip
                atomic_write_json(path, result)
                return result
        start = time.perf_counter()
        checkpoint = self.ensure_checkpoint(cell.split, cell.mode, cell.instructions, cell.seed)
        split = self.splits[cell.split]
        scores = {}
        model = None if cell.k else self._model(checkpoint)
        for task in split.heldout:
            if cell.k:  # few-shot: a fresh copy of the mode's checkpoint, tuned on k examples of this task
                model = self._model(checkpoint)
                rng = random.Random(f"{cell.id}/{task.name}")
                shots = rng.sample(split.pool[task.name], cell.k)
                pairs = [(_prompt(task, e, cell.instructions), e.target) for e in shots]
                t = self.cfg.train
                model.train(pairs, t.few_shot_steps, min(t.batch_size, cell.k), t.lr, cell.seed)
            scores[task.name] = self._evaluate(model, task, split.test[task.name], cell.instructions)
        result = {"cell": asdict(cell), "scores": scores, "seconds": round(time.perf_counter() - start, 1)}
        atomic_write_json(path, result)
        return result

    def _evaluate(self, model: Any, task: Task, examples: list, instructions: bool) -> dict[str, Any]:
        """Mean metric over ``examples``, per instruction wording (or without instruction)."""
        from slmstack.transfer.metrics import METRICS

        metric = METRICS.get(task.metric)
        e = self.cfg.eval
        wordings: list[int | None] = [None]
        if instructions and task.n_wordings:
            wordings = list(range(task.n_wordings if e.wordings == "all" else 1))
        per = []
        for w in wordings:
            prompts = [task.render(x, w) for x in examples]
            if task.kind == "classification":
                preds = model.choose(prompts, task.labels, e.batch_size)
            else:
                preds = model.generate(prompts, e.max_new_tokens, e.batch_size)
            per.append(sum(metric(p, x.targets) for p, x in zip(preds, examples, strict=True)) / len(examples))
        return {"score": sum(per) / len(per), "wordings": per, "metric": task.metric, "category": task.category,
                "n": len(examples)}  # fmt: skip

    # ---- running
    def prerequisites(self, todo: list[Cell]) -> list[list[tuple[str, tuple]]]:
        """The multi-task checkpoints the cells need: first those that start from the base, then the others."""
        needs = {(c.split, c.mode, c.instructions, c.seed) for c in todo if MODES[c.mode][0]}
        first = {n for n in needs if MODES[n[1]][1] == "off_the_shelf"}
        first |= {(s, MODES[m][1], i, seed) for s, m, i, seed in needs - first}  # the starting points
        return [[("ensure_checkpoint", args) for args in sorted(stage)] for stage in (first, needs - first)]
