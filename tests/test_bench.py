"""The benchmark suite: pure functions (fast) and the smoke suite end to end (integration)."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bench.cli import config_problem, parse_args, suite_from_args
from bench.metrics import (
    COLUMNS,
    bytes_to_target,
    comm_seconds,
    enrich,
    mean_std,
    over_seeds,
    pareto_front,
    run_summary,
    value_at_target,
)
from bench.runner import flwr_command
from bench.suites import FIRST_NINE, METHODS, STATS_FIVE, SUITES, render_overrides, resolve
from fedmud.config import parse_run_config
from bench.superlink import processes_with_token

from .conftest import ROOT
from .test_results_row import results_row


# ---------------------------------------------------------------------- pure functions
def rows(accuracies, cum_up):
    return [{"round": i, "accuracy": a, "cum_up_bytes": b} for i, (a, b) in enumerate(zip(accuracies, cum_up))]


def test_bytes_to_target_interpolates_between_the_bracketing_rounds():
    # 0.95 lies (0.95 - 0.90) / (0.98 - 0.90) = 0.625 of the way from round 2 (200 B) to round 3 (300 B)
    r = rows([0.1, 0.5, 0.9, 0.98], [0, 100, 200, 300])
    assert bytes_to_target(r, 0.95) == pytest.approx(200 + 0.625 * 100)


def test_bytes_to_target_exactly_on_a_round_and_already_at_round_0():
    assert bytes_to_target(rows([0.1, 0.95, 0.99], [0, 100, 200]), 0.95) == pytest.approx(100)
    assert bytes_to_target(rows([0.96, 0.97], [0, 100]), 0.95) == 0


def test_bytes_to_target_takes_the_first_crossing_and_ignores_later_dips():
    r = rows([0.1, 0.96, 0.90, 0.99], [0, 100, 200, 300])
    assert bytes_to_target(r, 0.95) == pytest.approx(0.85 / 0.86 * 100)


def test_bytes_to_target_not_reached_is_none():
    assert bytes_to_target(rows([0.1, 0.5, 0.94], [0, 100, 200]), 0.95) is None
    assert bytes_to_target(rows([0.1, float("nan")], [0, 100]), 0.95) is None
    assert value_at_target([], [], 0.5) is None


def test_bandwidth_model_is_the_slowest_client_of_each_round():
    records = [
        {"round": 1, "client": "a", "direction": "down", "bytes": 2_500_000},  # 20 Mbit at 20 Mbit/s: 1 s
        {"round": 1, "client": "a", "direction": "up", "bytes": 625_000},  # 5 Mbit at 5 Mbit/s: 1 s
        {"round": 1, "client": "b", "direction": "down", "bytes": 2_500_000},
        {"round": 1, "client": "b", "direction": "up", "bytes": 1_250_000},  # 2 s up: b is the slowest, 3 s
        {"round": 2, "client": "a", "direction": "down", "bytes": 1_250_000},  # 0.5 s
        {"round": 2, "client": "a", "direction": "up", "bytes": 312_500},  # 0.5 s
        {"round": 2, "client": "a", "direction": "up", "bytes": 312_500},  # a second message, same round: +0.5 s
        {"round": 2, "client": "b", "direction": "down", "bytes": 1_250_000},  # failed: no upload, 0.5 s
    ]
    comm = comm_seconds(records, up_mbps=5, down_mbps=20)
    assert comm == {1: pytest.approx(3.0), 2: pytest.approx(1.5)}
    assert comm_seconds(records, up_mbps=10, down_mbps=40)[1] == pytest.approx(1.5)
    with pytest.raises(ValueError):
        comm_seconds(records, up_mbps=0, down_mbps=20)


def test_enrich_adds_compute_comm_and_estimated_time():
    results = [
        results_row(0, accuracy=0.1, loss=2.3, wall_s=1.0),
        results_row(1, accuracy=0.9, loss=0.3, up_bytes=10, down_bytes=20, cum_up_bytes=10, cum_down_bytes=20,
                    wall_s=11.0, accepted=2, train_loss=0.5),
        results_row(2, accuracy=0.97, loss=0.1, up_bytes=10, down_bytes=20, cum_up_bytes=20, cum_down_bytes=40,
                    wall_s=19.0, accepted=2, train_loss=0.2),
    ]
    out = enrich(results, {1: 3.0, 2: 1.5})
    assert set(out[0]) == set(COLUMNS)
    assert [r["compute_s"] for r in out] == [1.0, 10.0, 8.0]
    assert [r["cum_comm_s"] for r in out] == [0.0, 3.0, 4.5]
    assert [r["est_time_s"] for r in out] == [1.0, 14.0, 23.5]
    assert math.isnan(out[0]["train_loss"])
    s = run_summary(out, 0.95)
    assert s["up_bytes_to_target"] == pytest.approx(10 + 0.05 / 0.07 * 10)
    assert s["time_to_target_s"] == pytest.approx(14.0 + 0.05 / 0.07 * 9.5)
    assert s["comm_s_per_round"] == pytest.approx(2.25) and s["compute_s_per_round"] == pytest.approx(9.0)
    assert s["best_accuracy"] == 0.97 and run_summary(out, 0.99)["time_to_target_s"] is None


def test_suites_and_overrides():
    assert set(FIRST_NINE) <= set(METHODS) and set(STATS_FIVE) <= set(METHODS)
    for name in ("iid", "dirichlet"):  # the statistics suites: >= 3 seeds, >= 20 rounds
        assert SUITES[name].methods == STATS_FIVE and len(SUITES[name].seeds) >= 3 and SUITES[name].rounds >= 20
    assert SUITES["dirichlet"].partition == "dirichlet" and SUITES["dirichlet"].alpha == 0.3
    suite = resolve("iid", methods=("fedavg", "fedmud"), rounds=3, up_mbps=None)
    assert suite.methods == ("fedavg", "fedmud") and suite.rounds == 3 and suite.up_mbps == 5.0
    with pytest.raises(ValueError, match="unknown method"):
        resolve("iid", methods=("nope",))
    text = render_overrides({**METHODS["topk-ef"], "num-server-rounds": 8, "alpha": 0.3})
    assert text == (
        "method='fedavg' downlink-codec='float32' uplink='topk' error-feedback=true topk-ratio='1/32' "
        "num-server-rounds=8 alpha=0.3"
    )


def test_the_dense_baselines_pin_their_codecs_and_the_mud_methods_their_float32_upload():
    """A committed table keeps meaning what it measured when a default changes."""
    assert METHODS["fedavg"] == {"method": "fedavg", "downlink-codec": "float32", "uplink": "float32"}
    for name in ("fedavg-fp16", "fedavg-int8", "topk-ef", "ef-signsgd"):
        assert METHODS[name]["method"] == "fedavg" and METHODS[name]["downlink-codec"] == "float32"
    assert METHODS["ef-signsgd"]["uplink"] == "sign" and METHODS["ef-signsgd"]["error-feedback"] is True
    assert METHODS["fedavg-int8"]["stochastic-rounding"] is False  # nearest rounding, as measured
    for name in ("fedmud", "mud-mat-ab", "mud-mat-aad"):
        assert METHODS[name]["uplink"] == "float32" and not {"downlink-codec", "error-feedback"} & set(METHODS[name])
    assert METHODS["fedmud-link-float32"] == {**METHODS["fedmud"], "downlink-codec": "float32"}
    assert METHODS["fedpara"] == {"method": "fedpara", "ratio": "1/32"}


def test_the_tuned_methods_run_the_configs_their_committed_tables_name():
    """docs/bench/p10-tuned and full-iid-tuned were measured with exactly these keys: composing the
    methods from shared levers must not move them."""
    fedmud = {"method": "fedmud", "kind": "kron", "pattern": "aad", "ratio": "1/32", "uplink": "float32"}
    assert METHODS["fedmud-int4-sr"] == {**fedmud, "uplink": "int4", "stochastic-rounding": True}
    assert METHODS["fedmud-r16-int8-sr"] == {**fedmud, "ratio": "1/16", "uplink": "int8", "stochastic-rounding": True}
    assert METHODS["fedmud-r16-int4-sr-link-int2"] == {
        **fedmud, "ratio": "1/16", "uplink": "int4", "stochastic-rounding": True, "downlink-codec": "int2"
    }
    assert METHODS["fedmud-sign-ef"] == {**fedmud, "uplink": "sign", "error-feedback": True}
    assert METHODS["ef-signsgd-int4"] == {
        "method": "fedavg", "uplink": "sign", "error-feedback": True, "downlink-codec": "int4"
    }


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_a_valid_run_config(name):
    """A method's overrides on top of the defaults parse (a key renamed or a value refused fails here,
    not an hour into a bench)."""
    parse_run_config(METHODS[name])


def test_participation_and_training_fields_become_run_config_keys():
    suite = resolve("p10")
    assert (suite.supernodes, suite.fraction_train, suite.min_train_nodes) == (100, 0.1, 10)
    assert suite.clients_per_round == 10
    config = suite.run_config("fedmud", seed=2)
    assert config["num-partitions"] == 100 and config["fraction-train"] == 0.1 and config["min-train-nodes"] == 10
    assert config["lr"] == 0.01 and config["batch-size"] == 64 and config["local-epochs"] == 3
    assert config["seed"] == 2 and config["data-seed"] == 42  # the data stay the same across seeds
    assert suite.run_config("fedmud")["seed"] == 0  # the first seed
    command = flwr_command(suite, "fedmud", 1, Path("raw"))
    assert command[command.index("--federation-config") + 1] == "num-supernodes=100 client-resources-num-cpus=1"
    assert "fraction-train=0.1 min-train-nodes=10" in command[command.index("-c") + 1]
    assert resolve("p1").clients_per_round == 10 and resolve("p1").supernodes == 1000


def test_unset_optional_fields_keep_the_pyproject_defaults():
    config = SUITES["iid"].run_config("fedavg")
    assert not {"fraction-train", "min-train-nodes", "lr", "batch-size", "local-epochs", "model"} & set(config)
    assert SUITES["iid"].clients_per_round == 10  # pyproject: fraction 1.0, every client every round


def test_every_method_runs_once_per_seed_each_seed_in_turn():
    suite = resolve("smoke", seeds=(3, 5))
    assert suite.runs == [("fedavg", 3), ("fedmud", 3), ("fedavg", 5), ("fedmud", 5)]
    assert SUITES["p10"].seeds == SUITES["p1"].seeds == SUITES["full-iid"].seeds == (0, 1, 2)


def test_seeds_and_participation_from_the_command_line():
    args = ["--suite", "smoke", "--seeds", "0,1,2", "--supernodes", "20", "--fraction-train", "0.25",
            "--min-train-nodes", "4", "--lr", "0.02", "--batch-size", "16"]
    suite = suite_from_args(parse_args(args))
    assert suite.seeds == (0, 1, 2) and suite.clients_per_round == 5
    assert (suite.lr, suite.batch_size) == (0.02, 16)
    assert suite_from_args(parse_args(["--suite", "p10", "--seed", "7"])).seeds == (7,)
    with pytest.raises(ValueError, match="not both"):
        suite_from_args(parse_args(["--seeds", "0,1", "--seed", "1"]))
    with pytest.raises(ValueError, match="different integers"):
        resolve("smoke", seeds=(1, 1))
    with pytest.raises(ValueError, match="min_train_nodes=10"):
        resolve("p10", supernodes=5)  # the server would wait for clients that do not exist
    with pytest.raises(ValueError, match="fraction_train"):
        resolve("smoke", fraction_train=1.5)
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "0,x"])


def test_run_config_keys_for_every_method_from_the_command_line(tmp_path):
    """Fine-tuning through the bench: --set gives every method the pretrained weights and classes."""
    args = ["--suite", "smoke", "--methods", "fedavg,lora,ffa-lora", "--set", 'classes="5-9"',
            "--set", f'init-weights="{tmp_path / "w.pt"}"', "--set", "lora-rank=4"]
    suite = suite_from_args(parse_args(args))
    for method in suite.methods:
        config = suite.run_config(method)
        assert config["classes"] == "5-9" and config["init-weights"] == str(tmp_path / "w.pt")
    assert suite.run_config("lora")["lora-rank"] == 4 and suite.run_config("lora")["method"] == "lora"
    with pytest.raises(ValueError, match="give KEY=VALUE"):
        suite_from_args(parse_args(["--suite", "smoke", "--set", "classes"]))


def test_mean_and_sample_std_over_seeds():
    assert mean_std([0.9]) == (0.9, 0.0)
    mean, std = mean_std([0.90, 0.92, 0.97])
    assert mean == pytest.approx(0.93) and std == pytest.approx(math.sqrt((0.03**2 + 0.01**2 + 0.04**2) / 2))


def seed_run(final, up, down, up_to_target, dense_up=3200, dense_down=3000):
    """One run's summary line as run_summary and load_run make it (up_to_target None: not reached)."""
    reached = up_to_target is not None
    return {
        "final_accuracy": final, "best_accuracy": final + 0.01, "up_bytes": up, "down_bytes": down,
        "total_bytes": up + down, "dense_up_bytes": dense_up, "dense_down_bytes": dense_down,
        "up_bytes_to_target": up_to_target,
        "down_bytes_to_target": up_to_target / 2 if reached else None,
        "total_bytes_to_target": 1.5 * up_to_target if reached else None,
        "rounds_to_target": 3.0 if reached else None,
        "time_to_target_s": 30.0 if reached else None,
        "comm_s_per_round": 1.0, "compute_s_per_round": 8.0, "wall_s": 80.0, "comm_s": 8.0, "est_time_s": 88.0,
    }


