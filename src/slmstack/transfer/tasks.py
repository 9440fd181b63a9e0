"""Task collections for transfer studies: tasks with instruction wordings, an input template, a type and a metric.

A :class:`Task` holds examples whose ``input`` is the input template's rendering *without* any
instruction, and one or more instruction wordings (a text before and after the input). A task either
classifies into a label set (scored by accuracy: the label with the highest log-likelihood) or generates
(scored by ROUGE-L against one or more references).

Collections are registered loaders (:data:`COLLECTIONS`): ``t0`` (PromptSource templates, the instruction
separated from the input where that split is reliable, see :mod:`slmstack.transfer.t0`), ``dialogsum``
(dialogue summarisation) and ``yaml`` (a user's own collection: ``docs/transfer.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from slmstack.errors import ConfigError, InputError
from slmstack.io import iter_jsonl, read_text
from slmstack.registry import Registry
from slmstack.transfer.examples import Example, Task, Wording
from slmstack.transfer.t0 import load_t0

logger = logging.getLogger(__name__)

__all__ = ["COLLECTIONS", "Example", "Task", "Wording", "load_collection"]


COLLECTIONS: Registry = Registry("collection")


def load_collection(name: str, path: Path, per_task: int | None = None) -> list[Task]:
    """The tasks of collection ``name`` read from ``path`` (a did-you-mean error for an unknown name)."""
    loader = COLLECTIONS.get(name)
    tasks = loader(path, per_task)
    logger.info("collection %s: %d tasks from %s", name, len(tasks), path)
    return tasks


@COLLECTIONS.register("t0")
def _t0(path: Path, per_task: int | None) -> list[Task]:
    return load_t0(path, per_task)


DIALOGSUM_WORDINGS = [
    Wording("Summarize the following dialogue.\n\n", ""),
    Wording("", "\n\nWhat was this conversation about? Summarize it in one or two sentences."),
    Wording("Dialogue:\n", "\n\nSummary of the dialogue above:"),
]


@COLLECTIONS.register("dialogsum")
def _dialogsum(path: Path, per_task: int | None) -> list[Task]:
    """DialogSum as one generation task scored by ROUGE-L against the best of its references.

    ``dialogsum.dev.jsonl`` (one summary each) and ``dialogsum.test.jsonl`` (three each) are pooled; a
    split cuts the pool into test and few-shot examples.
    """
    examples = []
    for name in ("dialogsum.dev.jsonl", "dialogsum.test.jsonl"):
        file = path / name
        for number, rec in iter_jsonl(file):
            refs = [rec[k] for k in ("summary", "summary1", "summary2", "summary3") if isinstance(rec.get(k), str)]
            if not isinstance(rec.get("dialogue"), str) or not refs:
                raise InputError(f"{file}:{number}: a DialogSum record needs 'dialogue' and 'summary' (or summary1-3)")
            examples.append(Example(rec["dialogue"], refs))
            if per_task and len(examples) >= per_task * (2 if name.endswith("test.jsonl") else 1):
                break
    return [Task("dialogsum", "dialogue summarization", "generation", "rouge_l", examples, list(DIALOGSUM_WORDINGS))]


@COLLECTIONS.register("yaml")
def _yaml(path: Path, per_task: int | None) -> list[Task]:
    """A user's collection: ``tasks.yaml`` listing tasks, each with a JSONL of ``{input, target}`` records."""
    import yaml

    file = path / "tasks.yaml" if path.is_dir() else path
    try:
        spec = yaml.safe_load(read_text(file, "task collection"))
    except yaml.YAMLError as exc:
        raise InputError(f"{file}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("tasks"), list):
        raise InputError(f"{file}: expected a mapping with a 'tasks' list (see docs/transfer.md)")
    tasks = []
    for i, entry in enumerate(spec["tasks"]):
        where = f"{file}: tasks.{i}"
        if not isinstance(entry, dict) or not {"name", "category", "data"} <= set(entry):
            raise InputError(f"{where}: needs name, category and data (a JSONL of input/target records)")
        data = file.parent / entry["data"]
        examples = []
        for number, rec in iter_jsonl(data):
            target = rec.get("target")
            targets = target if isinstance(target, list) else [target]
            if not isinstance(rec.get("input"), str) or not all(isinstance(t, str) for t in targets):
                raise InputError(f"{data}:{number}: a record needs text fields 'input' and 'target'")
            examples.append(Example(rec["input"], targets))
            if per_task and len(examples) >= per_task:
                break
        wordings = [Wording(w, "") if isinstance(w, str) else Wording(w.get("prefix", ""), w.get("suffix", ""))
                    for w in entry.get("instructions", [])]  # fmt: skip
        labels = entry.get("labels")
        kind = entry.get("kind", "classification" if labels else "generation")
        metric = entry.get("metric", "accuracy" if kind == "classification" else "rouge_l")
        try:
            tasks.append(Task(entry["name"], entry["category"], kind, metric, examples, wordings, labels))
        except ConfigError as exc:
            raise InputError(f"{where}: {exc}") from None
    return tasks
