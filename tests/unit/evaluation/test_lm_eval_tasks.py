"""Our built-in tasks send the model exactly the requests that lm-eval's *own* task definitions send.

For each task, the first 100 local records are written back in the hub's layout, lm-eval 0.4's
registered task (its own YAML, ``utils.py``, preprocessing and target delimiter) is built with only
its data source pointed at that file, and its requests (context, continuation) are compared string for
string with the requests our spec builds from the local file. Scoring equality given equal requests is
checked separately (``test_lm_eval_crosscheck.py``).

What each converter assumes about the hub record is written beside it; the only reconstruction that
is not a plain field rename is HellaSwag's ctx_a/ctx_b split (see ``split_hellaswag_ctx``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from slmstack.evaluation.harness import evaluate
from slmstack.evaluation.targets import extract, normalize_answer
from slmstack.evaluation.tasks import get_task, load_docs, split_hellaswag_ctx, wikitext_detokenize
from tests.conftest import SHARED_DATA

lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
DATA = SHARED_DATA
N = 100
pytestmark = pytest.mark.needs_data()


def _jsonl(path: Path, n: int = N) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def _letters(n: int) -> list[str]:
    return list("ABCDE")[:n]


# ---- local record -> hub record (the layout lm-eval's task reads)
def _hellaswag(r: dict) -> dict:
    label, ctx_a, ctx_b = split_hellaswag_ctx(r["ctx"])
    return {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": r["endings"], "label": str(r["label"])}


def _boolq(r: dict) -> dict:  # local query: "Passage: P\nQuestion: Q?"
    passage, _, question = r["query"].removeprefix("Passage: ").rpartition("\nQuestion: ")
    return {"passage": passage, "question": question.removesuffix("?"), "label": r["gold"]}


def _copa(r: dict) -> dict:  # local query: "premise-without-period, because|therefore"
    premise, _, connector = r["query"].rpartition(", ")
    question = {"because": "cause", "therefore": "effect"}[connector]
    return {"premise": premise + ".", "question": question, "choice1": r["choices"][0],
            "choice2": r["choices"][1], "label": r["gold"]}  # fmt: skip


def _arc(r: dict) -> dict:  # local query: "Question: Q"; the hub has no repeated option (the local file pads some)
    texts = list(dict.fromkeys(r["choices"]))
    labels = _letters(len(texts))
    return {"question": r["query"].removeprefix("Question: "), "choices": {"text": texts, "label": labels},
            "answerKey": labels[texts.index(r["choices"][r["gold"]])]}  # fmt: skip


def _piqa(r: dict) -> dict:  # local query: "Question: goal\n"
    return {"goal": r["query"].removeprefix("Question: ").removesuffix("\n"), "sol1": r["choices"][0],
            "sol2": r["choices"][1], "label": r["gold"]}  # fmt: skip


def _labelled(r: dict) -> dict:  # CommonsenseQA / OpenBookQA original layout
    q = r["question"]
    choices = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
    return {"question": q["stem"], "question_stem": q["stem"], "choices": choices, "answerKey": r["answerKey"]}


def _winogrande(r: dict) -> dict:  # two contexts that differ only in the option filling the blank
    a, b = r["context_options"]
    cut = len(re.match(r".*\s", a[: next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)]
                       or " ", re.DOTALL).group(0)) if a[:1] == b[:1] else 0  # fmt: skip
    return {"sentence": a[:cut] + "_ " + r["continuation"], "option1": a[cut:], "option2": b[cut:],
            "answer": str(r["gold"] + 1)}  # fmt: skip


def _lambada(r: dict) -> dict:
    return {"text": r["context"] + " " + r["continuation"].strip()}


CASES = {  # our task -> (lm-eval task, local file, converter)
    "hellaswag": ("hellaswag", "hellaswag/hellaswag_val.jsonl", _hellaswag),
    "boolq": ("boolq", "boolq/boolq.jsonl", _boolq),
    "copa": ("copa", "copa/copa.jsonl", _copa),
    "arc_easy": ("arc_easy", "arc_easy/arc_easy.jsonl", _arc),
    "arc_challenge": ("arc_challenge", "arc_challenge/arc_challenge.jsonl", _arc),
    "piqa": ("piqa", "piqa/piqa.jsonl", _piqa),
    "openbookqa": ("openbookqa", "openbookqa/test.jsonl", _labelled),
    "commonsenseqa": ("commonsense_qa", "commonsenseqa/dev_rand_split.jsonl", _labelled),
    "winogrande": ("winogrande", "winogrande/winogrande.jsonl", _winogrande),
    "lambada": ("lambada_openai", "lambada_openai/lambada_openai.jsonl", _lambada),
    "gsm8k": ("gsm8k", "gsm8k/test.jsonl", lambda r: r),
}


@functools.cache
def _manager() -> Any:
    return lm_eval_tasks.TaskManager()  # indexes every task YAML once (seconds)


def _lm_eval_requests(task_name: str, records: list[dict], tmp_path: Path) -> list[list[tuple]]:
    """lm-eval's own task, data source replaced by a local file: its request arguments per document."""
    data = tmp_path / f"{task_name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    manager = _manager()
    files = {split: str(data) for split in ("train", "validation", "test", "dev")}
    overrides = {"dataset_path": "json", "dataset_name": None, "num_fewshot": 0}
    overrides["dataset_kwargs"] = {"data_files": files}
    task = manager._factory.build(manager.task_index[task_name], overrides=overrides, registry=manager.task_index)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    per_doc: dict[int, list] = defaultdict(list)
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        per_doc[inst.doc_id].append(inst.arguments[:2] if inst.request_type != "generate_until" else inst.args[:1])
    return [per_doc[i] for i in sorted(per_doc)]


