"""Client sampling with fraction-train < 1 is a function of the run seed and the round."""

import pytest

from fedmud.seeds import sample_clients
from .conftest import finished_run

NODES = [9_000_000_000 + 37 * i for i in range(100)]  # Flower node ids are large integers, not 0..n-1
ROUNDS = range(1, 6)


def _picks(seed: int, nodes=NODES, fraction: float = 0.1, minimum: int = 2) -> list[list[int]]:
    return [sample_clients(seed, r, nodes, fraction, minimum) for r in ROUNDS]


def test_the_same_seed_picks_the_same_clients_every_time():
    assert _picks(0) == _picks(0)


def test_the_order_the_grid_lists_its_nodes_in_does_not_matter():
    assert _picks(0, nodes=list(reversed(NODES))) == _picks(0)


def test_another_seed_picks_other_clients():
    assert all(a != b for a, b in zip(_picks(0), _picks(1)))


def test_each_round_picks_other_clients():
    picks = _picks(0)
    assert len({tuple(p) for p in picks}) == len(picks)


def test_a_round_picks_fraction_train_of_the_nodes_sorted_and_without_repeats():
    for picked in _picks(0, fraction=0.25):
        assert len(picked) == 25 and picked == sorted(set(picked)) and set(picked) <= set(NODES)


@pytest.mark.parametrize(("nodes", "fraction", "minimum", "size"), [(100, 0.01, 5, 5), (3, 0.1, 5, 3), (10, 1.0, 2, 10)])
def test_min_train_nodes_raises_the_count_and_no_more_nodes_than_exist_are_picked(nodes, fraction, minimum, size):
    assert len(sample_clients(0, 1, NODES[:nodes], fraction, minimum)) == size


def test_the_picks_are_those_of_earlier_releases_so_old_checkpoints_resume_on_the_same_clients():
    """Measured with the strategy's inline sampling before it moved to fedmud.seeds (run seed 0)."""
    assert sample_clients(0, 1, list(range(10)), 0.3, 2) == [0, 5, 6]
    assert sample_clients(0, 2, list(range(10)), 0.3, 2) == [3, 6, 8]
    assert sample_clients(7, 1, list(range(100)), 0.05, 2) == [3, 8, 46, 59, 66]


@pytest.mark.integration
def test_two_flower_runs_of_one_config_and_seed_train_the_same_partitions(simulation_superlink, tmp_path):
    """Flower gives the nodes new random ids every run; the server asks each node its partition
    once and samples partitions, so at fraction-train < 1 both runs are the same run."""
    config = "num-server-rounds=2 local-epochs=1 fraction-train=0.5 min-train-nodes=2 num-partitions=4"
    first, second = (finished_run(simulation_superlink, tmp_path / name, config, supernodes=4) for name in "ab")
    rows = lambda run: [(r["round"], r["accuracy"], r["loss"], r.get("train-loss")) for r in run["results"]]  # noqa: E731
    assert rows(first) == rows(second)
    assert {r["client"] for r in first["ledger"]["records"]} != {r["client"] for r in second["ledger"]["records"]}
    asked = [r for r in first["ledger"]["control"] if r["direction"] == "down"]
    answered = [r for r in first["ledger"]["control"] if r["direction"] == "up"]
    assert len(asked) == len(answered) == 4  # each node is asked once
