"""Aggregation-aware decomposition makes factor averaging exact; plain A·B does not."""

import numpy as np
import pytest
import torch

from fedmud.aggregate import aggregate_factors
from fedmud.decomposition import BlockKroneckerUpdate, LowRankUpdate

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand

WEIGHTS = [3.0, 1.0, 2.0]


def _client_factors(update, seed):
    g = torch.Generator().manual_seed(seed)
    return {f.name: torch.randn(f.shape, generator=g, dtype=torch.float64) for f in update.factors}


def _shared_frozen(update, clients):
    """Every client holds the same seed-drawn frozen factors."""
    frozen = {f.name for f in update.factors if not f.trainable}
    for c in clients[1:]:
        for name in frozen:
            c[name] = clients[0][name]
    return clients


def _mean_of_deltas(update, clients):
    total = sum(w * update.delta_weight(c) for w, c in zip(WEIGHTS, clients))
    return total / sum(WEIGHTS)


def _delta_of_mean(update, clients):
    trained = [f.name for f in update.factors if f.trainable]
    mean = dict(clients[0])
    for name in trained:
        flat = aggregate_factors((c[name].numpy().reshape(-1), w) for c, w in zip(clients, WEIGHTS))
        mean[name] = torch.from_numpy(flat.astype(np.float64)).reshape(clients[0][name].shape)
    return update.delta_weight(mean)


UPDATES = {
    "mat": lambda pattern: LowRankUpdate((64, 32, 3, 3), pattern, rank=4),
    "kron": lambda pattern: BlockKroneckerUpdate((64, 32, 3, 3), pattern, 4, 5),
    "kron-linear": lambda pattern: BlockKroneckerUpdate((10, 256), pattern, 3, 4),
}


@pytest.mark.parametrize("kind", sorted(UPDATES))
@pytest.mark.parametrize("pattern", ["aad", "fab"])
def test_linear_patterns_aggregate_exactly(kind, pattern):
    update = UPDATES[kind](pattern)
    clients = _shared_frozen(update, [_client_factors(update, s) for s in range(3)])
    # float32 payloads: the mean is exact up to float32 rounding
    assert torch.allclose(_delta_of_mean(update, clients), _mean_of_deltas(update, clients), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mat", "kron"])
def test_ab_factor_averaging_is_not_the_mean_update(kind):
    update = UPDATES[kind]("ab")
    clients = [_client_factors(update, s) for s in range(3)]
    gap = (_delta_of_mean(update, clients) - _mean_of_deltas(update, clients)).abs().max()
    assert gap > 1e-1


def test_kron_block_rank_exceeds_same_budget_low_rank():
    """BKD: a block reaches rank a·b with a²+b² parameters per block."""
    update = BlockKroneckerUpdate((16, 16), "ab", 4, 4)  # one 16x16 block, 32 parameters
    factors = _client_factors(update, 0)
    assert torch.linalg.matrix_rank(update.delta_weight(factors)) == 16
    low_rank = LowRankUpdate((16, 16), "ab", rank=1)  # 32 parameters too
    assert torch.linalg.matrix_rank(low_rank.delta_weight(_client_factors(low_rank, 0))) == 1


# --------------------------------------------------------------------------- whole model, every init
def _trained_clients(model, seed, weights):
    """Each client's uploaded state after 'training' (a random step on its trained factors)."""
    out = []
    for c, _ in enumerate(weights):
        model.reset(seed)
        g = torch.Generator().manual_seed(1000 + c)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        effective = {n: model.effective_weight(n).detach().clone() for n in model.updates()}
        out.append(({n: t.clone() for n, t in model.uploaded_state().items()}, effective))
    model.clear()
    return out


@pytest.mark.parametrize("init", ["zero", "nonzero", "nonzero-compensated", "hrp"])
@pytest.mark.parametrize("kind", ["kron", "mat"])
def test_aad_merge_is_the_weighted_mean_of_the_clients_models_for_every_init(init, kind):
    """What the server merges equals the mean of what clients computed with, offsets included."""
    from fedmud.config import parse_run_config
    from fedmud.rounds import ServerModel

    # float32 links: the merge is the exact mean (a lossy link code merges it as decoded, see test_sync)
    server = ServerModel(parse_run_config({**FLOAT32_UP, "init": init, "kind": kind, "hrp-rounds": 1, "downlink-codec": "float32"}))
    if init == "hrp":  # a preheat round first, so that round 2 runs on the HRP directions
        server.apply_round(1, 11, [({"payload": server.codec.layout.flatten(s)}, 1.0) for s, _ in _trained_clients(server.model, 11, [1.0])])
        assert server.model.hrp_ready
    clients = _trained_clients(server.model, 22, WEIGHTS)
    server.apply_round(2, 22, [({"payload": server.codec.layout.flatten(s)}, w) for (s, _), w in zip(clients, WEIGHTS)])
    for name in server.model.updates():
        expected = sum(w * eff[name] for (_, eff), w in zip(clients, WEIGHTS)) / sum(WEIGHTS)
        assert torch.allclose(server.model.base_weight(name), expected, atol=2e-5), name
