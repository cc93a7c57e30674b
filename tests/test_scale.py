"""Speed and scale: the training step's fast path, order-free streaming aggregation, a server
that keeps no reply, and the client's reported seconds."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from fedmud.aggregate import WeightedMean
from fedmud.config import DecompositionConfig, parse_run_config
from fedmud.decomposition import BlockKroneckerUpdate
from fedmud.ledger import Ledger
from fedmud.mud import decompose
from fedmud.rounds import ServerModel
from server.strategy import FedMUD
from fedmud_wire import reply_seconds, upload_record

from .federation import reply_from

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand


def _reference_forward(update, weight, factors, start=None):
    """W + offset + ΔW with the plain product formula (the autograd path the fast one replaces)."""
    out = weight + update.delta_weight(factors)
    if start is not None:
        out = out - update.delta_weight(start)
    return out


@pytest.mark.parametrize("pattern", ["aad", "fab", "ab"])
@pytest.mark.parametrize(
    "shape, sizes",
    [((40, 30), (3, 4)), ((16, 8, 3, 3), (2, 5)), ((7, 5), (3, 3)), ((64, 9), (4, 6))],
    ids=["padded-last-block", "conv", "smaller-than-one-block", "whole-blocks"],
)
def test_block_kronecker_training_step_matches_autograd_through_the_products(pattern, shape, sizes):
    torch.manual_seed(0)
    update = BlockKroneckerUpdate(shape, pattern, *sizes)
    weight = torch.randn(shape)
    pairs_fast, pairs_ref = [], []
    for term in update.terms:
        left = torch.randn(update.blocks, update.a, update.a)
        right = torch.randn(update.blocks, update.b, update.b)
        trained = {f.name for f in update.factors if f.trainable}
        left.requires_grad_(term.left in trained)
        right.requires_grad_(term.right in trained)
        pairs_fast.append((left, right))
        pairs_ref.append((left.detach().clone().requires_grad_(left.requires_grad),
                          right.detach().clone().requires_grad_(right.requires_grad)))
    grad = torch.randn(shape)
    fast = update.add_products(weight, pairs_fast)
    ref = weight + sum(update.product(l, r) for l, r in pairs_ref)[: update.numel].reshape(shape)
    assert torch.allclose(fast, ref, atol=1e-5)
    fast.backward(grad)
    ref.backward(grad)
    for (l, r), (lr, rr) in zip(pairs_fast, pairs_ref):
        for mine, theirs in ((l, lr), (r, rr)):
            assert (mine.grad is None) == (theirs.grad is None)
            if mine.grad is not None:
                assert torch.allclose(mine.grad, theirs.grad, atol=1e-4)


@pytest.mark.parametrize("kind", ["kron", "mat"])
@pytest.mark.parametrize("pattern, init", [("aad", "nonzero-compensated"), ("fab", "nonzero-compensated"),
                                           ("ab", "nonzero-compensated"), ("aad", "zero"), ("aad", "nonzero")])
def test_a_decomposed_tensor_computes_w_plus_offset_plus_delta_and_merges_exactly(kind, pattern, init):
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5))
    decomposed = decompose(model, DecompositionConfig(kind=kind, pattern=pattern, init=init, ratio=0.25, dense_layers=("4",)))
    decomposed.reset(7)
    for name, update in decomposed.updates().items():
        weight = decomposed.base_weight(name)
        with torch.no_grad():  # move the trained factors as training would
            for f in update.update.factors:
                if f.trainable:
                    update.factor(f.name).add_(0.01 * torch.randn(f.shape))
        offset = update.offset()
        expected = weight + update.delta_weight() + (0 if offset is None else offset)
        if init == "nonzero-compensated":
            assert offset is not None
        assert torch.allclose(decomposed.effective_weight(name), expected, atol=1e-5)
    # a merge adds exactly offset + ΔW, computed as every party computes it
    name = next(iter(decomposed.updates()))
    update = decomposed.updates()[name]
    before = decomposed.base_weight(name).clone()
    increment = update.merged_increment()
    decomposed.merge()
    assert torch.equal(decomposed.base_weight(name), before + increment)


def test_the_weighted_mean_is_bitwise_the_same_in_any_order():
    rng = np.random.default_rng(0)
    payloads = [(rng.standard_normal(5000).astype(np.float32) * 10.0 ** rng.integers(-3, 3), int(rng.integers(1, 500)))
                for _ in range(200)]
    results = []
    for order in range(4):
        mean = WeightedMean()
        for i in np.random.default_rng(order).permutation(len(payloads)):
            mean.add(*payloads[i])
        results.append(mean.result())
    assert all(np.array_equal(results[0], r) for r in results[1:])
    exact = sum(p.astype(np.float64) * w for p, w in payloads) / sum(w for _, w in payloads)
    assert np.array_equal(results[0], exact.astype(np.float32)) or np.abs(results[0] - exact).max() < 1e-6


def test_the_strategy_adds_each_reply_and_lets_it_go_before_the_next(task_identity, tmp_path):
    run = parse_run_config({**FLOAT32_UP, "downlink-codec": "float32"})
    server = ServerModel(run)
    strategy = FedMUD(run, server, Ledger(), tmp_path, test_data=[])
    base = server.codec.layout.flatten(server.model.uploaded_state())
    alive: list[weakref.ref] = []
    held_at_once = []

    def replies():
        for i in range(20):
            gc.collect()
            held_at_once.append(sum(ref() is not None for ref in alive))
            values = base + np.float32(1e-3) * np.random.default_rng(i).standard_normal(base.size, dtype=np.float32)
            reply = reply_from(100 + i, upload_record(values, 40, 0.5, 1, i))
            alive.append(weakref.ref(reply))
            yield reply
            del reply

    try:
        _, metrics = strategy.aggregate_train(1, replies())
    finally:
        strategy.writer.close()
    assert metrics["accepted"] == 20
    # when a reply is made, at most the one before it is still referenced (the loop's variable):
    # memory does not grow with the replies
    assert max(held_at_once) <= 1 and len(held_at_once) == 20


def test_the_clients_seconds_are_read_when_they_are_sound_and_dropped_when_not():
    good = upload_record(np.zeros(3, np.float32), 1, 0.1, 1, 0, {"train-s": 1.5, "client-s": 2.0})
    assert reply_seconds(good) == {"train-s": 1.5, "client-s": 2.0}
    bad = upload_record(np.zeros(3, np.float32), 1, 0.1, 1, 0, {"train-s": float("nan"), "client-s": -1.0})
    assert reply_seconds(bad) == {}
    huge = upload_record(np.zeros(3, np.float32), 1, 0.1, 1)
    huge.metric_records["metrics"]["train-s"] = 10**400  # an int no float holds: dropped, not an error
    assert reply_seconds(huge) == {}
    assert reply_seconds(upload_record(np.zeros(3, np.float32), 1, 0.1, 1)) == {}  # an older client: none
