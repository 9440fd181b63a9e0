"""Distil each stage's training targets from a teacher (FSLM, arXiv 2410.15570, section 3).

For every instruction the teacher runs through the stack's stages in order, each with its role
prompt, and every stage's output becomes that stage's target. Items are journaled as they finish
(append + fsync), so a rerun resumes where it stopped; the per-stage datasets are then written
atomically from the journal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from slmstack.config import dataclass_to_dict
from slmstack.errors import ConfigError
from slmstack.io import atomic_write_json, atomic_write_text, read_done_jsonl
from slmstack.stack.config import INPUT_FIELD, StackConfig, save_stack_config
from slmstack.training.data import Example
from slmstack.training.teachers import Teacher, TeacherReply

logger = logging.getLogger(__name__)

__all__ = ["DistillConfig", "DistillReport", "distill", "find_problem"]

JOURNAL = "journal.jsonl"
META = "distill.json"


@dataclass(kw_only=True)
class DistillConfig:
    """Distillation settings."""

    batch_size: int = field(default=16, metadata={"help": "instructions per teacher batch"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "override every stage's limit"})
    max_chars: int = field(default=2000, metadata={"help": "longer outputs are dropped as over_long"})
    drop_unfinished: bool = field(default=True, metadata={"help": "drop outputs cut at max_new_tokens"})
    final_target: Literal["reference", "teacher"] = field(
        default="reference", metadata={"help": "last stage's target: the data's own output when it has one"}
    )
    overwrite: bool = False


@dataclass
class DistillReport:
    """What was kept, what was dropped and why."""

    total: int
    kept: int
    dropped: dict[str, int]
    resumed: int
    seconds: float
    per_stage: dict[str, int] = field(default_factory=dict)


_WORD = re.compile(r"\w+")


def find_problem(reply: TeacherReply, max_chars: int, drop_unfinished: bool = True) -> str | None:
    """Why an output is unusable (``empty``, ``degenerate``, ``over_long``), or None if it is fine."""
    text = reply.text.strip()
    if not text:
        return "empty"
    if len(text) > max_chars or (drop_unfinished and not reply.finished):
        return "over_long"
    words = _WORD.findall(text.lower())
    if len(words) >= 20 and len(set(words)) / len(words) < 0.3:
        return "degenerate"
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    if trigrams and len(words) >= 12:
        top = trigrams.most_common(1)[0][1]
        if top >= 4 and 3 * top / len(words) > 0.3:
            return "degenerate"
    lines = Counter(line.strip() for line in text.splitlines() if line.strip())
    if lines and lines.most_common(1)[0][1] >= 3:
        return "degenerate"
    return None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_out_dir(out: Path, meta: dict[str, Any], overwrite: bool) -> None:
    path = out / META
    if path.is_file():
        old = json.loads(path.read_text())
        if old != meta and not overwrite:
            raise ConfigError(
                f"{out} already holds a distillation with other settings (teacher, stack or data differ). "
                "Use another --out, or pass --overwrite to replace it."
            )
        if old != meta:
            for p in [path, out / JOURNAL, *out.glob("*.jsonl")]:
                p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, meta)


def _run_item_batch(stack: StackConfig, teacher: Teacher, batch: list[Example], cfg: DistillConfig) -> list[dict]:
    rows = [{"id": ex.id, "ok": True, "outputs": {}, "prompts": {}, "sources": {}} for ex in batch]
    values = [{INPUT_FIELD: ex.text} for ex in batch]
    last = stack.stages[-1].name
    for stage in stack.stages:
        alive = [i for i, row in enumerate(rows) if row["ok"]]
        settings = stage.generation
        if cfg.max_new_tokens:
            settings = replace(settings, max_new_tokens=cfg.max_new_tokens)
        prompts = {i: stage.template.format(**values[i]) for i in alive}
        use_ref = {i for i in alive if stage.name == last and cfg.final_target == "reference" and batch[i].output}
        asked = [i for i in alive if i not in use_ref]
        replies = dict(zip(asked, teacher.generate([(stage.role, prompts[i]) for i in asked], settings), strict=True))
        for i in alive:
            reply = TeacherReply(batch[i].output or "") if i in use_ref else replies[i]
            problem = None if i in use_ref else find_problem(reply, cfg.max_chars, cfg.drop_unfinished)
            if problem:
                rows[i].update(ok=False, reason=problem, stage=stage.name, rejected=reply.text[:500])
                continue
            values[i][stage.name] = reply.text
            rows[i]["outputs"][stage.name] = reply.text
            rows[i]["prompts"][stage.name] = prompts[i]
            rows[i]["sources"][stage.name] = "reference" if i in use_ref else "teacher"
    now = time.time()
    for row in rows:
        row["time"] = now
    return rows


def distill(
    stack: StackConfig,
    teacher: Teacher,
    examples: list[Example],
    out: str | Path,
    config: DistillConfig | None = None,
    show_progress: bool = True,
) -> DistillReport:
    """Run ``teacher`` through ``stack``'s stages for every example and write one JSONL dataset per stage.

    Args:
        stack: the stack whose roles and templates define each stage's prompt.
        teacher: a :class:`LocalTeacher`, :class:`OpenAITeacher` or anything with ``generate``.
        examples: the instructions (see :func:`slmstack.training.data.read_examples`).
        out: output directory: ``<stage>.jsonl`` per stage, ``stack.yaml``, ``distill_report.json``.
        config: batching, filtering and target settings.
        show_progress: show a progress bar.

    Returns:
        A :class:`DistillReport`; the same numbers are in ``out/distill_report.json``.

    Example:
        >>> distill(load_stack_config(), LocalTeacher(load_model("default")), read_examples(f).examples, "runs/d")
    """
    cfg = config or DistillConfig()
    out = Path(out)
    start = time.perf_counter()
    # The data itself is not part of the identity: a rerun with a larger --limit extends the same run.
    meta = {"teacher": teacher.identity, "stack": dataclass_to_dict(stack), "config": dataclass_to_dict(cfg)}
    meta["config"].pop("overwrite")
    _check_out_dir(out, meta, cfg.overwrite)
    save_stack_config(stack, out / "stack.yaml")
    journal = out / JOURNAL
    done = read_done_jsonl(journal, "id")
    todo = [ex for ex in examples if ex.id not in done]
    logger.info("distilling %d instructions (%d already done) with %s", len(todo), len(done), teacher.identity)
    with (
        journal.open("a", encoding="utf-8") as fh,
        tqdm(total=len(todo), desc="distill", disable=not show_progress) as bar,
    ):
        for s in range(0, len(todo), cfg.batch_size):
            batch = todo[s : s + cfg.batch_size]
            for row in _run_item_batch(stack, teacher, batch, cfg):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(batch))
    report = _materialize(stack, teacher.identity, out, len(done & {e.id for e in examples}))
    report.seconds = round(time.perf_counter() - start, 2)
    atomic_write_json(out / "distill_report.json", dataclass_to_dict(report))
    logger.info("kept %d of %d; dropped %s", report.kept, report.total, report.dropped or "none")
    return report


def _materialize(stack: StackConfig, teacher: str, out: Path, resumed: int) -> DistillReport:
    rows = [json.loads(line) for line in (out / JOURNAL).read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [r for r in rows if r["ok"]]
    dropped = Counter(f"{r['reason']}@{r['stage']}" for r in rows if not r["ok"])
    per_stage = {}
    for stage in stack.stages:
        lines = []
        for r in kept:
            prompt = r["prompts"][stage.name]
            prov = {"teacher": teacher, "source": r["sources"][stage.name], "prompt_sha256": _sha(prompt),
                    "time": r["time"]}  # fmt: skip
            record = {"id": r["id"], "stage": stage.name, "role": stage.role, "prompt": prompt,
                      "completion": r["outputs"][stage.name], "provenance": prov}  # fmt: skip
            lines.append(json.dumps(record, ensure_ascii=False))
        atomic_write_text(out / f"{stage.name}.jsonl", "".join(line + "\n" for line in lines))
        per_stage[stage.name] = len(lines)
    return DistillReport(len(rows), len(kept), dict(dropped), resumed, 0.0, per_stage)
