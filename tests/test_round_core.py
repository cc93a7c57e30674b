"""The strategy and :func:`fedmud.rounds.simulate_in_process` run the same rounds: the same
config through Flower's real simulation and in one process ends with the same global model,
bitwise, and the same accuracy after every round, skipped rounds (``min-replies``) included.

Studies trust the in-process loop to stand for a real run; any drift between the two (what a
client trains from, its seeds, its error feedback, which replies count) shows up here.
"""

import numpy as np
import pytest
import torch

from fedmud.config import parse_run_config
from fedmud.data import client_loader
from fedmud.rounds import ClientModel, simulate_in_process
from fedmud.sync import state_digest

from .conftest import finished_run

DROPOUT = {"model": "tests.factories:dropout_mlp", "uplink": "int8"}  # int8: the update itself is uploaded

PARTITIONS = 3  # finished_run's simulated SuperNodes, one partition each
COMMON = {"num-server-rounds": 2, "local-epochs": 1}


def _flwr_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else str(value)


def _both_paths(env, tmp_path, config: dict) -> tuple[dict, list[tuple[int, bool, float]], str]:
    """(what the flwr run wrote, [(round, merged, accuracy)] in process, the in-process final digest)."""
    run = parse_run_config({**COMMON, **config, "num-partitions": PARTITIONS})
    rounds = []
    server, history, _, _ = simulate_in_process(
        run, on_round=lambda r, s: rounds.append((r, bool(s.chain.links) and s.chain.links[-1].round == r))
    )
    in_process = [(r, merged, accuracy) for (r, merged), accuracy in zip(rounds, history[1:])]
    flwr = finished_run(env, tmp_path, " ".join(f"{k}={_flwr_value(v)}" for k, v in {**COMMON, **config}.items()))
    return flwr, in_process, server.digest


def _assert_same_rounds(flwr: dict, in_process: list, digest: str) -> None:
    rows = {row["round"]: row for row in flwr["results"]}
    assert [(r, rows[r]["accepted"] > 0, rows[r]["accuracy"]) for r, _, _ in in_process] == in_process
    checkpoint = torch.load(flwr["dir"] / "checkpoint.pt", weights_only=True)["server"]
    assert checkpoint["round"] == COMMON["num-server-rounds"]
    assert state_digest(checkpoint["global_state"]) == digest


@pytest.mark.integration
def test_a_run_with_lossy_uploads_error_feedback_and_stochastic_rounding_ends_bitwise_alike(simulation_superlink, tmp_path):
    """Every client's own state between rounds (the model it holds, what its codec has not sent yet,
    its rounding seed) and the median norm bound's history take part."""
    config = {"uplink": "int8", "error-feedback": True, "stochastic-rounding": True}
    flwr, in_process, digest = _both_paths(simulation_superlink, tmp_path, config)
    assert all(merged for _, merged, _ in in_process)
    _assert_same_rounds(flwr, in_process, digest)


@pytest.mark.integration
def test_a_round_with_fewer_valid_replies_than_min_replies_is_skipped_on_both(simulation_superlink, tmp_path):
    """Two of the three partitions a round (sampled from the seed); each update is bounded by the
    lower median norm (1x): in round 1, of its own two replies, so the larger is dropped
    (``norm-rejected``), one valid reply is fewer than ``min-replies=2`` and the round is skipped;
    round 2 bounds by round 1's norms, and with this seed both of its replies are within."""
    config = {
        "fraction-train": 0.67, "min-train-nodes": 2, "seed": 4,
        "median-norm-bound": 1.0, "update-norm-action": "reject", "min-replies": 2,
    }
    flwr, in_process, digest = _both_paths(simulation_superlink, tmp_path, config)
    assert [merged for _, merged, _ in in_process] == [False, True], "seed 4 no longer skips round 1 and merges round 2"
    rows = {row["round"]: row for row in flwr["results"]}
    assert (rows[1]["norm-rejected"], rows[1]["accepted"], rows[2]["accepted"]) == (1, 0, 2)
    _assert_same_rounds(flwr, in_process, digest)


@pytest.mark.integration
def test_a_model_with_dropout_trains_alike_on_both_paths(simulation_superlink, tmp_path):
    """Dropout draws from torch's global generator, which each path's processes have advanced
    differently by the time a client trains; local training draws from (round, client) instead."""
    flwr, in_process, digest = _both_paths(simulation_superlink, tmp_path, DROPOUT)
    _assert_same_rounds(flwr, in_process, digest)


def test_local_training_draws_from_the_round_and_the_client_not_from_the_process():
    run = parse_run_config({**DROPOUT, "local-epochs": 1, "num-partitions": PARTITIONS})
    client = ClientModel(run, torch.device("cpu"))

    def upload(client_id: int) -> np.ndarray:
        return client.train_round(123, client_loader(run.data, 0, 32, seed=5), client_id=client_id)[0]["payload"]

    first = upload(0)
    torch.rand(1000)  # the process draws in between, as a node does between rounds
    again = upload(0)
    before = torch.random.get_rng_state()
    other = upload(1)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)  # another client draws other masks from the same data
    assert torch.equal(torch.random.get_rng_state(), before)  # and leaves the process's generator as it was
