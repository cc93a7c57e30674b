"""The integers a secure round sums in: sized per round from the clipping range and its clients, so
a masked value travels in as few bits as keep the sum exact, not Flower's 64."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmud.config import parse_run_config
from fedmud.ledger import UP
from fedmud.privacy import mechanism
from fedmud.rounds import ServerModel
from fedmud.secagg import (
    MAX_LEVELS,
    STEP,
    CodeGrid,
    code_grid,
    pack_values,
    packed_nbytes,
    rotate,
    rotation_span,
    size_field,
    unpack_values,
    unrotate,
)
from server.app import run_server
from server.secure import secure_field

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand

from .federation import LoopbackGrid, as_server_app, readme_secure_example
from .test_privacy import SECAGG_TOLERANCE


# ---------------------------------------------------------------------------- the field
@pytest.mark.parametrize("clients, bits", [(2, 28), (4, 29), (10, 30), (63, 32)])
def test_a_round_sums_in_the_smallest_field_that_holds_its_clients_at_the_step(clients, bits):
    field = size_field(clients, 8.0)
    assert field.bits == bits
    assert clients * field.levels < field.modulus  # the sum of every client's largest value does not wrap
    assert field.step <= STEP  # ... at a step of at most 2^-22 over [-8, 8]
    assert clients * (2 * 8.0 / STEP) >= field.modulus // 2  # and no bit fewer would do


def test_the_clip_or_norm_bound_sets_the_levels_and_so_the_bits():
    """A narrower clipping range needs fewer levels for the same step: a DP clip of 1 saves 3 bits."""
    assert size_field(10, 1.0).bits == size_field(10, 8.0).bits - 3
    dp_run = parse_run_config({"secure-aggregation": True, "dp": "client", "dp-noise-multiplier": 1.0, "dp-clip": 0.5, "min-replies": 4})
    bounded = parse_run_config({"secure-aggregation": True, "update-norm-bound": 0.5})
    assert secure_field(dp_run, mechanism(dp_run), 10).clipping_range == pytest.approx(2.5)
    assert secure_field(bounded, mechanism(bounded), 10).bits == size_field(10, 8.0).bits - 4


def test_a_round_whose_clients_cannot_fit_32_bits_gets_a_larger_field_and_one_past_64_bit_sums_is_refused():
    field = size_field(1000, 8.0)  # 1,000 clients a round (Poisson sampling under DP can draw that many)
    assert field.bits == 36 and 1000 * field.levels < field.modulus and field.step <= STEP
    assert size_field(64, 8.0).bits == 33
    with pytest.raises(ValueError) as err:  # Flower adds the clients' values in int64 before it reduces them
        size_field(300_000, 8.0)
    for part in ("cannot sum 300,000 clients a round exactly", "64-bit", "fraction-train", "update-norm-bound"):
        assert part in str(err.value), str(err.value)


def test_a_range_wider_than_flowers_int32_quantiser_keeps_its_levels_and_a_coarser_step():
    field = size_field(10, 1e4)
    assert field.levels == MAX_LEVELS and field.step > STEP and 10 * field.levels < field.modulus


# ---------------------------------------------------------------------------- codes on a shared grid
@pytest.mark.parametrize("numel", [1, 5, 4096, 12_519])
def test_the_rounds_rotation_keeps_norms_undoes_itself_and_spreads_a_spike(numel):
    x = np.random.default_rng(numel).normal(size=numel)
    rotated = rotate(x, 7)
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(x)) and np.allclose(unrotate(rotated, 7), x)
    assert numel == 1 or not np.allclose(rotate(x, 8), rotated)  # each round draws its own
    spike = np.zeros(numel)
    spike[-1] = 1.0  # a single coordinate, e.g. the one a bias update moves, ends spread over a power of two
    assert np.abs(rotate(spike, 7)).max() == pytest.approx(1 / math.sqrt(rotation_span(numel)))


def _grid_round(grid: CodeGrid, weights: list[int], norm: float, seed: int = 11):
    rng = np.random.default_rng(seed)
    shape = rng.lognormal(size=grid.numel)  # coordinates of very different sizes, as a model's layers have
    updates = [norm * u / np.linalg.norm(u) for u in (shape * rng.normal(size=grid.numel) for _ in weights)]
    vectors = [grid.encode(u, w, seed, np.random.default_rng(i)) for i, (u, w) in enumerate(zip(updates, weights))]
    exact = sum(w * u for u, w in zip(updates, weights)) / sum(weights)
    return vectors, exact


@pytest.mark.parametrize("half", [127, 7])
def test_codes_on_the_shared_grid_sum_to_the_weighted_mean_within_the_rounding_and_carry_the_weights(half):
    grid = CodeGrid(half=half, numel=3000, bound=1.0, max_weight=400)
    weights = [400, 1, 37, 250]
    vectors, exact = _grid_round(grid, weights, norm=0.9)
    for vector in vectors:  # whole numbers in [-half, half]: Flower's quantiser carries each exactly
        assert vector.shape == (grid.length,) and np.array_equal(vector, np.round(vector)) and np.abs(vector).max() <= half
    mean, total, why = grid.decode(np.sum(vectors, axis=0), len(weights), 11)
    assert why == "" and total == sum(weights)
    assert 0 < np.linalg.norm(mean - exact) <= grid.norm_slack(len(weights), total)


def test_the_grids_rounding_is_unbiased():
    grid = CodeGrid(half=7, numel=256, bound=1.0, max_weight=1)
    (vector,), exact = _grid_round(grid, [1], norm=1.0)
    update = exact
    draws = [grid.decode(grid.encode(update, 1, 3, np.random.default_rng(i)), 1, 3)[0] for i in range(400)]
    one = np.linalg.norm(draws[0] - update)
    assert np.linalg.norm(np.mean(draws, axis=0) - update) < one / 10  # 400 draws: about 1/20 of one's error


def test_sums_that_cannot_be_the_clients_are_refused_saying_why():
    grid = CodeGrid(half=7, numel=100, bound=1.0, max_weight=40)
    vectors, _ = _grid_round(grid, [40, 20], norm=1.0)
    sums = np.sum(vectors, axis=0)
    assert "malformed" in grid.decode(sums[:-1], 2, 11)[2]
    beyond = sums.copy()
    beyond[3] = 15  # two clients' codes sum to at most 14: masks that did not cancel
    assert "the masks did not cancel" in grid.decode(beyond, 2, 11)[2]
    heavy = sums.copy()
    heavy[grid.numel :] = 2 * grid.half  # digits of a summed weight above 2 · max-examples
    assert "weights sum to" in grid.decode(heavy, 2, 11)[2]


def test_the_grid_is_set_by_the_norm_every_update_keeps_and_float32_has_none():
    bounded = parse_run_config({"secure-aggregation": True, "uplink": "int4", "update-norm-bound": 2.0, "max-examples": 400})
    grid = code_grid(bounded, mechanism(bounded), 12_519)
    assert (grid.half, grid.bound, grid.max_weight, grid.field_bits(10), grid.digits) == (7, 2.0, 400, 8, 3)
    dp = parse_run_config({"secure-aggregation": True, "uplink": "int8", "dp": "client", "dp-noise-multiplier": 1.0, "dp-clip": 0.5, "min-replies": 4})
    grid = code_grid(dp, mechanism(dp), 12_519)
    assert (grid.half, grid.bound, grid.max_weight, grid.noise_std, grid.field_bits(10)) == (127, 0.5, 1, 0.25, 12)
    assert code_grid(parse_run_config({"secure-aggregation": True}), mechanism(parse_run_config({})), 10) is None


# ---------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [8, 13, 30, 32, 36, 62])
def test_packed_values_take_their_bits_and_unpack_to_flowers_int64(bits):
    values = np.random.default_rng(bits).integers(0, 1 << bits, size=70_001, dtype=np.int64)
    packed = pack_values(values, bits)
    assert packed.dtype == np.uint8 and packed.nbytes == packed_nbytes(values.size, bits) == -(-values.size * bits // 8)
    unpacked = unpack_values(packed, bits)
    assert unpacked.dtype == np.int64 and np.array_equal(unpacked, values)
    assert unpack_values(packed[:-1], bits).shape == (values.size - 1,)  # a byte short is a value short
    assert unpack_values(packed.reshape(1, -1), bits).shape == (1, values.size)  # leading axes kept


def test_the_sum_of_packed_masked_vectors_unmasks_exactly():
    """Masks that cancel modulo the field, packed and unpacked on the way: the sum is the sum."""
    field = size_field(10, 8.0)
    rng = np.random.default_rng(0)
    quantised = rng.integers(0, field.levels + 1, size=(10, 5000))
    quantised[0] = field.levels  # the largest values every client can send
    quantised[1:] = np.maximum(quantised[1:], field.levels - 3)
    masks = rng.integers(0, field.modulus, size=(9, 5000))
    masks = np.vstack([masks, -masks.sum(axis=0)])  # pairwise masks sum to zero
    travelled = [unpack_values(pack_values((q + m) % field.modulus, field.bits), field.bits) for q, m in zip(quantised, masks)]
    assert np.array_equal(np.sum(travelled, axis=0) % field.modulus, quantised.sum(axis=0))


# ---------------------------------------------------------------------------- the README's example
@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """One round of the README's example, plainly and under SecAgg+, in this process. The same model
    and number of clients; each client holds 40 examples (100 partitions) for one epoch, which
    changes no byte of an upload, with max-examples at that, as the README tells; downlink=full, so
    the merged weights are the mean itself."""
    _, example = readme_secure_example()
    runs = {}
    for name, secure in (("plain", False), ("secure", True)):
        # the plain run at the float32 upload a secure round's values start from (`uplink=auto` under
        # secure aggregation without a norm bound), so the figure is what the field costs
        config = {**example, "secure-aggregation": secure, "num-server-rounds": 1, "num-partitions": 100, "local-epochs": 1,
                  "max-examples": 40, "downlink": "full", "run-dir": str(tmp_path_factory.mktemp(name)), **FLOAT32_UP}
        runs[name] = _run(config)
    return runs


def _run(config: dict) -> dict:
    """The README example's ServerApp and ClientApp over the loopback grid: the config, the summary, the
    ledger and the merged weights."""
    federation, _ = readme_secure_example()
    with as_server_app():
        summary = run_server(LoopbackGrid(federation["num-supernodes"], config), config)
    run_dir = Path(summary["run_dir"])
    return {
        "config": config,
        "summary": summary,
        "ledger": json.loads((run_dir / "ledger.json").read_text()),
        "state": torch.load(run_dir / "checkpoint.pt", weights_only=False)["server"]["global_state"],
    }


def test_the_readme_secure_example_uploads_at_most_1_1_times_the_plain_run(readme_runs):
    plain, secure = readme_runs["plain"], readme_runs["secure"]
    assert secure["summary"]["up_bytes"] <= 1.1 * plain["summary"]["up_bytes"]  # SecAgg+'s own messages included
    every = secure["ledger"]["records"] + secure["ledger"]["protocol"] + secure["ledger"]["control"]
    assert secure["summary"]["up_bytes"] == sum(r["bytes"] for r in every if r["direction"] == UP)
    # a masked vector is 30 bits a value (10 clients over [-8, 8]): below the float32 upload
    masked = [r["bytes"] for r in secure["ledger"]["records"] if r["direction"] == UP]
    clear = [r["bytes"] for r in plain["ledger"]["records"] if r["direction"] == UP]
    assert len(masked) == 10 and max(masked) < min(clear)


def test_a_secure_run_repeats_with_its_seed(readme_runs, tmp_path):
    """Flower's quantiser rounds with numpy's global generator; the client seeds it from the round, so
    the same config merges the same weights, bit for bit."""
    again = _run({**readme_runs["secure"]["config"], "run-dir": str(tmp_path)})["state"]
    first = readme_runs["secure"]["state"]
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_the_readme_secure_example_merges_within_the_stated_tolerance_of_the_plain_run(readme_runs):
    plain, secure = readme_runs["plain"]["state"], readme_runs["secure"]["state"]
    diff = max((plain[k].double() - secure[k].double()).abs().max().item() for k in plain if plain[k].is_floating_point())
    assert 0 < diff <= SECAGG_TOLERANCE, diff  # 0 would mean the secure run did not merge its own sum


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory):
    """One round of the README's example with update-norm-bound=1 (every client's update is at least
    that in round 1, so the bound holds them all at it), plainly and under SecAgg+, float32 values
    and int8/int4 codes; as ``readme_runs``, downlink=full, 100 partitions of 40 examples."""
    _, example = readme_secure_example()
    runs = {}
    for name, secure, uplink in (("plain-float32", False, "float32"), ("plain-int4", False, "int4"), ("secure-float32", True, "float32"),
                                 ("secure-int8", True, "int8"), ("secure-int4", True, "int4")):
        config = {**example, "secure-aggregation": secure, "uplink": uplink, "update-norm-bound": 1.0, "num-server-rounds": 1,
                  "num-partitions": 100, "local-epochs": 1, "max-examples": 40, "downlink": "full", "run-dir": str(tmp_path_factory.mktemp(name))}
        runs[name] = _run(config)
    return runs


def test_codes_on_the_shared_grid_travel_in_the_fields_bits_and_upload_less_than_values(grid_runs):
    up = {name: run["summary"]["up_bytes"] for name, run in grid_runs.items()}
    assert up["secure-int4"] < up["secure-int8"] < up["secure-float32"]
    for name, bits in (("secure-int8", 12), ("secure-int4", 8)):  # 10 clients' codes in ±127 (±7) sum in 12 (8) bits
        run = parse_run_config(grid_runs[name]["config"])
        numel = ServerModel(run).codec.layout.numel
        grid = code_grid(run, mechanism(run), numel)
        assert grid.field_bits(10) == bits
        masked = [r["bytes"] for r in grid_runs[name]["ledger"]["records"] if r["direction"] == UP]
        vector = packed_nbytes(grid.length + 1, bits)  # Flower's mod puts the client's quantised weight first
        assert len(masked) == 10 and all(vector < size < vector + 1500 for size in masked), (masked, vector)


def _distance(state, reference) -> float:
    """The Euclidean distance between two models' floating-point weights."""
    return sum(((reference[k].double() - state[k].double()) ** 2).sum().item() for k in reference if reference[k].is_floating_point()) ** 0.5


def test_codes_on_the_shared_grid_merge_near_the_plain_mean_int8_nearer_than_plain_int4_uploads(grid_runs):
    reference = grid_runs["plain-float32"]["state"]

    def distance(name):
        return _distance(grid_runs[name]["state"], reference)

    # measured: float32 values 6.8e-6, int8 codes 0.016, int4 uploads without masks 0.039, int4 codes 0.29 (the
    # round's mean update is 1.02 in the model's weights)
    assert 0 < distance("secure-float32") < distance("secure-int8") < distance("plain-int4") < distance("secure-int4")
    start = ServerModel(parse_run_config(grid_runs["plain-float32"]["config"])).global_state()
    assert distance("secure-int4") < 0.5 * _distance(start, reference)
