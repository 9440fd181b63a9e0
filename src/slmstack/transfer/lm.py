"""One model API for decoder-only and encoder-decoder models: train (LoRA or full), choose a label, generate.

Decoder-only models load through :func:`slmstack.models.load_model` (any model reference, the default
included) and see prompts as the stacks do (the chat template when the tokenizer has one). Encoder-decoder
models (BART, T5: a local directory whose config says ``is_encoder_decoder``, or a hub id) load through
``AutoModelForSeq2SeqLM``. Training goes through the existing trainer (:func:`train_lora_steps`), whose loss
handles both. A label is chosen by the highest summed log-likelihood of the label tokens (as lm-eval's
``acc``); generation is greedy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from slmstack.errors import ModelNotFoundError
from slmstack.io import read_json

logger = logging.getLogger(__name__)

__all__ = ["TransferModel", "is_seq2seq"]


def is_seq2seq(ref: str) -> bool:
    """Whether ``ref`` (a local directory or hub id) is an encoder-decoder model."""
    config = Path(ref).expanduser() / "config.json"
    if config.is_file():
        return bool(read_json(config, "model config", expect=dict).get("is_encoder_decoder"))
    if Path(ref).expanduser().exists() or ref == "default" or ref.endswith(".gguf"):
        return False
    try:
        from transformers import AutoConfig

        return bool(getattr(AutoConfig.from_pretrained(ref), "is_encoder_decoder", False))
    except OSError:
        return False


class TransferModel:
    """A causal or seq2seq model with its tokenizer, optionally with a LoRA adapter being trained."""

    def __init__(self, ref: str, max_length: int = 256, device: str = "auto", engine: str = "auto") -> None:
        from slmstack.models import pick_device

        self.ref, self.max_length, self.engine = ref, max_length, engine
        device = str(pick_device(device))
        self.seq2seq = is_seq2seq(ref)
        if self.seq2seq:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(ref)
                self.model = AutoModelForSeq2SeqLM.from_pretrained(ref, dtype=torch.float32).to(device).eval()
            except (OSError, ValueError) as exc:
                raise ModelNotFoundError(f"{ref}: cannot load this encoder-decoder model ({exc})") from None
            self.chat = False
        else:
            from slmstack.models import load_model

            loaded = load_model(ref, device=device, dtype="float32")
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
            self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # ---- training
    def features(self, prompt: str, target: str) -> Any:
        """A tokenised training example (prompt positions carry no loss)."""
        from slmstack.training.train_data import tokenize_example, tokenize_seq2seq

        if self.seq2seq:
            return tokenize_seq2seq(self.tokenizer, prompt, target, self.max_length)
        return tokenize_example(self.tokenizer, "", prompt, target, self.max_length, self.chat)

    def prepare(self, method: Literal["lora", "full"], rank: int, alpha: int, adapter: Path | None = None) -> None:
        """Make the model trainable: a new (or loaded) LoRA adapter, or every weight (``full``)."""
        if method == "full":
            for p in self.model.parameters():
                p.requires_grad_(True)
            return
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter is not None:
            self.model = PeftModel.from_pretrained(self.model, str(adapter), is_trainable=True)
            return
        if self.seq2seq:
            targets = ["q_proj", "v_proj"] if self.model.config.model_type == "bart" else ["q", "v"]
        else:
            from slmstack.arch import get_arch

            targets = get_arch(self.model).lora_targets
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                            task_type="SEQ_2_SEQ_LM" if self.seq2seq else "CAUSAL_LM")  # fmt: skip
        self.model = get_peft_model(self.model, config)

    def train(self, pairs: list[tuple[str, str]], steps: int, batch_size: int, lr: float, seed: int) -> dict:
        """``steps`` AdamW steps over ``pairs`` (prompt, target) with the existing trainer."""
        from slmstack.training.trainer import train_lora_steps

        torch.manual_seed(seed)
        examples = [self.features(p, t) for p, t in pairs]
        return train_lora_steps(self.model, self.tokenizer.pad_token_id, examples, steps, batch_size, lr, seed=seed,
                                precision="fp32")  # fmt: skip

    def save(self, out: Path) -> None:
        """The adapter (LoRA) or the whole model (full), as safetensors."""
        self.model.save_pretrained(str(out), safe_serialization=True)
        if not hasattr(self.model, "peft_config"):
            self.tokenizer.save_pretrained(str(out))

    # ---- scoring
    @torch.no_grad()
    def choose(self, prompts: list[str], labels: list[str], batch_size: int = 8) -> list[str]:
        """For each prompt, the label whose tokens have the highest summed log-likelihood.

        Decoder-only models score through the evaluation harness's :class:`Scorer` (each prompt runs once,
        its labels on top of its KV cache), with the same tokenisation as training.
        """
        pairs = [(p, label) for p in prompts for label in labels]
        if self.seq2seq:
            scores = [x for s in range(0, len(pairs), batch_size) for x in self._logprobs(pairs[s : s + batch_size])]
        else:
            from slmstack.evaluation.scorer import Scorer, _Request

            requests = []
            for i, (p, label) in enumerate(pairs):
                ex = self.features(p, label)
                requests.append(_Request(i, ex.input_ids[: -ex.n_targets], ex.input_ids[-ex.n_targets :]))
            scorer = Scorer(self.model, self.tokenizer, batch_size=batch_size, max_length=self.max_length)
            scores = [ll for ll, _ in scorer.loglikelihood_tokens(requests)]
        best = []
        for i in range(len(prompts)):
            row = scores[i * len(labels) : (i + 1) * len(labels)]
            best.append(labels[max(range(len(labels)), key=row.__getitem__)])
        return best

    def _logprobs(self, pairs: list[tuple[str, str]]) -> list[float]:
        from slmstack.training.train_data import collate

        batch = collate([self.features(p, t) for p, t in pairs], self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        self.model.eval()
        if self.seq2seq:
            labels = batch["decoder_labels"]
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=labels).logits  # fmt: skip
        else:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]  # position t predicts token t+1
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        keep = labels != -100
        picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
        return (picked * keep).sum(dim=1).tolist()

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
        """Greedy completions of ``prompts``."""
        self.model.eval()
        if not self.seq2seq:  # the one way slmstack generates in process (the engine where it runs the model)
            from slmstack.stack.backends import LocalBackend, Row
            from slmstack.stack.config import GenerationSettings

            if getattr(self, "_backend", None) is None or self._backend.model is not self.model:
                # job "score": transfer's generative tasks are evaluation (ROUGE, exact match), kept in float32
                self._backend = LocalBackend(self.model, self.tokenizer, engine=self.engine, max_batch=batch_size,
                                             job="score")  # fmt: skip
            adapter = self._backend.default_adapter()
            settings = GenerationSettings(max_new_tokens=max_new_tokens)
            rows = [Row("", p, adapter) for p in prompts]
            return [g.text for g in self._backend.generate(rows, settings, self.chat, self.max_length, "truncate")]
        device = next(self.model.parameters()).device
        out = []
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s : s + batch_size]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=True)  # fmt: skip
            enc = {k: v.to(device) for k, v in enc.items()}
            ids = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
            out += [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return out