def lm_eval_task(task: str, data_dir: Path, limit: int, work: Path) -> Any:
    """lm-eval's own task for our ``task``, reading the first ``limit`` local records in the hub's layout."""
    lm_eval_name, local_file, to_hub = CASES[task]
    path = work / f"{task}.jsonl"
    path.write_text("".join(json.dumps(to_hub(r)) + "\n" for r in _jsonl(data_dir / local_file, limit)))
    manager = _manager()
    files = {split: str(path) for split in ("train", "validation", "test")}
    overrides = {
        "dataset_path": "json",
        "dataset_name": None,
        "num_fewshot": 0,
        "dataset_kwargs": {"data_files": files},
    }
    return manager._factory.build(manager.task_index[lm_eval_name], overrides=overrides, registry=manager.task_index)


class _Recorder:
    """Our side: a target and scorer that record the requests instead of running a model."""

    identity = {"kind": "model", "total": 1, "trainable": 0, "active_per_token": 1}
    tokens_processed = 0

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []
        self.contexts: list[str] = []

    def scorer(self, batch_size):
        return self

    def prepare(self, contexts, delimiter, fields=None):
        return contexts, delimiter

    def loglikelihood(self, pairs):
        self.pairs += pairs
        return [(0.0, False)] * len(pairs)

    def generate(self, contexts, until, max_new_tokens, batch_size):
        self.contexts += contexts
        return [""] * len(contexts)


def _our_requests(task: str) -> list[list[tuple]]:
    rec = _Recorder()
    evaluate(rec, [task], data_dir=DATA, limit=N)
    if rec.contexts:
        return [[(c,)] for c in rec.contexts]
    spec = get_task(task)
    docs = load_docs(spec, DATA)[:N]
    if spec.kind == "loglikelihood":
        sizes = [1] * len(docs)
    else:
        sizes = [len(d.data[spec.choices]) if isinstance(spec.choices, str) else len(spec.choices) for d in docs]
    out, i = [], 0
    for n in sizes:
        out.append(rec.pairs[i : i + n])
        i += n
    assert i == len(rec.pairs)
    return out


