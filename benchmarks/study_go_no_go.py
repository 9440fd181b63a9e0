"""The second stacking study's go/no-go table: do the retrieved rationales name the gold option? No training.

Builds the study's corpus (the training-pool rationales of the six FLAN CoT sets) and its BM25 index, then, per
evaluation task, retrieves the top-k passages for each item's question and options (as the study's retrieve stage
queries) and counts how often they name the gold option against the average distractor. Writes
benchmarks/results/study_go_no_go.json and prints the table.

    python benchmarks/study_go_no_go.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the study's evaluation sets and sizes (the issue's: ECQA 1,000 held out, all of clean CSQA, QASC 300, StrategyQA
# 400; ARC-Easy and OpenBookQA 200 each, out of domain)
QUERIES = ("question+options", "question")  # what the retrieve stage sends: the input with or without the options
TASKS = {"ecqa": 1000, "commonsenseqa_clean": 0, "qasc": 300, "strategyqa": 400, "arc_easy": 200, "openbookqa": 200}


def items_for(task: str, n: int, data_dir: Path, with_options: bool) -> list[dict]:
    from slmstack.evaluation.harness import _choices, _gold_index, options_text, task_context
    from slmstack.evaluation.tasks import get_task, load_docs, select_subset

    spec = get_task(task)
    docs = select_subset(load_docs(spec, data_dir), None, n or None)
    items = []
    for doc in docs:
        choices = _choices(spec, doc)
        query = task_context(spec, doc).removesuffix("Answer:").strip()
        query += "\n" + options_text(choices) if with_options else ""
        items.append({"query": query, "options": choices, "gold": _gold_index(spec, doc, len(choices))})
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared/data")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--out", type=Path, default=HERE / "results" / "study_go_no_go.json")
    args = p.parse_args()
    from slmstack.evaluation.flan_cot import YES_NO
    from slmstack.retrieval import build_index, load_retriever
    from slmstack.study.retrieval import build_corpus, go_no_go

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        corpus = build_corpus(args.data_dir, Path(tmp) / "corpus.jsonl")
        record = build_index(corpus, Path(tmp) / "index", show_progress=False)
        built = time.perf_counter() - start
        start = time.perf_counter()
        retriever = load_retriever(Path(tmp) / "index")
        loaded = time.perf_counter() - start
        rows = {}
        for task, n in TASKS.items():
            for query in QUERIES:
                items = items_for(task, n, args.data_dir, query == "question+options")
                rows[f"{task}|{query}"] = {f"k{k}": go_no_go(retriever, items, k) for k in args.k}
                rows[f"{task}|{query}"]["yes_no"] = task in YES_NO
    result = {"corpus_passages": record["passages"], "index_settings": record["settings"],
              "build_seconds": round(built, 1), "load_seconds": round(loaded, 2), "tasks": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"corpus {record['passages']} passages; index built in {built:.1f} s, loaded in {loaded:.2f} s")
    print("| task | query | n | k | gold named | distractor named (mean) | lift | gold only | distractor only |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, by_k in rows.items():
        task, query = key.split("|")
        for k in args.k:
            r = by_k[f"k{k}"]
            lift = f"{r['lift']:.2f}" if r["lift"] else "—"
            note = " (yes/no)" if by_k["yes_no"] else ""
            print(f"| {task}{note} | {query} | {r['n']} | {k} | {r['gold']:.3f} | {r['distractor']:.3f} | {lift} | "
                  f"{r['gold_only']:.3f} | {r['distractor_only']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
