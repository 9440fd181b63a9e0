r"""MMLU built in: ``mmlu`` (the group) and ``mmlu_<subject>`` for each of the 57 subjects, as lm-eval's ``mmlu`` task.

Prompt, choices and metric are lm-eval 0.4's default MMLU task (``tasks/mmlu/default``): the description
"The following are multiple choice questions (with answers) about {subject}.\\n\\n", then
"{question}\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\nAnswer:", choices " A" .. " D", ``acc``. The subjects form
lm-eval's four categories (``mmlu_stem``, ``mmlu_humanities``, ``mmlu_social_sciences``, ``mmlu_other``),
and ``mmlu`` groups those; every level is weighted by size, as lm-eval's group configs say.

Data, in the order they are looked for:

- with ``--data-dir DIR``: the original per-subject CSVs (no header; question, A, B, C, D, answer letter) at
  ``DIR/mmlu/test/<subject>_test.csv`` (or ``DIR/mmlu/<subject>_test.csv``, ``DIR/test/...``), else one JSONL
  with the hub's fields (``question``, ``subject``, ``choices``, ``answer``) at ``DIR/mmlu/test.jsonl``
  (or ``DIR/mmlu.jsonl``), each subject's rows picked by its ``subject`` field;
- without it: the hub's ``cais/mmlu`` (needs the hub).

``--subset tiny`` takes a seeded sample of 2 questions per subject (114 in all, the size of tinyMMLU, but not its
IRT-chosen items); ``--limit N`` the first N of each subject, as lm-eval's ``--limit``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from slmstack.errors import ConfigError, InputError
from slmstack.evaluation.groups import GroupSpec
from slmstack.evaluation.spec import Doc, HFSource, TaskSpec
from slmstack.io import check_input_file, guard_read, iter_jsonl

__all__ = ["CATEGORIES", "SUBJECTS", "load_mmlu", "mmlu_specs"]

# lm-eval's tasks/mmlu/_generate_configs.py SUBJECTS (a test checks this copy against its task YAMLs' tags)
SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
CATEGORIES = ("stem", "humanities", "social_sciences", "other")
LETTERS = "ABCD"
TEXT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"


def mmlu_specs() -> tuple[list[Any], list[Any]]:
    """The 57 subject tasks and the 5 groups (four categories and ``mmlu``)."""
    tasks = [
        TaskSpec(name=f"mmlu_{subject}", kind="multiple_choice", loader="mmlu", filter={"subject": subject},
                 hf=HFSource(path="cais/mmlu", name=subject, split="test"),
                 description=f"The following are multiple choice questions (with answers) about "
                             f"{subject.replace('_', ' ')}.\n\n",
                 text=TEXT, choices=list(LETTERS), gold="answer", metrics=["acc"], tiny_size=2)
        for subject in SUBJECTS
    ]  # fmt: skip
    groups = [GroupSpec(group=f"mmlu_{c}", alias=c.replace("_", " "),
                        tasks=[f"mmlu_{s}" for s, k in SUBJECTS.items() if k == c]) for c in CATEGORIES]  # fmt: skip
    groups.append(GroupSpec(group="mmlu", tasks=[f"mmlu_{c}" for c in CATEGORIES]))
    return tasks, groups


def _where(data_dir: Path, subject: str) -> Path | None:
    for rel in (f"mmlu/test/{subject}_test.csv", f"mmlu/{subject}_test.csv", f"test/{subject}_test.csv",
                f"{subject}_test.csv", "mmlu/test.jsonl", "mmlu.jsonl", "mmlu_test.jsonl"):  # fmt: skip
        if (data_dir / rel).is_file():
            return data_dir / rel
    return None


def load_mmlu(spec: Any, data_dir: str | Path | None) -> list[Any] | None:
    """One subject's records from the local CSV or JSONL layout (None: no --data-dir, so the hub is used).

    Raises:
        InputError: the data is not under ``data_dir`` (with where to put it), a row lacks a choice, or its
            answer is not A-D (or 0-3).
    """
    subject = (spec.filter or {}).get("subject")
    if not isinstance(subject, str) or not subject:
        raise ConfigError(f"task {spec.name!r}: loader mmlu reads one subject; add filter: {{subject: NAME}} "
                          "(e.g. anatomy) to the task YAML, or use the built-in task mmlu_<subject>")  # fmt: skip
    if data_dir is None:
        return None
    path = _where(Path(data_dir), subject)
    if path is None:
        raise InputError(
            f"MMLU data not found under {data_dir}: put the original CSVs at {data_dir}/mmlu/test/<subject>_test.csv "
            f"(question, A, B, C, D, answer; no header), or one JSONL with question, subject, choices and answer at "
            f"{data_dir}/mmlu/test.jsonl; or leave out --data-dir to read cais/mmlu from the hub"
        )
    if path.suffix == ".csv":
        check_input_file(path, "MMLU data file")
        with guard_read(path, "MMLU data file (CSV)"), path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        return [Doc(f"{path}:{i}", _csv_record(row, subject, f"{path}:{i}")) for i, row in enumerate(rows, 1) if row]
    return [Doc(f"{path}:{n}", _json_record(rec, f"{path}:{n}")) for n, rec in iter_jsonl(path)]


def _csv_record(row: list[str], subject: str, where: str) -> dict[str, Any]:
    if len(row) != 6 or not all(cell.strip() for cell in row[1:5]):
        raise InputError(f"{where}: an MMLU row needs 6 cells (question, A, B, C, D, answer), each choice non-empty; "
                         f"got {len(row)} cells. Fix or remove the row.")  # fmt: skip
    return {"question": row[0], "subject": subject, "choices": row[1:5], "answer": _answer(row[5], where)}


def _json_record(rec: dict[str, Any], where: str) -> dict[str, Any]:
    choices = rec.get("choices")
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) and c for c in choices):
        raise InputError(f"{where}: an MMLU record needs 'choices', a list of 4 non-empty strings. Fix the record.")
    if not isinstance(rec.get("question"), str) or not isinstance(rec.get("subject"), str):
        raise InputError(f"{where}: an MMLU record needs 'question' and 'subject' strings. Fix the record.")
    return {**rec, "answer": _answer(rec.get("answer"), where)}


def _answer(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS and value.strip():
        return LETTERS.index(value.strip().upper())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return value
    raise InputError(f"{where}: the answer {value!r} is not one of A, B, C, D (or 0-3). Fix the record.")
