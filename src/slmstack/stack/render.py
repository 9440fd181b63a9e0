"""Terminal rendering of a stack trace as stage cards (rich when available, else plain text)."""

from __future__ import annotations

import sys

from slmstack.stack.runtime import StackResult

__all__ = ["format_cards", "print_cards"]


def format_cards(result: StackResult) -> str:
    """Plain-text stage cards: one block per stage, then the answer."""
    lines = [f"INPUT: {result.input}", ""]
    for i, t in enumerate(result.trace, start=1):
        adapter = f" adapter={t.adapter}" if t.adapter else ""
        lines.append(f"[{i}/{len(result.trace)}] {t.stage}  ({t.tokens_in} in, {t.tokens_out} out, "
                     f"{t.seconds:.2f}s{adapter})")  # fmt: skip
        lines += [_field("prompt", t.prompt), _field("output", t.output), ""]
    lines.append(f"ANSWER: {result.answer}")
    return "\n".join(lines)


def _field(label: str, text: str) -> str:
    return f"  {label}: " + text.replace("\n", "\n" + " " * (len(label) + 4))


def print_cards(result: StackResult, plain: bool = False) -> None:
    """Print the trace; uses rich panels when rich is installed and stdout is a terminal."""
    try:
        from rich.console import Console
        from rich.panel import Panel
        from rich.text import Text
    except ImportError:
        plain = True
    if plain or not sys.stdout.isatty():
        sys.stdout.write(format_cards(result) + "\n")
        return
    console = Console()
    console.print(Panel(Text(result.input), title="input", border_style="cyan"))
    for i, t in enumerate(result.trace, start=1):
        adapter = f" · adapter {t.adapter}" if t.adapter else ""
        body = Text(t.prompt, style="dim") + Text("\n\n") + Text(t.output)
        subtitle = f"{t.tokens_in} in · {t.tokens_out} out · {t.seconds:.2f}s{adapter}"
        console.print(Panel(body, title=f"{i}. {t.stage}", subtitle=subtitle, border_style="blue"))
    console.print(Panel(Text(result.answer), title="answer", border_style="green"))
