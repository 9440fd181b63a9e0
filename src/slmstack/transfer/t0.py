"""T0 (PromptSource) templates as transfer tasks: separating each template's instruction from its input.

The T0 files hold rendered prompts only, the instruction embedded. A template's instruction is the text
that every one of its renderings shares: the common prefix, the common suffix, and lines that recur
verbatim. Each is snapped to word boundaries (a prefix ends at whitespace, a suffix starts at its first
word with letters, so ``"`` and ``.`` stay with the input) and counts as instruction only if it has at
least :data:`MIN_WORDS` words; shorter constant text (``Title:``, ``Answer:``) is a field label of the
input template and stays. The split is *reliable* when some instruction was found and every example
keeps a non-empty input with letters. Only tasks with a reliable split enter the instruction ablation;
``docs/transfer.md`` lists which templates have one (``slmstack.transfer.t0.split_report``).

A task is one template. Its wording 0 is the template's own rendering; templates of the same source
dataset with the same label set (or both generative) lend their instructions as further wordings.
A task is a classification when its targets take between 2 and :data:`MAX_LABELS` distinct values
(the label set); otherwise it is generative (ROUGE-L). Templates whose 200 examples hold one label only
are generative here: accuracy over a one-label set would be meaningless.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from slmstack.errors import InputError
from slmstack.io import check_input_file, guard_read, iter_jsonl
from slmstack.transfer.examples import Example, Task, Wording

__all__ = ["MAX_LABELS", "MIN_WORDS", "TemplateSplit", "load_t0", "split_instruction", "split_report"]

MIN_WORDS = 3
MAX_LABELS = 12
STOP = "<|endoftext|>"
_WORD = re.compile(r"[A-Za-z]")


@dataclass
class TemplateSplit:
    """A template's instruction (prefix, suffix, recurring lines) and each example's input without it."""

    prefix: str
    suffix: str
    lines: list[str]
    inputs: list[str]
    reliable: bool

    @property
    def wording(self) -> Wording:
        """The instruction as a wording for other inputs (recurring middle lines join the prefix)."""
        middle = "".join(f"{line}\n" for line in self.lines)
        return Wording(self.prefix + middle, self.suffix)


def _words(text: str) -> int:
    return sum(1 for w in text.split() if _WORD.search(w))


def _snap_prefix(prefix: str) -> str:
    """Cut back to the last whitespace: a shared partial word belongs to the input."""
    cut = max(prefix.rfind(c) for c in " \n\t")
    return prefix[: cut + 1] if cut >= 0 else ""


def _snap_suffix(suffix: str) -> str:
    """Start at the first whitespace-delimited word with letters: leading punctuation belongs to the input."""
    match = re.search(r"(?:(?<=\s)|^)(?=\S*[A-Za-z])", suffix)
    if match is None:
        return ""
    start = match.start()
    if start == 0 and suffix and not suffix[0].isspace():
        rest = re.search(r"\s(?=\S*[A-Za-z])", suffix)  # the first char may continue the input's last word
        start = rest.end() if rest else len(suffix)
    return suffix[start:]


def split_instruction(prompts: list[str]) -> TemplateSplit:
    """Separate the instruction shared by all renderings of one template from each rendering's input."""
    prefix = _snap_prefix(os.path.commonprefix(prompts))
    suffix = _snap_suffix(os.path.commonprefix([p[::-1] for p in prompts])[::-1])
    prefix = prefix if _words(prefix) >= MIN_WORDS else ""
    suffix = suffix if _words(suffix) >= MIN_WORDS else ""
    counts = Counter(line.strip() for p in prompts for line in set(p.split("\n")))
    lines = [line for line, n in counts.items() if n == len(prompts) and _words(line) >= MIN_WORDS
             and line not in prefix and line not in suffix]  # fmt: skip
    inputs = []
    for p in prompts:
        body = p[len(prefix) : len(p) - len(suffix)]
        if lines:
            body = "\n".join(line for line in body.split("\n") if line.strip() not in lines)
        inputs.append(body.strip())
    found = bool(prefix or suffix or lines)
    reliable = found and all(_WORD.search(i) for i in inputs)
    return TemplateSplit(prefix, suffix, sorted(lines), inputs if found else [p.strip() for p in prompts], reliable)


@dataclass
class _Template:
    file: str
    source: str
    category: str
    split: TemplateSplit
    examples: list[Example]
    labels: list[str] | None


def _read(root: Path, per_task: int | None) -> list[_Template]:
    manifest = check_input_file(root / "tasks.csv", "T0 task manifest", "Point data at the t0_multitask folder.")
    templates = []
    with guard_read(manifest, "T0 task manifest"), manifest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for number, row in enumerate(rows, start=2):
        if not {"file", "source_dataset", "category"} <= set(row) or not row["file"]:
            raise InputError(f"{manifest}:{number}: needs columns file, source_dataset, category")
        records = []
        for line, rec in iter_jsonl(root / row["file"]):
            if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
                raise InputError(f"{root / row['file']}:{line}: a record needs text 'prompt' and 'completion'")
            records.append(rec)
        split = split_instruction([r["prompt"] for r in records])
        targets = [r["completion"].removesuffix(STOP).strip() for r in records]
        distinct = sorted(set(targets))
        labels = distinct if 2 <= len(distinct) <= MAX_LABELS else None
        examples = [Example(i, [t], r["prompt"]) for i, t, r in zip(split.inputs, targets, records, strict=True)]
        examples = examples[:per_task] if per_task else examples
        templates.append(_Template(row["file"], row["source_dataset"], row["category"], split, examples, labels))
    return templates


def load_t0(root: Path, per_task: int | None = None) -> list[Task]:
    """Every T0 template in ``root/tasks.csv`` as a :class:`Task` named ``<dataset>__<template>``."""
    templates = _read(Path(root), per_task)
    tasks = []
    for t in templates:
        siblings = [s for s in templates if s.source == t.source and s is not t and s.split.reliable
                    and (s.labels == t.labels)]  # fmt: skip
        wordings = [t.split.wording] + [s.split.wording for s in siblings] if t.split.reliable else []
        kind, metric = ("classification", "accuracy") if t.labels else ("generation", "rouge_l")
        name = Path(t.file).stem
        tasks.append(Task(name, t.category, kind, metric, t.examples, wordings, t.labels, t.split.reliable))
    return tasks


def split_report(root: Path) -> list[dict[str, object]]:
    """Per template: category, type, whether the instruction split is reliable, and the instruction found."""
    return [{"task": Path(t.file).stem, "category": t.category, "labels": len(t.labels or []),
             "reliable": t.split.reliable, "prefix": t.split.prefix.strip(), "suffix": t.split.suffix.strip(),
             "lines": t.split.lines} for t in _read(Path(root), 2)]  # fmt: skip
