"""The retriever contract, the registry of kinds, and the index folder every kind shares.

An index folder holds ``index.json`` (the kind, its settings, the passage count and the corpus's SHA-256),
``passages.jsonl`` (each passage's ``id`` and ``text``, in index order) and the kind's own files. It is written once
by :func:`build_index` (``slmstack index``) into a folder claimed by the ownership rule, and loaded by
:func:`load_retriever`.

Example:
    >>> build_index(Path("facts.jsonl"), Path("runs/index"))
    >>> retriever = load_retriever(Path("runs/index"))
    >>> [p.text for p in retriever.search(["why is the sky blue"], k=3)[0]]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from slmstack.errors import ConfigError, InputError
from slmstack.io import atomic_write_json, atomic_write_text, check_input_file, guard_read, read_json
from slmstack.ownership import claim_dir
from slmstack.registry import Registry

__all__ = [
    "INDEX_FILE",
    "RETRIEVERS",
    "Passage",
    "Retriever",
    "build_index",
    "format_passages",
    "load_retriever",
    "load_stage_retrievers",
]

INDEX_FILE = "index.json"
PASSAGES_FILE = "passages.jsonl"


@dataclass(frozen=True)
class Passage:
    """One retrieved passage: its corpus id, its text and its score (higher is better)."""

    id: str
    text: str
    score: float


class Retriever(Protocol):
    """What a stack's ``retrieve`` stage and the study call: the top ``k`` passages for each query.

    ``exclude`` holds, per query, passage ids that must not be returned (an item's own passage); a retriever
    returns fewer than ``k`` passages when fewer match at all.
    """

    def search(self, queries: list[str], k: int, exclude: list[Collection[str]] | None = None) -> list[list[Passage]]:
        """The top-``k`` passages of each query, best first."""
        ...


# kind -> a class with ``build(ids, texts, folder, show_progress)`` (writes the kind's files) and ``load(folder,
# passages, settings)``; a new kind (dense, remote) is one more entry
RETRIEVERS: Registry[Any] = Registry("retriever")


def format_passages(passages: list[Passage]) -> str:
    """A retrieve stage's output text: one passage a line, as later stages' templates read it."""
    return "\n".join(f"- {p.text}" for p in passages)


def build_index(corpus: Path, out: Path, kind: str = "bm25", show_progress: bool = True) -> dict[str, Any]:
    """Read ``corpus`` (.jsonl or .txt), index it with the retriever ``kind`` and write the index folder ``out``.

    Raises:
        InputError: the corpus is missing, not UTF-8, empty, malformed (naming the line), or ``out`` is not ours.
    """
    from slmstack.retrieval.corpus import read_corpus

    cls = RETRIEVERS.get(kind)
    ids, texts = read_corpus(corpus)
    out = claim_dir(Path(out), "index", "--out index folder")
    settings = cls.build(ids, texts, out, show_progress)
    atomic_write_text(out / PASSAGES_FILE, "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
                                                    for i, t in zip(ids, texts, strict=True)))  # fmt: skip
    with guard_read(corpus, "corpus"):
        digest = hashlib.sha256(corpus.read_bytes()).hexdigest()
    record = {"written_by": "slmstack", "kind": kind, "passages": len(ids), "settings": settings,
              "corpus": str(corpus), "corpus_sha256": digest}  # fmt: skip
    atomic_write_json(out / INDEX_FILE, record)  # last: a folder without it is an unfinished build
    return record


def load_retriever(path: str | Path) -> Any:
    """The retriever an index folder holds.

    Raises:
        InputError: the folder is missing, is not an index slmstack wrote, or a file in it is damaged.
    """
    path = Path(path)
    fix = "Build it with: slmstack index --corpus FILE --out DIR"
    if not path.is_dir():
        what = "is a file, not an index folder" if path.exists() else "index folder not found"
        raise InputError(f"{path}: {what}. {fix}")
    check_input_file(path / INDEX_FILE, "index record (index.json)", f"Is this an index folder? {fix}")
    record = read_json(path / INDEX_FILE, "index record", fix, expect={"kind": str, "passages": int, "settings": dict})
    try:
        cls = RETRIEVERS.get(record["kind"])
    except ConfigError as exc:
        raise InputError(f"{path / INDEX_FILE}: {exc}") from None
    passages = _read_passages(path / PASSAGES_FILE, record["passages"], fix)
    return cls.load(path, passages, record["settings"])


def load_stage_retrievers(config: Any) -> dict[str, Any]:
    """Stage name -> the retriever of each ``retrieve`` stage of a stack config (one load per index folder)."""
    loaded: dict[Path, Any] = {}
    out = {}
    for stage in config.stages:
        if stage.kind == "retrieve":
            path = config.index_path(stage)
            try:
                out[stage.name] = loaded[path] if path in loaded else loaded.setdefault(path, load_retriever(path))
            except InputError as exc:
                raise InputError(f"stage {stage.name}: {exc}") from None
    return out


def _read_passages(path: Path, count: int, fix: str) -> tuple[list[str], list[str]]:
    from slmstack.io import iter_jsonl

    check_input_file(path, "index passages", fix)
    ids, texts = [], []
    for number, rec in iter_jsonl(path):
        if not isinstance(rec.get("id"), str) or not isinstance(rec.get("text"), str):
            raise InputError(f"{path}:{number}: an index passage needs 'id' and 'text' strings. {fix}")
        ids.append(rec["id"])
        texts.append(rec["text"])
    if len(ids) != count:
        raise InputError(f"{path}: holds {len(ids)} passages, but the index has {count}. {fix}")
    return ids, texts
