"""``slmstack prune``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from slmstack.cli.common import VERBS
from slmstack.errors import ConfigError
from slmstack.io import check_input_file, read_text
from slmstack.ownership import LEGACY, check_dir_ours


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model reference to prune (default: the embedded model)")
    p.add_argument("--method", default="wanda", help="magnitude, wanda, sparsegpt, or structured (smaller dense)")
    p.add_argument(
        "--sparsity", type=float, nargs="+", default=[0.5], help="one or more sparsities (structured: ratios)"
    )
    p.add_argument("--pattern", default="unstructured", help="unstructured, 2:4 or 4:8 (N:M fixes sparsity at N/M)")
    p.add_argument("--calibration", type=Path, help="plain-text calibration file (wanda, sparsegpt, structured)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", help="calibration forwards: auto (bf16 where native), fp32, bf16")
    p.add_argument("--eval-text", type=Path, help="plain text for perplexity before and after")
    p.add_argument("--out", type=Path, required=True, help="folder; one model directory per sparsity inside")
    p.add_argument("--overwrite", action="store_true")


def _perplexity(model: Any, tok: Any, text_path: Path | None, seqlen: int) -> float | None:
    """Token perplexity over disjoint windows of ``seqlen`` (lm-eval's rolling log-likelihood)."""
    from slmstack.evaluation.scorer import Scorer

    if text_path is None:
        return None
    ll, n = Scorer(model, tok, max_length=seqlen).loglikelihood_rolling(read_text(text_path, "--eval-text file"))
    return math.exp(-ll / n)


def prune_cmd(args: argparse.Namespace) -> int:
    """Prune at each sparsity and write loadable model directories."""
    from slmstack.models import load_model
    from slmstack.pruning.base import PruneConfig
    from slmstack.pruning.engine import PruneResult, load_calibration, prune
    from slmstack.pruning.export import save_pruned
    from slmstack.pruning.structured import decode_tokens_per_s, prune_structured

    structured = args.method == "structured"
    configs = (
        []
        if structured
        else [
            PruneConfig(
                method=args.method,
                sparsity=s,
                pattern=args.pattern,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                seed=args.seed,
                precision=args.precision,
            )
            for s in args.sparsity
        ]
    )  # fmt: skip  (validates every sparsity before any work)
    if structured and args.calibration is None:
        raise ConfigError("structured pruning ranks channels by their activations: pass --calibration FILE")
    if structured and (any(not 0 <= r < 1 for r in args.sparsity) or args.nsamples < 1 or args.seqlen < 2):
        raise ConfigError("structured: --sparsity ratios must be in [0, 1), --nsamples >= 1 and --seqlen >= 2")
    # fail on bad paths (and folders that are not ours) before loading a model
    check_dir_ours(args.out, "prune", "--out folder", legacy=LEGACY["prune"])
    for flag, path in (("--calibration", args.calibration), ("--eval-text", args.eval_text)):
        if path is not None:
            check_input_file(path, f"{flag} file")
    base = load_model(args.model, device="cpu", dtype="float32")
    calibration = None
    if args.calibration is not None:
        calibration = load_calibration(base.tokenizer, args.calibration, args.nsamples, args.seqlen, args.seed)
    before = _perplexity(base.model, base.tokenizer, args.eval_text, args.seqlen)
    common = {"model": args.model, "calibration_source": str(args.calibration) if args.calibration else None,
              "eval_text": str(args.eval_text) if args.eval_text else None, "perplexity_before": before}  # fmt: skip
    runs = []
    for i, ratio in enumerate(args.sparsity):
        if structured:
            small, report = prune_structured(base.model, ratio, calibration)
            report["decode_tokens_per_s"] = [decode_tokens_per_s(base.model, base.tokenizer),
                                             decode_tokens_per_s(small, base.tokenizer)]  # fmt: skip
            result, tag, tok = PruneResult(small, {}, report), f"structured-{round(ratio * 100)}", base.tokenizer
        else:
            lm = load_model(args.model, device="cpu", dtype="float32")
            result, tok = prune(lm.model, config=configs[i], calibration=calibration, show_progress=True), lm.tokenizer
            pattern = args.pattern.replace(":", "of") if args.pattern != "unstructured" else None
            tag = f"{args.method}-{pattern or round(configs[i].sparsity * 100)}"
        result.report.update(common, perplexity_after=_perplexity(result.model, tok, args.eval_text, args.seqlen))
        out = save_pruned(result, tok, args.out / tag, args.overwrite)
        report = result.report
        runs.append({"out": str(out), "actual_sparsity": report.get("actual_sparsity"),
                     "parameters": report.get("parameters_after"), "seconds": report["seconds"],
                     "perplexity_after": report["perplexity_after"]})  # fmt: skip
    print(json.dumps({"perplexity_before": before, "runs": runs}, indent=2))
    return 0


VERBS.add("prune", (_prune_args, prune_cmd, "prune into smaller blocks: magnitude, wanda, sparsegpt, structured"))
