"""Side-by-side table and bar chart of several ``slmstack eval`` result files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmstack.errors import InputError
from slmstack.evaluation.harness import MAIN_METRIC, main_metric
from slmstack.io import read_json, save_figure

__all__ = ["compare_table", "load_runs", "plot_runs"]

_NUMERIC = {f"{m}{s}" for m in MAIN_METRIC for s in ("", "_stderr")}


def load_runs(paths: list[str | Path]) -> list[tuple[str, dict[str, Any]]]:
    """(label, results) for each file; the label is the file's stem."""
    runs = []
    for p in map(Path, paths):
        data = read_json(p, "results file", "Pass the JSON that slmstack eval --out wrote.")
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
            raise InputError(f"{p}: not an slmstack eval results file (no 'tasks')")
        for task, result in data["tasks"].items():  # what the table and the chart read: numbers per metric
            numbers = isinstance(result, dict) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for k, v in result.items() if k in _NUMERIC
            )
            if not numbers or main_metric(result) is None:
                raise InputError(f"{p}: task {task!r} is not an slmstack eval result (each task maps metrics such "
                                 "as acc to numbers). Pass the JSON that slmstack eval --out wrote.")  # fmt: skip
        runs.append((p.stem, data))
    if not runs:
        raise InputError("no result files given")
    return runs


def _tasks(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return list(dict.fromkeys(t for _, r in runs for t in r["tasks"]))


def compare_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table: one row per task (its headline metric), one column per run."""
    header = "| task | metric | " + " | ".join(label for label, _ in runs) + " |"
    lines = [header, "|---|---|" + "---:|" * len(runs)]
    for task in _tasks(runs):
        metric = next((main_metric(r["tasks"][task]) for _, r in runs if task in r["tasks"]), None)
        cells = []
        for _, r in runs:
            result = r["tasks"].get(task, {})
            value, err = result.get(metric), result.get(f"{metric}_stderr")
            cells.append("" if value is None else f"{value:.3f}" + (f" ± {err:.3f}" if err == err and err else ""))
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[tuple[str, dict[str, Any]]], out: str | Path) -> Path:
    """Grouped bar chart of each task's headline metric (with standard errors) per run, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in _tasks(runs) if "perplexity" not in str(main_metric(runs[0][1]["tasks"].get(t, {})))]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) + 2), 4))
    for i, (label, r) in enumerate(runs):
        values = [r["tasks"].get(t, {}).get(main_metric(r["tasks"].get(t, {})) or "", 0.0) for t in tasks]
        errs = [r["tasks"].get(t, {}).get(f"{main_metric(r['tasks'].get(t, {}))}_stderr", 0.0) for t in tasks]
        xs = [x + i * width for x in range(len(tasks))]
        ax.bar(xs, values, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel("accuracy (acc_norm where defined)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, Path(out), dpi=110)
