"""Secure aggregation (Flower's SecAgg+) and client-level differential privacy in factor space."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from fedmud.codec import Codec
from fedmud.config import ConfigError, parse_run_config
from fedmud.ledger import DOWN, MODEL, PROTOCOL, UP, Ledger
from fedmud.privacy import Mechanism, calibrate, epsilon, mechanism, sample_round
from fedmud.rounds import ClientModel, ServerModel
from fedmud.seeds import round_seed
from fedmud.sync import CHAIN, Downlink
from fedmud.secagg import code_grid, packed_nbytes
from server.secure import DEFAULT_CLIPPING_RANGE, clipping_range, max_weight, secure_field

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand

from .conftest import finished_run
from .federation import loader

PROBE = "tests/apps/secure_probe"


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "cfg, named",
    [
        ({"dp": "server"}, ("dp='server'", "dp-noise-multiplier", "dp-epsilon")),
        ({"dp": "server", "dp-noise-multiplier": 1.0, "dp-epsilon": 2.0}, ("dp-noise-multiplier", "dp-epsilon", "both")),
        ({"dp-epsilon": 2.0}, ("dp-epsilon=2.0", "dp='off'")),
        ({"dp": "client", "dp-noise-multiplier": 1.0}, ("dp='client'", "secure-aggregation=false")),
        ({"dp": "laplace"}, ("dp='laplace'", "off, server, client")),
        ({"dp": "server", "dp-noise-multiplier": 1.0, "dp-clip": 0.0}, ("dp-clip=0.0", "> 0.0")),
        ({"dp": "server", "dp-noise-multiplier": -1.0}, ("dp-noise-multiplier=-1.0", ">= 0.0")),
        ({"dp": "server", "dp-noise-multiplier": 1.0, "dp-delta": 0.5}, ("dp-delta=0.5", "<= 0.1")),
        ({"secure-aggregation": True, "uplink": "topk"}, ("secure-aggregation=true", "uplink='topk'", "float32")),
        ({"secure-aggregation": True, "uplink": "sign"}, ("uplink='sign'", "secure-aggregation=true", "float32, int8, int4")),
        ({"secure-aggregation": True, "uplink": "int4"}, ("uplink='int4'", "update-norm-bound > 0 or dp", "float32")),
        ({"secure-aggregation": True, "uplink": "int4", "update-norm-bound": 1.0}, ("max-examples", "largest partition")),
        (
            {"secure-aggregation": True, "uplink": "int4", "update-norm-bound": 1.0, "max-examples": 40, "stochastic-rounding": False},
            ("stochastic-rounding=false", "uplink='int4'", "auto"),
        ),
        (
            {"secure-aggregation": True, "uplink": "int8", "update-norm-bound": 1.0, "max-examples": 40, "error-feedback": True},
            ("error-feedback=true", "secure-aggregation=true"),
        ),
        ({"secure-aggregation": "yes"}, ("secure-aggregation='yes'", "true or false")),
        ({"secagg-threshold": 1.5}, ("secagg-threshold=1.5", "<= 1.0")),
    ],
)
def test_bad_privacy_settings_stop_with_one_message_naming_the_keys_and_what_is_allowed(cfg, named):
    with pytest.raises(ConfigError) as err:
        parse_run_config(cfg)
    for part in named:
        assert part in str(err.value)


@pytest.mark.parametrize(
    "cfg, codec",
    [
        ({}, "int4"),  # plainly: FedMUD's default code
        ({"secure-aggregation": True}, "float32"),  # no bound sets a grid: values in a fine field
        ({"secure-aggregation": True, "update-norm-bound": 1.0}, "float32"),  # max-examples at its default
        ({"secure-aggregation": True, "update-norm-bound": 1.0, "max-examples": 40}, "int8"),
        ({"secure-aggregation": True, "dp": "client", "dp-noise-multiplier": 1.0}, "int8"),  # the clip sets it
        ({"secure-aggregation": True, "dp": "server", "dp-noise-multiplier": 1.0}, "int8"),
        ({"secure-aggregation": True, "update-norm-bound": 1.0, "max-examples": 40, "method": "fedavg"}, "float32"),
        ({"secure-aggregation": True, "update-norm-bound": 1.0, "max-examples": 40, "uplink": "float32"}, "float32"),
    ],
)
def test_uplink_auto_under_secure_aggregation_sends_int8_codes_where_the_run_sets_their_grid(cfg, codec):
    """The study behind it: docs/secure-codes (int8 codes end within the seeds' spread of float32 values at a
    tight and a loose bound, at 3.5x the plain int4 upload instead of 6.5x)."""
    run = parse_run_config(cfg)
    assert run.uplink.codec == codec
    grid = code_grid(run, mechanism(run), 1000)
    assert (grid is not None) == (run.privacy.secure_aggregation and codec == "int8")
    assert run.uplink.stochastic_rounding == (codec != "float32")


def test_an_epsilon_no_noise_can_reach_is_refused_naming_it():
    run = parse_run_config({**FLOAT32_UP, "dp": "server", "dp-epsilon": 1e-6, "dp-delta": 1e-10, "fraction-train": 1.0, "num-server-rounds": 1000})
    with pytest.raises(ConfigError, match="dp-epsilon=1e-06 is not reachable"):
        mechanism(run)


# ---------------------------------------------------------------------------- accounting
def test_epsilon_is_dp_accountings_rdp_reference_for_a_known_setting():
    import dp_accounting
    from dp_accounting import rdp

    # DP-FedAvg at 20% Poisson sampling, σ = 1, 30 rounds, δ = 1e-5, computed with the library directly
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.0)), 30)
    expected = reference.get_epsilon(1e-5)
    assert epsilon(1.0, 0.2, 30, 1e-5) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(8.9393, abs=1e-3)  # the value itself, pinned
    # more rounds or less noise cost more; no rounds cost nothing
    assert epsilon(1.0, 0.2, 60, 1e-5) > expected > epsilon(2.0, 0.2, 30, 1e-5)
    assert epsilon(1.0, 0.2, 0, 1e-5) == 0.0


def test_epsilon_agrees_with_flowers_own_accountant_for_poisson_sampled_client_level_dp():
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    config = PrivacyConfig(1e-5, 500, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON)
    for sigma, rounds in ((1.0, 30), (0.7, 20), (3.0, 100)):
        flower = RdpAccountant(config)
        flower.compose(GaussianPrivacyEvent(sigma, 100, 500), count=rounds)  # 100 of 500: rate 0.2
        assert epsilon(sigma, 0.2, rounds, 1e-5) == pytest.approx(flower.get_epsilon(1e-5), rel=1e-9)


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """ε of a Gaussian mechanism with sensitivity/σ = mu at δ (Balle & Wang 2018, Theorem 8)."""
    def gap(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(gap, 0.0, 500.0)


@pytest.mark.parametrize("sigma, rounds", [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_without_sampling_epsilon_is_a_valid_and_close_bound_on_the_exact_gaussian_epsilon(sigma, rounds):
    # T Gaussian mechanisms of σ compose exactly into one with σ/√T: its exact ε is known in closed form
    exact = _exact_gaussian_epsilon(math.sqrt(rounds) / sigma, 1e-5)
    ours = epsilon(sigma, 1.0, rounds, 1e-5)
    assert exact <= ours <= 1.3 * exact


def test_calibrate_finds_the_smallest_sigma_reaching_the_target_epsilon():
    sigma = calibrate(4.0, 0.2, 30, 1e-5)
    assert epsilon(sigma, 0.2, 30, 1e-5) <= 4.0
    assert epsilon(sigma * 0.99, 0.2, 30, 1e-5) > 4.0
    run = parse_run_config({**FLOAT32_UP, "dp": "server", "dp-epsilon": 4.0, "fraction-train": 0.2, "num-server-rounds": 30})
    assert mechanism(run).noise_multiplier == sigma
    assert mechanism(run).epsilon(30) == pytest.approx(4.0, abs=1e-3)


# ---------------------------------------------------------------------------- the mechanism
def _mechanism(mode="server", sigma=1.0, clip=2.0, rate=0.5, min_replies=4) -> Mechanism:
    return Mechanism(mode, clip, sigma, 1e-5, rate, min_replies)


def test_an_update_is_clipped_to_the_clip_norm_and_a_smaller_one_is_left_alone():
    m = _mechanism()
    big, small = np.full(100, 1.0), np.full(100, 0.01)
    clipped, norm = m.clip_update(big)
    assert norm == pytest.approx(10.0) and np.linalg.norm(clipped) == pytest.approx(2.0)
    assert np.allclose(clipped / np.linalg.norm(clipped), big / 10.0)  # direction kept
    assert np.array_equal(m.clip_update(small)[0], small)


def test_client_noise_sums_to_the_accounted_noise_and_server_noise_is_added_once():
    client, server = _mechanism("client"), _mechanism("server")
    assert client.client_noise_std == pytest.approx(1.0 * 2.0 / 2.0) and client.server_noise_std == 0.0
    assert server.server_noise_std == pytest.approx(2.0) and server.client_noise_std == 0.0
    # min-replies (4) clients' shares add up to σC on the sum
    rng = np.random.default_rng(0)
    total = sum(client.privatise(np.zeros(200_000), rng) for _ in range(4))
    assert np.std(total) == pytest.approx(2.0, rel=0.01)
    # the release divides by the expected number of clients, rate · population
    released = _mechanism("server", sigma=1e-12).release(np.full(10, 6.0), population=6)
    assert np.allclose(released, 2.0)


def test_noise_comes_from_the_system_entropy_not_from_a_seed():
    m = _mechanism("client")
    a, b = m.privatise(np.zeros(1000)), m.privatise(np.zeros(1000))
    assert not np.array_equal(a, b)


def test_under_dp_clients_are_poisson_sampled_at_the_training_fraction():
    run = parse_run_config({**FLOAT32_UP, "dp": "server", "dp-noise-multiplier": 1.0, "fraction-train": 0.2})
    rng = np.random.default_rng(0)
    counts = [len(sample_round(run, r, range(1000), rng)) for r in range(1, 51)]
    assert 180 < np.mean(counts) < 220 and len(set(counts)) > 5  # about 200, and not a fixed number
    plain = parse_run_config({**FLOAT32_UP, "fraction-train": 0.2})
    assert sample_round(plain, 3, range(1000)) == sample_round(plain, 3, range(1000))  # seeded, fixed size
    assert len(sample_round(plain, 3, range(1000))) == 200


@pytest.mark.parametrize("method", ["fedmud", "fedavg", "lora"])
def test_a_dp_client_uploads_an_update_within_the_clip_and_the_server_releases_the_clipped_sum(method):
    cfg = {**FLOAT32_UP, "method": method, "dp": "server", "dp-noise-multiplier": 1e-9, "dp-clip": 0.05, "fraction-train": 0.5, "lr": 0.5}
    cfg["downlink"] = "full"  # float32 links: the merged values are the released mean itself
    run = parse_run_config(cfg)
    server, client = ServerModel(run), ClientModel(run, torch.device("cpu"))
    seed = round_seed(run.seed, 1)
    reference = server.reference(seed).astype(np.float64)
    updates, uploads = [], []
    for partition in range(3):
        client.sync(None, Downlink(CHAIN, 0, 0, digest=server.digest))
        parts, _, _ = client.train_round(seed, loader(partition, 1))
        update = client.upload_update(seed, parts)
        assert np.linalg.norm(update) <= 0.05 * (1 + 1e-5)  # clipped on the client
        updates.append(update)
        uploads.append((parts, 48))
    # one client that skipped clipping: the server clips it again
    rogue = Codec(server.codec.layout).encode((reference + 100 * updates[0]).astype(np.float32))
    uploads.append((rogue, 48))
    assert server.screen(seed, rogue, 48).events == ("clipped",)
    server.apply_round(1, seed, uploads, population=8)
    merged = server.chain.links[-1].parts["payload"].astype(np.float64)
    expected = reference + (sum(updates) + updates[0] * 0.05 / np.linalg.norm(updates[0])) / (0.5 * 8)
    assert np.allclose(merged, expected, atol=1e-6)


@pytest.mark.parametrize("uplink", ["float32", "int8"])
def test_an_update_norm_bound_above_the_dp_clip_never_undoes_the_clip(uplink):
    """Both bounds hold for what merges: the norm bound measures the DP-clipped update. (It measured
    the residual as sent, so with a lossy uplink a hostile reply merged at the bound, 20x the clip.)"""
    run = parse_run_config(
        {"uplink": uplink, "dp": "server", "dp-noise-multiplier": 1.0, "dp-clip": 0.05, "update-norm-bound": 1.0}
    )
    server = ServerModel(run)
    seed = round_seed(run.seed, 1)
    reference = server.reference(seed).astype(np.float64)
    hostile = np.random.default_rng(0).standard_normal(reference.size) * 100 / np.sqrt(reference.size)  # norm ~100
    sent = hostile if server.codec.residual else reference + hostile
    screened = server.screen(seed, server.codec.validate(server.codec.encode(sent.astype(np.float32))), 48)
    assert screened.events[0] == "clipped" and "dp-clip" in screened.reasons[0]
    assert np.linalg.norm(screened.values.astype(np.float64) - reference) <= 0.05 * (1 + 1e-5)


@pytest.mark.parametrize("dp", ["off", "server"])
def test_the_server_merges_what_secure_aggregation_gives_and_under_dp_releases_it_as_a_noisy_sum(dp):
    cfg = {"secure-aggregation": True, "downlink": "full", "fraction-train": 0.5}
    if dp != "off":
        cfg.update({"dp": dp, "dp-noise-multiplier": 1e-9})
    server = ServerModel(parse_run_config(cfg))
    seed = round_seed(0, 1)
    reference = server.reference(seed).astype(np.float64)
    mean_update = np.random.default_rng(0).normal(0, 0.01, reference.shape)
    assert server.merge_secure(1, seed, mean_update, count=3, population=12) == 3
    merged = server.chain.links[-1].parts["payload"].astype(np.float64)
    # without DP the weighted mean is the update; under DP the sum (3 × mean) over rate × population
    expected = reference + (mean_update if dp == "off" else mean_update * 3 / (0.5 * 12))
    assert np.allclose(merged, expected, atol=1e-6)
    assert server.merge_secure(2, round_seed(0, 2), None, count=0, population=12) == 0  # the protocol halted
    assert server.round == 2 and len(server.chain.links) == 1


def test_a_secure_rounds_mean_update_must_be_finite_and_within_the_bound_every_update_keeps():
    from fedmud.bounds import check_mean_update

    mean = np.full(100, 0.1)  # norm 1
    assert check_mean_update(mean, 0.0) == "" and check_mean_update(mean, 1.0) == ""
    assert "norm 1 is above the bound 0.5" in check_mean_update(mean, 0.5)
    assert "not finite" in check_mean_update(np.array([0.0, np.nan]), 0.0)


# ---------------------------------------------------------------------------- secure aggregation's settings
def test_secure_aggregation_carries_the_privatised_range_and_weighs_one_under_dp():
    dp_run = parse_run_config(
        {"secure-aggregation": True, "dp": "client", "dp-noise-multiplier": 1.0, "dp-clip": 0.5, "min-replies": 4}
    )
    dp = mechanism(dp_run)
    assert clipping_range(dp_run, dp) == pytest.approx(0.5 + 8 * 0.25) and max_weight(dp_run, dp) == 1.0
    plain = parse_run_config({"secure-aggregation": True, "max-examples": 500})
    assert clipping_range(plain, mechanism(plain)) == DEFAULT_CLIPPING_RANGE and max_weight(plain, mechanism(plain)) == 500
    bounded = parse_run_config({"secure-aggregation": True, "update-norm-bound": 3.0})
    assert clipping_range(bounded, mechanism(bounded)) == 3.0
    field = secure_field(plain, mechanism(plain), 4096)  # clients a round, summed without wrapping
    assert 4096 * field.levels < field.modulus


def test_the_ledger_keeps_protocol_traffic_apart_from_the_models_and_counts_both():
    ledger = Ledger(dense_up_bytes=1000, dense_down_bytes=2000)
    ledger.record(1, "7", DOWN, 300)
    ledger.record(1, "7", UP, 100)
    ledger.record(1, "7", UP, 40, PROTOCOL)
    ledger.record(1, "7", DOWN, 60, PROTOCOL)
    assert ledger.totals() == {UP: 140, DOWN: 360}
    assert ledger.totals(MODEL) == {UP: 100, DOWN: 300} and ledger.totals(PROTOCOL) == {UP: 40, DOWN: 60}
    assert ledger.dense_equivalent() == {UP: 1000, DOWN: 2000}  # a FedAvg round sends one message each way
    assert ledger.round_totals(1) == {UP: 140, DOWN: 360}
    again = Ledger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert again.records == ledger.records and again.protocol == ledger.protocol
    old = ledger.to_dict()
    del old["protocol"]  # a ledger saved before secure aggregation existed
    assert Ledger.from_dict(old).protocol == []


# ---------------------------------------------------------------------------- through Flower
def _probe_run(env, run_dir, config: str) -> dict:
    out = finished_run(env, run_dir, config, supernodes=4, app=PROBE)
    out["state"] = torch.load(out["dir"] / "checkpoint.pt", weights_only=False)["server"]["global_state"]
    probe = out["dir"] / "probe.json"
    out["probe"] = json.loads(probe.read_text()) if probe.exists() else None
    return out


# the protocol's quantisation: a coordinate of weight/max-examples · update is rounded to one of the
# round's levels over [-8, 8] (fedmud.secagg.size_field: a step of at most 2^-22 = 2.4e-7; 4 clients sum
# in 29 bits at a step of 1.2e-7), so the mean's error is at most the step over the mean weight ratio:
# 1.2e-7 with max-examples at the clients' 1,000 examples (README: set it near your largest partition),
# 1.2e-5 at the default 100,000. (Measured with 2^30 levels at 100,000: 1.5e-6 to 2.7e-6.)
SECAGG_TOLERANCE = 2e-5
# int8 codes on the round's grid (fedmud.secagg.CodeGrid), 2 clients at update-norm-bound=1: the largest absolute
# difference from the plain merge measured 6.5e-4
GRID_TOLERANCE = 5e-3


@pytest.mark.integration
def test_int8_codes_on_the_shared_grid_survive_a_dropout_and_merge_near_the_plain_weights(simulation_superlink, tmp_path):
    """The dropouts below, with the clients' codes on the round's grid (update-norm-bound=1, which
    the round's updates reach): the two survivors' sum decodes (its weights add up to theirs), and
    the merge is the plain run's within the grid's rounding."""
    base = 'downlink="full" max-examples=1000 update-norm-bound=1.0 probe.lost-partitions="1" probe.drop-partitions="3"'
    plain = _probe_run(simulation_superlink, tmp_path / "plain", base)
    secure = _probe_run(simulation_superlink, tmp_path / "secure", f'{base} secure-aggregation=true uplink="int8"')
    for run in (plain, secure):
        assert (run["results"][-1]["accepted"], run["results"][-1]["failed"]) == (2, 2), run["results"][-1]
    assert "codes in ±127 on a shared grid" in secure["output"]
    diff = max((plain["state"][k].double() - secure["state"][k].double()).abs().max().item() for k in plain["state"])
    assert 0 < diff <= GRID_TOLERANCE, diff


@pytest.mark.integration
def test_secure_aggregation_survives_a_dropout_merges_to_the_plain_weights_and_the_server_sees_only_the_sum(
    simulation_superlink, tmp_path
):
    """One round of 4 clients, plainly and under SecAgg+ (threshold: 2 of 4): partition 1 is lost
    before the round (it fails at the first message: under SecAgg+ before it shares its keys, which
    Flower 1.39's workflow alone cannot survive) and partition 3 drops out in training (after it
    shared its keys, so the others' masks with it must be rebuilt from their shares)."""
    base = 'downlink="full" max-examples=1000 probe.lost-partitions="1" probe.drop-partitions="3"'
    plain = _probe_run(simulation_superlink, tmp_path / "plain", base)  # float32 uploads, as the secure run (the app's)
    secure = _probe_run(simulation_superlink, tmp_path / "secure", f"{base} secure-aggregation=true")

    # the two are left out of both, and the two merges agree within the quantisation
    for run in (plain, secure):
        row = run["results"][-1]
        assert (row["accepted"], row["failed"]) == (2, 2), row
    diff = max((plain["state"][k].double() - secure["state"][k].double()).abs().max().item() for k in plain["state"])
    assert 0 < diff <= SECAGG_TOLERANCE, diff  # 0 would mean the secure run did not merge its own sum
    assert "Secure aggregation completed" in secure["output"]

    # every reply that reached the server: no arrays (the mod cleared the update), only masked integers
    probe = secure["probe"]
    assert probe["replies"] and all(sum(r["array_bytes"].values()) == 0 for r in probe["replies"])
    # what reached aggregation: the 2 survivors' results, each carrying the one unmasked mean, weights hidden
    (agg,) = probe["aggregate_fit"]
    assert agg["results"] == 2 and agg["distinct_parameters"] == 1 and len(agg["digests"]) == 1
    assert agg["num_examples"] == [0, 0]

    # the ledger: SecAgg+'s own messages apart; all 4 nodes were sent the setup, 3 answered it
    ledger, summary = secure["ledger"], secure["summary"]
    assert len({r["client"] for r in ledger["protocol"] if r["direction"] == DOWN}) == 4
    assert len({r["client"] for r in ledger["protocol"] if r["direction"] == UP}) == 3
    assert summary["secagg_protocol_up_bytes"] > 0 and summary["secagg_protocol_down_bytes"] > 0
    every = ledger["records"] + ledger["protocol"] + ledger["control"]  # control: the partition queries
    assert summary["up_bytes"] == sum(r["bytes"] for r in every if r["direction"] == UP)
    # a masked value travels in the round's bits (4 clients: 29), not Flower's int64: below the float32 upload
    masked = [r["bytes"] for r in ledger["records"] if r["direction"] == UP]
    clear = [r["bytes"] for r in plain["ledger"]["records"] if r["direction"] == UP]
    numel = ServerModel(parse_run_config({**FLOAT32_UP})).codec.layout.numel  # the values of an upload (and one weight)
    assert len(masked) == 2 and max(masked) < min(clear)
    assert 0 < max(masked) - packed_nbytes(numel, 29) - packed_nbytes(1, 29) < 1500  # Flower's framing
    assert summary["privacy"] == {"secure_aggregation": True, "dp": "off"}


@pytest.mark.integration
def test_client_side_noise_under_secure_aggregation_trains_and_reports_epsilon_every_round(simulation_superlink, tmp_path):
    config = (
        'num-server-rounds=2 num-partitions=4 local-epochs=1 secure-aggregation=true dp="client" '
        "dp-noise-multiplier=0.5 dp-clip=1.0 min-replies=2"
    )
    out = finished_run(simulation_superlink, tmp_path, config, supernodes=4)
    rows = out["results"]
    expected = [epsilon(0.5, 1.0, r, 1e-5) for r in (1, 2)]
    assert [row["epsilon"] for row in rows[1:]] == pytest.approx(expected)
    assert out["summary"]["privacy"]["epsilon"] == pytest.approx(expected[-1])
    assert out["summary"]["privacy"]["dp"] == "client" and out["summary"]["privacy"]["noise_multiplier"] == 0.5
    assert "ε = " in out["output"] and "FINAL privacy" in out["output"]
    assert all(row["accepted"] >= 2 for row in rows[1:])
