"""Load on `slmstack serve`: N concurrent clients against one request at a time, same server, same run.

Starts ``slmstack serve`` on the default stack (or ``--stack``) in a subprocess on loopback, warms it up,
then for ``--seconds`` each:

* ``concurrent``: ``--clients`` threads, each sending chat completions back to back (micro-batched);
* ``sequential``: one client sending the same questions one at a time (the baseline).

It records requests/s, p50/p95 latency, the error count and the server's RSS at the start (after a warm-up
batch of ``--clients`` requests) and at the end (a leak shows as growth), writes JSON and prints a table.
Questions are ARC-Easy questions.

    python benchmarks/serve_load.py --clients 16 --seconds 60
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stack_inference import load_questions, proc_status_mb  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cli = "from slmstack.cli import main; raise SystemExit(main())"
    cmd = [sys.executable, "-c", cli, "serve", "--port", str(port), "--max-batch-size", str(args.clients),
           "--max-wait-ms", str(args.max_wait_ms)]  # fmt: skip
    if args.stack:
        cmd += ["--stack", str(args.stack)]
    if getattr(args, "dtype", None):
        cmd += ["--dtype", args.dtype]
    env = os.environ | {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("server did not start in 300 s")


def phase(url: str, model: str, questions: list[str], clients: int, seconds: float, max_tokens: int | None) -> dict:
    """``clients`` threads sending back to back until ``seconds`` have passed (each sends at least one);
    every request is waited for."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**9))

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            first = True
            while first or time.perf_counter() < deadline:
                first = False
                with lock:
                    q = questions[next(counter) % len(questions)]
                body = {"model": model, "messages": [{"role": "user", "content": q}]}
                if max_tokens:
                    body["max_tokens"] = max_tokens
                start = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/chat/completions", json=body)
                    ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
                except httpx.HTTPError as exc:
                    ok, r = False, exc
                with lock:
                    (latencies if ok else errors).append(time.perf_counter() - start if ok else str(r)[:200])

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    p50 = round(statistics.median(latencies), 3) if latencies else None
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 4), "p50_s": p50,
            "p95_s": round(q[18], 3)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--stack", type=Path, help="stack YAML (default: the packaged default stack)")
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (caps the last stage)")
    p.add_argument("--max-wait-ms", type=float, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default=None, help="serve --dtype (e.g. float16-weights); default: the stack's own")
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared/data/arc_easy/arc_easy.jsonl")
    p.add_argument("--out", type=Path, default=HERE / "results" / "serve_load.json")
    args = p.parse_args()

    import httpx

    from slmstack.io import atomic_write_json

    questions = load_questions(args.data, 64)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        # warm-up: one full batch of `clients` requests at once, so that the start RSS already holds the
        # buffers a full batch needs and any growth after it is a leak
        phase(url, model, questions, args.clients, 0, args.max_tokens)
        rss_start = proc_status_mb("VmRSS", proc.pid)
        runs = {
            "concurrent": phase(url, model, questions, args.clients, args.seconds, args.max_tokens),
            "sequential": phase(url, model, questions, 1, args.seconds, args.max_tokens),
        }
        rss_end = proc_status_mb("VmRSS", proc.pid)
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    batch_sum = next((float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("slmstack_batch_size_sum")), 0.0)  # fmt: skip
    batch_count = next((float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("slmstack_batch_size_count")), 1.0)  # fmt: skip
    con, seq = runs["concurrent"], runs["sequential"]
    summary = {
        "concurrent_over_sequential_requests_per_s": round(con["requests_per_s"] / seq["requests_per_s"], 2)
        if seq["requests_per_s"] else None,
        "errors": con["errors"] + seq["errors"],
        "server_rss_start_mb": round(rss_start, 1), "server_rss_end_mb": round(rss_end, 1),
        "mean_batch_size": round(batch_sum / max(batch_count, 1), 2),
    }  # fmt: skip
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    report = {"benchmark": "serve_load", "model": model, "settings": settings, "runs": runs, "summary": summary}
    atomic_write_json(args.out, report)
    print(f"{'phase':<12}{'clients':>8}{'requests':>10}{'req/s':>9}{'p50 s':>8}{'p95 s':>8}{'errors':>8}")
    for name, r in runs.items():
        print(f"{name:<12}{r['clients']:>8}{r['requests']:>10}{r['requests_per_s']:>9.3f}{r['p50_s']:>8}"
              f"{r['p95_s']:>8}{r['errors']:>8}")  # fmt: skip
    for key, value in summary.items():
        print(f"{key}: {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
