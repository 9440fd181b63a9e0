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
- :mod:`.engine`: :class:`Engine`, the loop that ties them together.
"""

from slmstack.engine.engine import Engine, EngineRequest, engine_supports

__all__ = ["Engine", "EngineRequest", "engine_supports"]
