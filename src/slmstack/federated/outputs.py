"""The server's view of the global model, its per-round checkpoint, and the run's outputs.

Outputs in the run directory: ``metrics.json`` (``strategy``, ``full_model_bytes``, ``rounds``),
``global_adapter/`` (a peft LoRA directory for the dense base), ``clients/<id>/adapter/`` (each client's
last accepted update), ``recombined_stack.yaml`` (a one-stage stack on the dense base with the global
adapter) and ``metrics.png``. Everything is written atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from slmstack.errors import InputError
from slmstack.federated.plan import Plan
from slmstack.io import atomic_dir, atomic_write_json, check_json_shape, guard_read, read_json, save_figure

logger = logging.getLogger(__name__)

__all__ = ["GlobalModel", "load_checkpoint", "save_checkpoint", "write_outputs"]

CHECKPOINT = "checkpoint"


class GlobalModel:
    """The dense base with the LoRA adapter every client shares, and the held-out set to score it on."""

    def __init__(self, plan: Plan) -> None:
        from peft import get_peft_model

        from slmstack.models import load_model
        from slmstack.training.train_data import tokenize_example

        loaded = load_model(plan.model, device="cpu", dtype="float32")
        self.base_parameters = sum(p.numel() for p in loaded.model.parameters())
        torch.manual_seed(plan.seed)  # the initial A is random, B is zero: ΔW starts at 0
        self.model = get_peft_model(loaded.model, plan.lora_config(loaded.model))
        self.tokenizer = loaded.tokenizer
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.heldout = [tokenize_example(self.tokenizer, "", r["prompt"], r["completion"], plan.train["max_length"],
                                         chat) for r in plan.heldout()]  # fmt: skip
        self.batch_size = plan.train["batch_size"]

    @property
    def full_model_bytes(self) -> int:
        """Bytes of one full-weight float32 FedAvg update of the base model."""
        return 4 * self.base_parameters

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The starting global adapter."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def loss(self, state: dict[str, torch.Tensor]) -> float:
        """Held-out loss of the dense base with adapter ``state``."""
        from peft import set_peft_model_state_dict

        from slmstack.training.trainer import eval_loss

        set_peft_model_state_dict(self.model, state)
        return eval_loss(self.model, self.heldout, self.tokenizer.pad_token_id, self.batch_size)

    def save_adapter(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        """``state`` as a peft LoRA directory (safetensors), written under a temp name and renamed."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)
        return atomic_dir(out, lambda tmp: self.model.save_pretrained(tmp, safe_serialization=True))


def save_checkpoint(run_dir: Path, state: dict[str, torch.Tensor], history: list[dict],
                    updates: dict[int, dict[str, torch.Tensor]]) -> None:  # fmt: skip
    """The global adapter, the clients' last updates and the metrics so far, as one directory swap."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "global.safetensors"))
        for client, update in updates.items():
            save_file({k: v.contiguous() for k, v in update.items()}, str(tmp / f"client_{client}.safetensors"))
        atomic_write_json(tmp / "history.json", history)

    atomic_dir(run_dir / CHECKPOINT, write)


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict]] | None:
    """``(global adapter, history)`` of the last finished round, or None."""
    from safetensors.torch import load_file

    path = run_dir / CHECKPOINT
    if not (path / "history.json").is_file():
        return None
    with guard_read(path / "global.safetensors", "federation checkpoint", "Remove it (or --out) to start over."):
        state = load_file(str(path / "global.safetensors"))
    fix = "The checkpoint is damaged: remove it (or use another --out) to start over."
    history = read_json(path / "history.json", "federation checkpoint history", fix, expect=list)
    for entry in history:
        check_json_shape(entry, {"round": int, "eval_loss": (int, float)}, f"{path / 'history.json'}: a round", fix)
    if not history:
        raise InputError(f"{path / 'history.json'}: the federation checkpoint history is empty. {fix}")
    logger.info("resuming after round %d", history[-1]["round"])
    return state, history


def _client_updates(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    found = sorted((run_dir / CHECKPOINT).glob("client_*.safetensors"))
    return {int(p.stem.split("_")[1]): load_file(str(p)) for p in found}


def write_outputs(run_dir: Path, plan: Plan, model: GlobalModel, state: dict[str, torch.Tensor],
                  history: list[dict]) -> None:  # fmt: skip
    """metrics.json and .png, the global adapter, each client's adapter, and the recombined stack."""
    from slmstack.stack.config import GenerationSettings, StackConfig, StageConfig, save_stack_config

    atomic_write_json(run_dir / "metrics.json", {"strategy": plan.strategy, "rank_return": plan.rank_return,
                                                 "full_model_bytes": model.full_model_bytes,
                                                 "clients": [{"sparsity": c["sparsity"]} for c in plan.clients],
                                                 "rounds": history})  # fmt: skip
    model.save_adapter(state, run_dir / "global_adapter")
    for client, update in _client_updates(run_dir).items():
        model.save_adapter(update, run_dir / "clients" / str(client) / "adapter")
    stage = StageConfig(name="answer", role="", template="{input}", adapter="global_adapter",
                        generation=GenerationSettings(max_new_tokens=64))  # fmt: skip
    stack = StackConfig(name=f"recombined-{plan.strategy}", model=plan.model, stages=[stage],
                        description="the dense base with the federated global adapter")  # fmt: skip
    save_stack_config(stack, run_dir / "recombined_stack.yaml")
    _plot(history, run_dir / "metrics.png", plan.strategy)


def _plot(history: list[dict], png: Path, strategy: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["round"] for h in history], [h["eval_loss"] for h in history], marker="o", label="global")
    clients = sorted({c for h in history for c in h.get("client_eval_loss", {})}, key=int)
    for c in clients:
        rows = [h for h in history if c in h.get("client_eval_loss", {})]
        ax.plot([h["round"] for h in rows], [h["client_eval_loss"][c] for h in rows], ls="--", label=f"client {c}")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"federated LoRA ({strategy})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png)
