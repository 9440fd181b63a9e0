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
from slmstack.io import (
    atomic_write_json,
    atomic_write_text,
    guard_read,
    jsonl_lines,
    read_done_jsonl,
    read_json,
    read_text,
)
from slmstack.ownership import LEGACY, check_dir_ours, claim_dir
from slmstack.retrieval.base import format_passages, load_stage_retrievers
from slmstack.stack.config import INPUT_FIELD, StackConfig, save_stack_config
from slmstack.training.data import Example
from slmstack.training.teachers import Teacher, TeacherReply

logger = logging.getLogger(__name__)

__all__ = ["DistillConfig", "DistillReport", "distill", "find_problem", "keep_advice", "settle_reply"]

JOURNAL = "journal.jsonl"
META = "distill.json"


@dataclass(kw_only=True)
class DistillConfig:
    """Distillation settings."""

    batch_size: int = field(default=16, metadata={"help": "instructions per teacher batch"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "override every stage's limit"})
    max_chars: int = field(default=2000, metadata={"help": "longer outputs are dropped as over_long"})
    unfinished: Literal["trim", "keep", "drop"] = field(
        default="trim",
        metadata={"help": "outputs cut at the token limit: trim to the last complete sentence, keep, or drop"},
    )
    final_target: Literal["reference", "teacher"] = field(
        default="reference", metadata={"help": "last stage's target: the data's own output when it has one"}
    )
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_chars < 1:
            raise ConfigError(f"max_chars must be >= 1, got {self.max_chars}")


@dataclass
class DistillReport:
    """What was kept, what was dropped and why."""

    total: int
    kept: int
    dropped: dict[str, int]
    resumed: int
    seconds: float
    per_stage: dict[str, int] = field(default_factory=dict)
    kept_cut: dict[str, int] = field(default_factory=dict)  # "trimmed@stage"/"cut@stage": kept but cut at the limit


_WORD = re.compile(r"\w+")
# the end of a sentence: . ! ? (and closing quotes/brackets) before whitespace or the end; or a line break
# (a numbered-list marker such as "2." at the start of a line is not a sentence end)
_SENTENCE_END = re.compile(r"(?m)(?<!^\d)(?<!^\d\d)[.!?][\"')\]]*(?=\s|$)|\n")


def settle_reply(reply: TeacherReply, unfinished: str = "trim") -> tuple[str, str]:
    """The text to keep and how it ended: ``stop``, ``trimmed`` (cut, then trimmed to a sentence) or ``cut``.

    A reply cut at the token limit is trimmed to its last complete sentence (``unfinished="trim"``);
    one with no complete sentence is kept as cut. ``keep`` keeps every cut reply as it is.

    Example:
        >>> settle_reply(TeacherReply("One. Two is ha", finished=False))
        ('One.', 'trimmed')
    """
    text = reply.text.strip()
    if reply.finished:
        return text, "stop"
    if unfinished == "trim":
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        trimmed = text[: ends[-1]].strip() if ends else ""
        if trimmed:
            return trimmed, "trimmed"
    return text, "cut"


def find_problem(reply: TeacherReply, max_chars: int, unfinished: str = "trim") -> str | None:
    """Why an output is unusable (``empty``, ``unfinished``, ``over_long``, ``degenerate``), or None if fine.

    ``unfinished`` is given only when the policy is ``drop`` and the reply was cut at the token limit.
    """
    text = reply.text.strip()
    if not text:
        return "empty"
    if unfinished == "drop" and not reply.finished:
        return "unfinished"
    if len(text) > max_chars:
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
    check_dir_ours(out, "distill", "distillation output (--out)", legacy=LEGACY["distill"])
    path = out / META
    if path.exists():
        old = read_json(path, "distillation metadata", "Use another --out, or pass --overwrite.")
        if old != meta and not overwrite:
            raise ConfigError(
                f"{out} already holds a distillation with other settings (teacher, stack or data differ). "
                "Use another --out, or pass --overwrite to replace it."
            )
        if old != meta:
            for p in [path, out / JOURNAL, *out.glob("*.jsonl")]:
                p.unlink(missing_ok=True)
    claim_dir(out, "distill", "distillation output (--out)")
    atomic_write_json(path, meta)