def test_over_seeds_averages_every_run_and_bytes_to_target_over_the_seeds_that_reached_it():
    line = over_seeds({0: seed_run(0.96, 100, 200, 60), 1: seed_run(0.94, 110, 200, None),
                       2: seed_run(0.95, 120, 220, 80)})
    assert line["seeds"] == [0, 1, 2] and line["finished"] == 3 and line["reached"] == 2
    assert line["final_accuracy"] == pytest.approx(0.95) and line["final_accuracy_std"] == pytest.approx(0.01)
    assert line["up_bytes"] == pytest.approx(110) and line["total_bytes"] == pytest.approx(950 / 3)
    assert line["up_bytes_to_target"] == pytest.approx(70)
    assert line["up_bytes_to_target_std"] == pytest.approx(math.sqrt(200))
    assert line["total_bytes_to_target"] == pytest.approx(105)
    # vs dense: the mean bytes over the ledger's dense equivalent
    assert line["up_vs_dense"] == pytest.approx(110 / 3200) and line["down_vs_dense"] == pytest.approx(620 / 3 / 3000)
    assert line["total_vs_dense"] == pytest.approx(950 / 3 / 6200)
    none = over_seeds({0: seed_run(0.9, 100, 200, None)})
    assert none["reached"] == 0 and none["up_bytes_to_target"] is None and none["final_accuracy_std"] == 0.0


