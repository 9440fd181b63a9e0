"""BM25 retrieval: scores against the formula by hand, top-k order, exclusion, the index folder, the corpus."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from slmstack.errors import InputError
from slmstack.retrieval import build_index, format_passages, load_retriever
from slmstack.retrieval.corpus import read_corpus

# after lower-casing, English stop words out (a, on, the, is) and stemming: the tokens each passage is indexed by
CORPUS = {
    "mat": "A cat sat on the mat",  # cat sat mat                      (3 tokens)
    "dogs": "Dogs chase cats",  # dog chase cat                        (3)
    "sun": "The sun is a star",  # sun star                            (2)
    "plants": "Plants make food from sunlight",  # plant make food from sunlight (5)
}


def _bm25(tf: int, df: int, length: int, n: int = 4, avgdl: float = 13 / 4, k1: float = 1.5, b: float = 0.75) -> float:
    """One term's Lucene BM25 score, by the formula: idf * tf / (tf + k1 (1 - b + b |d| / avgdl))."""
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + k1 * (1 - b + b * length / avgdl))


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bm25")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in CORPUS.items()))
    build_index(corpus, root / "index", show_progress=False)
    return root / "index"


def test_scores_and_order_equal_the_formula_by_hand(index: Path) -> None:
    # Execute
    found = load_retriever(index).search(["Which cat food?"], k=4)[0]
    # Assert: "food" (df 1) in the 5-token passage outranks "cat" (df 2) in the two 3-token passages, whose equal
    # scores keep corpus order; "sun" shares no term and is left out
    assert [p.id for p in found] == ["plants", "mat", "dogs"]
    expected = [_bm25(1, 1, 5), _bm25(1, 2, 3), _bm25(1, 2, 3)]
    assert [p.score for p in found] == pytest.approx(expected, rel=1e-5)
    assert expected[0] == pytest.approx(0.38766, abs=1e-5) and expected[1] == pytest.approx(0.28720, abs=1e-5)


def test_more_shared_terms_rank_higher_and_k_cuts(index: Path) -> None:
    retriever = load_retriever(index)
    # "cats chase": dogs has both terms, mat only one
    assert [p.id for p in retriever.search(["do cats chase?"], k=2)[0]] == ["dogs", "mat"]
    assert [p.id for p in retriever.search(["do cats chase?"], k=1)[0]] == ["dogs"]
    # stemming: "stars" finds "star"; a query of stop words or unknown words finds nothing
    assert [p.id for p in retriever.search(["stars"], k=3)[0]] == ["sun"]
    assert retriever.search(["the of a", "zebras"], k=3) == [[], []]


def test_excluded_ids_are_never_returned_and_the_rest_keep_their_order(index: Path) -> None:
    retriever = load_retriever(index)
    found = retriever.search(["cat food", "cat food"], k=2, exclude=[{"plants"}, {"mat", "nope"}])
    assert [p.id for p in found[0]] == ["mat", "dogs"]  # the best passage is some query's own: the next two
    assert [p.id for p in found[1]] == ["plants", "dogs"]


def test_the_index_folder_is_recorded_and_loads_fast(index: Path) -> None:
    record = json.loads((index / "index.json").read_text())
    assert record["kind"] == "bm25" and record["passages"] == 4 and record["settings"]["stemmer"] == "english"
    assert json.loads((index / ".slmstack.json").read_text())["verb"] == "index"
    start = time.perf_counter()
    load_retriever(index)
    assert time.perf_counter() - start < 5  # memory-mapped; about a second for a large corpus


def test_a_retrieve_stages_text_is_one_passage_a_line(index: Path) -> None:
    passages = load_retriever(index).search(["cat food"], k=2)[0]
    assert format_passages(passages) == "- Plants make food from sunlight\n- A cat sat on the mat"


def test_a_text_corpus_is_one_passage_a_line_with_line_numbers_as_ids(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("first passage\n\n  second   passage  \n")
    assert read_corpus(path) == (["1", "3"], ["first passage", "second passage"])


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("c.jsonl", '{"text": "a"}\n{"txt": "b"}\n', "c.jsonl:2: a passage needs a non-empty 'text'"),
        ("c.jsonl", '{"text": "a", "id": 1}\n{"text": "b", "id": "1"}\n', "id '1' is used twice"),
        ("c.jsonl", '{"text": "a", "id": [1]}\n', "'id' must be a string or a number"),
        ("c.jsonl", "\n \n", "holds no passages"),
        ("c.csv", "a,b\n", "a corpus is .jsonl"),
        ("c.txt", b"\xff\xfe not text", "not UTF-8"),
    ],
)
def test_a_bad_corpus_is_named(tmp_path: Path, name: str, content, fragment: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=fragment):
        read_corpus(path)


def test_a_damaged_index_is_named(index: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(index, broken)
    (broken / "passages.jsonl").write_text('{"id": "x", "text": "only one"}\n')
    with pytest.raises(InputError, match="holds 1 passages, but the index has 4"):
        load_retriever(broken)
    with pytest.raises(InputError, match="index folder not found"):
        load_retriever(tmp_path / "none")
