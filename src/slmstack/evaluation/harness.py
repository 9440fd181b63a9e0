"""Run tasks on a target and report lm-eval's metrics, standard errors, and the cost of the run."""

from __future__ import annotations

import logging
import math
import re
import resource
import time
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, UndefinedError

from slmstack.errors import InputError
from slmstack.evaluation.groups import expand as expand_tasks
from slmstack.evaluation.groups import score_groups
from slmstack.evaluation.scorer import perplexities
from slmstack.evaluation.targets import EvalTarget, extract, normalize_answer
from slmstack.evaluation.tasks import (
    TINY_SEED,
    Doc,
    TaskSpec,
    compile_template,
    ensure_builtins,
    get_task,
    load_docs,
    select_subset,
)
from slmstack.io import atomic_write_json, atomic_write_text
from slmstack.ownership import check_file_ours, first_line_proof, json_fields
from slmstack.version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "check_results_paths",
    "options_text",
    "evaluate",
    "markdown_table",
    "mean_stderr",
    "multiple_choice_items",
    "task_context",
    "write_results",
]

MAIN_METRIC = ["acc_norm", "acc", "exact_match", "word_perplexity"]


def mean_stderr(values: list[float]) -> float:
    """lm-eval's standard error of a mean: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def _render(template: str, doc: Doc, task: str, extra: dict[str, Any] | None = None) -> str:
    try:
        return compile_template(template).render(**{**(extra or {}), **doc.data})
    except UndefinedError as exc:
        raise InputError(f"{doc.where}: task {task!r} needs a field the record lacks ({exc.message})") from None
    except (TemplateError, TypeError, ValueError, ArithmeticError) as exc:  # an operation the record's values reject
        raise InputError(f"{doc.where}: task {task!r}'s template fails on this record "
                         f"({type(exc).__name__}: {exc})") from None  # fmt: skip


def task_context(spec: TaskSpec, doc: Doc) -> str:
    """The task's description (lm-eval's prompt prefix), then its text, both rendered on the record.

    A multiple-choice task's templates may also name ``options_text``: the choices, one ``- choice`` a line (unless
    the record has a field of that name), so that every stage of a stack can see the options.
    """
    extra = {"options_text": options_text(_choices(spec, doc))} if spec.kind == "multiple_choice" else None
    return _render(spec.description, doc, spec.name, extra) + _render(spec.text, doc, spec.name, extra)


def options_text(choices: list[str]) -> str:
    """The options as a prompt lists them: ``- choice`` one a line."""
    return "\n".join(f"- {c}" for c in choices)


def _field(doc: Doc, name: str, task: str) -> Any:
    if name not in doc.data:
        raise InputError(f"{doc.where}: task {task!r} needs field {name!r} (keys: {', '.join(doc.data)})")
    return doc.data[name]


def _choices(spec: TaskSpec, doc: Doc) -> list[str]:
    choices = spec.choices if isinstance(spec.choices, list) else _field(doc, spec.choices, spec.name)
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise InputError(f"{doc.where}: task {spec.name!r} needs a non-empty list of text choices, got {choices!r}")
    return list(choices)


def _gold_index(spec: TaskSpec, doc: Doc, n_choices: int) -> int:
    """The gold choice index; an index that is not an integer in range is an error, never scored."""
    gold = _field(doc, spec.gold, spec.name)
    if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
        gold = int(gold)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n_choices:
        raise InputError(
            f"{doc.where}: task {spec.name!r}: gold {gold!r} (field {spec.gold!r}) is not a choice index; "
            f"it must be an integer from 0 to {n_choices - 1}. Fix the record or the task's 'gold' field."
        )
    return gold


def _accuracy(values: dict[str, list[float]]) -> dict[str, float]:
    out = {}
    for name, vals in values.items():
        out[name] = sum(vals) / len(vals)
        out[f"{name}_stderr"] = mean_stderr(vals)
    return out


def _multiple_choice(spec: TaskSpec, docs: list[Doc], target: EvalTarget, scorer: Any) -> dict[str, float]:
    return _accuracy(multiple_choice_items(spec, docs, target, scorer))


def multiple_choice_items(spec: TaskSpec, docs: list[Doc], target: EvalTarget, scorer: Any) -> dict[str, list[float]]:
    """Each item's 0/1 score under each of the task's metrics (``acc``, ``acc_norm``), in the order of ``docs``."""
    pairs, spans, golds, lengths = [], [], [], []
    if spec.partial:  # each choice is a context; the continuation is shared
        contexts = [_render(spec.description, d, spec.name) + c for d in docs for c in _choices(spec, d)]
        prepared, delim = target.prepare(contexts, spec.target_delimiter)
        it = iter(prepared)
        for d in docs:
            cont = str(_field(d, spec.continuation, spec.name))
            n = len(_choices(spec, d))
            spans.append((len(pairs), len(pairs) + n))
            pairs += [(next(it), delim + cont) for _ in range(n)]
            lengths.append([float(len(cont))] * n)
            golds.append(_gold_index(spec, d, n))
    else:
        fields = [{"options": options_text(_choices(spec, d))} for d in docs]  # for stacks whose stages list them
        prepared, delim = target.prepare([task_context(spec, d) for d in docs], spec.target_delimiter, fields)
        for d, ctx in zip(docs, prepared, strict=True):
            choices = _choices(spec, d)
            spans.append((len(pairs), len(pairs) + len(choices)))
            pairs += [(ctx, delim + c) for c in choices]
            lengths.append([float(len(c)) for c in choices])  # lm-eval normalises by characters
            golds.append(_gold_index(spec, d, len(choices)))
    lls = [ll for ll, _ in scorer.loglikelihood(pairs)]
    acc, acc_norm = [], []
    for (a, b), gold, lens in zip(spans, golds, lengths, strict=True):
        scores = lls[a:b]
        acc.append(float(max(range(len(scores)), key=scores.__getitem__) == gold))
        normed = [s / n for s, n in zip(scores, lens, strict=True)]
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == gold))
    wanted = {"acc": acc, "acc_norm": acc_norm}
    return {m: wanted[m] for m in spec.metrics if m in wanted}


def _loglikelihood(spec: TaskSpec, docs: list[Doc], target: EvalTarget, scorer: Any) -> dict[str, float]:
    prepared, delim = target.prepare([task_context(spec, d) for d in docs], spec.target_delimiter)
    pairs = [(ctx, delim + str(_field(d, spec.gold, spec.name))) for d, ctx in zip(docs, prepared, strict=True)]
    results = scorer.loglikelihood(pairs)
    out = _accuracy({"acc": [float(greedy) for _, greedy in results]})
    out["perplexity"] = math.exp(-sum(ll for ll, _ in results) / len(results))  # lm-eval: exp(-mean ll)
    return out


def _generative(spec: TaskSpec, docs: list[Doc], target: EvalTarget, batch_size: int) -> dict[str, float]:
    contexts = [task_context(spec, d) for d in docs]
    answers = target.generate(contexts, spec.until, spec.max_new_tokens, batch_size)

    def norm(text: str) -> str:
        return normalize_answer(text, spec.ignore_regexes, spec.ignore_case)

    golds = [norm(extract(spec.gold_regex, str(_field(d, spec.gold, spec.name)))) for d in docs]
    strict = [float(norm(extract(spec.answer_regex, a)) == g) for a, g in zip(answers, golds, strict=True)]
    flexible = [float(norm(extract(spec.flexible_regex, a, group_select=-1)) == g)
                for a, g in zip(answers, golds, strict=True)]  # fmt: skip
    wanted = {"exact_match": strict, "exact_match_flexible": flexible}
    return _accuracy({m: wanted[m] for m in spec.metrics if m in wanted})


def _perplexity(spec: TaskSpec, docs: list[Doc], scorer: Any) -> dict[str, float]:
    total_ll, words, nbytes, tokens = 0.0, 0, 0, 0
    for d in docs:
        text = str(_field(d, spec.text_field, spec.name))
        ll, n_tokens = scorer.loglikelihood_rolling(text)
        total_ll, tokens = total_ll + ll, tokens + n_tokens
        words += len(re.split(r"\s+", text))  # lm-eval's count_words
        nbytes += len(text.encode("utf-8"))
    return {k: v for k, v in perplexities(total_ll, words, nbytes, tokens).items() if k in spec.metrics}


def evaluate(
    target: EvalTarget,
    tasks: list[str],
    data_dir: str | Path | None = None,
    subset: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Evaluate ``target`` zero-shot on each task.

    Args:
        target: a :class:`ModelTarget` or :class:`StackTarget`.
        tasks: built-in task names or paths to task YAML files.
        data_dir: a folder holding the tasks' ``data_file`` layouts (else the hub is used).
        subset: ``tiny`` for the fixed, seeded 100-item subset; None or ``full`` for all.
        limit: at most this many items per task (after the subset).
        batch_size: log-likelihood requests (or generations) per forward pass.

    Returns:
        ``{"target", "tasks": {name: {metrics..., n, spec_hash, subset, seed}}, "cost"}``.
    """
    ensure_builtins()
    names, groups = expand_tasks(tasks)
    specs = [get_task(t) for t in names]  # unknown names fail before any work
    start = time.perf_counter()
    scorer = target.scorer(batch_size)
    generated_tokens = 0
    results: dict[str, Any] = {}
    for spec in specs:
        docs = select_subset(load_docs(spec, data_dir), subset, limit, spec.tiny_size)
        logger.info("task %s: %d items", spec.name, len(docs))
        t0 = time.perf_counter()
        if spec.kind == "multiple_choice":
            metrics = _multiple_choice(spec, docs, target, scorer)
        elif spec.kind == "loglikelihood":
            metrics = _loglikelihood(spec, docs, target, scorer)
        elif spec.kind == "generative":
            metrics = _generative(spec, docs, target, batch_size)
            generated_tokens += len(docs) * spec.max_new_tokens
        else:
            if target.identity.get("kind") == "stack":
                raise InputError(f"task {spec.name!r} measures perplexity of a model; evaluate --model, not a stack")
            metrics = _perplexity(spec, docs, scorer)
        seconds = round(time.perf_counter() - t0, 2)
        results[spec.name] = {**metrics, "n": len(docs), "spec_hash": spec.spec_hash(), "subset": subset or "full",
                              "seed": TINY_SEED if subset == "tiny" else None, "seconds": seconds}  # fmt: skip
    wall = time.perf_counter() - start
    tokens = scorer.tokens_processed + getattr(target, "upstream_tokens", 0)
    cost = {"parameters": {k: target.identity[k] for k in ("total", "trainable", "active_per_token")},
            "tokens_processed": tokens, "generated_tokens_at_most": generated_tokens, "wall_seconds": round(wall, 2),
            "tokens_per_second": round(tokens / wall, 1) if wall else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # fmt: skip
    target_id = {k: v for k, v in target.identity.items() if k not in ("total", "trainable", "active_per_token")}
    out = {"slmstack": __version__, "target": target_id, "tasks": results, "cost": cost,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    if groups:
        out["groups"] = score_groups(groups, results, lambda member: get_task(member).name)
    return out


def main_metric(task: dict[str, Any]) -> str | None:
    """The headline metric of a task result (acc_norm, else acc, exact_match, word_perplexity)."""
    return next((m for m in MAIN_METRIC if m in task), None)


def markdown_table(results: dict[str, Any]) -> str:
    """A markdown table of every metric with its standard error."""
    lines = ["| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for name, group in reversed(list(results.get("groups", {}).items())):  # the outermost group first
        for metric in [k for k in group if f"{k}_stderr" in group]:
            err = group[f"{metric}_stderr"]
            err_text = f"{err:.4f}" if not math.isnan(err) else ""
            lines.append(f"| **{name}** ({group['tasks']} tasks) | {metric} | {group[metric]:.4f} | {err_text} | "
                         f"{group['n']} |")  # fmt: skip
    for name, task in results["tasks"].items():
        for metric, value in task.items():
            if metric.endswith("_stderr") or metric in ("n", "spec_hash", "subset", "seed", "seconds"):
                continue
            err = task.get(f"{metric}_stderr")
            err_text = f"{err:.4f}" if isinstance(err, float) and not math.isnan(err) else ""
            lines.append(f"| {name} | {metric} | {value:.4f} | {err_text} | {task['n']} |")
    cost = results["cost"]
    p = cost["parameters"]
    lines += ["", f"Parameters: {p['total']:,} total, {p['trainable']:,} trainable, {p['active_per_token']:,} active "
              f"per token. {cost['tokens_processed']:,} tokens in {cost['wall_seconds']} s "
              f"({cost['tokens_per_second']} tokens/s), peak RSS {cost['peak_rss_mb']} MB."]  # fmt: skip
    return "\n".join(lines) + "\n"


REPORT_HEAD = "<!-- slmstack eval results -->"  # the first line of every report: how it proves it is ours


def check_results_paths(out: str | Path) -> tuple[Path, Path]:
    """``(out, out.md)`` if both may be written: new, or results and report slmstack wrote before.

    Raises:
        InputError: either path holds a file slmstack did not write (it is left untouched), or ``out`` ends in .md.
    """
    out = Path(out)
    if out.suffix.lower() == ".md":
        raise InputError(f"{out}: the results file must not end in .md (the report is written beside it as .md); "
                         "use e.g. results.json")  # fmt: skip
    check_file_ours(out, "results file (--out)", json_fields("tasks", "target"))
    md = check_file_ours(out.with_suffix(".md"), "results report (.md beside --out)", first_line_proof(REPORT_HEAD))
    return out, md


def write_results(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write the results JSON and a markdown table beside it (``.md``), atomically; never over a foreign file."""
    out, md = check_results_paths(out)
    atomic_write_json(out, results)
    atomic_write_text(md, f"{REPORT_HEAD}\n{markdown_table(results)}")
    return out, md
