"""slmstack as an lm-evaluation-harness model: ``--model slmstack --model_args stack=FILE`` (or ``model=REF``).

lm-eval 0.4 discovers external models only once their module is imported, so run it through the
``slmstack-lm-eval`` command (same arguments as ``lm_eval``), or ``import slmstack.evaluation.lm_eval_plugin``
before ``lm_eval.simple_evaluate(model="slmstack", ...)``.

For a stack, each request's context is answered by the final stage, given the upstream stages' outputs
for that context (run once per distinct context, batched); generation returns the stack's final answer.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from slmstack.evaluation.targets import ModelTarget, StackTarget

__all__ = ["SlmstackLM", "main"]


@register_model("slmstack")
class SlmstackLM(LM):
    """An lm-eval ``LM`` backed by a slmstack stack or model (+ adapter)."""

    def __init__(
        self, stack: str | None = None, model: str | None = None, adapter: str | None = None, batch_size: int = 16,
        **_: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        if model is not None:
            self.target: Any = ModelTarget.from_ref(model, adapter)
        else:
            from slmstack.stack.runtime import Stack

            self.target = StackTarget(Stack.from_config(stack, job="score"))
        self.batch_size = int(batch_size)
        self.scorer = self.target.scorer(self.batch_size)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation; for a stack, under the final stage."""
        contexts = [r.args[0] for r in requests]
        prepared, _ = self.target.prepare(contexts, " ")
        stack = isinstance(self.target, StackTarget) and self.target.stack.uses_chat_template
        pairs = [(ctx, r.args[1].lstrip() if stack else r.args[1]) for ctx, r in zip(prepared, requests, strict=True)]
        return self.scorer.loglikelihood(pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Rolling log-likelihood of whole texts (models only)."""
        if isinstance(self.target, StackTarget):
            raise NotImplementedError("perplexity tasks measure a model; pass model=REF instead of stack=FILE")
        return [self.scorer.loglikelihood_rolling(r.args[0])[0] for r in requests]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop string; for a stack, its final answer."""
        out = []
        for r in requests:  # requests may carry different stop strings
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            out += self.target.generate([context], until, int(kwargs.get("max_gen_toks", 256)), self.batch_size)
        return out


def main() -> None:
    """``slmstack-lm-eval``: lm-eval's own CLI with the slmstack model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