def _run_item_batch(stack: StackConfig, teacher: Teacher, batch: list[Example], cfg: DistillConfig,
                    retrievers: dict[str, Any]) -> list[dict]:  # fmt: skip
    rows = [{"id": ex.id, "ok": True, "outputs": {}, "prompts": {}, "sources": {}} for ex in batch]
    values = [{INPUT_FIELD: ex.text} for ex in batch]
    last = stack.stages[-1].name
    for stage in stack.stages:
        alive = [i for i, row in enumerate(rows) if row["ok"]]
        if stage.kind == "retrieve":  # the index answers, as it will at run time: no teacher, nothing to train
            queries = [stage.template.format(**values[i]) for i in alive]
            found = retrievers[stage.name].search(queries, stage.k, [set(stage.exclude or ()) for _ in alive])
            for i, query, passages in zip(alive, queries, found, strict=True):
                values[i][stage.name] = rows[i]["outputs"][stage.name] = format_passages(passages)
                rows[i]["prompts"][stage.name], rows[i]["sources"][stage.name] = query, "retrieve"
            continue
        settings = stage.generation
        if cfg.max_new_tokens:
            settings = replace(settings, max_new_tokens=cfg.max_new_tokens)
        prompts = {i: stage.template.format(**values[i]) for i in alive}
        use_ref = {i for i in alive if stage.name == last and cfg.final_target == "reference" and batch[i].output}
        asked = [i for i in alive if i not in use_ref]
        replies = dict(zip(asked, teacher.generate([(stage.role, prompts[i]) for i in asked], settings), strict=True))
        for i in alive:
            if i in use_ref:
                text, finish = batch[i].output or "", "reference"
            else:
                text, finish = settle_reply(replies[i], cfg.unfinished)
                problem = find_problem(TeacherReply(text, replies[i].finished), cfg.max_chars, cfg.unfinished)
                if problem:
                    rows[i].update(ok=False, reason=problem, stage=stage.name, rejected=replies[i].text[:500])
                    continue
            values[i][stage.name] = text
            rows[i]["outputs"][stage.name] = text
            rows[i]["prompts"][stage.name] = prompts[i]
            rows[i]["sources"][stage.name] = "reference" if i in use_ref else "teacher"
            rows[i].setdefault("finish", {})[stage.name] = finish
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
    retrievers = load_stage_retrievers(stack)
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
            for row in _run_item_batch(stack, teacher, batch, cfg, retrievers):
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
    fix = "The journal was not written by this version of slmstack distill: rerun with --overwrite to start over."
    stage_lines: dict[str, list[str]] = {}
    finishes: Counter[str] = Counter()
    with guard_read(out / JOURNAL, "distillation journal", fix):  # a journal line lacking a field is named, once
        rows = [json.loads(line) for line in jsonl_lines(read_text(out / JOURNAL, "distillation journal"))]
        kept = [r for r in rows if r["ok"]]
        dropped = Counter(f"{r['reason']}@{r['stage']}" for r in rows if not r["ok"])
        for stage in (s for s in stack.stages if s.kind != "retrieve"):  # a retrieve stage has nothing to learn
            lines = stage_lines.setdefault(stage.name, [])
            for r in kept:
                prompt = r["prompts"][stage.name]
                prov = {"teacher": teacher, "source": r["sources"][stage.name], "prompt_sha256": _sha(prompt),
                        "finish": r.get("finish", {}).get(stage.name, "stop"), "time": r["time"]}  # fmt: skip
                finishes[f"{prov['finish']}@{stage.name}"] += 1
                record = {"id": r["id"], "stage": stage.name, "role": stage.role, "prompt": prompt,
                          "completion": r["outputs"][stage.name], "provenance": prov}  # fmt: skip
                lines.append(json.dumps(record, ensure_ascii=False))
    per_stage = {}
    for name, lines in stage_lines.items():
        atomic_write_text(out / f"{name}.jsonl", "".join(line + "\n" for line in lines))
        per_stage[name] = len(lines)
    kept_cut = {k: v for k, v in sorted(finishes.items()) if k.split("@")[0] in ("trimmed", "cut")}
    return DistillReport(len(rows), len(kept), dict(dropped), resumed, 0.0, per_stage, kept_cut)


_ADVICE = {
    "unfinished": "--unfinished trim (the default) or keep, or a larger --max-new-tokens",
    "over_long": "a larger --max-chars",
    "degenerate": "a stronger teacher (--teacher REF or --teacher-url), or a repetition penalty "
    "(--set stages.N.generation.repetition_penalty=1.3)",
    "empty": "check the teacher and the stack's templates; a larger --max-new-tokens",
}


def keep_advice(report: DistillReport) -> str:
    """One line: how many were kept, the drops per reason and stage, and the flags that would keep more."""
    drops = ", ".join(f"{k}={v}" for k, v in sorted(report.dropped.items())) or "none"
    reasons = sorted({key.split("@")[0] for key in report.dropped})
    hints = "; ".join(f"{r}: {_ADVICE[r]}" for r in reasons if r in _ADVICE)
    return f"kept {report.kept} of {report.total} ({drops} dropped). To keep more — {hints or 'more data'}."
