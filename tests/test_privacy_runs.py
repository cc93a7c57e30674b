"""What a differentially private run states and warns.

ε is the composition of the rounds that ran, each at the (σ, q) its results row records, across
any resume; a ``dp-epsilon`` run is not resumed past its ε; a run whose noise the clipped updates
cannot carry is warned at start, with the population that would; a diverging run is flagged in the
log and in ``summary.json``. Whole runs go through the ServerApp's ``run_server`` in this process,
with real Flower messages answered by the real ClientApp round.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import rdp
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args

from client.app import app as client_app
from fedmud.config import ConfigError, parse_run_config
from fedmud.divergence import divergence
from fedmud.privacy import CARRYABLE_NOISE, Mechanism, accounted_epsilon, calibrate, check_resume, mechanism
from fedmud.results import RoundResult
from server.app import RunFailed, run_server

from .conftest import ROOT
from .federation import InProcessGrid
from .test_results_row import results_row

DELTA = 1e-5
# a small federation: 3 nodes, each one partition of 100 of scikit-learn's digits (~14 images), one local epoch
BASE = {"dataset": "digits", "num-partitions": 100, "local-epochs": 1, "min-train-nodes": 1, "dp": "server", "dp-clip": 1.0}


class LoopbackGrid(InProcessGrid):
    """Flower's Grid over the ClientApp in this process. Node 100 + p holds partition p and keeps
    its state from run to run, as a SuperNode does; each run's config reaches every node, as Flower
    gives it to each ClientApp. ``crash_at``: pushing that round's messages fails (the server stops)."""

    def __init__(self, nodes: int = 3) -> None:
        self.contexts = {
            100 + p: Context(run_id=1, node_id=100 + p, node_config={"partition-id": p}, state=RecordDict(), run_config={})
            for p in range(nodes)
        }
        self.replies: dict = {}
        self.crash_at: int | None = None

    def serve(self, run_config: dict, crash_at: int | None = None) -> LoopbackGrid:
        for context in self.contexts.values():
            context.run_config = run_config
            context.node_config["num-partitions"] = run_config["num-partitions"]
        self.crash_at = crash_at
        return self

    def push_messages(self, messages):
        ids = []
        for message in messages:
            config = message.content.config_records["config"]
            if "server-round" in config and int(config["server-round"]) == self.crash_at:
                raise ConnectionError("the SuperLink went away")
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do
            ids.append(message.metadata.message_id)
            self.replies[message.metadata.message_id] = client_app(message, self.contexts[message.metadata.dst_node_id])
        return ids


    def get_node_ids(self):
        return list(self.contexts)



@pytest.fixture
def flower_log():
    """The lines the apps log through Flower's logger."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def _run(grid: LoopbackGrid, tmp_path, crash_at: int | None = None, **config) -> dict:
    run_config = {**BASE, "run-dir": str(tmp_path), **config}
    return run_server(grid.serve(run_config, crash_at), run_config)


def _rows(run_dir) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())


def _composed(*events: tuple[float, float, int]) -> float:
    """dp-accounting's RDP ε at δ of (σ, q, rounds) events, composed here, not by the library."""
    accountant = rdp.RdpAccountant()
    for sigma, rate, rounds in events:
        one = dp_accounting.GaussianDpEvent(sigma)
        accountant.compose(one if rate == 1.0 else dp_accounting.PoissonSampledDpEvent(rate, one), rounds)
    return accountant.get_epsilon(DELTA)


# ---------------------------------------------------------------------------- ε across resumes
def test_a_resumed_run_states_the_composition_of_the_rounds_that_ran_at_each_rounds_sigma_and_q(task_identity, tmp_path):
    grid = LoopbackGrid()
    first = _run(grid, tmp_path, **{"dp-noise-multiplier": 1.0, "num-server-rounds": 1})
    run_dir = Path(first["run_dir"])
    # resumed at another sampling rate: rounds 2-3 sample half the nodes
    last = _run(grid, tmp_path, **{"dp-noise-multiplier": 1.0, "num-server-rounds": 3, "fraction-train": 0.5, "resume": str(run_dir)})

    rows = _rows(run_dir)
    assert [(r["round"], r.get("noise_multiplier"), r.get("sampling_rate")) for r in rows] == [
        (0, None, None), (1, 1.0, 1.0), (2, 1.0, 0.5), (3, 1.0, 0.5)
    ]
    expected = [_composed((1.0, 1.0, 1)), _composed((1.0, 1.0, 1), (1.0, 0.5, 1)), _composed((1.0, 1.0, 1), (1.0, 0.5, 2))]
    assert [r["epsilon"] for r in rows[1:]] == pytest.approx(expected, rel=1e-9)
    assert last["privacy"]["epsilon"] == pytest.approx(expected[-1], rel=1e-9)
    assert last["privacy"]["accounted"] == [
        {"noise_multiplier": 1.0, "sampling_rate": 1.0, "rounds": 1}, {"noise_multiplier": 1.0, "sampling_rate": 0.5, "rounds": 2}
    ]
    # what a run of 3 rounds at the resumed settings alone would have claimed
    assert last["privacy"]["epsilon"] > 1.1 * _composed((1.0, 0.5, 3))


