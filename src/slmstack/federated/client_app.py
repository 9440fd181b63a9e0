"""The Flower ClientApp: a pruned block, a private data partition, local LoRA training.

A client receives the global LoRA factors, trains them on its own partition for ``train.steps`` steps
with slmstack's trainer, and replies with ONLY its LoRA update (an ``ArrayRecord`` named ``arrays``) and
a ``MetricRecord`` named ``metrics`` (``num-examples``, ``client-id``, ``train-loss``). Its data and base
weights never leave it. On ``evaluate`` it reports the loss of its block with the global adapter masked
to it (``W + M ⊙ s·BA``) on the shared held-out set. Under ``secure_aggregation`` it replies through
Flower's ``secaggplus_mod`` with its masked share of the strategy's mean, and keeps its adapter itself.

The client reads the federation plan (``plan.json`` in the run directory, written by
:func:`slmstack.federated.run.prepare`); which client it is comes from ``node_config["partition-id"]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from slmstack.federated.plan import Plan, load_plan

logger = logging.getLogger(__name__)

__all__ = ["app", "build_client_app"]


@dataclass
class _Client:
    """One client's block (a peft model), masks, and tokenised data; kept between rounds in its process."""

    index: int
    model: Any
    tokenizer: Any
    masks: dict[str, torch.Tensor] | None
    train: list
    heldout: list
    own: list[bool]  # per held-out record: is its label one this client's data holds?

    def load(self, arrays: ArrayRecord) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, arrays.to_torch_state_dict())

    def state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(self.model).items()}

    def save_adapter(self, run_dir: Path) -> None:
        """This client's adapter as a peft directory, ``clients/<id>/adapter`` in its run directory."""
        from slmstack.io import atomic_dir

        out = run_dir / "clients" / str(self.index) / "adapter"
        atomic_dir(out, lambda tmp: self.model.save_pretrained(tmp, safe_serialization=True))


def _share(plan: Plan, client: _Client) -> Any:
    """The plan's strategy as this client sees it (its own masks only): what its share of the mean is."""
    from slmstack.federated.strategies import build_strategy

    return build_strategy(plan.strategy, {client.index: client.masks}, plan.scaling, plan.train["rank"],
                          n_clients=len(plan.clients), min_clients=1, rank_return=plan.rank_return)  # fmt: skip


_CLIENTS: dict[tuple[str, int], _Client] = {}


def _build(plan: Plan, index: int) -> _Client:
    from peft import get_peft_model

    from slmstack.models import load_model
    from slmstack.pruning.masks import load_masks
    from slmstack.training.train_data import tokenize_example

    spec = plan.clients[index]
    loaded = load_model(spec["model"], device=plan.device, dtype="float32")
    masks = load_masks(Path(spec["masks"])) if spec.get("masks") else None
    model = get_peft_model(loaded.model, plan.lora_config(loaded.model))
    tok = loaded.tokenizer
    chat = bool(getattr(tok, "chat_template", None))

    def tokenize(records: list[dict]) -> list:
        return [
            tokenize_example(tok, "", r["prompt"], r["completion"], plan.train["max_length"], chat) for r in records
        ]

    mine, heldout = plan.partition(index), plan.heldout()
    labels = {str(r.get(plan.column)) for r in mine}
    own = [str(r.get(plan.column)) in labels for r in heldout]
    logger.info("client %d: block %s, %d training records", index, spec["model"], len(mine))
    return _Client(index, model, tok, masks, tokenize(mine), tokenize(heldout), own)


def _client(context: Context, run_dir: str | None) -> tuple[Plan, _Client]:
    run_dir = run_dir or str(context.run_config["run-dir"])
    index = int(context.node_config["partition-id"])
    plan = load_plan(Path(run_dir))
    key = (run_dir, index)
    if key not in _CLIENTS:
        _CLIENTS[key] = _build(plan, index)
    return plan, _CLIENTS[key]


def build_client_app(run_dir: str | None = None) -> ClientApp:
    """A ClientApp for the run in ``run_dir`` (None: ``run-dir`` from the run config, as under ``flwr run``)."""
    from slmstack.federated.secure import secure_mod

    app = ClientApp(mods=[secure_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from slmstack.federated.secure import client_reply, received_global
        from slmstack.training.trainer import train_lora_steps

        plan, client = _client(context, run_dir)
        secure = received_global(msg.content, list(client.state()))  # a SecAgg+ round sends legacy FitIns
        if secure:
            state, server_round = secure
            client.load(ArrayRecord(state))
        else:
            client.load(msg.content["arrays"])
            server_round = int(msg.content["config"]["server-round"])
        t = plan.train
        seed = plan.seed + 1000 * server_round + client.index
        pad = client.tokenizer.pad_token_id
        stats = train_lora_steps(client.model, pad, client.train, t["steps"], t["batch_size"], t["lr"], seed=seed)
        values = {"num-examples": len(client.train), "client-id": client.index, "train-loss": stats["loss"]}
        if secure:  # the server never sees this update: the client keeps its own adapter
            client.save_adapter(Path(run_dir or str(context.run_config["run-dir"])))
            share = _share(plan, client).share(client.state(), client.index)
            metrics = {k: v for k, v in values.items() if k != "num-examples"}
            return client_reply(msg, share, len(client.train), metrics, plan.secure["clipping_range"])
        return Message(RecordDict({"arrays": ArrayRecord(client.state()), "metrics": MetricRecord(values)}),
                       reply_to=msg)  # fmt: skip

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from slmstack.federated.lora import masked_merge
        from slmstack.training.trainer import eval_loss

        plan, client = _client(context, run_dir)
        client.load(msg.content["arrays"])
        pad, size = client.tokenizer.pad_token_id, plan.train["batch_size"]
        values = {"num-examples": len(client.heldout), "client-id": client.index}
        own = [e for e, mine in zip(client.heldout, client.own, strict=True) if mine]
        other = [e for e, mine in zip(client.heldout, client.own, strict=True) if not mine]
        with masked_merge(client.model, client.masks) as merged:
            parts = {name: (eval_loss(merged, rows, pad, size), sum(e.n_targets for e in rows))
                     for name, rows in (("own", own), ("other", other)) if rows}  # fmt: skip
        # the whole set's per-token loss is the token-weighted mean of its two halves: one pass, not two
        tokens = sum(n for _, n in parts.values())
        values["eval-loss"] = sum(loss * n for loss, n in parts.values()) / max(tokens, 1)
        for name in ("own", "other"):
            values[f"eval-loss-{name}"] = parts[name][0] if name in parts else -1.0
        metrics = MetricRecord(values)
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = build_client_app()
