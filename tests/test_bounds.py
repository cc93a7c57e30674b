"""A valid reply cannot take over the model: its weight is capped and its update can be norm-bounded."""

import json

import numpy as np
import pytest
import torch

from fedmud.bounds import cap_examples, update_norm
from fedmud.config import parse_run_config
from fedmud.ledger import Ledger
from fedmud.rounds import ServerModel
from fedmud.seeds import round_seed
from server.strategy import FedMUD
from .federation import reply_from
from .test_results_row import results_row
from fedmud_wire import upload_record

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand

ROUND = 3
SEED = round_seed(0, ROUND)


def _server(**cfg) -> ServerModel:
    """float32 links: the merged update is read back from the link as the exact weighted mean."""
    server = ServerModel(parse_run_config({**FLOAT32_UP, "downlink-codec": "float32", **cfg}))
    server.round = ROUND - 1
    return server


def _update(server: ServerModel, scale: float, seed: int) -> np.ndarray:
    """A random update of norm ``scale`` in upload coordinates."""
    x = np.random.default_rng(seed).standard_normal(server.codec.layout.numel)
    return x / np.linalg.norm(x) * scale


def _upload(server: ServerModel, update: np.ndarray) -> dict[str, np.ndarray]:
    """What a client sends for ``update``: the values (float32) or the encoded residual."""
    reference = server.reference(SEED)
    if server.codec.residual:
        return server.codec.encode(update.astype(np.float32))
    return server.codec.encode((reference + update).astype(np.float32))


def _merged_update(server: ServerModel, reference: np.ndarray) -> np.ndarray:
    """The round's aggregated upload minus the round-start values."""
    return server.chain.links[-1].payload.astype(np.float64) - reference


# ------------------------------------------------------------------------- num-examples
def test_a_reply_claiming_ten_to_the_fifteen_examples_weighs_as_max_examples():
    server = _server(**{"max-examples": 100})
    honest, liar = _update(server, 1.0, 1), _update(server, 1.0, 2)
    reference = server.reference(SEED)
    server.apply_round(ROUND, SEED, [(_upload(server, honest), 40), (_upload(server, liar), 10**15)])
    expected = (40 * honest + 100 * liar) / 140
    assert np.allclose(_merged_update(server, reference), expected, atol=1e-6)
    assert not np.allclose(server.chain.links[-1].payload, reference + liar, atol=1e-3)


def test_a_claim_too_large_for_a_float_is_capped_not_an_error():
    weight, reason = cap_examples(10**400, 1000)
    assert weight == 1000.0 and "~10^400 is above max-examples, counted as 1000" in reason
    assert cap_examples(1000, 1000) == (1000.0, "")


# ------------------------------------------------------------------------- update norm
@pytest.mark.parametrize("uplink", ["float32", "float16", "int8", "topk"])
def test_an_update_beyond_the_norm_bound_is_clipped_to_it(uplink):
    server = _server(**{"update-norm-bound": 2.0, "update-norm-action": "clip", "uplink": uplink})
    screened = server.screen(SEED, _upload(server, _update(server, 50.0, 3)), 40)
    assert screened.events == ("clipped",) and "above update-norm-bound 2" in screened.reasons[0]
    assert update_norm(screened.values.astype(np.float64) - server.reference(SEED)) == pytest.approx(2.0, rel=1e-4)


def test_an_update_within_the_norm_bound_merges_bitwise_as_without_the_bound():
    free, bounded = _server(), _server(**{"update-norm-bound": 2.0})
    uploads = [(_upload(free, _update(free, 1.5, seed)), 40 + seed) for seed in range(3)]
    free.apply_round(ROUND, SEED, uploads)
    bounded.apply_round(ROUND, SEED, uploads)
    assert free.digest == bounded.digest


def test_a_merge_that_would_make_the_model_non_finite_is_refused_and_the_model_kept_with_every_bound_off():
    """Finite values near float32's limit would merge into inf: the round is refused, nothing moves."""
    server = _server(**{"median-norm-bound": 0.0})
    before = {n: t.clone() for n, t in server.global_state().items()}
    huge = np.full(server.codec.layout.numel, 3e38, dtype=np.float32)
    merged = server.apply_round(ROUND, SEED, [({"payload": huge}, 40)])
    assert merged == 0 and "non-finite" in server.refused
    assert all(torch.equal(before[n], t) for n, t in server.global_state().items())
    assert server.round == ROUND and not server.chain.links  # the round is over; no link was recorded


def test_with_a_norm_bound_a_huge_finite_upload_merges_clipped_and_finite():
    bounded = _server(**{"update-norm-bound": 10.0, "median-norm-bound": 0.0})
    huge = np.full(bounded.codec.layout.numel, 3e38, dtype=np.float32)
    assert bounded.apply_round(ROUND, SEED, [({"payload": huge}, 40)]) == 1
    assert all(torch.isfinite(t).all() for t in bounded.global_state().values() if t.is_floating_point())


