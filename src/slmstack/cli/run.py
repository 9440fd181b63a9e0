"""``slmstack run`` and ``slmstack models``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from slmstack.cli.common import VERBS, add_stack_args
from slmstack.errors import InputError, SlmstackError
from slmstack.io import check_input_file, check_output_file


# ---------------------------------------------------------------- run
def _run_args(p: argparse.ArgumentParser) -> None:
    add_stack_args(p)
    p.add_argument("question", nargs="?", help="the question or task to answer")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of stage cards")
    p.add_argument("--plain", action="store_true", help="plain-text stage cards (no colours)")
    p.add_argument("--input", type=Path, help="JSONL (one {'input': ...} per line) or .txt (one per line)")
    p.add_argument("--output", type=Path, help="JSONL results file; rerunning resumes where it stopped")
    p.add_argument("--field", default=None, help="JSON field that holds the input (default: input/question/prompt)")
    p.add_argument("--batch-size", type=int, default=None, help="inputs per batch (default: the stack's)")


def _run(args: argparse.Namespace) -> int:
    from slmstack.stack.runtime import Stack

    if args.input is None and args.question is None:
        raise InputError("nothing to answer: give a question, or --input FILE --output FILE")
    if args.input is not None and args.output is None:
        raise InputError("--input needs --output FILE for the results (JSONL)")
    if args.question is not None and not args.question.strip():
        raise InputError("the question is empty; give some text")
    if args.input is not None:  # fail on bad paths before loading a model
        check_input_file(args.input, "--input file")
        check_output_file(args.output, "--output results file")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be at least 1")
    stack = Stack.from_config(args.stack, args.overrides, show_progress=False)
    if args.input is not None:
        from slmstack.stack.batch_io import run_file

        summary = run_file(stack, args.input, args.output, field=args.field, batch_size=args.batch_size)
        summary["generation"] = stack.generation_info()
        print(json.dumps(summary) if args.json else f"wrote {summary['written']} results to {args.output} "
              f"({summary['skipped']} already done)")  # fmt: skip
        return 0
    result = stack(args.question)
    generation = stack.generation_info()
    if args.json:
        print(json.dumps({**result.to_dict(), "generation": generation}, ensure_ascii=False, indent=2))
    else:
        from slmstack.stack.render import print_cards

        print_cards(result, plain=args.plain)
        weights = generation.get("weights")
        print(f"generated on {generation['engine']}" + (f": {weights['summary']}" if weights else ""))
    return 0


# ---------------------------------------------------------------- models
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--folder", metavar="REF", help="print only the Hugging Face folder REF loads from (a GGUF's "
                   "dequantized copy, made now if needed): the tokenizer to give lm-eval or vLLM")  # fmt: skip


def _models(args: argparse.Namespace) -> int:
    from slmstack.models import DEFAULT_GGUF_NAME, cache_root, default_gguf_path, list_cached_models, model_folder

    if args.folder is not None:
        folder = model_folder(args.folder)
        print(folder if folder is not None else args.folder)  # a hub id is its own name
        return 0

    try:
        default: Any = str(default_gguf_path())
    except SlmstackError as exc:
        default = f"unavailable: {exc}"
    info = {"default": {"name": DEFAULT_GGUF_NAME, "path": default}, "cache": str(cache_root()),
            "cached": list_cached_models()}  # fmt: skip
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"default -> {DEFAULT_GGUF_NAME}\n  {default}\ncache: {info['cache']}")
    for entry in info["cached"] or [{"path": "(empty)"}]:
        size = f" {entry['bytes'] / 1e6:.0f} MB from {entry['source']}" if "bytes" in entry else ""
        print(f"  {entry['path']}{size}")
    return 0


VERBS.add("run", (_run_args, _run, "answer questions with a stack; print every stage's output"))
VERBS.add("models", (_models_args, _models, "show what 'default' resolves to and what is cached"))
