"""MMLU: the requests of lm-eval's own mmlu_<subject> tasks, its group arithmetic, and our loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slmstack.cli import main
from slmstack.errors import InputError
from slmstack.evaluation.groups import GroupSpec, aggregate, score_groups
from slmstack.evaluation.harness import evaluate
from slmstack.evaluation.mmlu import SUBJECTS
from slmstack.evaluation.tasks import get_task, load_docs

ROWS = {  # a few questions in the hub's layout (cais/mmlu), for three subjects
    "anatomy": [("Which bone is the longest in the body?", ["Femur", "Tibia", "Humerus", "Ulna"], 0),
                ("  The heart has how many chambers?\n", ["Two", "Three", "Four", "Five"], 2)],
    "college_physics": [("What is the SI unit of force?", ["Joule", "Newton", "Watt", "Pascal"], 1)],
    "philosophy": [("Who wrote the Republic?", ["Aristotle", "Kant", "Hume", "Plato"], 3),
                   ("Cogito, ergo sum is due to", ["Descartes", "Locke", "Mill", "Hegel"], 0)],
}  # fmt: skip


def _hub_records(subject: str) -> list[dict]:
    return [{"question": q, "subject": subject, "choices": c, "answer": a} for q, c, a in ROWS[subject]]


def _write_jsonl(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for s in ROWS for r in _hub_records(s)))
    return path


def _write_csv(root: Path, subjects=None) -> Path:
    import csv

    for subject in subjects or ROWS:
        path = root / "mmlu" / "test" / f"{subject}_test.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            rows = ROWS.get(subject) or [(f"q about {subject}?", ["w", "x", "y", "z"], 1)]
            csv.writer(fh).writerows([[q, *c, "ABCD"[a]] for q, c, a in rows])
    return root


@pytest.mark.parametrize("subject", sorted(ROWS))
def test_requests_equal_lm_evals_own_mmlu_task(subject: str, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("lm_eval")
    from tests.unit.evaluation.test_lm_eval_tasks import _lm_eval_requests, _Recorder

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    # Execute: lm-eval's registered task on the hub-layout rows, ours on the same rows as our CSV layout
    theirs = _lm_eval_requests(f"mmlu_{subject}", _hub_records(subject), tmp_path)
    rec = _Recorder()
    evaluate(rec, [f"mmlu_{subject}"], data_dir=_write_csv(tmp_path / "data"))
    # Assert: description + question + lettered options, and " A".." D", string for string
    assert [tuple(p) for p in rec.pairs] == [tuple(p) for doc in theirs for p in doc]
    assert rec.pairs[0][0].startswith(f"The following are multiple choice questions (with answers) about "
                                      f"{subject.replace('_', ' ')}.\n\n")  # fmt: skip


def test_our_subject_categories_are_lm_evals() -> None:
    lm_eval = pytest.importorskip("lm_eval")
    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    theirs = {}
    for path in folder.glob("mmlu_*.yaml"):
        spec = yaml.safe_load(path.read_text())
        theirs[spec["dataset_name"]] = spec["tag"].removeprefix("mmlu_").removesuffix("_tasks")
    assert theirs == SUBJECTS and len(SUBJECTS) == 57


def test_group_scores_equal_lm_evals_aggregation_by_hand() -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr, unweighted_mean_stderr

    # a hand-made result table: three subjects in two categories, and the group over both
    results = {"a": {"acc": 0.5, "acc_stderr": 0.1, "n": 10}, "b": {"acc": 0.25, "acc_stderr": 0.2, "n": 30},
               "c": {"acc": 0.9, "acc_stderr": 0.05, "n": 20}}  # fmt: skip
    cat1, cat2 = GroupSpec(group="g1", tasks=["a", "b"]), GroupSpec(group="g2", tasks=["c"])
    top = GroupSpec(group="all", tasks=["g1", "g2"])
    from slmstack.evaluation.groups import GROUPS

    for g in (cat1, cat2, top):
        GROUPS._entries.pop(g.group, None)
        GROUPS.add(g.group, g)
    try:  # the table's members are plain names, not registered tasks: each is its own name
        scored = score_groups([cat1, cat2, top], results, lambda member: member)
    finally:
        for g in (cat1, cat2, top):
            GROUPS._entries.pop(g.group, None)
    g1_acc = aggregate_subtask_metrics([0.5, 0.25], [10, 30], True)
    g1_se = pooled_sample_stderr([0.1, 0.2], [10, 30])
    assert scored["g1"]["acc"] == pytest.approx(g1_acc) == pytest.approx((0.5 * 10 + 0.25 * 30) / 40)
    assert scored["g1"]["acc_stderr"] == pytest.approx(g1_se)
    top_acc = aggregate_subtask_metrics([g1_acc, 0.9], [40, 20], True)
    assert scored["all"]["acc"] == pytest.approx(top_acc) == pytest.approx((5 + 7.5 + 18) / 60)
    assert scored["all"]["acc_stderr"] == pytest.approx(pooled_sample_stderr([g1_se, 0.05], [40, 20]))
    assert scored["all"]["n"] == 60
    # unweighted: the plain mean of the means
    assert aggregate([0.5, 0.25], [0.1, 0.2], [10, 30], False) == pytest.approx(
        (aggregate_subtask_metrics([0.5, 0.25], [10, 30], False), unweighted_mean_stderr([0.1, 0.2]))
    )


def test_jsonl_layout_is_split_by_subject_and_csv_and_jsonl_agree(tmp_path: Path) -> None:
    jsonl = _write_jsonl(tmp_path / "j" / "mmlu" / "test.jsonl").parent.parent
    csv_dir = _write_csv(tmp_path / "c")
    for subject in ROWS:
        from_jsonl = [d.data for d in load_docs(get_task(f"mmlu_{subject}"), jsonl)]
        from_csv = [d.data for d in load_docs(get_task(f"mmlu_{subject}"), csv_dir)]
        assert from_jsonl == from_csv == _hub_records(subject)


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        (["q?", "a", "", "c", "d", "A"], "each choice non-empty"),
        (["q?", "a", "b", "c", "d"], "needs 6 cells"),
        (["q?", "a", "b", "c", "d", "E"], "the answer 'E' is not one of A, B, C, D"),
    ],  # fmt: skip
)
def test_a_bad_csv_row_is_one_clear_line(row, fragment, tmp_path: Path) -> None:
    import csv

    path = tmp_path / "mmlu" / "test" / "anatomy_test.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([["ok?", "a", "b", "c", "d", "B"], row])
    with pytest.raises(InputError, match="anatomy_test.csv:2") as err:
        load_docs(get_task("mmlu_anatomy"), tmp_path)
    assert fragment in str(err.value)


def test_missing_data_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"put the original CSVs at .*/mmlu/test/<subject>_test.csv"):
        load_docs(get_task("mmlu_anatomy"), tmp_path)


def test_cli_mmlu_reports_subjects_categories_and_the_whole(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = _write_csv(tmp_path / "data", subjects=list(SUBJECTS))
    out = tmp_path / "mmlu.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--tasks", "mmlu", "--data-dir", str(data), "--limit", "1",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert len(result["tasks"]) == 57 and set(result["groups"]) == {"mmlu", "mmlu_stem", "mmlu_humanities",
                                                                     "mmlu_social_sciences", "mmlu_other"}  # fmt: skip
    assert result["groups"]["mmlu"]["n"] == 57
    mean = sum(t["acc"] for t in result["tasks"].values()) / 57  # one item each: the group is the plain mean
    assert result["groups"]["mmlu"]["acc"] == pytest.approx(mean)
    assert "**mmlu** (4 tasks)" in capsys.readouterr().out


def test_description_reaches_the_prompt_and_filter_picks_rows(tmp_path: Path) -> None:
    from tests.unit.evaluation.test_lm_eval_tasks import _Recorder

    data = tmp_path / "t.jsonl"
    data.write_text('{"q": "one", "kind": "x", "g": 0}\n{"q": "two", "kind": "y", "g": 1}\n')
    spec = tmp_path / "t.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "kind": "multiple_choice", "data_file": str(data),
                                    "description": "About {{kind}}: ", "text": "{{q}}?", "choices": ["a", "b"],
                                    "gold": "g", "filter": {"kind": "y"}, "metrics": ["acc"]}))  # fmt: skip
    rec = _Recorder()
    assert evaluate(rec, [str(spec)])["tasks"]["t"]["n"] == 1  # the filter kept only the second row
    assert rec.pairs == [("About y: two?", " a"), ("About y: two?", " b")]
