"""Federated data: prompt/completion records, a held-out set, and seeded client partitions (flwr-datasets).

Records come from a JSONL file (``prompt``, ``completion`` and any label columns; Alpaca
``instruction``/``input``/``output`` also work) or from a task collection: a folder with ``tasks.csv``
(columns ``file`` and ``category``) and one JSONL per task, as the T0 multi-task data is laid out. A
collection's records get ``task`` (the file's stem) and ``category`` columns; a trailing
``<|endoftext|>`` is stripped from completions.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from slmstack.errors import ConfigError, InputError
from slmstack.io import check_input_file, guard_read, iter_jsonl, save_figure

__all__ = ["check_partition", "load_records", "partition_records", "plot_partitions", "split_heldout"]

_EOT = "<|endoftext|>"


def _normalise(rec: dict[str, Any], where: str) -> dict[str, Any]:
    if "prompt" not in rec and "instruction" in rec:
        extra = rec.get("input") or ""
        rec = {**rec, "prompt": rec["instruction"] + (f"\n\n{extra}" if extra.strip() else ""),
               "completion": rec.get("output")}  # fmt: skip
    if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
        raise InputError(f"{where}: a record needs text fields 'prompt' and 'completion' (keys: {', '.join(rec)})")
    return {**rec, "completion": rec["completion"].removesuffix(_EOT).rstrip()}


def _collection(folder: Path) -> list[dict[str, Any]]:
    manifest = check_input_file(folder / "tasks.csv", "task manifest", "A collection folder holds tasks.csv.")
    with guard_read(manifest, "task manifest"), manifest.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "file" not in rows[0]:
        raise InputError(f"{manifest}: needs a 'file' column (and usually 'category')")
    records = []
    for row in rows:
        path = folder / row["file"]
        labels = {"task": Path(row["file"]).stem, "category": row.get("category", "")}
        records += [{**_normalise(rec, f"{path}:{n}"), **labels} for n, rec in iter_jsonl(path)]
    return records


def load_records(path: str | Path, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """All records of a JSONL file or a task collection; with ``limit``, a seeded sample of that many.

    Raises:
        InputError: a missing or malformed file (with ``file:line``), or a record without prompt/completion.
    """
    path = Path(path)
    if path.is_dir():
        records = _collection(path)
    else:
        records = [_normalise(rec, f"{path}:{n}") for n, rec in iter_jsonl(path)]
    if not records:
        raise InputError(f"{path}: holds no records")
    if limit is not None and limit < len(records):
        records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), limit))]
    return records


def split_heldout(records: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)``: a seeded ``fraction`` of the records is held out for the global eval loss."""
    order = list(range(len(records)))
    random.Random(seed + 1).shuffle(order)
    n = max(1, round(len(records) * fraction))
    held = set(order[:n])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def check_partition(records: list[dict], n: int, mode: str, column: str) -> None:
    """Raise :class:`ConfigError` when the records cannot be split as asked (checked without Flower)."""
    if mode != "iid" and any(column not in r for r in records):
        have = sorted(set().union(*(r.keys() for r in records)) - {"prompt", "completion"})
        raise ConfigError(f"data.column: {column!r} is not a column of the data; columns: {', '.join(have) or 'none'}")
    if mode == "task":
        values = {str(r.get(column, "")) for r in records}
        if len(values) < n:
            raise ConfigError(f"data.partition task: {len(values)} distinct {column!r} values for {n} clients")


def partition_records(records: list[dict], n: int, mode: str = "iid", column: str = "category",
                      alpha: float = 0.5, seed: int = 0) -> list[list[dict]]:  # fmt: skip
    """Split ``records`` into ``n`` client partitions with flwr-datasets' partitioners.

    ``iid``: ``IidPartitioner``; ``dirichlet``: ``DirichletPartitioner`` over ``column`` (label skew with
    concentration ``alpha``); ``task``: one value of ``column`` per client (``NaturalIdPartitioner``; the
    ``n`` values are a seeded choice when there are more).

    Raises:
        ConfigError: ``column`` missing from the records, too few distinct values, or an empty partition.
    """
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    check_partition(records, n, mode, column)
    rows = [{"index": i, "label": str(r.get(column, ""))} for i, r in enumerate(records)]
    if mode == "task":
        values = sorted({row["label"] for row in rows})
        chosen = set(random.Random(seed).sample(values, n))
        rows = [row for row in rows if row["label"] in chosen]
    dataset = datasets.Dataset.from_list(rows)
    if mode == "iid":
        partitioner: Any = IidPartitioner(num_partitions=n)
    elif mode == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions=n, partition_by="label", alpha=alpha,
                                           min_partition_size=1, self_balancing=True, seed=seed)  # fmt: skip
    else:
        partitioner = NaturalIdPartitioner(partition_by="label")
    partitioner.dataset = dataset
    parts = [[records[i] for i in partitioner.load_partition(k)["index"]] for k in range(n)]
    for k, part in enumerate(parts):
        if not part:
            raise ConfigError(f"data: client {k} got no records ({mode} partition); use more data or fewer clients")
    return parts


def plot_partitions(parts: list[list[dict]], column: str, png: Path) -> Path:
    """A stacked bar chart of each client's records per ``column`` value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [Counter(str(r.get(column, "")) for r in part) for part in parts]
    labels = sorted(set().union(*counts))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0] * len(parts)
    for label in labels:
        values = [c.get(label, 0) for c in counts]
        ax.bar([f"client {k}" for k in range(len(parts))], values, bottom=bottom, label=label or "(none)")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("records")
    ax.set_title(f"records per client by {column}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return save_figure(fig, png)


def write_records(path: Path, records: list[dict]) -> Path:
    """One JSON object per line, atomically."""
    from slmstack.io import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