def test_pareto_front_keeps_the_points_nothing_cheaper_beats():
    points = {
        "fedavg": (200.0, 0.98),
        "fedavg-int8": (60.0, 0.98),  # as accurate as fedavg, cheaper: fedavg is dominated
        "fedmud": (8.0, 0.97),
        "fedlmt": (8.0, 0.95),  # same cost as fedmud, less accurate
        "topk-ef": (110.0, 0.976),  # dearer and less accurate than fedavg-int8
        "fedmud-int8-ef": (4.0, 0.96),
        "twin": (4.0, 0.96),  # identical to an earlier point: the first named is kept
    }
    assert pareto_front(points) == ["fedmud-int8-ef", "fedmud", "fedavg-int8"]
    assert pareto_front({}) == [] and pareto_front({"a": (1.0, 0.5)}) == ["a"]


def synthetic_run(name, seed, accuracies, up_per_round, down_per_round=0):
    """A finished run as load_run returns it; dense FedAvg would send 3.2 MB each way per round."""
    results = [
        results_row(i, accuracy=a, loss=1.0, up_bytes=up_per_round * (i > 0), down_bytes=down_per_round * (i > 0),
                    cum_up_bytes=up_per_round * i, cum_down_bytes=down_per_round * i, wall_s=10.0 * i)
        for i, a in enumerate(accuracies)
    ]
    rows = enrich(results, {})
    summary = run_summary(rows, 0.95)
    summary["dense_up_bytes"] = summary["dense_down_bytes"] = 3_200_000 * (len(accuracies) - 1)
    return {"method": name, "seed": seed, "overrides": METHODS[name], "command": f"flwr run {name} seed={seed}",
            "rows": rows, "summary": summary}


