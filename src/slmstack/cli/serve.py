"""``slmstack serve``."""

from __future__ import annotations

import argparse
import os

from slmstack.cli.common import VERBS, add_engine_arg


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", action="append", default=[], metavar="FILE", help="a stack YAML to serve (repeatable)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=REF",
                   help="also serve a plain model under NAME, e.g. base=default (repeatable)")  # fmt: skip
    p.add_argument("--dtype", default=None,
                   help="weights of every in-process stack: auto, float32, bfloat16, float16 or "
                        "float16-weights (x86 CPU: float16 weights, float32 math). Default: each stack's")  # fmt: skip
    add_engine_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=16, help="requests per stack batch")
    p.add_argument("--max-wait-ms", type=float, default=20.0, help="how long a request waits for company")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or SLMSTACK_API_KEY)")


def serve_cmd(args: argparse.Namespace) -> int:
    """Serve stacks over an OpenAI-compatible API."""
    from slmstack.serving.server import require_serve

    require_serve()
    from slmstack.serving.server import bind_socket, serve, stack_configs, start_engines
    from slmstack.serving.settings import ServeSettings

    # an empty key (e.g. --api-key "$KEY" with KEY unset) is refused, never read as "no authentication"
    key = args.api_key if args.api_key is not None else os.environ.get("SLMSTACK_API_KEY")
    settings = ServeSettings(host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                             max_wait_ms=args.max_wait_ms, max_prompt_tokens=args.max_prompt_tokens,
                             max_tokens=args.max_tokens, api_key=key)  # fmt: skip
    configs = stack_configs(args.stack, args.model, dtype=args.dtype, engine=args.engine)
    sock = bind_socket(settings.host, settings.port)  # a bad --host or --port fails before any model loads
    try:
        from slmstack.stack.runtime import Stack

        stacks = {c.name: s for c, s in zip(configs, Stack.sharing_bases(configs), strict=True)}
        start_engines(stacks, settings)  # an engine that cannot load is refused here, before the server starts
    except BaseException:
        sock.close()
        raise
    serve(stacks, settings, sock)
    return 0


VERBS.add("serve", (_serve_args, serve_cmd, "serve stacks over an OpenAI-compatible HTTP API"))
