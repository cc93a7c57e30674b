"""scripts/tuned_bench.py: learning rates chosen on a tuning seed, bytes counted as the server plans them."""

import subprocess
import sys

import pytest

from .conftest import ROOT, load_script

tuned_bench = load_script("scripts/tuned_bench.py")


def tuning_runs(curves: dict[float, list[float]]) -> dict:
    return {
        tuned_bench.key_of({"suite": "p10", "method": "fedmud", "lr": lr, "seed": 100, "rounds": 4}): {
            "accuracy": acc, "up_bytes": [100] * (len(acc) - 1), "down_bytes": [0] * (len(acc) - 1),
            "dense_bytes_per_round": 1000,
        }
        for lr, acc in curves.items()
    }


def test_each_budget_takes_the_rate_best_over_its_last_rounds_and_flags_a_grid_edge():
    assert tuned_bench.SMOOTH == 5
    runs = tuning_runs({
        0.03: [0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9],
        0.1: [0.1, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8],
        0.3: [0.1, 0.6, 0.9, 0.3, 0.2, 0.2, 0.2, 0.95],  # best in the last round alone: not chosen
    })
    short = tuned_bench.choose(runs, "p10", "fedmud", [0.03, 0.1, 0.3], 100, 4, at=2, target=0.85)
    full = tuned_bench.choose(runs, "p10", "fedmud", [0.03, 0.1, 0.3], 100, 4, at=7, target=0.85)
    assert short["lr"] == 0.1 and not short["edge"]  # rounds 1-2: 0.75, tied with 0.3: the smaller rate
    assert full["lr"] == 0.03 and full["edge"]  # rounds 3-7: 0.84 against 0.8 and 0.37; the grid's low edge
    assert full["scores"] == {"0.03": 0.84, "0.1": 0.8, "0.3": 0.37}
    # bytes to 0.85 (100 B a round): 0.3 passes it in round 1.83, 0.03 in round 4.5, 0.1 never
    assert full["up_to_target"] == {"0.03": pytest.approx(450), "0.1": None, "0.3": pytest.approx(550 / 3)}
    assert full["fastest"] == 0.3 and short["fastest"] == 0.3
    assert tuned_bench.choose(runs, "p10", "fedmud", [0.03, 0.1], 100, 4, at=2, target=0.85)["fastest"] is None


def test_figures_interpolate_bytes_to_the_target_over_the_budget_only():
    row = {"accuracy": [0.1, 0.5, 0.9, 0.99], "up_bytes": [100, 100, 100], "down_bytes": [0, 50, 50],
           "dense_bytes_per_round": 1000}
    two = tuned_bench.figures(row, rounds=2, target=0.7)
    assert (two["final"], two["up"], two["down"], two["total"]) == (0.9, 200, 50, 250)
    assert two["last"] == pytest.approx((0.5 + 0.9) / 2)  # the budget's last rounds, never round 0
    assert two["up_to_target"] == pytest.approx(150)  # halfway from 0.5 to 0.9, between 100 and 200 B
    assert two["round_to_target"] == pytest.approx(1.5)
    assert two["up_vs_dense"] == pytest.approx(0.1) and two["total_vs_dense"] == pytest.approx(250 / 4000)
    assert tuned_bench.figures(row, rounds=2, target=0.95)["up_to_target"] is None  # reached only in round 3


def test_a_reported_seed_cannot_be_the_tuning_seed():
    result = subprocess.run(
        [sys.executable, "scripts/tuned_bench.py", "--seeds", "0,100", "--tune-seed", "100"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "--tune-seed 100 is one of the reported --seeds" in result.stderr


def test_a_run_counts_each_upload_and_the_chain_the_server_plans_for_each_client():
    row = tuned_bench.run_one({"suite": "smoke", "method": "fedmud", "lr": 0.05, "seed": 0, "rounds": 3, "phase": "test"})
    assert len(row["accuracy"]) == 4 and len(row["up_bytes"]) == len(row["down_bytes"]) == 3
    assert len(set(row["up_bytes"])) == 1 and row["up_bytes"][0] < row["dense_bytes_per_round"] / 30  # 1/32 of dense
    # both clients train every round: round 1 needs nothing (both hold round 0), later rounds one link each
    assert row["down_bytes"] == [0, 2 * row["link_bytes"], 2 * row["link_bytes"]]
    assert row["link_bytes"] < row["full_bytes"] / 50  # an int4 link of the factors
