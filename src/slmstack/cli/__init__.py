"""The ``slmstack`` command line. Each verb parses its flags, builds typed config, and calls the library.

Verbs register in :data:`VERBS` (one module per group of verbs); the library never sees argparse.
Every :class:`SlmstackError` is shown as one clear line on stderr with exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from slmstack.cli import (  # noqa: F401
    attribute,
    evaluate,
    export,
    federate,
    index,
    prune,
    run,
    serve,
    study,
    train,
    transfer,
)
from slmstack.cli.common import VERBS
from slmstack.errors import SlmstackError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where help is), exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print one line naming the problem and the help command, then exit 2."""
        self.exit(2, f"{self.prog}: error: {message}. See: {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered verb."""
    parser = _Parser(prog="slmstack", description="Stacks of small language models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (add_args, handler, helptext) in VERBS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        add_args(p)
        p.set_defaults(handler=handler, verb_parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slmstack`` console script."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # report it as the verb's error, with the verb's help
        args.verb_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = logging.INFO - 10 * min(args.verbose, 1) if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("slmstack").setLevel(logging.INFO if args.handler in _CHATTY or args.verbose else level)
    for noisy in ("transformers", "huggingface_hub", "peft", "httpx", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.handler(args)
    except SlmstackError as exc:
        _close_progress_bars()
        print(f"slmstack {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no (permissions, disk full, a path of the wrong kind)
        _close_progress_bars()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"slmstack {args.verb}: error: {where}{exc.strerror or exc}. Check the path.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"slmstack {args.verb}: interrupted; {_ON_INTERRUPT.get(args.verb, _NOTHING_SAVED)}", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """Close every live progress bar, so that none is redrawn after the error line (which must come last)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# what an interrupted verb leaves behind: only what is true of that verb
_NOTHING_SAVED = "nothing was written"
_ON_INTERRUPT = {
    "run": "the answers finished so far are in --output, if one was given (rerun the same command to resume)",
    "distill": "the finished items are saved (rerun the same command to resume)",
    "train": "the last checkpoint is saved (rerun the same command with --resume to continue)",
    "federate": "the finished rounds are saved (rerun the same command with --resume to continue)",
    "study": "the finished cells are saved (rerun the same command to resume)",
    "transfer": "the finished cells are saved (rerun the same command to resume)",
    "prune": "the blocks finished so far are saved in --out; rerun only the missing sparsities",
    "index": "the index was not finished (rerun the same command to build it)",
    "serve": "the server stopped",
}


# long-running verbs report their progress at INFO level by default
_CHATTY = {
    attribute.attribute_cmd,
    index.index_cmd,
    train.distill_cmd,
    train.train_cmd,
    evaluate.eval_cmd,
    prune.prune_cmd,
    federate.federate_cmd,
    study.study_cmd,
    transfer.transfer_cmd,
}

if __name__ == "__main__":
    sys.exit(main())
