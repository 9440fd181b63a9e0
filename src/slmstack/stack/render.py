"""Terminal rendering of a stack trace as stage cards (rich when available, else plain text)."""

from __future__ import annotations

import sys

from slmstack.stack.trace import StackResult, StageTrace

__all__ = ["format_cards", "print_cards"]


def format_cards(result: StackResult) -> str:
    """Plain-text stage cards: one block per stage, then the answer."""
    lines = [f"INPUT: {result.input}", ""]
    for i, t in enumerate(result.trace, start=1):
        lines.append(f"[{i}/{len(result.trace)}] {t.stage}  ({_meta(t, ', ')})")
        lines += [_field("query" if t.kind == "retrieve" else "prompt", t.prompt), _field("output", t.output), ""]
    lines.append(f"ANSWER: {result.answer}")
    return "\n".join(lines)


def _meta(t: StageTrace, sep: str) -> str:
    """What a card says of its stage: tokens and time, or, for a retrieve stage, the passages it found."""
    if t.kind == "retrieve":
        found = sum(1 for line in t.output.split("\n") if line.strip())
        return f"retrieve: {found} passage{'' if found == 1 else 's'}{sep}no model{sep}{t.seconds:.2f}s"
    adapter = f"{sep}adapter {t.adapter}" if t.adapter else ""
    return f"{t.tokens_in} in{sep}{t.tokens_out} out{sep}{t.seconds:.2f}s{adapter}"


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
        body = Text(t.prompt, style="dim") + Text("\n\n") + Text(t.output)
        subtitle = _meta(t, " · ")
        console.print(Panel(body, title=f"{i}. {t.stage}", subtitle=subtitle, border_style="blue"))
    console.print(Panel(Text(result.answer), title="answer", border_style="green"))
