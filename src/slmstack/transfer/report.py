"""The study's report: absolute scores per task and category, the paper's relative improvements, plots.

``results.json`` holds every cell, a summary per (split, mode, instructions, k) with the mean and standard
error over seeds of the held-out average and of each task and category, the relative improvements the
paper reports (general MTL over off-the-shelf; in-domain MTL over each of its starting points; with over
without instructions; each computed per seed on the held-out average, then mean ± standard error), the
few-shot curves, and the spread of scores across instruction wordings. ``results.md`` renders the same
tables; ``zero_shot.png`` and ``few_shot.png`` plot them.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from slmstack.io import atomic_write_json, atomic_write_text, save_figure
from slmstack.transfer.config import MODES as MODE_ORDER

__all__ = ["summarise", "write_report"]

# (label, mode, the mode it is compared against): the paper's comparisons
COMPARISONS = [
    ("general MTL vs off-the-shelf", "general", "off_the_shelf"),
    ("in-domain MTL vs off-the-shelf", "in_domain", "off_the_shelf"),
    ("in-domain MTL (from general) vs general MTL", "general_in_domain", "general"),
    ("in-domain MTL (from general) vs off-the-shelf", "general_in_domain", "off_the_shelf"),
]


def _mean_se(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "se": se, "n": len(values)}


def _avg(scores: dict[str, dict]) -> float:
    return statistics.fmean(s["score"] for s in scores.values())


def summarise(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary tables from the cells' results."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        k = c["cell"]
        groups[(k["split"], k["mode"], k["instructions"], k["k"])].append(c)
    rows = []
    order = sorted(groups.items(), key=lambda g: (g[0][0], g[0][3], list(MODE_ORDER).index(g[0][1]), not g[0][2]))
    for (split, mode, instr, k), members in order:
        tasks = sorted(members[0]["scores"])
        cats: dict[str, list[str]] = defaultdict(list)
        for t in tasks:
            cats[members[0]["scores"][t]["category"]].append(t)
        rows.append({"split": split, "mode": mode, "instructions": instr, "k": k,
                     "average": _mean_se([_avg(m["scores"]) for m in members]),
                     "tasks": {t: _mean_se([m["scores"][t]["score"] for m in members]) for t in tasks},
                     "categories": {c: _mean_se([statistics.fmean(m["scores"][t]["score"] for t in ts)
                                                for m in members]) for c, ts in cats.items()},
                     "wording_spread": {t: statistics.fmean(statistics.pstdev(m["scores"][t]["wordings"])
                                                            for m in members)
                                        for t in tasks if len(members[0]["scores"][t]["wordings"]) > 1},
                     "seconds": sum(m["seconds"] for m in members)})  # fmt: skip
    return {"rows": rows, "relative": _relative(cells), "few_shot": _few_shot(rows)}


def _by_seed(cells: list[dict]) -> dict[tuple, float]:
    return {(c["cell"]["split"], c["cell"]["mode"], c["cell"]["instructions"], c["cell"]["k"], c["cell"]["seed"]):
            _avg(c["scores"]) for c in cells}  # fmt: skip


def _relative(cells: list[dict]) -> list[dict[str, Any]]:
    """Per comparison, split, instructions setting and k: the relative change of the held-out average (%)."""
    avg = _by_seed(cells)
    out = []
    keys = sorted({(s, i, k) for s, _, i, k, _ in avg})
    seeds = sorted({seed for *_, seed in avg})
    for label, mode, base in COMPARISONS:
        for split, instr, k in keys:
            pairs = [(avg[(split, mode, instr, k, s)], avg[(split, base, instr, k, s)]) for s in seeds
                     if (split, mode, instr, k, s) in avg and (split, base, instr, k, s) in avg]  # fmt: skip
            if pairs:
                out.append({"comparison": label, "split": split, "instructions": instr, "k": k,
                            **_percent(pairs)})  # fmt: skip
    modes = sorted({m for _, m, *_ in avg})
    for mode in modes:
        for split, _, k in {(s, None, k) for s, _, k in keys}:
            pairs = [(avg[(split, mode, True, k, s)], avg[(split, mode, False, k, s)]) for s in seeds
                     if (split, mode, True, k, s) in avg and (split, mode, False, k, s) in avg]  # fmt: skip
            if pairs:
                out.append({"comparison": f"instructions vs none ({mode})", "split": split, "instructions": None,
                            "k": k, **_percent(pairs)})  # fmt: skip
    return out


def _percent(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    rel = [100 * (a - b) / b if b else float("nan") for a, b in pairs]
    diff = [a - b for a, b in pairs]
    return {"relative_percent": _mean_se(rel), "absolute": _mean_se(diff)}


def _few_shot(rows: list[dict]) -> list[dict[str, Any]]:
    curves: dict[tuple, list] = defaultdict(list)
    for r in rows:
        curves[(r["split"], r["mode"], r["instructions"])].append((r["k"], r["average"]["mean"], r["average"]["se"]))
    return [{"split": s, "mode": m, "instructions": i, "points": sorted(p)} for (s, m, i), p in sorted(curves.items())
            if len(p) > 1]  # fmt: skip


def _fmt(x: dict[str, float], scale: float = 100.0) -> str:
    return f"{scale * x['mean']:.1f} ± {scale * x['se']:.1f}"


def write_report(out: Path, cells: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Write results.json, results.md and the plots; returns the summary."""
    summary = summarise(cells)
    atomic_write_json(out / "results.json", {"settings": settings, "summary": summary, "cells": cells})
    lines = ["# Transfer study", "", f"Model: `{settings['model']}`; seeds {settings['seeds']}. Scores ×100 "
             "(accuracy or ROUGE-L F), mean ± standard error over seeds, on the held-out tasks only.", "",
             "## Held-out scores", "", "| split | mode | instructions | k | average | per category | seconds |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary["rows"]:
        cats = "; ".join(f"{c}: {_fmt(v)}" for c, v in r["categories"].items())
        lines.append(f"| {r['split']} | {r['mode']} | {'yes' if r['instructions'] else 'no'} | {r['k']} | "
                     f"{_fmt(r['average'])} | {cats} | {r['seconds']:.0f} |")  # fmt: skip
    lines += ["", "## Per task", "", "| split | mode | instructions | k | task | score | spread across wordings |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary["rows"]:
        for t, v in r["tasks"].items():
            spread = r["wording_spread"].get(t)
            lines.append(f"| {r['split']} | {r['mode']} | {'yes' if r['instructions'] else 'no'} | {r['k']} | {t} | "
                         f"{_fmt(v)} | {'' if spread is None else f'{100 * spread:.1f}'} |")  # fmt: skip
    lines += ["", "## Relative improvements (the paper's comparisons)", "",
              "| comparison | split | instructions | k | relative change (%) | absolute change (×100) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary["relative"]:
        instr = "both" if r["instructions"] is None else ("yes" if r["instructions"] else "no")
        lines.append(f"| {r['comparison']} | {r['split']} | {instr} | {r['k']} | "
                     f"{_fmt(r['relative_percent'], 1.0)} | {_fmt(r['absolute'])} |")  # fmt: skip
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    _plots(out, summary)
    return summary


def _plots(out: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zero = [r for r in summary["rows"] if r["k"] == 0]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(zero) + 2), 3.5))
    labels = [f"{r['mode']}\n{'instr' if r['instructions'] else 'no instr'}" + (f"\n{r['split']}" if len(
        {z['split'] for z in zero}) > 1 else "") for r in zero]  # fmt: skip
    ax.bar(range(len(zero)), [100 * r["average"]["mean"] for r in zero],
           yerr=[100 * r["average"]["se"] for r in zero], capsize=3)  # fmt: skip
    ax.set_xticks(range(len(zero)), labels, fontsize=7)
    ax.set_ylabel("held-out score ×100")
    ax.set_title("zero-shot on held-out tasks")
    fig.tight_layout()
    save_figure(fig, out / "zero_shot.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for c in summary["few_shot"]:
        ks, means, ses = zip(*c["points"], strict=True)
        ax.errorbar(ks, [100 * m for m in means], yerr=[100 * s for s in ses], marker="o", capsize=3,
                    label=f"{c['mode']} {'instr' if c['instructions'] else 'no instr'} ({c['split']})")  # fmt: skip
    ax.set_xlabel("k (few-shot training examples; 0 = zero-shot)")
    ax.set_ylabel("held-out score ×100")
    ax.set_title("few-shot fine-tuning")
    if summary["few_shot"]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, out / "few_shot.png")
