"""``slmstack export``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slmstack.cli.common import VERBS


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", type=Path, required=True, help="the stack YAML (its model and stage adapters)")
    p.add_argument("--format", required=True, choices=["merged", "gguf-lora", "vllm"],
                   help="merged: HF folders with adapters merged; gguf-lora: llama.cpp LoRA files; vllm: a "
                        "--lora-modules layout")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder (or an earlier export)")


def export_cmd(args: argparse.Namespace) -> int:
    """Write a stack's model and adapters in a format another engine loads."""
    from slmstack.export import export_stack
    from slmstack.stack.config import load_stack_config

    config = load_stack_config(args.stack)
    manifest = export_stack(config, args.format, args.out)
    print(json.dumps({"out": str(args.out), **manifest}))
    if "command" in manifest:
        print(f"serve it with: sh {args.out / 'launch.sh'}\nrun the stack there: slmstack run --stack "
              f"{args.out / manifest['backend_stack']} \"your question\"")  # fmt: skip
    return 0


VERBS.add("export", (_export_args, export_cmd, "export a stack: merged models, GGUF LoRA files, or a vLLM layout"))
