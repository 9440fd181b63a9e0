"""Read a passage corpus: JSONL (``{"text": ..., "id": ...}`` per line, ``id`` optional) or text (one per line)."""

from __future__ import annotations

from pathlib import Path

from slmstack.errors import InputError
from slmstack.io import check_input_file, iter_jsonl, read_text

__all__ = ["read_corpus"]


def read_corpus(path: str | Path) -> tuple[list[str], list[str]]:
    """``(ids, texts)`` of every passage; a line without its own ``id`` gets its line number.

    Raises:
        InputError: naming the file (missing, not UTF-8, another format, no passages) or the line (not JSON, no
            ``text``, an empty text, an ``id`` that is not a string or number, an ``id`` used twice).
    """
    path = check_input_file(Path(path), "corpus", 'Pass a .jsonl ({"text": ..., "id": ...} per line) or a .txt.')
    if path.suffix not in (".jsonl", ".txt"):
        raise InputError(f"{path}: a corpus is .jsonl (one {{\"text\": ..., \"id\": ...}} per line) or .txt (one "
                         f"passage per line), not {path.suffix or 'a file without a suffix'}")  # fmt: skip
    rows: list[tuple[int, object, object]] = []
    if path.suffix == ".txt":
        lines = read_text(path, "corpus").split("\n")
        rows = [(n, None, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    else:
        rows = [(n, rec.get("id"), rec.get("text")) for n, rec in iter_jsonl(path)]
    ids, texts, seen = [], [], set()
    for number, given, text in rows:
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{number}: a passage needs a non-empty 'text' string. Fix or remove the line.")
        if given is not None and (isinstance(given, bool) or not isinstance(given, str | int)):
            raise InputError(f"{path}:{number}: 'id' must be a string or a number. Fix the line.")
        pid = str(given) if given is not None else str(number)
        if pid in seen:
            raise InputError(f"{path}:{number}: id {pid!r} is used twice; every passage needs its own id")
        seen.add(pid)
        ids.append(pid)
        texts.append(" ".join(text.split()))  # one line each: a passage is one line of a stage's output
    if not ids:
        raise InputError(f"{path}: the corpus holds no passages. Give at least one.")
    return ids, texts
