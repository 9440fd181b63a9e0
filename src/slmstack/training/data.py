"""Instruction data readers: Alpaca, GPTeacher, prompt/completion, a column mapping, or a HF dataset.

Every reader yields :class:`Example` records. Malformed lines and missing fields are reported with the
file and line (or record index, for a JSON array); ``skip_bad`` skips and counts them instead.
Formats are registry entries: a new one is a field mapping.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmstack.errors import InputError
from slmstack.io import check_input_file, read_json, read_text
from slmstack.registry import Registry

logger = logging.getLogger(__name__)

__all__ = ["DATA_FORMATS", "Example", "ReadResult", "read_examples"]


@dataclass
class Example:
    """One instruction: what to do, optional extra input, and the reference output when the data has one."""

    id: str
    instruction: str
    input: str = ""
    output: str | None = None

    @property
    def text(self) -> str:
        """The user turn a stack receives: the instruction, then the input if any."""
        return f"{self.instruction}\n\n{self.input}" if self.input.strip() else self.instruction


@dataclass
class ReadResult:
    """The examples read and the bad records skipped (with their location and reason)."""

    examples: list[Example]
    skipped: list[str] = field(default_factory=list)


# format name -> {Example field: record field}; "input"/"output" are optional in the record
DATA_FORMATS: Registry[dict[str, str]] = Registry("data format")
DATA_FORMATS.add("alpaca", {"instruction": "instruction", "input": "input", "output": "output"})
DATA_FORMATS.add("gpteacher", {"instruction": "instruction", "input": "input", "output": "response"})
DATA_FORMATS.add("prompt_completion", {"instruction": "prompt", "output": "completion"})
_REQUIRED = ("instruction",)


def _detect(record: dict[str, Any], where: str) -> str:
    for name, mapping in DATA_FORMATS.items():  # the format whose instruction and output keys are both present
        if mapping["instruction"] in record and mapping.get("output") in record:
            return name
    if "instruction" in record:  # instructions without reference outputs
        return "alpaca"
    raise InputError(
        f"{where}: cannot tell the data format from keys {sorted(record)}. Pass a format "
        f"({', '.join(DATA_FORMATS)}) or a column mapping such as instruction=question,output=answer."
    )


def _records(path: Path, skip_bad: bool, skipped: list[str]) -> list[tuple[str, Any]]:
    """(location, record) pairs from a .json array or a .jsonl file."""
    text = read_text(path, "data file")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        data = read_json(path, "data file", expect=list)
        return [(f"{path} record {i}", rec) for i, rec in enumerate(data)]
    out = []
    for number, line in enumerate(text.split("\n"), start=1):  # "\n" only: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{number}", json.loads(line)))
        except (json.JSONDecodeError, RecursionError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            if not skip_bad:
                raise InputError(
                    f"{path}:{number}: not valid JSON ({msg}). Fix the line or pass --skip-bad."
                ) from None
            skipped.append(f"{path}:{number}: not valid JSON")
    return out


def _files(source: Path) -> list[Path]:
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise InputError(f"{source}: directory holds no .json or .jsonl files")
        return files
    return [check_input_file(source, "data file", "Pass a .json/.jsonl file, a directory of them, or hf:NAME.")]


def _to_example(where: str, rec: Any, mapping: dict[str, str], index: int) -> Example:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in _REQUIRED:
        if mapping[key] not in rec:
            raise InputError(f"{where}: missing field {mapping[key]!r} (keys: {', '.join(rec)})")
    values = {}
    for ours, theirs in mapping.items():
        value = rec.get(theirs, "" if ours == "input" else None)
        if value is not None and not isinstance(value, str):
            raise InputError(f"{where}: field {theirs!r} must be text, got {type(value).__name__}")
        values[ours] = value
    if not values["instruction"].strip():
        raise InputError(f"{where}: field {mapping['instruction']!r} is empty")
    return Example(id=str(rec.get("id", index)), **values)


def read_examples(
    source: str | Path,
    data_format: str = "auto",
    columns: dict[str, str] | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
) -> ReadResult:
    """Read instruction examples from a file, a directory of files, or ``hf:NAME[:SPLIT]``.

    Args:
        source: a .json/.jsonl file, a directory of them, or ``hf:dataset_name[:split]`` (needs the hub).
        data_format: ``auto`` (from the keys), or a name in :data:`DATA_FORMATS`.
        columns: explicit mapping from ``instruction``/``input``/``output`` to record fields.
        skip_bad: skip (and count) malformed records instead of failing.
        limit: keep the first ``limit`` examples.

    Raises:
        InputError: naming the file and line (or record) of the first bad record.

    Example:
        >>> read_examples("gpteacher.json", limit=200).examples[0].text
    """
    skipped: list[str] = []
    if str(source).startswith("hf:"):
        pairs = _hf_records(str(source)[3:])
    else:
        pairs = [pair for path in _files(Path(source)) for pair in _records(path, skip_bad, skipped)]
    examples: list[Example] = []
    mapping = columns
    for index, (where, rec) in enumerate(pairs):
        if limit is not None and len(examples) >= limit:
            break
        try:
            if mapping is None:
                mapping = DATA_FORMATS.get(_detect(rec, where) if data_format == "auto" else data_format)
            examples.append(_to_example(where, rec, mapping, index))
        except InputError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
    if skipped:
        logger.warning("skipped %d bad records (first: %s)", len(skipped), skipped[0])
    if not examples:
        raise InputError(f"{source}: no usable examples")
    return ReadResult(examples, skipped)


def _hf_records(spec: str) -> list[tuple[str, Any]]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise InputError("reading hf: datasets needs the datasets package: pip install datasets") from None
    try:
        data = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # the hub raises many types; all mean "not loadable here"
        raise InputError(
            f"could not load dataset {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Where the hub is unreachable, export it to JSONL and pass the file."
        ) from None
    return [(f"{name} row {i}", dict(row)) for i, row in enumerate(data)]
