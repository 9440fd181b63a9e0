"""A small generation engine made for stacks: multi-LoRA continuous batching on a static KV cache.

Modelled on gpt-fast (a decoder in plain PyTorch, a static cache) and nano-vllm (a scheduler that knows no
tensors, a model runner that knows no requests, decode steps captured as CUDA graphs). See ``docs/engine.md``.

- :mod:`.weights`: which models run here, and their weights read out of a Hugging Face model;
- :mod:`.layers`: RMSNorm, RoPE, attention over the cache, and the weight formats of a linear layer;
- :mod:`.lora`: LoRA adapters as packed factors, a row's adapter chosen per step;
- :mod:`.cache`: the per-slot KV cache;
- :mod:`.prefix`: prompt prefixes kept across requests (a stage's system turn and role, computed once);
- :mod:`.model`: the decoder forward over one step's flat batch of tokens;
- :mod:`.sampling`: greedy, temperature / top-k / top-p with a seed, repetition penalty;
- :mod:`.scheduler`: requests joining and leaving between steps, chunked prefill;
- :mod:`.scoring`: lm-eval's log-likelihood requests on the decoder, each context once;
- :mod:`.engine`: :class:`Engine`, the loop that ties them together;
- :mod:`.text`: what every way of generating shares: settings, results, text streams, stop strings;
- :mod:`.hf`: the transformers fallback (``generate`` on a left-padded batch, fused LoRA).

Nothing here imports :mod:`slmstack.stack`: stacks use the engine, never the other way round. Names are imported
lazily, so ``import slmstack.engine.text`` does not build the engine's modules.
"""

from __future__ import annotations

from slmstack._lazy import lazy_getattr

_EXPORTS = {
    "Engine": "slmstack.engine.engine",
    "EngineOptions": "slmstack.engine.options",
    "EngineRequest": "slmstack.engine.request",
    "EngineUnsupported": "slmstack.engine.weights",
    "engine_supports": "slmstack.engine.weights",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("slmstack.engine", _EXPORTS)
