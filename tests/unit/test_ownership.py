"""The ownership rule: a folder or file is written only when it proves it is slmstack's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmstack.errors import InputError
from slmstack.io import save_figure
from slmstack.ownership import (
    LEGACY,
    MARKER,
    chart_proof,
    check_dir_ours,
    check_file_ours,
    claim_dir,
    first_line_proof,
    json_fields,
)


def test_a_new_or_empty_folder_is_claimed_with_a_marker(tmp_path: Path) -> None:
    # Execute
    new = claim_dir(tmp_path / "new", "train", "--out")
    (tmp_path / "empty").mkdir()
    empty = claim_dir(tmp_path / "empty", "train", "--out")
    # Assert: both marked as train's, and train may claim them again
    for folder in (new, empty):
        assert json.loads((folder / MARKER).read_text()) == {"written_by": "slmstack", "verb": "train"}
        assert claim_dir(folder, "train", "--out") == folder


def test_a_folder_of_another_verb_or_of_the_user_is_refused(tmp_path: Path) -> None:
    claim_dir(tmp_path / "d", "distill", "--out")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds the output of slmstack distill, not train"):
        check_dir_ours(tmp_path / "d", "train", "--out")
    with pytest.raises(InputError, match="not empty and was not written by slmstack train"):
        claim_dir(tmp_path / "user", "train", "--out")
    assert sorted(p.name for p in (tmp_path / "user").iterdir()) == ["notes.txt"]  # no marker was added


def test_a_folder_from_before_markers_proves_itself_by_its_record_fields(tmp_path: Path) -> None:
    # Prepare: an old train run (run.json with its fields), and a user's folder that happens to hold a run.json
    old, user = tmp_path / "old", tmp_path / "user"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"stack": {}, "data": "abc", "stages": ["a"]}))
    user.mkdir()
    (user / "run.json").write_text('{"my": "settings"}')
    # Execute / Assert
    assert check_dir_ours(old, "train", "--out", LEGACY["train"]) == old
    with pytest.raises(InputError, match="not written by slmstack train"):
        check_dir_ours(user, "train", "--out", LEGACY["train"])


def test_a_damaged_marker_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / MARKER).write_text('{"verb": "train"}')  # no written_by
    with pytest.raises(InputError, match="not an slmstack output marker"):
        check_dir_ours(tmp_path / "d", "train", "--out")


def test_a_file_is_written_only_when_its_content_proves_it(tmp_path: Path) -> None:
    results, report = tmp_path / "r.json", tmp_path / "r.md"
    assert check_file_ours(results, "results", json_fields("tasks")) == results  # new: fine
    results.write_text('{"tasks": {}}')
    report.write_text("<!-- ours -->\n| table |\n")
    assert check_file_ours(results, "results", json_fields("tasks")) == results
    assert check_file_ours(report, "report", first_line_proof("<!-- ours -->")) == report
    for path, proof, text in ((results, json_fields("tasks"), '{"mine": 1}'), (results, json_fields("tasks"), "[1"),
                              (report, first_line_proof("<!-- ours -->"), "| table |\n<!-- ours -->\n")):  # fmt: skip
        path.write_text(text)
        with pytest.raises(InputError, match="left untouched"):
            check_file_ours(path, "thing", proof)
        assert path.read_text() == text


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_a_chart_slmstack_saved_proves_itself_and_a_foreign_one_does_not(tmp_path: Path, suffix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Prepare: one chart through save_figure, one through plain matplotlib
    ours, theirs = tmp_path / f"ours{suffix}", tmp_path / f"theirs{suffix}"
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    save_figure(fig, ours)
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    fig.savefig(theirs)
    plt.close(fig)
    # Assert
    assert chart_proof(ours.read_bytes())
    assert not chart_proof(theirs.read_bytes())
    assert not chart_proof(b"slmstack, but not a chart")
    assert not list(tmp_path.glob(".*"))  # no temp file left behind
