"""Serving stacks over an OpenAI-compatible HTTP API, micro-batched (needs the ``serve`` extra)."""
