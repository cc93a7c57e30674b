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
from bench.metrics import COLUMNS, bytes_to_target, comm_seconds, enrich, run_summary, value_at_target
from bench.runner import flwr_command
from bench.suites import METHODS, SUITES, render_overrides, resolve
from bench.superlink import processes_with_token

from .conftest import ROOT


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
        {"round": 0, "accuracy": 0.1, "loss": 2.3, "up_bytes": 0, "down_bytes": 0, "cum_up_bytes": 0,
         "cum_down_bytes": 0, "wall_s": 1.0},
        {"round": 1, "accuracy": 0.9, "loss": 0.3, "up_bytes": 10, "down_bytes": 20, "cum_up_bytes": 10,
         "cum_down_bytes": 20, "wall_s": 11.0, "accepted": 2, "train-loss": 0.5},
        {"round": 2, "accuracy": 0.97, "loss": 0.1, "up_bytes": 10, "down_bytes": 20, "cum_up_bytes": 20,
         "cum_down_bytes": 40, "wall_s": 19.0, "accepted": 2, "train-loss": 0.2},
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
    assert len(SUITES["default"].methods) == 9 and set(SUITES["default"].methods) == set(METHODS)
    assert SUITES["dirichlet"].partition == "dirichlet" and SUITES["dirichlet"].alpha == 0.3
    suite = resolve("default", methods=("fedavg", "fedmud"), rounds=3, up_mbps=None)
    assert suite.methods == ("fedavg", "fedmud") and suite.rounds == 3 and suite.up_mbps == 5.0
    with pytest.raises(ValueError, match="unknown method"):
        resolve("default", methods=("nope",))
    text = render_overrides({**METHODS["topk-ef"], "num-server-rounds": 8, "alpha": 0.3})
    assert text == "method='fedavg' uplink='topk' error-feedback=true topk-ratio='1/32' num-server-rounds=8 alpha=0.3"


def test_summary_table_ratio_not_reached_and_failures(tmp_path):
    from bench.report import summarise, write_run
    from bench.runner import Outcome

    def run(name, accuracies, per_round):
        results = [
            {"round": i, "accuracy": a, "loss": 1.0, "up_bytes": per_round * (i > 0), "down_bytes": 0,
             "cum_up_bytes": per_round * i, "cum_down_bytes": 0, "wall_s": 10.0 * i}
            for i, a in enumerate(accuracies)
        ]
        rows = enrich(results, {})
        return {"method": name, "overrides": METHODS[name], "command": f"flwr run {name}", "rows": rows,
                "summary": run_summary(rows, 0.95)}

    runs = {"fedavg": run("fedavg", [0.1, 0.9, 0.96], 3_200_000), "fedmud": run("fedmud", [0.1, 0.8, 0.94], 100_000),
            "fedlmt": run("fedlmt", [0.1, 0.94, 0.98], 100_000)}
    outcomes = [Outcome("fedavg", "c", "ok"), Outcome("fedmud", "c", "ok"), Outcome("fedlmt", "c", "ok"),
                Outcome("topk-ef", "flwr run topk", "failed", error="boom")]
    suite = resolve("default", methods=("fedavg", "fedmud", "fedlmt", "topk-ef"))
    summary = summarise(suite, runs, outcomes, "fedmud-bench --suite default", tmp_path)
    text = (tmp_path / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) == {"method", "fedavg", "fedmud", "fedlmt"}
    assert "not reached" in rows["fedmud"] and "vs FedAvg" in rows["method"]
    # FedAvg reaches 0.95 at 3.2 + 5/6 * 3.2 MB; fedlmt at 0.1 + 1/4 * 0.1 MB
    ratio = summary["methods"]["fedlmt"]["up_to_target_vs_fedavg"]
    assert ratio == pytest.approx(0.125e6 / (3.2e6 * (1 + 5 / 6)))
    assert f"1/{1 / ratio:.1f}" in rows["fedlmt"]
    assert "topk-ef" in summary["failed"] and "boom" in text and "flwr run topk" in text
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    write_run(runs["fedavg"], tmp_path)
    data = json.loads((tmp_path / "runs" / "fedavg.json").read_text(), parse_constant=pytest.fail)
    assert data["rows"][0]["train_loss"] is None  # NaN -> null


