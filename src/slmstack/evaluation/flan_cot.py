r"""Tasks with gold rationales, from FLAN v2's chain-of-thought data: ECQA, QASC, StrategyQA and CREAK.

Each ``<name>_train.tsv`` line is ``question \t answer \t rationale`` (newlines written as backslash-n); the
question of a multiple-choice set ends with ``\nOptions:\n- ...`` (QASC's and AQuA's options are ``(A) text`` and
the answer is the letter; SenseMaking's answer is ``Sentence A`` of ``Sentence A: "..."``). Every set is scored as
the other built-in multiple-choice tasks are: ``Question: {question}\nAnswer:`` then `` {option}``, with lm-eval's
``acc`` and ``acc_norm``, except the yes/no sets (StrategyQA, CREAK: no options, ``yes``/``no``), which report
``acc`` only: ``acc_norm`` divides by the answer's length in characters, 3 for "yes" and 2 for "no", and so favours
one answer. A template can name ``{{options_text}}``, the options one a line (the harness adds it to every
multiple-choice record). SenseMaking and AQuA are read whole, as retrieval corpora only (no test split).
Each record keeps its ``rationale``, which the task names as its gold text (``gold_text``), for
``slmstack attribute``'s oracle and for training the stages of a stack.

Splits are seeded and fixed: questions are deduplicated by their normalised text, shuffled with
:data:`SPLIT_SEED`, and the first :data:`HELDOUT` of each set are the held-out test (the built-in tasks ``ecqa``,
``qasc``, ``strategyqa``, ``creak``); the rest is the training pool (:func:`flan_cot_split`). ECQA's questions
are CommonsenseQA questions, 794 of them (normalised) from CommonsenseQA's dev split: those are removed from ECQA
entirely (its training pool and its test), so ``commonsenseqa_clean`` (CommonsenseQA dev, all 1,221 questions,
scored on the option texts as ECQA is) is a test that no ECQA row holds.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from slmstack.errors import InputError
from slmstack.evaluation.spec import Doc, TaskSpec
from slmstack.io import check_input_file, read_text

__all__ = [
    "CORPUS_ONLY",
    "FLAN_COT",
    "HELDOUT",
    "SPLIT_SEED",
    "YES_NO",
    "flan_cot_specs",
    "flan_cot_split",
    "read_flan_cot",
]

FLAN_COT = ("ecqa", "qasc", "strategyqa", "creak")  # the sets with a held-out test (built-in tasks)
CORPUS_ONLY = ("sensemaking", "aqua")  # read whole: a retrieval corpus's rationales, never a test
HELDOUT = {"ecqa": 1000, "qasc": 300, "strategyqa": 400, "creak": 1000}
YES_NO = ("strategyqa", "creak")  # options yes/no: scored with acc (acc_norm divides by 3 vs 2 characters)
SPLIT_SEED = 2026
CSQA_DEV = "commonsenseqa/dev_rand_split.jsonl"
TEXT = "Question: {{question}}\nAnswer:"


def normalise(question: str) -> str:
    """Lower case, single spaces: how questions are compared for duplicates and overlaps."""
    return re.sub(r"\s+", " ", question.replace("\\n", " ").strip().lower())


def _parse(line: str, where: str, name: str) -> dict[str, Any]:
    fields = line.split("\t")
    if len(fields) != 3 or not all(f.strip() for f in fields):
        raise InputError(f"{where}: a {name} line needs three tab-separated fields (question, answer, rationale)")
    question, answer, rationale = (f.replace("\\n", "\n").strip() for f in fields)
    if "\nOptions:\n" in question:
        question, _, listed = question.partition("\nOptions:\n")
        options = [o.removeprefix("- ").strip() for o in listed.split("\n") if o.strip()]
    else:
        options = ["yes", "no"]
    if name == "sensemaking":  # options 'Sentence A: "..."', answer "Sentence A"
        match = [o for o in options if o.startswith(answer + ":")]
        answer = match[0] if len(match) == 1 else answer
    if name in ("qasc", "aqua"):  # "(A) text" options, answer "(D)"
        lettered = [_LETTERED.fullmatch(o) for o in options]
        if not options or not all(lettered):
            raise InputError(
                f"{where}: a {name} option must read '(A) text'; got {options[:2]}. Fix or remove the line."
            )
        letters = [m.group(1) for m in lettered]
        options = [m.group(2).strip() for m in lettered]
        answer = options[letters.index(answer.strip("()"))] if answer.strip("()") in letters else answer
    if answer not in options:
        raise InputError(f"{where}: the answer {answer!r} is not one of the options {options}")
    return {"question": question.strip(), "options": options, "gold": options.index(answer), "answer": answer,
            "rationale": rationale}  # fmt: skip


_LETTERED = re.compile(r"\(([A-Z])\)\s*(\S.*)")  # "(A) text": QASC, AQuA (whose texts may start after 2 spaces)


def _csqa_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` of each CommonsenseQA line, checked: ``question.stem``, ``question.choices``, ``answerKey``.

    Raises:
        InputError: naming the line that is not valid JSON or lacks one of those fields.
    """
    out = []
    for number, line in enumerate(read_text(path, "CommonsenseQA dev file").split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            r = json.loads(line)
            stem, choices = r["question"]["stem"], r["question"]["choices"]
            labels = [c["label"] for c in choices]
            record = {"question": stem, "options": [c["text"] for c in choices], "gold": labels.index(r["answerKey"]),
                      "id": r.get("id", f"csqa-{number}")}  # fmt: skip
            if not isinstance(stem, str) or not all(isinstance(o, str) for o in record["options"]):
                raise TypeError("stem and choice texts must be strings")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise InputError(f"{where}: not a CommonsenseQA record (needs question.stem, question.choices with label "
                             f"and text, and an answerKey among the labels; {type(exc).__name__}: {exc}). "
                             "Fix or remove the line.") from None  # fmt: skip
        out.append((where, record))
    return out


def _csqa_dev_questions(data_dir: Path) -> set[str] | None:
    path = data_dir / CSQA_DEV
    if not path.is_file():
        return None
    return {normalise(r["question"]) for _, r in _csqa_records(path)}


def read_flan_cot(name: str, data_dir: str | Path) -> list[dict[str, Any]]:
    """Every distinct question of ``<name>_train.tsv`` under ``data_dir/flan_cot`` (ECQA: without CommonsenseQA dev's).

    Raises:
        InputError: the file is missing (saying where it goes), or a line is malformed (naming it).
    """
    data_dir = Path(data_dir)
    path = check_input_file(data_dir / "flan_cot" / f"{name}_train.tsv", f"{name} data (FLAN CoT TSV)",
                            f"Put FLAN v2's cot_data/{name}_train.tsv at {data_dir}/flan_cot/.")  # fmt: skip
    seen, rows = set(), []
    excluded = _csqa_dev_questions(data_dir) if name == "ecqa" else set()
    if excluded is None:
        raise InputError(
            f"{data_dir / CSQA_DEV}: ECQA is split against CommonsenseQA dev, which is missing; put "
            "dev_rand_split.jsonl there so that no CommonsenseQA dev question lands in ECQA"
        )
    for number, line in enumerate(read_text(path, f"{name} data").split("\n"), start=1):
        if not line.strip():
            continue
        record = _parse(line, f"{path}:{number}", name)
        key = normalise(record["question"])
        if key in seen or key in excluded:
            continue
        seen.add(key)
        rows.append({**record, "id": f"{name}-{number}"})
    return rows


def flan_cot_split(name: str, data_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, test)``: the seeded held-out split of one set (the same on every machine)."""
    rows = read_flan_cot(name, data_dir)
    order = list(range(len(rows)))
    random.Random(f"{SPLIT_SEED}/{name}").shuffle(order)
    n = min(HELDOUT[name], len(rows) // 2)
    return [rows[i] for i in sorted(order[n:])], [rows[i] for i in sorted(order[:n])]


def load_flan_cot(spec: Any, data_dir: str | Path | None) -> list[Any]:
    """The held-out test of the set the task is named after (a ``LOADERS`` entry)."""
    if data_dir is None:
        raise InputError(f"task {spec.name!r} reads FLAN's CoT files: pass --data-dir (the folder holding flan_cot/)")
    return [Doc(f"{spec.name} {r['id']}", r) for r in flan_cot_split(spec.name, data_dir)[1]]


def load_commonsenseqa_clean(spec: Any, data_dir: str | Path | None) -> list[Any]:
    """CommonsenseQA dev, options as texts (ECQA, which held 794 of its questions, is read without them)."""
    if data_dir is None:
        raise InputError("task 'commonsenseqa_clean' needs --data-dir (the folder holding commonsenseqa/)")
    path = check_input_file(Path(data_dir) / CSQA_DEV, "CommonsenseQA dev file")
    return [Doc(where, {**r, "answer": r["options"][r["gold"]]}) for where, r in _csqa_records(path)]


def flan_cot_specs() -> list[Any]:
    """The built-in tasks: the four held-out sets and ``commonsenseqa_clean``."""
    specs = [TaskSpec(name=name, kind="multiple_choice", loader="flan_cot", text=TEXT, choices="options",
                      gold="gold", gold_text="rationale", about=f"FLAN v2 CoT {name}, the held-out split",
                      metrics=["acc"] if name in YES_NO else ["acc", "acc_norm"])
             for name in FLAN_COT]  # fmt: skip
    specs.append(TaskSpec(name="commonsenseqa_clean", kind="multiple_choice", loader="commonsenseqa_clean",
                          text=TEXT, choices="options", gold="gold",
                          about="CommonsenseQA dev, scored on the option texts (no ECQA row holds it)"))  # fmt: skip
    return specs
