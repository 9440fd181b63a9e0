"""The ``slmstack`` command line. Each verb parses its flags, builds typed config, and calls the library.

Verbs register in :data:`VERBS`; later features add theirs with one ``VERBS.register`` entry.
Every :class:`SlmstackError` is shown as one clear line on stderr with exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmstack.errors import InputError, SlmstackError
from slmstack.registry import Registry

logger = logging.getLogger("slmstack")

Verb = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
VERBS: Registry[Verb] = Registry("verb")


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", type=Path, default=None, help="stack YAML (default: the packaged 4-stage stack)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stack field, e.g. --set stages.0.generation.max_new_tokens=32")  # fmt: skip


# ---------------------------------------------------------------- run
def _run_args(p: argparse.ArgumentParser) -> None:
    _add_stack_args(p)
    p.add_argument("question", nargs="?", help="the question or task to answer")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of stage cards")
    p.add_argument("--plain", action="store_true", help="plain-text stage cards (no colours)")
    p.add_argument("--input", type=Path, help="JSONL (one {'input': ...} per line) or .txt (one per line)")
    p.add_argument("--output", type=Path, help="JSONL results file; rerunning resumes where it stopped")
    p.add_argument("--field", default=None, help="JSON field that holds the input (default: input/question/prompt)")
    p.add_argument("--batch-size", type=int, default=None, help="inputs per batch (default: the stack's)")


def _run(args: argparse.Namespace) -> int:
    from slmstack.stack import Stack

    if args.input is None and args.question is None:
        raise InputError("nothing to answer: give a question, or --input FILE --output FILE")
    if args.input is not None and args.output is None:
        raise InputError("--input needs --output FILE for the results (JSONL)")
    if args.question is not None and not args.question.strip():
        raise InputError("the question is empty; give some text")
    stack = Stack.from_config(args.stack, args.overrides, show_progress=False)
    if args.input is not None:
        from slmstack.batch_io import run_file

        summary = run_file(stack, args.input, args.output, field=args.field, batch_size=args.batch_size)
        print(json.dumps(summary) if args.json else f"wrote {summary['written']} results to {args.output} "
              f"({summary['skipped']} already done)")  # fmt: skip
        return 0
    result = stack(args.question)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
    else:
        from slmstack.render import print_cards

        print_cards(result, plain=args.plain)
    return 0


# ---------------------------------------------------------------- models
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _models(args: argparse.Namespace) -> int:
    from slmstack.models import DEFAULT_GGUF_NAME, cache_root, default_gguf_path, list_cached_models

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


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered verb."""
    parser = argparse.ArgumentParser(prog="slmstack", description="Stacks of small language models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (add_args, handler, helptext) in VERBS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slmstack`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "huggingface_hub", "peft"):
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))
    try:
        return args.handler(args)
    except SlmstackError as exc:
        print(f"slmstack {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
