"""``slmstack distill`` and ``slmstack train``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from slmstack.cli.common import VERBS, add_stack_args
from slmstack.errors import ConfigError, InputError
from slmstack.ownership import LEGACY, check_dir_ours


def _columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = [item.partition("=") for item in text.split(",")]
    if any(not sep or not k or not v for k, sep, v in pairs):
        raise InputError(f"--columns {text!r}: expected ours=theirs pairs, e.g. instruction=question,output=answer")
    mapping = {k.strip(): v.strip() for k, _, v in pairs}
    unknown = set(mapping) - {"instruction", "input", "output"}
    if unknown or "instruction" not in mapping:
        raise InputError(f"--columns: map 'instruction' (and optionally input, output); got {sorted(mapping)}")
    return mapping


# ---------------------------------------------------------------- distill
def _distill_args(p: argparse.ArgumentParser) -> None:
    add_stack_args(p)
    p.add_argument("--teacher", help="teacher model reference (default, .gguf, dir, hub id)")
    p.add_argument("--teacher-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--teacher-model", help="model name to send to --teacher-url")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the endpoint's API key")
    p.add_argument("--retries", type=int, default=4, help="endpoint retries (exponential backoff)")
    p.add_argument("--data", required=True, help="instructions: .json/.jsonl file, directory, or hf:NAME[:SPLIT]")
    p.add_argument("--format", default="auto", help="auto, alpaca, gpteacher, prompt_completion")
    p.add_argument("--columns", help="column mapping, e.g. instruction=question,output=answer")
    p.add_argument("--out", type=Path, required=True, help="output directory (one JSONL per stage)")
    p.add_argument("--limit", type=int, help="use the first N instructions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, help="override every stage's max_new_tokens for the teacher")
    p.add_argument("--final-target", choices=["reference", "teacher"], default="reference",
                   help="last stage's target: the data's output if any (default), or the teacher's")  # fmt: skip
    p.add_argument(
        "--unfinished",
        choices=["trim", "keep", "drop"],
        default=None,
        help="outputs cut at the token limit: trim to the last sentence (default), keep, or drop",
    )
    p.add_argument("--keep-unfinished", action="store_true", help="same as --unfinished keep")
    p.add_argument("--min-kept", type=float, default=0.5,
                   help="warn (last line) when less than this share of the items is kept")  # fmt: skip
    p.add_argument("--max-chars", type=int, default=2000, help="drop longer outputs as over_long")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
    p.add_argument("--overwrite", action="store_true", help="replace a different distillation in --out")


def distill_cmd(args: argparse.Namespace) -> int:
    """Run the teacher through the stack's stages and write per-stage datasets."""
    from slmstack.stack.config import load_stack_config
    from slmstack.training.data import read_examples
    from slmstack.training.distill import DistillConfig, distill, keep_advice
    from slmstack.training.teachers import LocalTeacher, OpenAITeacher

    if bool(args.teacher) == bool(args.teacher_url):
        raise InputError("give exactly one teacher: --teacher REF, or --teacher-url URL --teacher-model NAME")
    if args.teacher_url and not args.teacher_model:
        raise InputError("--teacher-url needs --teacher-model NAME (the model the endpoint serves)")
    check_dir_ours(args.out, "distill", "--out directory", legacy=LEGACY["distill"])
    stack = load_stack_config(args.stack, args.overrides)
    data = read_examples(args.data, args.format, _columns(args.columns), args.skip_bad, args.limit)
    cfg = DistillConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_chars=args.max_chars,
                        unfinished=args.unfinished or ("keep" if args.keep_unfinished else "trim"),
                        final_target=args.final_target,
                        overwrite=args.overwrite)  # fmt: skip
    if args.teacher_url:
        teacher: Any = OpenAITeacher(args.teacher_url, args.teacher_model, args.api_key_env, retries=args.retries)
    else:
        from slmstack.models import load_model

        teacher = LocalTeacher(load_model(args.teacher, stack.device, stack.dtype), args.batch_size,
                               stack.chat_template, engine=args.engine)  # fmt: skip
    report = distill(stack, teacher, data.examples, args.out, cfg)
    summary = {"kept": report.kept, "total": report.total, "dropped": report.dropped,
               "skipped_bad_records": len(data.skipped), "seconds": report.seconds, "out": str(args.out)}  # fmt: skip
    print(json.dumps(summary))
    if report.kept == 0:
        raise InputError(f"nothing usable to train on: {keep_advice(report)}")
    if report.kept < args.min_kept * report.total:
        print(f"slmstack distill: warning: only {keep_advice(report)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- train
_TRAIN_FLAGS = {  # flag -> (TrainConfig field, type, help)
    "--epochs": ("epochs", int, "passes over each stage's data"),
    "--max-steps": ("max_steps", int, "optimizer steps per stage (overrides --epochs)"),
    "--batch-size": ("batch_size", int, "examples per micro-batch"),
    "--grad-accum": ("grad_accum", int, "micro-batches per optimizer step"),
    "--lr": ("lr", float, "peak learning rate"),
    "--rank": ("rank", int, "LoRA rank"),
    "--alpha": ("alpha", int, "LoRA alpha"),
    "--dropout": ("dropout", float, "LoRA dropout"),
    "--max-length": ("max_length", int, "tokens per example (prompt cut from the left)"),
    "--eval-fraction": ("eval_fraction", float, "held-out share for eval loss"),
    "--checkpoint-every": ("checkpoint_every", int, "steps between checkpoints"),
    "--seed": ("seed", int, "random seed"),
    "--precision": ("precision", str, "auto, fp32 or bf16 (autocast; LoRA weights stay fp32)"),
}


def _train_args(p: argparse.ArgumentParser) -> None:
    add_stack_args(p)
    p.add_argument("--data", type=Path, required=True, help="directory with <stage>.jsonl (from slmstack distill)")
    p.add_argument("--out", type=Path, required=True, help="output directory: adapters + trained_stack.yaml")
    p.add_argument("--stages", help="comma-separated stages to train (default: all)")
    p.add_argument("--config", type=Path, help="YAML with TrainConfig fields (flags and --train-set win)")
    p.add_argument("--train-set", dest="train_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training field, e.g. --train-set schedule=linear")  # fmt: skip
    for flag, (_, typ, helptext) in _TRAIN_FLAGS.items():
        p.add_argument(flag, type=typ, help=helptext)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed data lines")


def train_config_from_args(args: argparse.Namespace) -> Any:
    """YAML (``--config``) < flags < ``--train-set`` overrides, into a validated :class:`TrainConfig`."""
    from slmstack.config import apply_overrides, build_dataclass, load_yaml
    from slmstack.training.trainer import TrainConfig

    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for flag, (name, _, _) in _TRAIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            data[name] = value
    if args.skip_bad:
        data["skip_bad"] = True
    apply_overrides(data, args.train_overrides)
    return build_dataclass(TrainConfig, data, source=args.config or "training options")


def train_cmd(args: argparse.Namespace) -> int:
    """LoRA-train each stage and write the trained stack YAML."""
    from slmstack.stack.config import load_stack_config
    from slmstack.training.trainer import train_stack

    if not args.data.is_dir():
        what = "is a file" if args.data.exists() else "does not exist"
        raise InputError(f"{args.data}: --data {what}; pass the directory slmstack distill wrote (<stage>.jsonl).")
    check_dir_ours(args.out, "train", "--out directory", legacy=LEGACY["train"])
    stack = load_stack_config(args.stack, args.overrides)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    if stages:
        unknown = [s for s in stages if s not in {st.name for st in stack.stages}]
        if unknown:
            raise ConfigError(f"--stages: unknown stage {unknown[0]!r}; stages are "
                              f"{', '.join(s.name for s in stack.stages)}")  # fmt: skip
    path = train_stack(stack, args.data, args.out, train_config_from_args(args), stages, args.resume, args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        print(f'trained stack: {path}\nrun it with: slmstack run --stack {path} "your question"')
    return 0


VERBS.add("distill", (_distill_args, distill_cmd, "distil each stage's targets from a teacher"))
VERBS.add("train", (_train_args, train_cmd, "LoRA-train every stage of a stack on distilled data"))
