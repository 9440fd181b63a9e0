"""BM25 over the corpus, through the maintained ``bm25s`` library (sparse-matrix BM25, saved and memory-mapped).

Scoring is Lucene's BM25 (Robertson et al.; Lucene's form without the ``(k1 + 1)`` factor, which changes no
ranking): ``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))`` and ``tf / (tf + k1 (1 - b + b |d| / avgdl))`` per
query term, with ``k1 = 1.5`` and ``b = 0.75``. Text is lower-cased, split into words of two or more characters,
stripped of English stop words and stemmed (Snowball English, through PyStemmer), the same way for the corpus and
the queries; the settings are recorded in the index and applied again at load.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from slmstack.errors import ConfigError, InputError
from slmstack.io import guard_read
from slmstack.retrieval.base import RETRIEVERS, Passage

__all__ = ["BM25Retriever"]

_FILES = "bm25"  # the folder bm25s writes inside the index folder
_FIX = "Rebuild it with: slmstack index --corpus FILE --out DIR"


def _bm25s() -> Any:
    import logging

    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets DEBUG on import: its steps are not news
    return bm25s


def _stemmer(name: str | None) -> Any:
    if name is None:
        return None
    import Stemmer

    return Stemmer.Stemmer(name)


@RETRIEVERS.register("bm25")
class BM25Retriever:
    """Top-k passages by BM25 score (see the module docstring for the formula and the text processing)."""

    settings = {"k1": 1.5, "b": 0.75, "method": "lucene", "stopwords": "en", "stemmer": "english"}

    def __init__(self, model: Any, ids: list[str], texts: list[str], settings: dict[str, Any]) -> None:
        self.model, self.ids, self.texts = model, ids, texts
        self.stopwords, self.stemmer = settings["stopwords"], _stemmer(settings["stemmer"])
        self._row = {pid: i for i, pid in enumerate(ids)}

    @classmethod
    def build(cls, ids: list[str], texts: list[str], out: Path, show_progress: bool = True) -> dict[str, Any]:
        """Tokenize and index ``texts``; write bm25s's files under ``out``; return the settings to record."""
        bm25s = _bm25s()

        s = cls.settings
        tokens = bm25s.tokenize(texts, stopwords=s["stopwords"], stemmer=_stemmer(s["stemmer"]),
                                show_progress=show_progress)  # fmt: skip
        model = bm25s.BM25(k1=s["k1"], b=s["b"], method=s["method"])
        model.index(tokens, show_progress=show_progress)
        model.save(str(out / _FILES), show_progress=False)
        return {**s, "library": f"bm25s {bm25s.__version__}"}

    @classmethod
    def load(cls, folder: Path, passages: tuple[list[str], list[str]], settings: dict[str, Any]) -> BM25Retriever:
        """The retriever of an index folder (its matrices memory-mapped: a load takes about a second)."""
        bm25s = _bm25s()

        missing = [k for k in ("stopwords", "stemmer") if k not in settings]
        if missing:
            raise InputError(f"{folder}: the index record lacks {missing[0]!r}. {_FIX}")
        with guard_read(folder / _FILES, "BM25 index files", _FIX):
            model = bm25s.BM25.load(str(folder / _FILES), mmap=True, show_progress=False)
        if int(model.scores["num_docs"]) != len(passages[0]):
            raise InputError(f"{folder}: the BM25 files index {model.scores['num_docs']} passages, the folder "
                             f"holds {len(passages[0])}. {_FIX}")  # fmt: skip
        return cls(model, *passages, settings)

    def _top(self, tokens: list[str], k: int, skip: set[str]) -> list[Passage]:
        """The best ``k`` passages not in ``skip``; equal scores in corpus order, so a search is the same everywhere.

        bm25s returns an arbitrary member of a tie at its cut-off, so the cut-off widens until the last candidate
        scores below the ``k``-th kept one (or every passage is a candidate).
        """
        n = min(len(self.ids), k + len(skip))
        while True:
            docs, scores = self.model.retrieve([tokens], k=n, show_progress=False, n_threads=1)
            found = sorted(zip(scores[0].tolist(), docs[0].tolist(), strict=True), key=lambda sd: (-sd[0], sd[1]))
            kept = [(s, d) for s, d in found if s > 0 and self.ids[d] not in skip][:k]
            if n == len(self.ids) or not kept or found[-1][0] < kept[-1][0] or (len(kept) < k and found[-1][0] <= 0):
                return [Passage(self.ids[d], self.texts[d], float(s)) for s, d in kept]
            n = min(len(self.ids), 2 * n)

    def search(self, queries: list[str], k: int, exclude: list[Collection[str]] | None = None) -> list[list[Passage]]:
        """The top-``k`` passages of each query by BM25 score; passages scoring 0 (no shared term) are left out.

        ``exclude[i]`` holds ids that query ``i`` must not get (its own passage, held-out items): the search asks
        for ``k`` more per excluded id, so the top ``k`` of the rest are exact.
        """
        bm25s = _bm25s()

        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
        tokens = bm25s.tokenize(queries, stopwords=self.stopwords, stemmer=self.stemmer, return_ids=False,
                                show_progress=False)  # fmt: skip
        vocab = self.model.vocab_dict
        known = [[t for t in q if t in vocab] for q in tokens]  # a word the corpus never uses scores nothing
        results: list[list[Passage]] = [[] for _ in queries]
        asked = [i for i, q in enumerate(known) if q]
        if not asked:
            return results
        skip = [set(exclude[i]) if exclude is not None else set() for i in range(len(queries))]
        for i in asked:
            results[i] = self._top(known[i], k, skip[i])
        return results