# ------------------------------------------------------------------------- in the strategy
def _aggregate(server: ServerModel, tmp_path, replies: list[tuple[int, np.ndarray, int]]):
    strategy = FedMUD(server.run, server, Ledger(), tmp_path, test_data=[])
    messages = [reply_from(node, upload_record(_upload(server, u), n, 0.1, ROUND, node)) for node, u, n in replies]
    try:
        return strategy.aggregate_train(ROUND, messages)[1]
    finally:
        strategy.writer.close()


def test_the_strategy_counts_and_logs_a_capped_reply(task_identity, tmp_path, caplog):
    server = _server(**{"max-examples": 1000})
    metrics = _aggregate(server, tmp_path, [(1, _update(server, 1.0, 1), 40), (2, _update(server, 1.0, 2), 10**15)])
    assert (metrics["accepted"], metrics["capped"], metrics["rejected"]) == (2, 1, 0)
    assert "node 2: num-examples 1e+15 is above max-examples, counted as 1000" in caplog.text


def test_a_norm_rejected_reply_is_dropped_counted_and_its_node_stays_synced(task_identity, tmp_path, caplog):
    server = _server(**{"update-norm-bound": 5.0, "update-norm-action": "reject"})
    honest, reference = _update(server, 1.0, 1), server.reference(SEED)
    metrics = _aggregate(server, tmp_path, [(1, honest, 40), (2, _update(server, 500.0, 2), 40)])
    assert (metrics["accepted"], metrics["norm-rejected"], metrics["rejected"]) == (1, 1, 0)
    assert np.allclose(_merged_update(server, reference), honest, atol=1e-6)  # only the honest update merged
    assert server.records.get("2", None) == ROUND - 1  # it holds the round's model: a chain next time
    assert "node 2: update norm 500 is above update-norm-bound 5; dropped" in caplog.text


def test_norm_rejected_replies_do_not_count_towards_min_replies(task_identity, tmp_path):
    server = _server(**{"update-norm-bound": 5.0, "update-norm-action": "reject", "min-replies": 2})
    digest = server.digest
    metrics = _aggregate(server, tmp_path, [(1, _update(server, 1.0, 1), 40), (2, _update(server, 500.0, 2), 40)])
    assert (metrics["accepted"], metrics["norm-rejected"]) == (0, 1)
    assert server.digest == digest and not server.chain.links


def test_huge_reported_seconds_are_left_out_and_results_json_stays_strict_json(task_identity, tmp_path):
    """Two replies claiming train-s=1e308 would sum to inf and write `Infinity` (not JSON); a
    skipped round's NaN train-loss too. Seconds above round-timeout are left out; NaN is null."""
    server = _server()
    strategy = FedMUD(server.run, server, Ledger(), tmp_path, test_data=[])
    update = _update(server, 0.5, 1)
    replies = [
        reply_from(node, upload_record(_upload(server, update), 10, 0.1, ROUND, node, {"train-s": 1e308, "client-s": 1e308}))
        for node in (1, 2)
    ]
    try:
        strategy.aggregate_train(ROUND, replies)
        assert all(v <= server.run.round_timeout for v in strategy._round_seconds.values())
        strategy.history = [results_row(ROUND, train_loss=float("nan"), **strategy._round_seconds)]
        strategy._write_results()
    finally:
        strategy.writer.close()
    rows = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert rows[0]["train-loss"] is None


@pytest.mark.parametrize("method", ["fedmud", "fedpara", "lora", "ffa-lora"])
def test_a_float32_max_reply_with_every_bound_off_skips_the_round_instead_of_stopping_the_server(method, task_identity, tmp_path):
    """All ±3.4028235e38: valid float32, but the round's int4 link cannot code it. The server used
    to die on the PayloadError; now the merge is refused and the model kept."""
    server = ServerModel(parse_run_config({**FLOAT32_UP, "method": method, "median-norm-bound": 0.0}))
    server.round = ROUND - 1
    before = {n: t.clone() for n, t in server.global_state().items()}
    extreme = np.float32(np.finfo(np.float32).max) * np.where(np.arange(server.codec.layout.numel) % 2, 1, -1)
    strategy = FedMUD(server.run, server, Ledger(), tmp_path, test_data=[])
    try:
        _, metrics = strategy.aggregate_train(ROUND, [reply_from(1, upload_record(extreme.astype(np.float32), 10, 0.1, ROUND, 1))])
    finally:
        strategy.writer.close()
    assert metrics["accepted"] == 0 and metrics["merge-refused"] == 1
    assert all(torch.equal(before[n], t) for n, t in server.global_state().items())
