"""Secure aggregation through Flower's SecAgg+ workflow and mod: the aggregate in the clear, to quantisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
from safetensors.torch import load_file  # noqa: E402

from slmstack.federated.config import load_federate_config  # noqa: E402
from slmstack.federated.lora import dense_update, factor_pairs  # noqa: E402
from slmstack.federated.run import federate, prepare  # noqa: E402
from slmstack.federated.strategies import build_strategy, weighted_mean  # noqa: E402

from .test_federate import _config  # noqa: E402


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(path / "adapter_model.safetensors"))
    return {f"base_model.model.{k.removeprefix('base_model.model.')}": v for k, v in state.items()}


def _deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {m: dense_update(state[a], state[b], 2.0) for m, (a, b) in factor_pairs(state).items()}


def test_secagg_gives_the_plain_lego_aggregate_and_survives_a_dropout(tiny_model_dir: Path, tmp_path: Path) -> None:
    from slmstack.pruning.masks import load_masks

    # Prepare: one round, three pruned clients, lego under SecAgg+; client 2 raises on its data mid-protocol
    cfg = load_federate_config(_config(tmp_path, tiny_model_dir, rounds=1, rank_return="svd",
                                       secure_aggregation={"enabled": True}))  # fmt: skip
    out = tmp_path / "secure"
    prepare(cfg, out)
    (out / "partitions" / "client_2.jsonl").write_text('{"prompt": "broken"\n')
    # Execute
    metrics = federate(cfg, out, resume=True)
    # Assert: the round went on without client 2 (SecAgg+ removed its masks from the shares it left)
    last = metrics["rounds"][-1]
    assert last["clients_ok"] == 2 and last["clients_failed"] == 1
    # the server never held an update: each client that finished wrote its own adapter
    updates = [_adapter(out / "clients" / str(c) / "adapter") for c in range(2)]
    assert not (out / "clients" / "2").exists()
    assert not list((out / "checkpoint").glob("client_*.safetensors"))
    # the masked mean SecAgg+ unmasked is the one computed in the clear from those updates, to quantisation
    plan = json.loads((out / "plan.json").read_text())
    masks = {i: load_masks(Path(c["masks"])) if c.get("masks") else None for i, c in enumerate(plan["clients"])}
    lego = build_strategy("lego", masks, 2.0, 4, n_clients=3, min_clients=1, rank_return="svd")
    lego.current = updates[0]
    clear = _deltas(lego.combine(updates, [float(c["records"]) for c in plan["clients"][:2]], [0, 1]))
    secure = _deltas(_adapter(out / "global_adapter"))
    assert clear.keys() == secure.keys() and clear
    scale = max(float(v.abs().max()) for v in clear.values())
    assert scale > 0
    assert all(torch.allclose(clear[m], secure[m], atol=1e-4 * scale, rtol=0) for m in clear)
    assert any(not torch.equal(clear[m], secure[m]) for m in clear)  # quantised: the masked path ran
    # each client uploaded one masked int64 vector: SecAgg+'s weight factor, then its share
    # (under lego-svd, the masked dense ΔW and the mask of every module)
    entries = 1 + sum(2 * v.numel() for v in clear.values())
    assert last["bytes_up"] == 8 * entries * 2


def test_a_share_holds_only_what_the_weighted_mean_needs() -> None:
    # Hand-computed: one module 2x2, rank 1, scaling 1; client 1 prunes input column 1 (mask [[1,0],[1,0]])
    ka, kb = "base_model.model.l.q.lora_A.weight", "base_model.model.l.q.lora_B.weight"
    masks = {1: {"l.q.weight": torch.tensor([[True, False], [True, False]])}}
    lego = build_strategy("lego", masks, 1.0, 1, n_clients=2, min_clients=1, rank_return="svd")
    state = {ka: torch.tensor([[3.0, 4.0]]), kb: torch.tensor([[1.0], [1.0]])}  # ΔW = [[3, 4], [3, 4]]
    share = lego.share(state, 1)
    assert set(share) == {"l.q.delta", "l.q.delta:held"}
    assert torch.equal(share["l.q.delta"], torch.tensor([[3.0, 0.0], [3.0, 0.0]]))
    assert torch.equal(share["l.q.delta:held"], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    # with a dense client 0 (ΔW0 = 1 everywhere, 1 sample) and client 1 (3 samples): kept elements average,
    # column 1 is held by client 0 alone: [[(1 + 9) / 4, 1], [(1 + 9) / 4, 1]]
    dense = {ka: torch.tensor([[1.0, 1.0]]), kb: torch.tensor([[1.0], [1.0]])}
    mean = weighted_mean([lego.share(dense, 0), share], [1.0, 3.0])
    lego.current = {ka: torch.zeros(1, 2), kb: torch.zeros(2, 1)}
    new = lego.finish(mean)
    assert torch.allclose(dense_update(new[ka], new[kb], 1.0).float(), torch.tensor([[2.5, 1.0], [2.5, 1.0]]))


def test_secure_aggregation_config_is_checked(tiny_model_dir: Path, tmp_path) -> None:
    from slmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="exclude each other"):
        load_federate_config(_config(tmp_path, tiny_model_dir, secure_aggregation={"enabled": True},
                                     privacy={"enabled": True}))  # fmt: skip
    with pytest.raises(ConfigError, match="at least 2 clients"):
        load_federate_config(_config(tmp_path, tiny_model_dir, secure_aggregation={"enabled": True},
                                     clients=[{"sparsity": 0.0}], min_clients=1))  # fmt: skip
