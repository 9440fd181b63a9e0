"""Task specs: a small YAML plus a data source, in a registry that users extend with their own YAML.

Kinds: ``multiple_choice`` (log-likelihood of each choice; ``acc`` and lm-eval's ``acc_norm``),
``loglikelihood`` (one target continuation: greedy ``acc`` and ``perplexity``, as LAMBADA),
``generative`` (greedy generation, answer-extraction regex, exact match) and ``perplexity`` (rolling
log-likelihood; word, byte and token perplexity). Templates are Jinja2 over the record, as in lm-eval.
"""

from __future__ import annotations

import csv
import json
import random
import re
from importlib import resources
from pathlib import Path
from typing import Any

from slmstack.config import build_dataclass, load_yaml
from slmstack.errors import ConfigError, InputError
from slmstack.evaluation.spec import (
    KIND_METRICS,
    PREPROCESSORS,
    Doc,
    HFSource,
    TaskSpec,
    compile_template,
)
from slmstack.io import check_input_file, guard_read, read_json, read_text
from slmstack.registry import Registry

__all__ = ["KIND_METRICS", "LOADERS", "PREPROCESSORS", "TASKS", "Doc", "HFSource", "TaskSpec", "compile_template",
           "ensure_builtins", "get_task", "load_docs", "load_task_file"]  # fmt: skip

TINY_SIZE = 100
TINY_SEED = 1234


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


_LAST_SENTENCE_END = re.compile(r".*[.!?]\s+", re.DOTALL)


def split_hellaswag_ctx(ctx: str) -> tuple[str, str, str]:
    """``(activity_label, ctx_a, ctx_b)`` of a local HellaSwag ``ctx`` (``"label: ctx_a ctx_b"``).

    The local file joined the hub's ``ctx_a`` and ``ctx_b`` and so lost where ``ctx_b`` starts, which
    lm-eval needs: it capitalises ``ctx_b``. ActivityNet items end in ``ctx_b``, an unfinished sentence
    (no final ``.``, ``!`` or ``?``): it is what follows the last sentence end. WikiHow items end with a
    finished sentence and have an empty ``ctx_b``. (In the 10,042-item validation file, 3,243 contexts end
    unfinished; every other one ends with a sentence end.)
    """
    label, _, rest = ctx.partition(": ")
    if rest.rstrip()[-1:] in (".", "!", "?"):
        return label, rest, ""
    head = _LAST_SENTENCE_END.match(rest)
    return (label, rest[: head.end()].rstrip(), rest[head.end() :]) if head else (label, "", rest)


