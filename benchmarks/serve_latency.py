"""Single-question latency of the default stack over the API.

``slmstack serve`` (default stack) in a subprocess on loopback; one streaming chat request at a time. Time to the
first streamed token of the final stage, total time, and each stage's time from the trace. Median over
``--questions`` ARC-Easy questions (after one warm-up request). Batch-1 decode speed beside transformers and
llama.cpp is ``benchmarks/engine.py``.

    python benchmarks/serve_latency.py --questions 5 [--dtype float16-weights]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_load import free_port, load_questions, start_server  # noqa: E402


def stream_once(url: str, model: str, question: str) -> dict:
    import httpx

    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": question}]}
    start = time.perf_counter()
    first, trace = None, None
    with httpx.Client(timeout=600) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if first is None and chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                first = time.perf_counter() - start  # an empty final answer: its "first token" is the end
            trace = chunk.get("slmstack_trace") or trace
    total = time.perf_counter() - start
    return {"first_token_s": first, "total_s": total, "stages": {t["stage"]: t["seconds"] for t in trace},
            "tokens_out": {t["stage"]: t["tokens_out"] for t in trace}}  # fmt: skip


def latency(args: argparse.Namespace) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args.clients, args.stack, args.max_wait_ms = 1, None, 0
    proc = start_server(args, port)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        questions = load_questions(args.data, args.questions + 1)
        stream_once(url, model, questions[0])  # warm-up
        runs = [stream_once(url, model, q) for q in questions[1:]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    stages = list(runs[0]["stages"])
    return {
        "requests": len(runs),
        "median_first_token_of_final_stage_s": round(statistics.median(r["first_token_s"] for r in runs), 3),
        "median_total_s": round(statistics.median(r["total_s"] for r in runs), 3),
        "median_stage_s": {s: round(statistics.median(r["stages"][s] for r in runs), 3) for s in stages},
        "median_stage_tokens_out": {s: statistics.median(r["tokens_out"][s] for r in runs) for s in stages},
        "runs": runs,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default=None, help="serve --dtype for the latency part (e.g. float16-weights)")
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared/data/arc_easy/arc_easy.jsonl")
    p.add_argument("--out", type=Path, default=HERE / "results" / "serve_latency.json")
    args = p.parse_args()
    os.environ["TQDM_DISABLE"] = "1"

    from slmstack.io import atomic_write_json

    report: dict = {"benchmark": "serve_latency", "settings": {k: str(v) for k, v in vars(args).items()}}
    report["latency"] = latency(args)
    atomic_write_json(args.out, report)
    lat = report["latency"]
    print(f"single question over the API, median of {lat['requests']}: first token of the final stage "
          f"{lat['median_first_token_of_final_stage_s']} s, total {lat['median_total_s']} s")  # fmt: skip
    for stage, s in lat["median_stage_s"].items():
        print(f"  {stage:<10}{s:>8.2f} s  {lat['median_stage_tokens_out'][stage]:>5} tokens")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
