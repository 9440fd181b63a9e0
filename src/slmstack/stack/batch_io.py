"""Answer a file of inputs in batches, appending results so a rerun resumes where it stopped."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from slmstack.errors import InputError
from slmstack.io import check_output_file, iter_jsonl, read_done_jsonl, read_text
from slmstack.stack.runtime import Stack

logger = logging.getLogger(__name__)

__all__ = ["read_inputs", "run_file"]

_FIELDS = ("input", "question", "prompt", "instruction")


def read_inputs(path: Path, field: str | None = None) -> list[tuple[int, str, dict[str, Any]]]:
    """``(line, text, record)`` for each input in a ``.jsonl`` file (or a ``.txt`` file, one per line).

    Raises:
        InputError: naming the file and line of malformed JSON, a missing field or an empty input.
    """
    path = Path(path)
    items = []
    if path.suffix == ".txt":
        lines = read_text(path, "input file").split("\n")
        items = [(n, line.strip(), {}) for n, line in enumerate(lines, start=1) if line.strip()]
    for number, record in iter_jsonl(path) if path.suffix != ".txt" else ():
        key = field or next((k for k in _FIELDS if k in record), None)
        if key is None or key not in record:
            want = repr(field) if field else "one of " + ", ".join(_FIELDS)
            raise InputError(f"{path}:{number}: no {want} field (keys: {', '.join(record)}). Pass --field NAME.")
        text = record[key]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{number}: field {key!r} is empty or not text")
        items.append((number, text, record))
    if not items:
        raise InputError(f"{path}: no inputs found (the file is empty or blank). Give at least one input.")
    return items


def run_file(
    stack: Stack, input_path: Path, output_path: Path, field: str | None = None, batch_size: int | None = None
) -> dict[str, int]:
    """Answer every input of ``input_path`` into ``output_path`` (JSONL, one result per input line).

    Each batch is appended and fsynced as soon as it is done; items already in the output (matched by
    input line number) are skipped, so a killed run resumes where it stopped.
    """
    check_output_file(output_path, "--output results file")
    items = read_inputs(input_path, field)
    done = read_done_jsonl(output_path, "line")
    todo = [item for item in items if item[0] not in done]
    size = batch_size or stack.config.batch_size
    output_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("%d inputs, %d already done, %d to run", len(items), len(items) - len(todo), len(todo))
    with output_path.open("a", encoding="utf-8") as fh, tqdm(total=len(todo), desc="answering", unit="q") as bar:
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            results = stack.run_batch([text for _, text, _ in chunk], batch_size=size)
            for (line, _, record), result in zip(chunk, results, strict=True):
                row = {"line": line, **({"id": record["id"]} if "id" in record else {}), **result.to_dict()}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(chunk))
    return {"total": len(items), "skipped": len(items) - len(todo), "written": len(todo)}
