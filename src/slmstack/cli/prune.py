"""``slmstack prune``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from slmstack.cli.common import VERBS


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model reference to prune (default: the embedded model)")
    p.add_argument("--method", default="wanda", help="magnitude, wanda or sparsegpt")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5], help="one or more sparsities in [0, 1)")
    p.add_argument("--pattern", default="unstructured", help="unstructured, 2:4 or 4:8 (N:M fixes sparsity at N/M)")
    p.add_argument("--calibration", type=Path, help="plain-text calibration file (wanda, sparsegpt)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-text", type=Path, help="plain text for perplexity before and after")
    p.add_argument("--out", type=Path, required=True, help="folder; one model directory per sparsity inside")
    p.add_argument("--overwrite", action="store_true")


def prune_cmd(args: argparse.Namespace) -> int:
    """Prune at each sparsity and write loadable model directories."""
    from slmstack.evaluation.scorer import Scorer
    from slmstack.models import load_model
    from slmstack.pruning.base import PruneConfig
    from slmstack.pruning.engine import load_calibration, prune
    from slmstack.pruning.export import save_pruned

    configs = [
        PruneConfig(
            method=args.method,
            sparsity=s,
            pattern=args.pattern,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=args.seed,
        )
        for s in args.sparsity
    ]  # fmt: skip  (validates)

    def perplexity(model, tok) -> float | None:
        if args.eval_text is None:
            return None
        ll, n = Scorer(model, tok, max_length=args.seqlen).loglikelihood_rolling(args.eval_text.read_text())
        return math.exp(-ll / n)

    base = load_model(args.model, device="cpu", dtype="float32")
    calibration = None
    if args.calibration is not None:
        calibration = load_calibration(base.tokenizer, args.calibration, args.nsamples, args.seqlen, args.seed)
    before = perplexity(base.model, base.tokenizer)
    summary = []
    for cfg in configs:
        lm = load_model(args.model, device="cpu", dtype="float32")
        result = prune(lm.model, config=cfg, calibration=calibration, show_progress=True)
        result.report.update(model=args.model, calibration_source=str(args.calibration) if args.calibration else None,
                             eval_text=str(args.eval_text) if args.eval_text else None, perplexity_before=before,
                             perplexity_after=perplexity(lm.model, lm.tokenizer))  # fmt: skip
        tag = args.pattern.replace(":", "of") if args.pattern != "unstructured" else f"{round(cfg.sparsity * 100)}"
        out = save_pruned(result, lm.tokenizer, args.out / f"{args.method}-{tag}", args.overwrite)
        report = result.report
        summary.append({"out": str(out), "actual_sparsity": round(report["actual_sparsity"], 4),
                        "seconds": report["seconds"], "perplexity_after": report["perplexity_after"]})  # fmt: skip
    print(json.dumps({"perplexity_before": before, "runs": summary}, indent=2))
    return 0


VERBS.add(
    "prune", (_prune_args, prune_cmd, "prune a model into sparser building blocks (magnitude, wanda, sparsegpt)")
)