def test_a_dp_epsilon_run_resumed_past_its_epsilon_is_refused_naming_the_rounds_that_fit(task_identity, tmp_path):
    """The issue's case: ε = 4 over 2 rounds (σ = 1.637), resumed to 4 rounds, would recalibrate σ to
    2.315 and compose to ε = 5.05."""
    grid = LoopbackGrid()
    first = _run(grid, tmp_path, **{"dp-epsilon": 4.0, "num-server-rounds": 2})
    run_dir = Path(first["run_dir"])
    assert first["privacy"]["epsilon"] == pytest.approx(_composed((calibrate(4.0, 1.0, 2, DELTA), 1.0, 2)), rel=1e-9)
    assert first["privacy"]["epsilon"] == pytest.approx(4.0, abs=1e-3)

    with pytest.raises(RunFailed) as err:
        _run(grid, tmp_path, **{"dp-epsilon": 4.0, "num-server-rounds": 4, "resume": str(run_dir)})
    message = str(err.value)
    for part in ("num-server-rounds=4", "dp-epsilon=4", "σ = 1.637", "σ = 2.315", "would bring ε to 5.045",
                 "nothing more: ε = 4 is spent after round 2"):
        assert part in message, message
    assert [r["round"] for r in _rows(run_dir)] == [0, 1, 2]  # the run it refused to extend is as it was


def test_a_dp_epsilon_run_that_stopped_resumes_with_its_own_settings_and_ends_at_its_epsilon(task_identity, tmp_path):
    grid = LoopbackGrid()
    with pytest.raises(RunFailed, match="the SuperLink went away"):
        _run(grid, tmp_path, crash_at=2, **{"dp-epsilon": 4.0, "num-server-rounds": 2})
    (run_dir,) = [p for p in tmp_path.iterdir() if (p / "checkpoint.pt").exists()]
    last = _run(grid, tmp_path, **{"dp-epsilon": 4.0, "num-server-rounds": 2, "resume": str(run_dir)})

    sigma = calibrate(4.0, 1.0, 2, DELTA)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["noise_multiplier"] == sigma for r in rows[1:])
    assert last["privacy"]["epsilon"] == pytest.approx(_composed((sigma, 1.0, 2)), rel=1e-9)
    assert last["privacy"]["epsilon"] <= 4.0


def _rows_at(*events: tuple[float, float, int]) -> list[RoundResult]:
    """The results rows of a run whose rounds ran at ``events`` ((σ, q, rounds), in order)."""
    rows, r = [results_row(0, loss=2.3)], 0
    for sigma, rate, rounds in events:
        for _ in range(rounds):
            r += 1
            rows.append(results_row(r, loss=1.0, noise_multiplier=sigma, sampling_rate=rate))
    return rows


def test_epsilon_composes_any_chain_of_resumes_exactly():
    chain = ((1.2, 0.2, 3), (0.8, 0.2, 2), (0.8, 0.5, 4), (1.2, 0.2, 1))
    assert accounted_epsilon(_rows_at(*chain), DELTA) == pytest.approx(_composed(*chain), rel=1e-9)
    assert accounted_epsilon(_rows_at(), DELTA) == 0.0


@pytest.mark.parametrize(
    "change, allowed",
    [
        ({"num-server-rounds": 30}, "allowed: num-server-rounds from 10 to 20 with fraction-train=0.2"),
        ({"fraction-train": 0.5}, "allowed: num-server-rounds from 10 to 20 with fraction-train=0.2"),
    ],
)
def test_a_dp_epsilon_resume_that_would_overspend_is_refused_naming_key_value_and_what_is_allowed(change, allowed):
    started = {"dp": "server", "dp-epsilon": 4.0, "num-server-rounds": 20, "fraction-train": 0.2}
    ran = _rows_at((calibrate(4.0, 0.2, 20, DELTA), 0.2, 10))  # stopped after round 10 of 20
    check_resume(parse_run_config(started), ran)  # its own settings: accepted
    check_resume(parse_run_config({**started, "num-server-rounds": 15}), ran)  # fewer rounds: less noise, within ε

    with pytest.raises(ConfigError) as err:
        check_resume(parse_run_config({**started, **change}), ran)
    key, value = next(iter(change.items()))
    assert f"{key}={value:g}" in str(err.value) and allowed in str(err.value), str(err.value)


def test_rows_that_do_not_say_their_sigma_and_q_cannot_be_resumed_under_dp():
    rows = [results_row(0, loss=2.3), results_row(1, loss=1.0, epsilon=3.0)]
    with pytest.raises(ConfigError, match="round 1's results row does not record the noise_multiplier and sampling_rate"):
        check_resume(parse_run_config({"dp": "server", "dp-noise-multiplier": 1.0}), rows)