@pytest.mark.parametrize("task", sorted(CASES))
def test_requests_equal_lm_eval_own_task(task: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    lm_eval_name, local_file, to_hub = CASES[task]
    # Prepare: the same first 100 records in the hub's layout
    records = [to_hub(r) for r in _jsonl(DATA / local_file)]
    # Execute
    theirs = _lm_eval_requests(lm_eval_name, records, tmp_path)
    ours = _our_requests(task)
    # Assert: every request string is identical
    assert len(ours) == len(theirs) == N
    for i, (mine, ref) in enumerate(zip(ours, theirs, strict=True)):
        assert [tuple(p) for p in mine] == [tuple(p) for p in ref], f"{task} item {i}"


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge"])
def test_arc_questions_padded_with_a_repeated_option_send_lm_evals_requests(task: str, tmp_path: Path,
                                                                           monkeypatch) -> None:  # fmt: skip
    # Prepare: every local record whose options repeat one (7 in ARC-Easy, 4 in ARC-Challenge)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    lm_eval_name, local_file, to_hub = CASES[task]
    rows = [json.loads(line) for line in (DATA / local_file).read_text().splitlines() if line.strip()]
    padded = [r for r in rows if len(set(r["choices"])) < len(r["choices"])]
    assert len(padded) == {"arc_easy": 7, "arc_challenge": 4}[task]
    local = tmp_path / "padded.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in padded))
    spec = tmp_path / "arc.yaml"
    body = {k: v for k, v in dataclasses.asdict(get_task(task)).items() if k not in ("hf",)}
    spec.write_text(yaml.safe_dump({**body, "data_file": str(local)}))
    # Execute
    theirs = _lm_eval_requests(lm_eval_name, [to_hub(r) for r in padded], tmp_path)
    rec = _Recorder()
    evaluate(rec, [str(spec)])
    # Assert: three requests per question, string for string
    assert [len(t) for t in theirs] == [3] * len(padded)
    assert [tuple(p) for p in rec.pairs] == [tuple(p) for doc in theirs for p in doc]


def test_wikitext_detokenizer_is_lm_evals() -> None:
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    docs = load_docs(get_task("wikitext2"), DATA)
    assert len(docs) > 50
    for doc in docs:
        assert doc.data["text"] == wikitext_detokenizer({"page": doc.data["page"]})
        assert wikitext_detokenize(doc.data["page"]) == doc.data["text"]


def test_gsm8k_scoring_is_lm_evals_filters_and_exact_match(tmp_path: Path, monkeypatch) -> None:
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    from tests.unit.evaluation.test_harness import FakeTarget

    # Prepare: lm-eval's own gsm8k settings, read from its task config
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    records = _jsonl(DATA / "gsm8k/test.jsonl", 6)
    manager = _manager()
    cfg = manager._factory.build(manager.task_index["gsm8k"], overrides={"dataset_path": "json", "dataset_kwargs": {
        "data_files": {"train": str(DATA / "gsm8k/test.jsonl"), "test": str(DATA / "gsm8k/test.jsonl")}}},
        registry=manager.task_index).config  # fmt: skip
    em = {k: v for k, v in cfg.metric_list[0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    filters = {f["name"]: f["filter"][0] for f in cfg.filter_list}
    strict = RegexFilter(filters["strict-match"]["regex_pattern"])
    flexible = RegexFilter(filters["flexible-extract"]["regex_pattern"], group_select=-1)
    ours_spec = get_task("gsm8k")
    assert (ours_spec.ignore_regexes, ours_spec.ignore_case) == (em["regexes_to_ignore"], em["ignore_case"])
    # Answers that exercise the normalisation: trailing period, dollars, commas, case, no number at all
    gold = [r["answer"].split("#### ")[-1] for r in records]
    answers = [f"So #### {gold[0]}.", f"It costs ${gold[1]} in total.", f"#### {int(gold[2]):,}", "no idea",
               f"#### {gold[4]} then #### 7", f"First 12, then {gold[5]}."]  # fmt: skip
    # Execute: lm-eval's pipeline per item, and ours
    theirs = {}
    for name, filt in (("exact_match", strict), ("exact_match_flexible", flexible)):
        picked = [r[0] for r in filt.apply([[a] for a in answers], records)]
        theirs[name] = [exact_match_hf_evaluate([p], [r["answer"]], **em)["exact_match"] for p, r in
                        zip(picked, records, strict=True)]  # fmt: skip
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = tmp_path / "g.yaml"
    body = {k: v for k, v in dataclasses.asdict(ours_spec).items() if k not in ("hf", "name")}
    spec.write_text(yaml.safe_dump({**body, "name": "g", "data_file": str(data)}))
    ours = evaluate(FakeTarget(answers=answers), [str(spec)])["tasks"]["g"]

    def norm(text: str) -> str:
        return normalize_answer(text, ours_spec.ignore_regexes, ours_spec.ignore_case)

    golds = [norm(r["answer"]) for r in records]
    pairs = list(zip(answers, golds, strict=True))
    per_item = {
        "exact_match": [float(norm(extract(ours_spec.answer_regex, a)) == g) for a, g in pairs],
        "exact_match_flexible": [float(norm(extract(ours_spec.flexible_regex, a, -1)) == g) for a, g in pairs],
    }
    # Assert: the same score for every item, and the harness reports their means
    assert per_item == theirs
    for name, scores in theirs.items():
        assert ours[name] == sum(scores) / len(scores)
    assert theirs["exact_match"] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
