"""Stage attribution: what each upstream stage of a stack contributes to the final stage's score on a task.

For each upstream stage, the task is re-scored with that stage's output replaced, and compared item by item
with the stack as it is:

- ``skip``: no output; every later template is rendered without the lines that hold the stage's field;
- ``placebo``: another item's output for the same stage (a seeded derangement: no item keeps its own);
- ``base``: the stage run on the bare base model, without its adapter;
- ``oracle``: a gold text, where the task names a field for it (``gold_text``, e.g. a rationale).

Stages between the replaced one and the final one are generated again from the changed text (the final stage
scores). Each row reports the change in accuracy with a paired bootstrap 95 % interval and McNemar's exact p,
and each stage how often its text contains the gold answer. The stack's own upstream outputs are generated once
per task and reused by every intervention.
"""

from __future__ import annotations

import copy
import math
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from slmstack.engine.text import BASE_ADAPTER
from slmstack.errors import ConfigError, InputError
from slmstack.evaluation.harness import MAIN_METRIC, _choices, multiple_choice_items, options_text, task_context
from slmstack.evaluation.targets import StackTarget
from slmstack.evaluation.tasks import TaskSpec, get_task, load_docs, select_subset
from slmstack.io import save_figure
from slmstack.stack.config import INPUT_FIELD, StageConfig

__all__ = ["INTERVENTIONS", "attribute", "check_request", "default_interventions", "derangement", "mcnemar_exact_p",
           "paired_bootstrap_ci", "render_without"]  # fmt: skip

INTERVENTIONS = ("skip", "placebo", "base", "oracle")


