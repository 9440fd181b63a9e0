"""Strategy maths against values computed by hand, and reply validation, with in-memory Flower messages.

One LoRA module, out = in = 2, rank 1, scaling 1. Client 0 (1 sample, dense block):
A0 = [1, 2], B0 = [1, 0]ᵀ -> ΔW0 = [[1, 2], [0, 0]]. Client 1 (3 samples, input column 1 pruned):
A1 = [3, 0], B1 = [1, 1]ᵀ -> ΔW1 = [[3, 0], [3, 0]], M1 = [[1, 0], [1, 0]].
"""

from __future__ import annotations

import math

import pytest
import torch

flwr = pytest.importorskip("flwr")
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402

from slmstack.federated.lora import dense_update, refactor_svd  # noqa: E402
from slmstack.federated.strategies import STRATEGIES, build_strategy  # noqa: E402

KA, KB = "base_model.model.l.q.lora_A.weight", "base_model.model.l.q.lora_B.weight"
GLOBAL = {KA: torch.tensor([[0.5, 0.5]]), KB: torch.tensor([[0.0], [0.0]])}
CLIENTS = [
    {KA: torch.tensor([[1.0, 2.0]]), KB: torch.tensor([[1.0], [0.0]])},
    {KA: torch.tensor([[3.0, 0.0]]), KB: torch.tensor([[1.0], [1.0]])},
]
MASKS = {0: None, 1: {"l.q.weight": torch.tensor([[True, False], [True, False]])}}
WEIGHTS = [1.0, 3.0]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Flower stamps messages with the running task's identity; outside a run, give it one
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def _strategy(name: str, **kw):
    s = build_strategy(name, MASKS, scaling=1.0, rank=1, n_clients=2, min_clients=1, **kw)
    s.current = {k: v.clone() for k, v in GLOBAL.items()}
    return s


def _reply(state: dict, client: int, n: float, node: int = 1) -> Message:
    out = Message(RecordDict({"arrays": ArrayRecord(state), "config": flwr.app.ConfigRecord()}), node, "train")
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"client-id": client,
                                                                                  "num-examples": n})})  # fmt: skip
    return Message(content, reply_to=out)


def test_fedavg_is_the_sample_weighted_mean_of_the_factors() -> None:
    out = _strategy("fedavg").combine(CLIENTS, WEIGHTS, [0, 1])
    torch.testing.assert_close(out[KA], torch.tensor([[(1 * 1 + 3 * 3) / 4, (1 * 2 + 3 * 0) / 4]]))
    torch.testing.assert_close(out[KB], torch.tensor([[1.0], [(0 + 3 * 1) / 4]]))


def test_heterofl_averages_a_channel_over_the_clients_that_hold_it() -> None:
    out = _strategy("heterofl").combine(CLIENTS, WEIGHTS, [0, 1])
    # input column 1 is pruned in client 1's block: A[:, 1] comes from client 0 alone
    torch.testing.assert_close(out[KA], torch.tensor([[2.5, 2.0]]))
    torch.testing.assert_close(out[KB], torch.tensor([[1.0], [0.75]]))


def test_lego_svd_is_the_masked_mean_of_the_dense_updates() -> None:
    out = _strategy("lego", rank_return="svd").combine(CLIENTS, WEIGHTS, [0, 1])
    # element (0,0): (1·1 + 3·3)/4; (0,1): client 0 only; (1,0): (1·0 + 3·3)/4; (1,1): client 0 only
    expected = torch.tensor([[2.5, 2.0], [2.25, 0.0]], dtype=torch.float64)
    u, s, vh = torch.linalg.svd(expected)
    rank1 = s[0] * torch.outer(u[:, 0], vh[0])  # the best rank-1 approximation, by hand
    torch.testing.assert_close(dense_update(out[KA], out[KB], 1.0), rank1, atol=1e-5, rtol=0)


def test_lego_factors_weights_each_channel_by_its_kept_share() -> None:
    out = _strategy("lego", rank_return="factors").combine(CLIENTS, WEIGHTS, [0, 1])
    # A column 0: client 1 keeps all of it (weight 3); column 1: client 1 keeps none (weight 0)
    torch.testing.assert_close(out[KA], torch.tensor([[2.5, 2.0]]))
    # B rows: client 1 keeps half of each row -> weights 1 and 1.5
    torch.testing.assert_close(out[KB], torch.tensor([[1.0], [(0 * 1 + 1 * 1.5) / 2.5]]))


def test_an_element_no_client_keeps_keeps_the_previous_global_value() -> None:
    strategy = build_strategy("lego", {0: MASKS[1]}, scaling=1.0, rank=1, n_clients=1, min_clients=1)
    strategy.current = {KA: torch.tensor([[1.0, 1.0]]), KB: torch.tensor([[1.0], [1.0]])}  # ΔW = all ones
    out = strategy.combine([CLIENTS[1]], [3.0], [0])
    delta = dense_update(out[KA], out[KB], 1.0)
    # column 1 is pruned for the only client: it stays 1; column 0 is the client's 3
    torch.testing.assert_close(delta, torch.tensor([[3.0, 1.0], [3.0, 1.0]], dtype=torch.float64), atol=1e-5, rtol=0)


def test_svd_refactor_is_exact_when_the_rank_suffices() -> None:
    delta = torch.tensor([[2.0, 4.0], [1.0, 2.0]], dtype=torch.float64)  # rank 1
    a, b = refactor_svd(delta, rank=1, scaling=2.0)
    torch.testing.assert_close(dense_update(a, b, 2.0), delta, atol=1e-5, rtol=0)


def test_bad_updates_are_rejected_and_counted_never_averaged() -> None:
    strategy = _strategy("fedavg")
    good = _reply(CLIENTS[0], 0, 1.0)
    nan = _reply({KA: torch.tensor([[math.nan, 0.0]]), KB: CLIENTS[1][KB]}, 1, 3.0)
    wrong_shape = _reply({KA: torch.zeros(1, 3), KB: CLIENTS[1][KB]}, 2, 3.0)
    wrong_name = _reply({KA: CLIENTS[1][KA], "base_model.model.x.lora_B.weight": CLIENTS[1][KB]}, 3, 3.0)
    arrays, _ = strategy.aggregate_train(1, [good, nan, wrong_shape, wrong_name])
    log = strategy.last_round
    assert log.ok == [0] and len(log.failed) == 3
    assert "NaN" in log.failed[0] and "shape" in log.failed[1] and "names differ" in log.failed[2]
    torch.testing.assert_close(arrays.to_torch_state_dict()[KA], CLIENTS[0][KA])  # only the good one


def test_too_few_accepted_updates_keep_the_global_adapter() -> None:
    strategy = build_strategy("fedavg", MASKS, scaling=1.0, rank=1, n_clients=2, min_clients=2)
    strategy.current = dict(GLOBAL)
    arrays, metrics = strategy.aggregate_train(1, [_reply(CLIENTS[0], 0, 1.0)])
    assert arrays is None and metrics is None and strategy.last_round.ok == [0]


def test_registry_lists_the_three_strategies_with_did_you_mean() -> None:
    assert list(STRATEGIES) == ["fedavg", "heterofl", "lego"]
    with pytest.raises(Exception, match="Did you mean 'lego'"):
        STRATEGIES.get("legoo")