def test_a_refused_config_is_found_before_running():
    assert all(config_problem(SUITES["default"], m, ROOT) == "" for m in METHODS)
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
    command = flwr_command(suite, "fedavg", tmp_path)
    overrides = command[command.index("-c") + 1]
    assert "model='package.models:build'" in overrides and "dataset='package.data:load'" in overrides


def test_without_a_model_the_run_config_keeps_the_pyproject_default():
    suite = suite_from_args(parse_args(["--suite", "smoke"]))
    assert suite.model is None and SUITES["default"].model is None
    assert not any("model" in suite.run_config(m) for m in METHODS)


def test_a_model_import_string_that_does_not_import_is_reported_before_running():
    suite = replace(SUITES["smoke"], model="no_such_package.models:build")
    problem = config_problem(suite, "fedmud", ROOT)
    assert problem.startswith("configuration error: model='no_such_package.models:build' is not allowed")
    assert "cannot import module 'no_such_package.models'" in problem
    assert "has no attribute 'nope'" in config_problem(replace(suite, model="fedmud.models:nope"), "fedavg", ROOT)
    assert config_problem(replace(suite, model="fedmud.models:cnn_mnist"), "fedmud", ROOT) == ""


def test_a_model_that_cannot_reach_the_ratio_is_reported_before_running():
    suite = replace(SUITES["smoke"], model="mobilenet-v3-small", extra={"ratio": "1/64"})
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
        with open(out / "runs" / f"{method}.csv") as f:
            table = list(csv.DictReader(f))
        assert tuple(table[0]) == COLUMNS
        assert [int(r["round"]) for r in table] == list(range(suite.rounds + 1))
        data = json.loads((out / "runs" / f"{method}.json").read_text())
        assert [r["round"] for r in data["rows"]] == list(range(suite.rounds + 1))
        for key in ("cum_up_bytes", "cum_down_bytes", "cum_comm_s"):
            values = [float(r[key]) for r in table]
            assert values == sorted(values), (method, key, values)
        assert float(table[-1]["comm_s"]) > 0
        assert (out / "logs" / f"{method}.log").stat().st_size > 0
        assert list((out / "tensorboard" / method).glob("events.out.tfevents.*"))
        runs[method] = data
    assert runs["fedmud"]["summary"]["up_bytes"] < runs["fedavg"]["summary"]["up_bytes"] / 20

    summary_md = (out / "summary.md").read_text()
    table_rows = [line for line in summary_md.splitlines() if line.startswith("| ")]
    assert "vs FedAvg" in table_rows[0]
    assert {row.split("|")[1].strip() for row in table_rows[1:]} == set(suite.methods)
    assert "flwr run . --stream --federation-config" in summary_md and "CPU cores" in summary_md
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == set(suite.methods) and not summary["failed"]
    assert summary["suite"]["rounds"] == suite.rounds and summary["machine"]["cpu_cores"] >= 1

    for name in ("accuracy_vs_mb_up.png", "accuracy_vs_round.png", "label_distribution.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # nothing left running: the SuperLink it started (and everything under it) is gone
    superlink_log = (out / "logs" / "superlink.log").read_text()
    assert superlink_log
    started = re.search(r"SuperLink pid (\d+) .* FEDMUD_BENCH_TOKEN=(\w+)", output)
    assert started, output[:2000]
    assert not Path(f"/proc/{started.group(1)}").exists()
    assert processes_with_token(started.group(2)) == []
    print(f"smoke suite: {seconds:.0f}s")  # ~2 min on an idle 2-core machine