def table_rows(text):
    """First cell -> its rows in the markdown tables, joined (the header rows under 'method')."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("| "):
            name = line.split("|")[1].strip()
            rows[name] = rows.get(name, "") + line
    return rows


def cells(header, row):
    return dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))


def test_summary_table_ratio_not_reached_and_failures(tmp_path):
    from bench.report import summarise, write_run
    from bench.runner import Outcome

    runs = {
        "fedavg": {0: synthetic_run("fedavg", 0, [0.1, 0.9, 0.96], 3_200_000)},
        "fedmud": {0: synthetic_run("fedmud", 0, [0.1, 0.8, 0.94], 100_000)},
        "fedlmt": {0: synthetic_run("fedlmt", 0, [0.1, 0.94, 0.98], 100_000)},
    }
    outcomes = [Outcome("fedavg", 0, "c", "ok"), Outcome("fedmud", 0, "c", "ok"), Outcome("fedlmt", 0, "c", "ok"),
                Outcome("topk-ef", 0, "flwr run topk", "failed", error="boom")]
    suite = resolve("iid", methods=("fedavg", "fedmud", "fedlmt", "topk-ef"), seeds=(0,))
    summary = summarise(suite, runs, outcomes, "fedmud-bench --suite iid", tmp_path)
    text = (tmp_path / "summary.md").read_text()
    rows = table_rows(text)
    assert set(rows) == {"method", "fedavg", "fedmud", "fedlmt"}
    assert "not reached" in rows["fedmud"] and "vs FedAvg" in rows["method"]
    assert not any("±" in row for row in rows.values()) and "## Per seed" not in text  # one seed: no spread
    # FedAvg reaches 0.95 at 3.2 + 5/6 * 3.2 MB; fedlmt at 0.1 + 1/4 * 0.1 MB
    ratio = summary["methods"]["fedlmt"]["up_to_target_vs_fedavg"]
    assert ratio == pytest.approx(0.125e6 / (3.2e6 * (1 + 5 / 6)))
    assert f"1/{1 / ratio:.1f}" in rows["fedlmt"]
    assert "topk-ef/seed-0" in summary["failed"] and "boom" in text and "flwr run topk" in text
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    write_run(runs["fedavg"][0], tmp_path)
    data = json.loads((tmp_path / "runs" / "fedavg" / "seed-0.json").read_text(), parse_constant=pytest.fail)
    assert data["rows"][0]["train_loss"] is None  # NaN -> null


def test_ratio_columns_against_dense_and_against_fedavg(tmp_path):
    from bench.report import summarise

    # fedavg sends the dense model both ways; fedmud 1/32 of it up and 1/16 down
    runs = {
        "fedavg": {0: synthetic_run("fedavg", 0, [0.1, 0.96, 0.97], 3_200_000, 3_200_000)},
        "fedmud": {0: synthetic_run("fedmud", 0, [0.1, 0.96, 0.97], 100_000, 200_000)},
    }
    summary = summarise(resolve("smoke"), runs, [], "c", tmp_path)
    s = summary["methods"]["fedmud"]
    assert s["up_vs_dense"] == pytest.approx(1 / 32) and s["down_vs_dense"] == pytest.approx(1 / 16)
    assert s["total_vs_dense"] == pytest.approx(3 / 64) and s["total_vs_fedavg"] == pytest.approx(3 / 64)
    assert s["total_to_target_vs_fedavg"] == pytest.approx(3 / 64)
    assert summary["methods"]["fedavg"]["up_vs_dense"] == pytest.approx(1.0)
    header, fedavg, fedmud = [line for line in (tmp_path / "summary.md").read_text().splitlines()
                              if line.startswith("| ")][:3]
    row = cells(header, fedmud)
    assert row["up vs dense"] == row["up vs FedAvg"] == "1/32.0"
    assert row["down vs dense"] == "1/16.0" and row["total vs dense"] == row["total vs FedAvg"] == "1/21.3"
    assert cells(header, fedavg)["total vs dense"] == cells(header, fedavg)["total vs FedAvg"] == "1.00×"


def test_summary_over_seeds_shows_mean_std_and_how_many_reached_the_target(tmp_path):
    from bench.report import plot_curves, plot_pareto, summarise
    from bench.runner import Outcome

    runs = {
        "fedavg": {s: synthetic_run("fedavg", s, [0.1, 0.9, a], 3_200_000, 3_200_000)
                   for s, a in ((0, 0.96), (1, 0.98), (2, 0.97))},
        "fedmud": {s: synthetic_run("fedmud", s, [0.1, 0.9, a], 100_000, 100_000)
                   for s, a in ((0, 0.94), (1, 0.96), (2, 0.98))},
    }
    suite = resolve("smoke", seeds=(0, 1, 2))
    outcomes = [Outcome(m, s, "c", "ok") for m, by_seed in runs.items() for s in by_seed]
    summary = summarise(suite, runs, outcomes, "fedmud-bench --suite smoke --seeds 0,1,2", tmp_path)
    fedmud = summary["methods"]["fedmud"]
    assert fedmud["final_accuracy"] == pytest.approx(0.96) and fedmud["final_accuracy_std"] == pytest.approx(0.02)
    assert fedmud["reached"] == 2 and set(fedmud["per_seed"]) == {0, 1, 2}
    text = (tmp_path / "summary.md").read_text()
    fedmud_rows = [line for line in text.splitlines() if line.startswith("| fedmud |")]
    assert len(fedmud_rows) == 2 + 3  # the two tables, and one row per seed
    assert "| 3 | 0.9600 ± 0.0200 |" in fedmud_rows[0]
    # seeds 1 and 2 reach 0.95 in round 2, at 100 kB + 5/6 and + 5/8 of the next 100 kB up
    mean, std = mean_std([183_333, 162_500])
    assert f"| 2/3 | {mean / 1e6:.3f} ± {std / 1e6:.3f} |" in fedmud_rows[1]
    assert "## Per seed" in text and "seeds 0, 1, 2" in text
    # fedavg is more accurate on average (0.97 vs 0.96) at 32x the bytes: both on the front
    assert summary["pareto_front"] == ["fedmud", "fedavg"]
    plot_curves(runs, suite, tmp_path)
    plot_pareto(summary, suite, tmp_path)
    for name in ("accuracy_vs_mb_up.png", "accuracy_vs_round.png", "pareto_accuracy_vs_total_bytes.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_a_refused_config_is_found_before_running():
    for suite in SUITES.values():  # every suite's methods run as configured
        for method in suite.methods:
            assert config_problem(suite, method, ROOT) == "", (suite.name, method)
    assert all(config_problem(SUITES["iid"], m, ROOT) == "" for m in METHODS)
    bad = replace(SUITES["smoke"], extra={"pattern": "xyz"})
    assert "pattern='xyz' is not allowed" in config_problem(bad, "fedmud", ROOT)
    assert "not in pyproject.toml" in config_problem(replace(SUITES["smoke"], extra={"no-such-key": 1}), "fedavg", ROOT)


def test_the_model_flag_reaches_every_methods_run_config(tmp_path):
    args = parse_args(["--suite", "smoke", "--model", "package.models:build", "--dataset", "package.data:load"])
    suite = suite_from_args(args)
    assert suite.model == "package.models:build" and suite.dataset == "package.data:load"
    for method in METHODS:
        config = suite.run_config(method)
        assert config["model"] == "package.models:build" and config["dataset"] == "package.data:load"
    command = flwr_command(suite, "fedavg", 0, tmp_path)
    overrides = command[command.index("-c") + 1]
    assert "model='package.models:build'" in overrides and "dataset='package.data:load'" in overrides


def test_without_a_model_the_run_config_keeps_the_pyproject_default():
    suite = suite_from_args(parse_args(["--suite", "smoke"]))
    assert suite.model is None and SUITES["iid"].model is None
    assert not any("model" in suite.run_config(m) for m in METHODS)


def test_a_model_import_string_that_does_not_import_is_reported_before_running():
    suite = replace(SUITES["smoke"], model="no_such_package.models:build")
    problem = config_problem(suite, "fedmud", ROOT)
    assert problem.startswith("configuration error: model='no_such_package.models:build' is not allowed")
    assert "cannot import module 'no_such_package.models'" in problem
    assert "has no attribute 'nope'" in config_problem(replace(suite, model="fedmud.models:nope"), "fedavg", ROOT)
    assert config_problem(replace(suite, model="fedmud.models:cnn_mnist"), "fedmud", ROOT) == ""


def test_a_model_that_cannot_reach_the_ratio_is_reported_before_running():
    suite = replace(SUITES["smoke"], model="mobilenet-v3-small", extra={"ratio": "1/64", "vector-uplink": "uplink"})
    assert "ratio=0.015625 (1/64.0) cannot be reached" in config_problem(suite, "fedmud", ROOT)
    assert "is not allowed with dataset='mnist5k'" in config_problem(replace(suite, model="cnn-cifar"), "fedmud", ROOT)


def test_a_factory_in_the_app_directory_is_imported_as_flower_imports_it(tmp_path):
    name = "fedmud_bench_test_models"
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / f"{name}.py").write_text("from fedmud.models import cnn_mnist as build\n")
    suite = replace(SUITES["smoke"], model=f"{name}:build")
    before = list(sys.path)
    try:
        assert "cannot import module" in config_problem(suite, "fedmud", ROOT)
        assert config_problem(suite, "fedmud", tmp_path) == ""
    finally:
        sys.modules.pop(name, None)
    assert sys.path == before


# ---------------------------------------------------------------------- the bench's loop, Flower stubbed
class StubSuperLink:
    pid, token = 0, "stub"

    def __init__(self, *args) -> None:
        pass

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


def stub_run(self, index, method, seed):
    """What one finished ``flwr run`` leaves: results, ledger and summary; accuracy rises with the seed."""
    from bench.runner import Outcome, run_dir

    directory = run_dir(self.out, method, seed) / "20260101-000000"
    directory.mkdir(parents=True)
    up, down = (1_000_000, 1_000_000) if method == "fedavg" else (31_250, 31_250)
    accuracies = [0.1, 0.9, 0.95 + 0.01 * seed]
    results = [results_row(r, accuracy=a, loss=1.0, up_bytes=up * (r > 0), down_bytes=down * (r > 0),
                           cum_up_bytes=up * r, cum_down_bytes=down * r, wall_s=5.0 * r).as_dict()
               for r, a in enumerate(accuracies)]
    records = [{"round": r, "client": c, "direction": d, "bytes": (up if d == "up" else down) // 2}
               for r in (1, 2) for c in ("1", "2") for d in ("up", "down")]
    ledger = {"dense_up_bytes": 500_000, "dense_down_bytes": 500_000, "records": records,
              "totals": {"up": 2 * up, "down": 2 * down}, "dense_equivalent": {"up": 2_000_000, "down": 2_000_000}}
    for name, value in (("results.json", results), ("ledger.json", ledger), ("summary.json", {})):
        (directory / name).write_text(json.dumps(value))
    self.status(index, method, seed, "done", 1.0)
    return Outcome(method, seed, f"flwr run {method} seed={seed}", "ok", run_dir=directory, seconds=1.0)


def test_every_method_runs_once_per_seed_and_the_report_covers_them(tmp_path, monkeypatch, capsys):
    import bench.cli
    from bench.cli import main
    from bench.runner import Runner

    monkeypatch.setattr(bench.cli, "PrivateSuperLink", StubSuperLink)
    monkeypatch.setattr(Runner, "run", stub_run)
    assert main(["--suite", "smoke-seeds", "--seeds", "0,1,2", "--out", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "[6/6 fedmud seed=2] done" in output and "6/6 runs finished" in output
    for method in ("fedavg", "fedmud"):
        assert sorted(p.name for p in (tmp_path / "runs" / method).glob("*.csv")) == [
            "seed-0.csv", "seed-1.csv", "seed-2.csv"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    fedmud = summary["methods"]["fedmud"]
    assert fedmud["seeds"] == [0, 1, 2] and fedmud["reached"] == 3 and set(fedmud["per_seed"]) == {"0", "1", "2"}
    assert fedmud["final_accuracy"] == pytest.approx(0.96) and fedmud["final_accuracy_std"] == pytest.approx(0.01)
    assert fedmud["total_vs_dense"] == pytest.approx(1 / 32) and fedmud["total_vs_fedavg"] == pytest.approx(1 / 32)
    assert summary["pareto_front"] == ["fedmud"]  # as accurate as fedavg on every seed, 32x cheaper
    assert (tmp_path / "pareto_accuracy_vs_total_bytes.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------- end to end
@pytest.mark.integration
def test_smoke_suite_end_to_end(tmp_path):
    out = tmp_path / "bench"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--suite", "smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    suite = SUITES["smoke"]

    # progress: one line per round and method
    for method in suite.methods:
        for r in range(1, suite.rounds + 1):
            assert f"{method}] round {r}/{suite.rounds} acc " in output, output[-3000:]

    runs = {}
    for method in suite.methods:
        with open(out / "runs" / method / "seed-0.csv") as f:
            table = list(csv.DictReader(f))
        assert tuple(table[0]) == COLUMNS
        assert [int(r["round"]) for r in table] == list(range(suite.rounds + 1))
        data = json.loads((out / "runs" / method / "seed-0.json").read_text())
        assert [r["round"] for r in data["rows"]] == list(range(suite.rounds + 1))
        for key in ("cum_up_bytes", "cum_down_bytes", "cum_comm_s"):
            values = [float(r[key]) for r in table]
            assert values == sorted(values), (method, key, values)
        assert float(table[-1]["comm_s"]) > 0
        assert (out / "logs" / method / "seed-0.log").stat().st_size > 0
        assert list((out / "tensorboard" / method / "seed-0").glob("events.out.tfevents.*"))
        assert list((out / "raw" / method / "seed-0").glob("*/ledger.json"))
        runs[method] = data
    assert runs["fedmud"]["summary"]["up_bytes"] < runs["fedavg"]["summary"]["up_bytes"] / 20

    summary_md = (out / "summary.md").read_text()
    table_rows = [line for line in summary_md.splitlines() if line.startswith("| ")]
    assert "vs FedAvg" in table_rows[0]
    assert {row.split("|")[1].strip() for row in table_rows[1:]} == {"method", *suite.methods}
    assert "flwr run . --stream --federation-config" in summary_md and "CPU cores" in summary_md
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == set(suite.methods) and not summary["failed"]
    assert summary["methods"]["fedavg"]["up_vs_dense"] == pytest.approx(1.0)  # float32 both ways: dense
    assert summary["methods"]["fedmud"]["up_vs_dense"] < 1 / 20 and summary["pareto_front"]
    assert summary["suite"]["rounds"] == suite.rounds and summary["machine"]["cpu_cores"] >= 1

    for name in ("accuracy_vs_mb_up.png", "accuracy_vs_round.png", "pareto_accuracy_vs_total_bytes.png",
                 "label_distribution.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # nothing left running: the SuperLink it started (and everything under it) is gone
    superlink_log = (out / "logs" / "superlink.log").read_text()
    assert superlink_log
    started = re.search(r"SuperLink pid (\d+) .* FEDMUD_BENCH_TOKEN=(\w+)", output)
    assert started, output[:2000]
    assert not Path(f"/proc/{started.group(1)}").exists()
    assert processes_with_token(started.group(2)) == []
    print(f"smoke suite: {seconds:.0f}s")  # ~2 min on an idle 2-core machine


def test_the_default_suite_covers_full_10_and_1_percent_participation():
    from bench.suites import GROUPS

    members = [SUITES[name] for name in GROUPS["default"]]
    assert sorted(s.clients_per_round / s.supernodes for s in members) == [0.01, 0.1, 1.0]
    assert all(len(s.seeds) >= 3 for s in members)
