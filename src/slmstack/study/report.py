"""The study's report: accuracy per arm and task, paired tests against A1, A2 and A3, cost, a plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from slmstack.evaluation.attribution import mcnemar_exact_p, paired_bootstrap_ci
from slmstack.io import atomic_write_json, atomic_write_text, save_figure

__all__ = ["summarise", "write_report"]

REFERENCES = ("A1", "A2", "A3")


def _by_arm(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: r["cell"]["seed"]):
        arms.setdefault(r["cell"]["arm"], []).append(r)
    return arms


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def summarise(results: list[dict[str, Any]], seed: int, bootstrap: int = 2000, paired: bool = True) -> dict[str, Any]:
    """Scores (mean and s.e. over seeds), paired tests on the first seed (protocol 1: ``paired``), cost per item."""
    arms = _by_arm(results)
    tasks = list(next(iter(arms.values()))[0]["tasks"])
    scores = {}
    for arm, runs in arms.items():
        per_task = {t: _mean_se([r["tasks"][t]["score"] for r in runs]) for t in tasks}
        overall = _mean_se([sum(r["tasks"][t]["score"] for t in tasks) / len(tasks) for r in runs])
        scores[arm] = {
            "seeds": [r["cell"]["seed"] for r in runs],
            "tasks": {t: {"mean": m, "se": se} for t, (m, se) in per_task.items()},
            "mean": {"mean": overall[0], "se": overall[1]},
        }
    first = {
        arm: next(r for r in runs if r["cell"]["seed"] == seed)
        for arm, runs in arms.items()
        if any(r["cell"]["seed"] == seed for r in runs)
    }
    tests = []
    for ref in (r for r in REFERENCES if r in first and paired):
        for arm in (a for a in first if a != ref):
            for task in [*tasks, "all"]:
                pick = tasks if task == "all" else [task]
                a = [x for t in pick for x in first[ref]["tasks"][t]["items"]]
                b = [x for t in pick for x in first[arm]["tasks"][t]["items"]]
                lo, hi = paired_bootstrap_ci(a, b, bootstrap, seed)
                p, only_ref, only_arm = mcnemar_exact_p(a, b)
                tests.append(
                    {
                        "arm": arm,
                        "against": ref,
                        "task": task,
                        "delta": sum(b) / len(b) - sum(a) / len(a),
                        "ci95": [lo, hi],
                        "mcnemar_p": p,
                        "only_reference_right": only_ref,
                        "only_arm_right": only_arm,
                        "n": len(a),
                    }
                )
    cost = {}
    for arm, r in first.items():
        items = sum(t["n"] for t in r["tasks"].values())
        cost[arm] = {
            "generated_tokens_per_item": sum(t["generated_tokens"] for t in r["tasks"].values()) / items,
            "seconds_per_item": sum(t["seconds"] for t in r["tasks"].values()) / items,
            "train_tokens": sum(a["tokens"] for a in r["train"].values()),
            "train_seconds": round(sum(a["seconds"] for a in r["train"].values()), 1),
            "trainable_parameters": sum(a["trainable_parameters"] for a in r["train"].values()),
        }
    return {"tasks": tasks, "scores": scores, "paired_tests": tests, "cost": cost}


def contrasts(results: list[dict[str, Any]], cfg: Any, bootstrap: int = 2000) -> list[dict[str, Any]]:
    """Protocol 2's contrasts on per-item scores averaged over seeds: the primary as named, the rest Holm-corrected.

    A contrast is tested only when both arms have run every seed (a part-way report leaves it out).
    """
    from slmstack.study.stats import contrast, holm, seed_mean_items

    arms = _by_arm(results)
    tasks = list(cfg.eval)
    complete = {a for a, runs in arms.items() if sorted(r["cell"]["seed"] for r in runs) == sorted(cfg.seeds)}
    rows = []
    named = [cfg.primary or [None, None], *cfg.secondary]
    references = [[ref, (cfg.primary or [None])[0]] for ref in getattr(cfg, "reference", [])]
    for i, (arm, against) in enumerate(named + references):
        if arm in complete and against in complete:
            a, b = seed_mean_items(arms[against], tasks), seed_mean_items(arms[arm], tasks)
            per_task = {t: contrast(seed_mean_items(arms[against], [t]), seed_mean_items(arms[arm], [t]),
                                    bootstrap, cfg.seeds[0])["delta"] for t in tasks}  # fmt: skip
            rows.append({"arm": arm, "against": against, "primary": i == 0, "reference": i >= len(named),
                         **contrast(a, b, bootstrap, cfg.seeds[0]), "per_task": per_task})  # fmt: skip
    secondary = [r for r in rows if not r["primary"] and not r["reference"]]
    for r, adjusted in zip(secondary, holm([r["p"] for r in secondary]), strict=True):
        r["p_holm"] = adjusted
    return rows


def protocol_time(results: list[dict[str, Any]], attribution: dict[str, Any] | None = None) -> dict[str, float]:
    """Hours the protocol took, by part, from the records.

    The parts: each adapter's training (and the data it generated, ``data_seconds``), each cell's evaluation, the
    attribution. Adapters are trained once and cached, so a cell re-evaluated later still counts its training as
    first measured.
    """
    train = sum(a["seconds"] + a.get("data_seconds", 0.0) for r in results for a in r["train"].values())
    evaluation = sum(t["seconds"] for r in results for t in r["tasks"].values())
    attributed = float((attribution or {}).get("seconds", 0.0))
    return {"train_hours": train / 3600, "eval_hours": evaluation / 3600, "attribution_hours": attributed / 3600,
            "total_hours": (train + evaluation + attributed) / 3600}  # fmt: skip


def _cell(entry: dict[str, Any]) -> str:
    se = entry["se"]
    return f"{entry['mean']:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def markdown(summary: dict[str, Any], best: list[str], attribution: dict[str, Any] | None) -> str:
    """The tables of the report."""
    tasks = summary["tasks"]
    lines = [
        "# Stacking study",
        "",
        "Accuracy (mean ± s.e. over seeds where there are several):",
        "",
        "| arm | seeds | " + " | ".join(tasks) + " | mean |",
        "|---|---|" + "---:|" * (len(tasks) + 1),
    ]
    for arm, s in summary["scores"].items():
        cells = " | ".join(_cell(s["tasks"][t]) for t in tasks)
        lines.append(f"| {arm}{' (best)' if arm in best else ''} | {len(s['seeds'])} | {cells} | {_cell(s['mean'])} |")
    if summary["paired_tests"]:  # protocol 1: every arm against A1, A2 and A3 on the first seed, uncorrected
        lines += [
            "",
            "Paired against A1, A2 and A3 (first seed; Δ = arm - reference, bootstrap 95 % CI, McNemar exact p):",
            "",
            "| arm | vs | task | Δ | 95 % CI | p |",
            "|---|---|---|---:|---|---:|",
        ]
    for t in summary["paired_tests"]:
        lo, hi = t["ci95"]
        lines.append(
            f"| {t['arm']} | {t['against']} | {t['task']} | {t['delta']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | "
            f"{t['mcnemar_p']:.3g} |"
        )
    lines += [
        "",
        "Cost (first seed):",
        "",
        "| arm | generated tokens / item | seconds / item | training tokens | trainable parameters |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm, c in summary["cost"].items():
        lines.append(
            f"| {arm} | {c['generated_tokens_per_item']:.1f} | {c['seconds_per_item']:.3f} | "
            f"{c['train_tokens']:,} | {c['trainable_parameters']:,} |"
        )
    if summary.get("contrasts") is not None:
        lines += _contrast_lines(summary["contrasts"])
    t = summary["time"]  # set by write_report, which knows the attribution
    lines += ["", f"Time of the protocol: {t['total_hours']:.2f} h (training {t['train_hours']:.2f} h, evaluation "
              f"{t['eval_hours']:.2f} h, attribution {t['attribution_hours']:.2f} h)."]  # fmt: skip
    if attribution is not None:
        from slmstack.evaluation.attribution import markdown as attribution_markdown

        lines += ["", attribution_markdown(attribution).replace("# Stage attribution", "## Stage attribution")]
    return "\n".join(lines) + "\n"


def _contrast_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "Contrasts named before the run (per-item scores averaged over seeds; Δ = arm - against; bootstrap "
             "95 % CI; two-sided paired randomization p; the secondary contrasts Holm-corrected; a reference "
             "contrast, a larger base against the primary's arm, was named with issue #34, before any of its cells "
             "ran):", "",
             "| contrast | arm | against | Δ | 95 % CI | p | p (Holm) | n |",
             "|---|---|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lo, hi = r["ci95"]
        holm = f"{r['p_holm']:.3g}" if "p_holm" in r else "—"
        kind = "primary" if r["primary"] else "reference (#34)" if r.get("reference") else "secondary"
        lines.append(f"| {kind} | {r['arm']} | {r['against']} | "
                     f"{r['delta']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {r['p']:.3g} | {holm} | {r['n']} |")  # fmt: skip
    if not rows:
        lines.append("| (no contrast yet: an arm of each has seeds still to run) | | | | | | | |")
    return lines


def plot(summary: dict[str, Any], png: Path) -> None:
    """Accuracy per task, one bar per arm (error bars: s.e. over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, arms = summary["tasks"], list(summary["scores"])
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 2, 3.6))
    for i, arm in enumerate(arms):
        entries = [summary["scores"][arm]["tasks"][t] for t in tasks]
        ax.bar(
            [k + i * width for k in range(len(tasks))],
            [e["mean"] for e in entries],
            width,
            label=arm,
            yerr=[e["se"] or 0 for e in entries],
            capsize=2,
        )
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))], tasks, rotation=20, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title("Does stacking help? (default model, FLAN CoT training)")
    ax.legend(fontsize=7, ncol=len(arms))
    fig.tight_layout()
    save_figure(fig, png)


def write_report(
    out: Path,
    cfg: Any,
    results: list[dict[str, Any]],
    best: list[str],
    attribution: dict[str, Any] | None,
    pending: list[str] | None = None,
) -> dict[str, Any]:
    """results.json, results.md and results.png in ``out``; returns the summary.

    ``pending``: the cells of the plan not run yet (a report written part-way, ``slmstack study --report``).
    """
    summary = summarise(results, cfg.seeds[0], paired=cfg.protocol == 1)
    if cfg.protocol == 2:
        summary["contrasts"] = contrasts(results, cfg)
    summary["time"] = protocol_time(results, attribution)
    summary["best"], summary["pending"] = best, pending or []
    cells = [
        {**r, "tasks": {t: {k: v for k, v in x.items() if k != "items"} for t, x in r["tasks"].items()}}
        for r in results
    ]  # the per-item scores stay in cells/
    atomic_write_json(out / "results.json", {**summary, "cells": cells})
    text = markdown(summary, best, attribution)
    if pending:
        text = text.replace("\n", f"\n\n**Part-way report**: not run yet: {', '.join(pending)}.\n", 1)
    atomic_write_text(out / "results.md", text)
    plot(summary, out / "results.png")
    return summary
