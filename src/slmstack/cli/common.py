"""What every verb shares: the verb registry and the ``--stack``/``--set`` options."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from slmstack.registry import Registry

Verb = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
VERBS: Registry[Verb] = Registry("verb")


def add_stack_args(p: argparse.ArgumentParser) -> None:
    """``--stack FILE`` (default: the packaged default stack) and repeatable ``--set key=value``."""
    p.add_argument("--stack", type=Path, default=None, help="stack YAML (default: the packaged 4-stage stack)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stack field, e.g. --set stages.0.generation.max_new_tokens=32")  # fmt: skip
