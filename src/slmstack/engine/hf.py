"""The transformers fallback: a left-padded batch through ``model.generate``, one LoRA adapter per row.

Used where the engine cannot run a model (another architecture, a non-LoRA adapter) and as the reference the
engine is tested against. Rows are left-padded into one batch; on a peft model ``adapter_names`` routes each row
through its own adapter (``"__base__"`` = no adapter) in one forward pass.

At inference, peft's LoRA ``Linear.forward`` computes ``result + lora_B(lora_A(dropout(x))) * scaling``: two small
matmuls, then a scaled copy and a sum, each a full pass over the layer's output. :func:`fused_lora` swaps in one
in-place ``addmm`` instead, ``result += (x @ Aᵀ) @ (s·Bᵀ)`` with ``Aᵀ`` and ``s·Bᵀ`` packed once per adapter, on every
plain LoRA ``Linear`` for the duration of a ``with`` block; layers peft handles differently (DoRA and other variants,
merged weights, bitsandbytes) keep peft's own forward. The packed factors are cached per layer and adapter and
rebuilt when the adapter's weights changed. With ``s`` a power of two (``lora_alpha / r`` is 2 by default) the
product is the one peft computes, bit for bit; otherwise it differs by rounding only.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slmstack.engine.text import (
    BASE_ADAPTER,
    Generated,
    GenerationCancelled,
    GenerationSettings,
    TextStream,
    encode_prompts,
    eos_token_ids,
    finish_row,
    prompt_token_limit,
    tail_text,
)

__all__ = ["RowStreamer", "fused_lora", "generate_batch", "only_adapter"]


class RowStreamer:
    """Streams each row's text while ``generate`` decodes: ``on_text(row, delta)`` per new piece of text.

    A transformers streamer (``put``/``end``, as ``BaseStreamer``) that handles batches: the first ``put``
    is the prompt batch and is skipped; each later one holds one new token per row. A row stops streaming
    at its EOS token. Each row's text is a :class:`TextStream`.
    """

    def __init__(self, tokenizer: Any, n_rows: int, eos_ids: list[int], stop: list[str],
                 on_text: Any) -> None:  # fmt: skip
        self.eos_ids = set(eos_ids)
        self.rows = [TextStream(tokenizer, stop, lambda delta, row=row: on_text(row, delta)) for row in range(n_rows)]
        self.done = [False] * n_rows
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Called by ``generate``: first the prompts (B, T), then one token per row (B,)."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.eos_ids:
                self.done[row] = True
                self.rows[row].end()
                continue
            self.rows[row].add(token)

    def end(self) -> None:
        """Called by ``generate`` when decoding ends (the caller sends the final text with :meth:`flush`)."""

    def flush(self, row: int, final: str) -> None:
        """Send whatever of ``final`` (the row's finished answer) has not been streamed yet."""
        self.rows[row].flush(final)


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def _generation_config(settings: GenerationSettings, pad_id: int, eos_ids: list[int]) -> Any:
    from transformers import GenerationConfig

    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "pad_token_id": pad_id,
        "eos_token_id": eos_ids,
        "repetition_penalty": settings.repetition_penalty,
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
    return GenerationConfig(**kwargs)


def generate_batch(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    settings: GenerationSettings,
    adapter_names: list[str] | None = None,
    max_input_tokens: int | None = None,
    on_overflow: str = "truncate",
    chat: bool = True,
    on_text: Any = None,
    cancel: Any = None,
) -> list[Generated]:
    """Generate a continuation for every text in one left-padded batch.

    Args:
        model: a causal LM, or a peft model when ``adapter_names`` names adapters.
        tokenizer: its tokenizer.
        texts: full model inputs (already passed through :func:`format_prompt`).
        settings: decoding settings shared by the batch.
        adapter_names: per-row peft adapter (``"__base__"`` for none); None = use the model as is.
        max_input_tokens: cap on prompt length (default: context window minus ``max_new_tokens``).
        on_overflow: ``truncate`` (keep the last tokens, with a warning) or ``error``.
        chat: the texts came from a chat template (so the tokenizer adds no special tokens).
        on_text: ``on_text(row, delta)`` streams each row's text as it is decoded (see :class:`RowStreamer`).
        cancel: a ``threading.Event``; once set, decoding stops at the next token and
            :class:`GenerationCancelled` is raised.

    Returns:
        One :class:`Generated` per text, in order.
    """
    limit = prompt_token_limit(model, settings.max_new_tokens, max_input_tokens)
    rows, truncated = encode_prompts(tokenizer, texts, limit, on_overflow, chat)
    pad_id = tokenizer.pad_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    batch = _left_pad(rows, pad_id, device)
    extra: dict[str, Any] = {}
    single = None  # the one adapter every row uses: run peft's plain path, not the mixed-batch one
    if adapter_names is not None and hasattr(model, "peft_config"):
        if len(set(adapter_names)) == 1:
            single = adapter_names[0]
        else:
            extra["adapter_names"] = list(adapter_names)
    elif adapter_names is not None and any(name != BASE_ADAPTER for name in adapter_names):
        raise ValueError(f"adapters {sorted(set(adapter_names))} requested, but the model has no adapters loaded")
    streamer = None
    if on_text is not None:
        streamer = RowStreamer(tokenizer, len(rows), eos_ids, settings.stop, on_text)
        extra["streamer"] = streamer
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    config = _generation_config(settings, pad_id, eos_ids)
    criteria = _stopping_criteria(tokenizer, batch["input_ids"].shape[1], settings.stop, cancel)
    if criteria:
        extra["stopping_criteria"] = criteria
    with torch.inference_mode(), only_adapter(model, single), fused_lora(model):
        out = model.generate(**batch, generation_config=config, **extra)
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("generation was cancelled")
    new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()  # (B, new)
    results = [
        finish_row(tokenizer, ids, len(row), cut, eos_ids, settings.stop)
        for ids, row, cut in zip(new_tokens, rows, truncated, strict=True)
    ]
    if streamer is not None:
        for i, r in enumerate(results):
            streamer.flush(i, r.text)
    return results


def _stopping_criteria(tokenizer: Any, width: int, stop: list[str], cancel: Any) -> list[Any]:
    """Stop a row once its text holds a stop string, and every row once ``cancel`` is set.

    transformers' own ``stop_strings`` maps each string onto the vocabulary first and raises on characters
    the vocabulary lacks; matching the decoded text works for any string.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    stops = [s for s in stop if s]

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            if cancel is not None and cancel.is_set():
                return done.fill_(True)
            if stops:
                chars = max(len(s) for s in stops) + 4
                texts = [tail_text(tokenizer, row[width:].tolist(), chars) for row in input_ids]
                done |= torch.tensor([any(s in t for s in stops) for t in texts], device=input_ids.device)
            return done

    return StoppingCriteriaList([_Stop()]) if stops or cancel is not None else []


@contextmanager
def only_adapter(model: Any, name: str | None) -> Iterator[None]:
    """Make ``name`` the only adapter in use (``"__base__"``: none) for the block; None: leave routing alone."""
    if name is None:
        yield
    elif name == BASE_ADAPTER:
        with model.disable_adapter():
            yield
    else:
        previous = model.active_adapter
        model.set_adapter(name, inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter(previous, inference_mode=True)


_CACHE = "_slmstack_fused"  # per-layer dict: adapter -> (weights' identity, Aᵀ, s·Bᵀ)


def _packed(layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    key = (a.data_ptr(), a._version, b.data_ptr(), b._version, layer.scaling[name])
    cache = layer.__dict__.setdefault(_CACHE, {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, a.detach().t().contiguous(), (b.detach().t() * layer.scaling[name]).contiguous())
        cache[name] = hit
    return hit[1], hit[2]


def _add_lora(layer: Any, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
    """``out += lora(x)`` in place; ``x`` is (N, in) and ``out`` (N, out). Packed on entry to :func:`fused_lora`."""
    _, a_t, b_t = layer.__dict__[_CACHE][name]
    if a_t.dtype == out.dtype:
        out.addmm_(x.to(a_t.dtype) @ a_t, b_t)
    else:  # e.g. fp32 adapters on a bf16 base, as peft keeps them: compute in the adapter's dtype
        out.add_(((x.to(a_t.dtype) @ a_t) @ b_t).to(out.dtype))


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapter_names = kwargs.get("adapter_names")
    names = self.active_adapters if adapter_names is None else list(dict.fromkeys(adapter_names))
    if self.merged or any(n in self.lora_variant for n in names) or torch.is_grad_enabled():
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    kwargs.pop("adapter_names", None)
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters:
        return result
    flat_x, flat = x.reshape(-1, x.shape[-1]), result.view(-1, result.shape[-1])
    for name in names:
        if name not in self.lora_A:
            continue  # "__base__", or an adapter that does not touch this layer
        rows = None if adapter_names is None else [i for i, n in enumerate(adapter_names) if n == name]
        if rows is None or len(rows) == len(adapter_names):
            _add_lora(self, name, flat_x, flat)
        else:  # a sub-batch: gather its rows, add, scatter back
            sub = result[rows]
            _add_lora(self, name, x[rows].reshape(-1, x.shape[-1]), sub.view(-1, sub.shape[-1]))
            result[rows] = sub
    return result


def _plain_lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if type(m) is Linear]


@contextmanager
def fused_lora(model: nn.Module) -> Iterator[None]:
    """Use the fused LoRA forward on every plain LoRA ``Linear`` of ``model`` inside the block."""
    if not hasattr(model, "peft_config"):
        yield
        return
    layers = _plain_lora_layers(model)
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
        for name in layer.lora_A:  # pack every adapter now, before activations are allocated: packing
            _packed(layer, name)  # between them at the first forward fragments the heap (+40 % peak RSS)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
