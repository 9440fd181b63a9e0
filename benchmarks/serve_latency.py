"""Single-question latency of the default stack over the API, and batch-1 decode speed beside llama.cpp.

Two parts, in one run on the same machine:

1. **Latency**: ``slmstack serve`` (default stack) in a subprocess on loopback; one streaming chat request
   at a time. Time to the first streamed token of the final stage, total time, and each stage's time
   from the trace. Median over ``--questions`` ARC-Easy questions (after one warm-up request).
2. **Decode speed at batch 1** on SmolLM2-135M-Instruct, forced to ``--tokens`` new tokens after the same
   prompt: the in-process runtime (transformers ``generate``, the path every stage takes) with float32
   weights dequantized from the GGUF and with ``dtype: float16-weights`` (float16 weights, float32
   math), and llama.cpp through ``llama-cpp-python`` on the very GGUF file the default model comes from
   (Q4_1), when that package is installed. Decode tokens/s excludes the prompt:
   (time(n tokens) - time(1 token)) / (n - 1).

    pip install llama-cpp-python   # compiles llama.cpp; optional
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


def prompt_text(tokenizer) -> str:
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def decode_hf(args: argparse.Namespace, dtype: str) -> dict:
    import torch

    from slmstack.fp16_weights import FP16_WEIGHTS, use_float16_weights
    from slmstack.models import load_model

    torch.set_num_threads(args.threads)
    lm = load_model("default", device="cpu")
    if dtype == FP16_WEIGHTS:
        use_float16_weights(lm.model)  # what a stack with dtype: float16-weights does before its first batch
    ids = lm.tokenizer(prompt_text(lm.tokenizer), return_tensors="pt", add_special_tokens=False)

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            lm.model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=lm.tokenizer.eos_token_id)  # fmt: skip
        return time.perf_counter() - start

    timed(4)  # warm-up
    one = statistics.median(timed(1) for _ in range(3))
    full = statistics.median(timed(args.tokens) for _ in range(args.repeats))
    return {"engine": f"slmstack runtime (transformers generate, {dtype})", "prompt_tokens": ids["input_ids"].shape[1],
            "decode_tokens_per_s": round((args.tokens - 1) / (full - one), 2), "prefill_s": round(one, 3)}  # fmt: skip


def decode_llama_cpp(args: argparse.Namespace) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from slmstack.models import default_gguf_path, load_model

    llm = Llama(model_path=str(default_gguf_path()), n_ctx=1024, n_threads=args.threads, n_batch=512, verbose=False)
    # the same prompt text, tokenized by llama.cpp's own tokenizer
    tokens = llm.tokenize(prompt_text(load_model("default", device="cpu").tokenizer).encode(), add_bos=False,
                          special=True)  # fmt: skip

    def timed(n: int) -> float:
        llm.reset()
        start = time.perf_counter()
        for i, _ in enumerate(llm.generate(tokens, temp=0.0, reset=True)):
            if i + 1 >= n:
                break
        return time.perf_counter() - start

    timed(4)
    one = statistics.median(timed(1) for _ in range(3))
    full = statistics.median(timed(args.tokens) for _ in range(args.repeats))
    return {"engine": "llama.cpp via llama-cpp-python (Q4_1 GGUF)", "prompt_tokens": len(tokens),
            "decode_tokens_per_s": round((args.tokens - 1) / (full - one), 2), "prefill_s": round(one, 3)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--dtype", default=None, help="serve --dtype for the latency part (e.g. float16-weights)")
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared/data/arc_easy/arc_easy.jsonl")
    p.add_argument("--out", type=Path, default=HERE / "results" / "serve_latency.json")
    args = p.parse_args()
    os.environ["TQDM_DISABLE"] = "1"

    from slmstack.io import atomic_write_json

    report: dict = {"benchmark": "serve_latency", "settings": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_latency:
        report["latency"] = latency(args)
    fp32, half, theirs = decode_hf(args, "float32"), decode_hf(args, "float16-weights"), decode_llama_cpp(args)

    def ratio(ours: dict) -> float | None:
        return round(ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"], 3) if theirs else None

    report["decode"] = {"slmstack_float32": fp32, "slmstack_float16_weights": half, "llama_cpp": theirs,
                        "ratio_float32_over_llama_cpp": ratio(fp32),
                        "ratio_float16_weights_over_llama_cpp": ratio(half)}  # fmt: skip
    atomic_write_json(args.out, report)
    if "latency" in report:
        lat = report["latency"]
        print(f"single question over the API, median of {lat['requests']}: first token of the final stage "
              f"{lat['median_first_token_of_final_stage_s']} s, total {lat['median_total_s']} s")  # fmt: skip
        for stage, s in lat["median_stage_s"].items():
            print(f"  {stage:<10}{s:>8.2f} s  {lat['median_stage_tokens_out'][stage]:>5} tokens")
    print(f"{'engine':<60}{'decode tok/s':>14}{'prefill s':>11}")
    for r in (fp32, half, theirs):
        if r:
            print(f"{r['engine']:<60}{r['decode_tokens_per_s']:>14}{r['prefill_s']:>11}")
    print(f"ratio over llama.cpp: float32 {ratio(fp32)}, float16-weights {ratio(half)}  (llama-cpp-python "
          f"{'installed' if theirs else 'not installed'})")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
