"""What every verb shares: the verb registry and the ``--stack``/``--set`` options."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmstack.registry import Registry

Verb = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
VERBS: Registry[Verb] = Registry("verb")


def add_stack_args(p: argparse.ArgumentParser) -> None:
    """``--stack FILE`` (default: the packaged default stack), repeatable ``--set key=value`` and ``--engine``."""
    p.add_argument("--stack", type=Path, default=None, help="stack YAML (default: the packaged 4-stage stack)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stack field, e.g. --set stages.0.generation.max_new_tokens=32")  # fmt: skip
    add_engine_arg(p, also_override=True)


class _EngineChoice(argparse.Action):
    """``--engine X``: kept as ``args.engine``, and (for stacks) passed on as the override ``engine=X``."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, value: Any, option_string: Any = None) -> None:
        namespace.engine = value
        if self.const:
            namespace.overrides = [*(getattr(namespace, "overrides", None) or []), f"engine={value}"]


def add_engine_arg(p: argparse.ArgumentParser, also_override: bool = False) -> None:
    """``--engine auto|native|compiled|hf``: slmstack's engine where it runs the model, always, or never."""
    from slmstack.stack.config import ENGINES

    p.add_argument("--engine", choices=ENGINES, default="auto", action=_EngineChoice, const=also_override,
                   help="generate on slmstack's engine where it runs the model (auto, the default), always (native; "
                        "compiled: its decode steps through torch.compile, on a CPU), or with transformers' generate "
                        "(hf)")  # fmt: skip