@PREPROCESSORS.register("hellaswag")
def _hellaswag(doc: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``hellaswag/utils.py`` ``process_docs``, on the hub layout or the local one (``ctx`` only)."""
    if "ctx_a" in doc:
        label, ctx_a, ctx_b = doc["activity_label"], doc["ctx_a"], doc["ctx_b"]
    else:
        label, ctx_a, ctx_b = split_hellaswag_ctx(doc["ctx"])
    ctx = ctx_a + " " + ctx_b.capitalize()
    return {"query": _hellaswag_text(label + ": " + ctx), "choices": [_hellaswag_text(e) for e in doc["endings"]],
            "gold": int(doc["label"])}  # fmt: skip


@PREPROCESSORS.register("arc_local")
def _arc_local(doc: dict[str, Any]) -> dict[str, Any]:
    """The local ARC files pad some 3-option questions with a repeat of an option; the hub's data has none."""
    choices = list(dict.fromkeys(doc["choices"]))  # first occurrences, in order
    gold = choices.index(doc["choices"][int(doc["gold"])])
    return {**doc, "choices": choices, "gold": gold}


@PREPROCESSORS.register("arc_hf")
def _arc_hf(doc: dict[str, Any]) -> dict[str, Any]:
    """allenai/ai2_arc -> query/choices/gold."""
    labels = doc["choices"]["label"]
    return {"query": "Question: " + doc["question"], "choices": doc["choices"]["text"],
            "gold": labels.index(doc["answerKey"])}  # fmt: skip


@PREPROCESSORS.register("labelled_choices")
def _labelled_choices(doc: dict[str, Any]) -> dict[str, Any]:
    """CommonsenseQA/OpenBookQA original layout: question.stem, question.choices[{label,text}], answerKey."""
    question = doc["question"]
    choices = question["choices"] if isinstance(question, dict) else doc["choices"]
    stem = question["stem"] if isinstance(question, dict) else question
    labels = [c["label"] for c in choices]
    return {"query": stem, "choices": [c["text"] for c in choices], "labels": labels,
            "gold": labels.index(doc["answerKey"].strip())}  # fmt: skip


@PREPROCESSORS.register("piqa_hf")
def _piqa_hf(doc: dict[str, Any]) -> dict[str, Any]:
    return {"query": f"Question: {doc['goal']}\n", "choices": [doc["sol1"], doc["sol2"]], "gold": int(doc["label"])}


@PREPROCESSORS.register("winogrande_hf")
def _winogrande_hf(doc: dict[str, Any]) -> dict[str, Any]:
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return {"context_options": [doc["sentence"][:idx] + o for o in options],
            "continuation": doc["sentence"][idx + 1 :].strip(), "gold": int(doc["answer"]) - 1}  # fmt: skip


@PREPROCESSORS.register("boolq_hf")
def _boolq_hf(doc: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``super_glue/boolq/default.yaml``: passage, newline, ``Question: {{question}}?``."""
    return {"query": f"{doc['passage']}\nQuestion: {doc['question']}?", "choices": ["no", "yes"],
            "gold": int(doc["label"])}  # fmt: skip


@PREPROCESSORS.register("boolq_local")
def _boolq_local(doc: dict[str, Any]) -> dict[str, Any]:
    """The local file's query without the ``Passage: `` prefix, which lm-eval does not write."""
    query = doc["query"]
    return {**doc, "query": query[len("Passage: ") :] if query.startswith("Passage: ") else query}


def _copa_choice(choice: str) -> str:
    """lm-eval's ``super_glue/copa/utils.py``: ``" " + convert_choice(choice)`` (first letter lower-cased)."""
    return " " + choice[0].lower() + choice[1:]


@PREPROCESSORS.register("copa_hf")
def _copa_hf(doc: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's COPA: the premise without its final period, then `` because``/`` therefore``."""
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    choices = [_copa_choice(c) for c in (doc["choice1"], doc["choice2"])]
    return {"query": doc["premise"].strip()[:-1] + f" {connector}", "choices": choices, "gold": int(doc["label"])}


@PREPROCESSORS.register("copa_local")
def _copa_local(doc: dict[str, Any]) -> dict[str, Any]:
    """The local ``"premise, because"`` loses the comma lm-eval does not write; choices as lm-eval's."""
    query = re.sub(r",\s+(because|therefore)$", r" \1", doc["query"].strip())
    return {"query": query, "choices": [_copa_choice(c) for c in doc["choices"]], "gold": int(doc["gold"])}


@PREPROCESSORS.register("lambada_hf")
def _lambada_hf(doc: dict[str, Any]) -> dict[str, Any]:
    context, _, word = doc["text"].rpartition(" ")
    return {"context": context, "continuation": word}


@PREPROCESSORS.register("wikitext")
def _wikitext(doc: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's wikitext detokenizer; word counts use the original page."""
    return {"text": wikitext_detokenize(doc["page"]), "page": doc["page"]}


def wikitext_detokenize(string: str) -> str:
    """lm-eval's ``wikitext_detokenizer``."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    string = string.replace(" : ", ": ").replace(" ; ", "; ").replace(" . ", ". ").replace(" ! ", "! ")
    string = string.replace(" ? ", "? ").replace(" , ", ", ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n").replace("\n ", "\n")
    string = string.replace(" N ", " 1 ").replace(" 's", "'s")
    return string


TASKS: Registry[TaskSpec] = Registry("task")
# Data finders, by name: a task whose data is not one file (MMLU's per-subject CSVs) names one in ``loader``.
LOADERS: Registry[Any] = Registry("task data loader")


def load_task_file(path: str | Path) -> TaskSpec:
    """Read one task YAML (strict: unknown fields are errors naming the file)."""
    return build_dataclass(TaskSpec, load_yaml(path), source=path)


def ensure_builtins() -> None:
    """Register the built-in tasks and groups (once)."""
    if not len(TASKS):
        _register_builtins()


def _register_builtins() -> None:
    from slmstack.evaluation.flan_cot import flan_cot_specs, load_commonsenseqa_clean, load_flan_cot
    from slmstack.evaluation.groups import GROUPS
    from slmstack.evaluation.mmlu import load_mmlu, mmlu_specs

    root = resources.files("slmstack.evaluation") / "specs"
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            spec = load_task_file(Path(str(entry)))
            TASKS.add(spec.name, spec)
    tasks, groups = mmlu_specs()
    for spec in tasks + flan_cot_specs():
        TASKS.add(spec.name, spec)
    for group in groups:
        GROUPS.add(group.group, group)
    LOADERS.add("mmlu", load_mmlu)
    LOADERS.add("flan_cot", load_flan_cot)
    LOADERS.add("commonsenseqa_clean", load_commonsenseqa_clean)


def get_task(name_or_path: str) -> TaskSpec:
    """A built-in task by name, or a user's task YAML by path; an unknown name lists the known ones."""
    ensure_builtins()
    if name_or_path.endswith((".yaml", ".yml")):
        return load_task_file(name_or_path)
    return TASKS.get(name_or_path)


# ---------------------------------------------------------------- data
def _read_file(path: Path, kind: str) -> list[Doc]:
    check_input_file(path, "task data file", "Check --data-dir, or the task's data_file.")
    if path.suffix == ".raw" or (kind == "perplexity" and path.suffix == ".txt"):
        return _split_wiki_pages(path)
    if path.suffix == ".csv":
        with guard_read(path, "task data file (CSV)"), path.open(newline="", encoding="utf-8") as fh:
            return [Doc(f"{path}:{i + 2}", row) for i, row in enumerate(csv.DictReader(fh))]
    if path.suffix == ".json":
        data = read_json(path, "task data file")
        if not isinstance(data, list):
            raise InputError(f"{path}: a .json task data file must hold a list of records")
        return [Doc(f"{path} record {i}", rec) for i, rec in enumerate(data)]
    docs = []
    # split on "\n" only: JSON strings may hold U+0085, U+2028 and U+2029, which str.splitlines splits on
    for number, line in enumerate(read_text(path, "task data file").split("\n"), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise InputError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            docs.append(Doc(f"{path}:{number}", record))
    return docs


_HEADING = re.compile(r"^ = [^=].* = $")


def _split_wiki_pages(path: Path) -> list[Doc]:
    """Split raw WikiText into articles at top-level headings, as the document-level dataset does."""
    pages: list[list[str]] = []
    for line in read_text(path, "text file").splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\n")) or not pages:
            pages.append([])
        pages[-1].append(line)
    return [Doc(f"{path} page {i}", {"page": "".join(p)}) for i, p in enumerate(pages) if "".join(p).strip()]


def load_docs(spec: TaskSpec, data_dir: str | Path | None = None) -> list[Doc]:
    """Read the task's records: ``data_dir/data_file`` when given, else the hub, then filter and preprocess them."""
    found = LOADERS.get(spec.loader)(spec, data_dir) if spec.loader else None
    if found is not None:
        docs, convert = found, spec.preprocess
    elif spec.data_file and (data_dir is not None or Path(spec.data_file).is_absolute()):
        docs = _read_file(Path(data_dir or "/") / spec.data_file, spec.kind)
        convert = spec.preprocess
    elif spec.hf is not None:
        docs, convert = _read_hf(spec.hf), spec.hf.preprocess
    elif spec.data_file:
        docs, convert = _read_file(Path(spec.data_file), spec.kind), spec.preprocess
    else:
        raise ConfigError(f"task {spec.name!r} has neither data_file nor hf; add one to its YAML")
    if spec.filter:
        docs = [d for d in docs if all(d.data.get(k) == v for k, v in spec.filter.items())]
    if convert:
        fn = PREPROCESSORS.get(convert)
        out = []
        for d in docs:
            try:
                out.append(Doc(d.where, fn(d.data)))
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                raise InputError(f"{d.where}: record lacks what task {spec.name!r} needs ({exc!r})") from None
        docs = out
    if not docs:
        raise InputError(f"task {spec.name!r}: the data holds no records")
    return docs


def _read_hf(src: HFSource) -> list[Doc]:
    try:
        import datasets
    except ImportError:
        raise InputError("loading a task from the hub needs the datasets package; or pass --data-dir") from None
    try:
        data = datasets.load_dataset(src.path, src.name, split=src.split)
    except Exception as exc:  # the hub raises many types; all mean "not loadable here"
        raise InputError(
            f"could not load {src.path} ({src.name}) from the Hugging Face hub ({type(exc).__name__}). "
            "Offline, pass --data-dir with the task files."
        ) from None
    return [Doc(f"{src.path} row {i}", dict(row)) for i, row in enumerate(data)]


def select_subset(docs: list[Doc], subset: str | None, limit: int | None, tiny_size: int = TINY_SIZE) -> list[Doc]:
    """``tiny``: a fixed, seeded sample of ``tiny_size`` records (the same everywhere); ``limit``: the first N then."""
    if subset == "tiny" and len(docs) > tiny_size:
        keep = sorted(random.Random(TINY_SEED).sample(range(len(docs)), tiny_size))
        docs = [docs[i] for i in keep]
    elif subset not in (None, "tiny", "full"):
        raise ConfigError(f"--subset {subset!r}: use tiny or full")
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit {limit}: the subset would be empty; use a positive number")
        docs = docs[:limit]
    if not docs:
        raise InputError("the selected subset is empty")
    return docs
