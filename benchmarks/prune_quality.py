"""Pruning quality and speed on the default model: WikiText-2 perplexity at several sparsities.

Magnitude, Wanda and SparseGPT at 0/25/50/75 % (unstructured), calibrated on 128 x 512 tokens drawn from
WikiText-2 *validation*; perplexity measured on WikiText-2 *test* (the first ``--eval-chars`` characters
of the raw file, in disjoint 512-token windows, token-level, as the Wanda and SparseGPT papers report it).
Also structured pruning at 25 % and 50 %: parameters, perplexity and greedy decode tokens/s against the
dense model. Everything runs in one process, one configuration after another, on the same machine.

    python benchmarks/prune_quality.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def perplexity(model, tok, text: str, seqlen: int) -> float:
    from slmstack.evaluation.scorer import Scorer

    ll, n = Scorer(model, tok, max_length=seqlen, batch_size=8).loglikelihood_rolling(text)
    return round(math.exp(-ll / n), 3)


def decode_tokens_per_s(model, tok, new_tokens: int = 64) -> float:
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return round((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--sparsities", default="0.25,0.5,0.75")
    p.add_argument("--structured", default="0.25,0.5")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-chars", type=int, default=100_000)
    p.add_argument("--precision", default="fp32", help="calibration forwards: fp32 (default here), bf16, auto")
    p.add_argument("--out", type=Path, default=HERE / "results" / "prune_quality.json")
    args = p.parse_args()

    from slmstack.io import atomic_write_json
    from slmstack.models import load_model
    from slmstack.pruning.base import PruneConfig
    from slmstack.pruning.engine import load_calibration, prune
    from slmstack.pruning.structured import prune_structured

    calib_file = args.data_dir / "wikitext2" / "tokenized" / "valid.txt"
    text = (args.data_dir / "wikitext2" / "wiki.test.raw").read_text()[: args.eval_chars]
    base = load_model("default", device="cpu", dtype="float32")
    calibration = load_calibration(base.tokenizer, calib_file, args.nsamples, args.seqlen)
    dense_ppl = perplexity(base.model, base.tokenizer, text, args.seqlen)
    rows = [{"method": "dense", "sparsity": 0.0, "perplexity": dense_ppl, "seconds": 0.0}]
    print(f"dense: ppl {dense_ppl}", flush=True)
    for method in args.methods.split(","):
        for s in map(float, args.sparsities.split(",")):
            lm = load_model("default", device="cpu", dtype="float32")
            start = time.perf_counter()
            cfg = PruneConfig(method=method, sparsity=s, precision=args.precision)
            result = prune(lm.model, config=cfg, calibration=None if method == "magnitude" else calibration)
            seconds = round(time.perf_counter() - start, 1)
            ppl = perplexity(lm.model, lm.tokenizer, text, args.seqlen)
            actual = round(result.report["actual_sparsity"], 4)
            rows.append({"method": method, "sparsity": s, "actual_sparsity": actual, "perplexity": ppl,
                         "seconds": seconds})  # fmt: skip
            print(rows[-1], flush=True)
    dense_speed = decode_tokens_per_s(base.model, base.tokenizer)
    structured = [{"ratio": 0.0, "parameters": sum(p.numel() for p in base.model.parameters()),
                   "perplexity": dense_ppl, "decode_tokens_per_s": dense_speed}]  # fmt: skip
    for r in [float(x) for x in args.structured.split(",") if x]:
        start = time.perf_counter()
        small, report = prune_structured(base.model, r, calibration)
        seconds = round(time.perf_counter() - start, 1)
        structured.append({"ratio": r, "parameters": report["parameters_after"], "seconds": seconds,
                           "perplexity": perplexity(small, base.tokenizer, text, args.seqlen),
                           "decode_tokens_per_s": decode_tokens_per_s(small, base.tokenizer)})  # fmt: skip
        print(structured[-1], flush=True)
    report = {"benchmark": "prune_quality", "model": "default (SmolLM2-135M-Instruct, fp32)",
              "calibration": f"{args.nsamples} x {args.seqlen} tokens of {calib_file.name} (WikiText-2 validation)",
              "eval": f"first {args.eval_chars} chars of wiki.test.raw, {args.seqlen}-token windows",
              "precision": args.precision,
              "unstructured": rows, "structured": structured, "scratch": tempfile.gettempdir()}  # fmt: skip
    atomic_write_json(args.out, report)
    print(f"\n{'method':<11}{'sparsity':>9}{'perplexity':>12}{'prune s':>9}")
    for r in rows:
        print(f"{r['method']:<11}{r['sparsity']:>9}{r['perplexity']:>12}{r['seconds']:>9}")
    print(f"\n{'structured':<11}{'params':>12}{'perplexity':>12}{'decode tok/s':>14}")
    for r in structured:
        print(f"{r['ratio']:<11}{r['parameters']:>12}{r['perplexity']:>12}{r['decode_tokens_per_s']:>14}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