# ---------------------------------------------------------------- statistics
def paired_bootstrap_ci(a: list[float], b: list[float], samples: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Percentile interval of mean(b) - mean(a) over items resampled with replacement (the pairs kept together)."""
    n = len(a)
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo = means[int(math.floor((1 - level) / 2 * samples))]
    hi = means[min(samples - 1, int(math.ceil((1 + level) / 2 * samples)) - 1)]
    return lo, hi


def mcnemar_exact_p(a: list[float], b: list[float]) -> tuple[float, int, int]:
    """Two-sided exact McNemar p on paired 0/1 outcomes, and the discordant counts (a right only, b right only).

    The smaller discordant count under Binomial(n01 + n10, 1/2), doubled (capped at 1).
    """
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0, only_a, only_b
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail), only_a, only_b


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(n)`` with no fixed point (Sattolo's algorithm: one cycle), n >= 2."""
    if n < 2:
        raise InputError("placebo needs at least 2 items to swap outputs between")
    perm = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: the element never stays where it is
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def render_without(template: str, field: str) -> str:
    """``template`` without the lines that hold ``{field}`` (or the field alone, when other fields share its line)."""
    placeholder = "{" + field + "}"
    kept = []
    for line in template.split("\n"):
        if placeholder not in line:
            kept.append(line)
        elif re.search(r"\{[A-Za-z_]\w*\}", line.replace(placeholder, "")):
            kept.append(line.replace(placeholder, ""))  # another field shares the line: keep that one
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n")
    return text or template.replace(placeholder, "")


# ---------------------------------------------------------------- running
@dataclass
class _Run:
    """One variant of the stack over a task's items: the values every stage sees, and the final stage's scores."""

    values: list[dict[str, str]]
    scores: list[float] | None = None


class _FixedUpstream(StackTarget):
    """A stack target whose upstream outputs are given (one values dict per context) instead of generated."""

    def __init__(self, stack: Any, values: dict[str, dict[str, str]]) -> None:
        super().__init__(stack)
        self._upstream = values

    def _upstream_outputs(self, questions: list[str], fields: list[dict[str, str]] | None = None) -> None:
        missing = [q for q in questions if q not in self._upstream]
        if missing:
            raise RuntimeError(f"{len(missing)} contexts have no upstream outputs")


def _score(stack: Any, spec: TaskSpec, docs: list[Any], contexts: list[str], values: list[dict[str, str]],
           metric: str, batch_size: int) -> list[float]:  # fmt: skip
    by_context = {c: {k: v for k, v in vals.items() if k != INPUT_FIELD} for c, vals in zip(contexts, values,
                                                                                          strict=True)}  # fmt: skip
    target = _FixedUpstream(stack, by_context)
    return multiple_choice_items(spec, docs, target, target.scorer(batch_size))[metric]


def _run_stages(stack: Any, stages: list[StageConfig], values: list[dict[str, str]],
                adapter: str | None = None) -> None:  # fmt: skip
    """Generate ``stages`` in order for every item, writing their outputs into ``values``."""
    from slmstack.stack.chains import Chain, run_chains
    from slmstack.stack.trace import StackResult

    if stages:
        run_chains([Chain(stack, list(stages), v, StackResult(v[INPUT_FIELD], ""), adapter=adapter) for v in values])


def _variant(stack: Any, stage: StageConfig, kind: str) -> Any:
    """The stack with every later template rendered without ``stage``'s field (``skip``), else the stack."""
    if kind != "skip":
        return stack
    cfg = stack.config
    names = [s.name for s in cfg.stages]
    later = names.index(stage.name) + 1
    stages = cfg.stages[:later] + [replace(s, template=render_without(s.template, stage.name))
                                   for s in cfg.stages[later:]]  # fmt: skip
    variant = copy.copy(stack)
    variant.config = replace(cfg, stages=stages)
    return variant


def _intervene(stack: Any, stage: StageConfig, kind: str, base_values: list[dict[str, str]], docs: list[Any],
               spec: TaskSpec, seed: int) -> tuple[Any, list[dict[str, str]]]:  # fmt: skip
    """The stack to score with, and every item's values after replacing ``stage``'s output by ``kind``."""
    cfg = stack.config
    upstream = cfg.stages[:-1]
    index = [s.name for s in upstream].index(stage.name)
    keep = {INPUT_FIELD, *cfg.inputs} | {s.name for s in upstream[:index]}
    values = [{k: v for k, v in vals.items() if k in keep} for vals in base_values]
    variant = _variant(stack, stage, kind)
    if kind == "skip":
        for vals in values:
            vals[stage.name] = ""
    elif kind == "placebo":
        perm = derangement(len(values), seed)
        for vals, j in zip(values, perm, strict=True):
            vals[stage.name] = base_values[j][stage.name]
    elif kind == "oracle":
        for vals, doc in zip(values, docs, strict=True):
            vals[stage.name] = str(doc.data[spec.gold_text])
    else:  # base
        _run_stages(stack, [stage], values, adapter=BASE_ADAPTER)
    _run_stages(variant, variant.config.stages[index + 1 : -1], values)  # the stages that read the new text
    return variant, values


def check_request(cfg: Any, specs: list[TaskSpec], stages: list[str] | None,
                  interventions: list[str]) -> list[StageConfig]:  # fmt: skip
    """The upstream stages to attribute; a :class:`ConfigError` for a request that cannot run (before any model)."""
    if len(cfg.stages) < 2:
        raise ConfigError(f"stack {cfg.name!r} has one stage, so nothing is upstream of its final stage to attribute")
    upstream = cfg.stages[:-1]
    names = [s.name for s in upstream]
    for name in stages or []:
        if name not in names:
            where = "is the final stage, which scores" if name == cfg.stages[-1].name else "is not a stage"
            raise ConfigError(f"--stages: {name!r} {where}; upstream stages are {', '.join(names)}")
    for kind in interventions:
        if kind not in INTERVENTIONS:
            raise ConfigError(f"--interventions: unknown intervention {kind!r}; use {', '.join(INTERVENTIONS)}")
    for spec in specs:
        if spec.kind != "multiple_choice":
            raise ConfigError(f"task {spec.name!r} is {spec.kind}; attribution scores multiple-choice tasks")
        if "oracle" in interventions and not spec.gold_text:
            raise ConfigError(f"task {spec.name!r} names no gold text (gold_text), so 'oracle' cannot run on it; "
                              "leave oracle out of --interventions, or add gold_text to the task")  # fmt: skip
    return [s for s in upstream if not stages or s.name in stages]


def default_interventions(specs: list[TaskSpec]) -> list[str]:
    """Every intervention, ``oracle`` only when every task names a gold text."""
    return [k for k in INTERVENTIONS if k != "oracle" or all(s.gold_text for s in specs)]


def _gold_answer(spec: TaskSpec, doc: Any) -> str:
    choices = spec.choices if isinstance(spec.choices, list) else doc.data[spec.choices]
    return str(choices[int(doc.data[spec.gold])])


def attribute(stack: Any, tasks: list[str | TaskSpec], data_dir: str | Path | None = None, limit: int | None = None,
              subset: str | None = None, stages: list[str] | None = None, interventions: list[str] | None = None,
              seed: int = 0, bootstrap: int = 2000, batch_size: int = 16) -> dict[str, Any]:  # fmt: skip
    """Score every (upstream stage, intervention) of ``stack`` on each task against the stack as it is.

    Args:
        stack: a loaded :class:`slmstack.stack.runtime.Stack` with at least two stages.
        tasks: multiple-choice task names or task YAML paths.
        data_dir: the folder with the tasks' local files (None: the hub).
        limit: at most this many items per task.
        subset: ``tiny`` for each task's fixed, seeded subset.
        stages: the upstream stages to attribute (default: all).
        interventions: any of :data:`INTERVENTIONS` (default: all, ``oracle`` only where every task has gold text).
        seed: the placebo's derangement and the bootstrap.
        bootstrap: bootstrap resamples.
        batch_size: scoring batch size.

    Returns:
        ``{"stack", "tasks": {task: {"n", "metric", "stack_score", "rows": [...], "contains_gold": {...}}}}``.
    """
    specs = [t if isinstance(t, TaskSpec) else get_task(t) for t in tasks]
    interventions = interventions or default_interventions(specs)
    chosen = check_request(stack.config, specs, stages, interventions)
    upstream = stack.config.stages[:-1]
    out: dict[str, Any] = {
        "stack": stack.config.name,
        "stages": [s.name for s in stack.config.stages],
        "interventions": interventions,
        "seed": seed,
        "bootstrap": bootstrap,
        "tasks": {},
    }
    for spec in specs:
        docs = select_subset(load_docs(spec, data_dir), subset, limit, spec.tiny_size)
        metric = next(m for m in MAIN_METRIC if m in spec.metrics)
        contexts = [task_context(spec, d) for d in docs]
        values = [stack.input_values(c, {"options": options_text(_choices(spec, d))})
                  for c, d in zip(contexts, docs, strict=True)]  # fmt: skip
        _run_stages(stack, upstream, values)  # the stack's own upstream outputs: generated once, reused below
        reference = _score(stack, spec, docs, contexts, values, metric, batch_size)
        rows = []
        # "base" regenerates a stage without its adapter: a retrieve stage runs no model, so it has no such variant
        jobs = [(stage, kind) for stage in chosen for kind in interventions
                if not (kind == "base" and stage.kind == "retrieve")]  # fmt: skip
        for stage, kind in tqdm(jobs, desc=f"attribute {spec.name}", unit="variant"):
            variant, changed = _intervene(stack, stage, kind, values, docs, spec, seed)
            scores = _score(variant, spec, docs, contexts, changed, metric, batch_size)
            lo, hi = paired_bootstrap_ci(reference, scores, bootstrap, seed)
            p, only_stack, only_variant = mcnemar_exact_p(reference, scores)
            rows.append({"stage": stage.name, "intervention": kind, "score": sum(scores) / len(scores),
                         "delta": sum(scores) / len(scores) - sum(reference) / len(reference), "ci95": [lo, hi],
                         "mcnemar_p": p, "only_stack_right": only_stack, "only_variant_right": only_variant,
                         "adapter": stack.adapter_for(stage.name) != BASE_ADAPTER})  # fmt: skip
        golds = [_gold_answer(spec, d).lower() for d in docs]
        contains = {s.name: sum(g in v[s.name].lower() for g, v in zip(golds, values, strict=True)) / len(docs)
                    for s in upstream}  # fmt: skip
        out["tasks"][spec.name] = {"n": len(docs), "metric": metric, "stack_score": sum(reference) / len(reference),
                                   "rows": rows, "contains_gold": contains}  # fmt: skip
    return out


def markdown(report: dict[str, Any]) -> str:
    """One table per task: a row per (stage, intervention)."""
    lines = [f"# Stage attribution: {report['stack']}", ""]
    for task, t in report["tasks"].items():
        lines += [f"## {task} ({t['n']} items, {t['metric']}; the stack scores {t['stack_score']:.3f})", "",
                  "| stage | intervention | score | Δ vs stack | 95 % CI | McNemar p | text holds the gold answer |",
                  "|---|---|---:|---:|---|---:|---:|"]  # fmt: skip
        for r in t["rows"]:
            lo, hi = r["ci95"]
            held = t["contains_gold"][r["stage"]]
            lines.append(
                f"| {r['stage']} | {r['intervention']} | {r['score']:.3f} | {r['delta']:+.3f} | "
                f"[{lo:+.3f}, {hi:+.3f}] | {r['mcnemar_p']:.3g} | {held:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], png: Path) -> None:
    """Δ with its 95 % interval per (stage, intervention), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 0.5 + 0.45 * max(
        len(report["tasks"][t]["rows"]) for t in tasks)), squeeze=False)  # fmt: skip
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = report["tasks"][task]["rows"]
        labels = [f"{r['stage']}: {r['intervention']}" for r in rows]
        deltas = [r["delta"] for r in rows]
        errs = [[r["delta"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["delta"] for r in rows]]
        ax.barh(labels, deltas, xerr=errs, color=["#c44" if d < 0 else "#4a4" for d in deltas], capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(f"{task} (stack {report['tasks'][task]['stack_score']:.3f})", fontsize=9)
        ax.set_xlabel("Δ accuracy vs the stack as it is")
    fig.tight_layout()
    save_figure(fig, png)
