"""Crash-safe file helpers: atomic writes and line-numbered JSONL reading.

Nothing is ever half-written: every output goes to a temp file in the same directory, is fsynced,
then renamed over the target.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slmstack.errors import InputError

__all__ = ["atomic_write_json", "atomic_write_text", "iter_jsonl", "read_done_jsonl"]

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def iter_jsonl(path: Path, skip_bad: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSONL file.

    Raises:
        InputError: naming the file and line of a malformed line (unless ``skip_bad``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: input file not found")
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if skip_bad:
                    continue
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}). Fix or remove the line.") from None
            if not isinstance(record, dict):
                if skip_bad:
                    continue
                raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def read_done_jsonl(path: Path, key: str) -> set[Any]:
    """Values of ``key`` in an append-only results file, repairing a torn last line first.

    A process killed mid-append can leave a partial last line; it is cut off so that the item is
    simply redone on resume.
    """
    path = Path(path)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with path.open("r+b") as fh:
            fh.truncate(end)
    done = set()
    for line in data[:end].decode("utf-8").splitlines():
        if line.strip():
            try:
                done.add(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}: not a results file written by slmstack (line lacks {key!r})") from None
    return done