# ---------------------------------------------------------------------------- noise the updates can carry
def _study_cells() -> list[dict]:
    summary = json.loads((ROOT / "docs/privacy/summary.json").read_text())
    q, delta = summary["setup"]["common"]["fraction-train"], summary["setup"]["common"]["dp-delta"]
    cells = []
    for population, methods in summary["results"].items():
        for method, by_eps in methods.items():
            for label, cell in by_eps.items():
                if cell.get("sigma"):
                    dp = Mechanism("server", cell["clip"], cell["sigma"], delta, q, 1)
                    cells.append({"where": f"{population} {method} {label}", "population": int(population[2:]), "dp": dp,
                                  "accuracy": cell["final_mean"]})
    return cells


def test_the_noise_warning_fires_exactly_where_the_privacy_study_saw_models_learn_little():
    cells = _study_cells()
    assert len(cells) == 8
    for cell in cells:  # no DP: 0.94; chance: 0.10
        warned = cell["dp"].noise_warning(cell["population"]) is not None
        assert warned == (cell["accuracy"] < 0.3), (cell["where"], cell["accuracy"], cell["dp"].mean_noise(cell["population"]))


def _readme_dp_example() -> tuple[dict, dict]:
    """(federation config, run config) of the README's client-level DP example."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Privacy", 1)[1].split("\n## ", 1)[0]
    command = next(block for block in section.split("flwr run ")[1:] if " dp=" in block).replace("\\\n", " ")
    federation = re.search(r'--federation-config "([^"]+)"', command).group(1)
    run_config = re.search(r"-c '([^']+)'", command).group(1)
    return parse_config_args([federation]), parse_config_args([run_config])


def test_the_readme_dp_example_is_a_setting_the_study_shows_learning_and_is_not_warned():
    federation, config = _readme_dp_example()
    run = parse_run_config(config)
    dp = mechanism(run)
    assert federation["num-supernodes"] == run.data.num_partitions
    assert dp.noise_warning(run.data.num_partitions) is None
    study = json.loads((ROOT / "docs/privacy/summary.json").read_text())
    cell = study["results"][f"N={run.data.num_partitions}"]["fedmud"][f"eps={run.privacy.dp_epsilon:g}"]
    # exactly a run of the study (FedMUD, dp=server, the clip it chose at that ε) ...
    studied = {**study["setup"]["common"], "dp": "server", "dp-epsilon": run.privacy.dp_epsilon, "dp-clip": cell["clip"]}
    assert run == parse_run_config(studied)
    assert cell["final_mean"] > 0.3  # ... where FedMUD learned (no DP: 0.94; chance: 0.10)


def test_the_old_readme_example_is_warned_naming_the_population_that_would_carry_its_noise():
    old = {"num-server-rounds": 20, "num-partitions": 50, "fraction-train": 0.2, "secure-aggregation": True, "dp": "client",
           "dp-epsilon": 4.0, "dp-clip": 1.0, "min-replies": 5}
    dp = mechanism(parse_run_config(old))
    warning = dp.noise_warning(50)
    assert dp.mean_noise(50) > 20 * CARRYABLE_NOISE
    for part in ("num-partitions=50", "fraction-train=0.2", "min-replies=5", "1.41× the noise accounted for", "docs/privacy.md"):
        assert part in warning, warning
    # what it names carries the noise
    nodes, min_replies = (int(n) for n in re.search(r"about (\d+) nodes .*min-replies=(\d+): about 2%", warning).groups())
    assert 729 <= nodes <= 1000  # σ/(q · 0.01) = 729 with every expected reply counted; the skipped rounds' margin costs more
    assert mechanism(parse_run_config({**old, "num-partitions": nodes, "min-replies": min_replies})).noise_warning(nodes) is None


# ---------------------------------------------------------------------------- divergence
def test_a_loss_that_grows_by_orders_of_magnitude_is_divergence_and_an_ordinary_wobble_is_not():
    readme_run = [results_row(r, loss=loss) for r, loss in enumerate((2.3, 299.0, 2.2e9, 1.2e8))]  # the figures
    flagged = divergence(readme_run)
    assert (flagged["round"], flagged["best_round"], flagged["loss"]) == (1, 0, 299.0)
    assert "diverging since round 1" in flagged["reason"] and "130×" in flagged["reason"]
    learning = [results_row(r, loss=loss) for r, loss in enumerate((2.3, 1.2, 0.8, 1.5, 0.6, 0.9))]
    assert divergence(learning) is None
    assert divergence([results_row(0, loss=2.3), results_row(1, loss=float("nan"))])["round"] == 1  # not finite


def test_a_run_whose_noise_the_updates_cannot_carry_is_warned_at_start_and_flagged_when_it_diverges(
    task_identity, tmp_path, flower_log
):
    grid = LoopbackGrid()
    summary = _run(grid, tmp_path, **{"dp-noise-multiplier": 20.0, "dp-clip": 10.0, "num-server-rounds": 2})

    warning = next(line for line in flower_log if line.startswith("dp: the noise is more than the clipped updates can carry"))
    assert "num-partitions=100" in warning and "about 2000 nodes" in warning
    assert summary["diverged"]["round"] == 1 and summary["diverged"]["best_round"] == 0
    assert any(line.startswith("round 1: the model is diverging since round 1") for line in flower_log), flower_log
    assert any(line.startswith("FINAL the model diverged") for line in flower_log)
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["diverged"] == summary["diverged"]
