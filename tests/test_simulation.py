"""End to end on Flower's real simulation runtime: a SuperLink process, `flwr run`, three clients."""

import json
import subprocess

import pytest

from fedmud.results import ROUND_PARTS

from .conftest import ROOT, finished_run, flwr_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_round_run(simulation_superlink, tmp_path_factory):
    return finished_run(simulation_superlink, tmp_path_factory.mktemp("runs"), "num-server-rounds=2 local-epochs=1")


def test_run_completes_every_round_with_every_client(two_round_run):
    rows = two_round_run["results"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["accepted"] == 3 and r["rejected"] == 0 for r in rows[1:])
    assert rows[-1]["accuracy"] > 0.5  # two short rounds on MNIST-5k already learn
    assert "FINAL accuracy" in two_round_run["output"]


def test_every_round_says_where_its_time_went_and_the_summary_adds_it_up(two_round_run):
    rows, seconds = two_round_run["results"][1:], two_round_run["summary"]["seconds"]
    for row in rows:
        assert all(row[p] >= 0 for p in ROUND_PARTS) and sum(row[p] for p in ROUND_PARTS) <= row["round_s"] + 1e-6
        # the three clients' own training, reported with their replies, is part of the round
        assert 0 < row["client_train_s"] <= row["client_s"]
    assert seconds["timed_rounds"] == 2
    assert seconds["rounds"] == pytest.approx(sum(r["round_s"] for r in rows))
    assert seconds["client_training_summed"] == pytest.approx(sum(r["client_train_s"] for r in rows))
    assert "FINAL time" in two_round_run["output"] and "round 2 took" in two_round_run["output"]


def test_uplink_per_client_is_within_the_ratio_bound(two_round_run):
    ledger = two_round_run["ledger"]
    uploads = [r["bytes"] for r in ledger["records"] if r["direction"] == "up"]
    assert len(uploads) == 3 * 2
    assert max(uploads) <= 1.05 * ledger["dense_up_bytes"] / 32


def test_downlink_and_uplink_are_recorded_per_client(two_round_run):
    records = two_round_run["ledger"]["records"]
    for direction in ("up", "down"):
        clients = {r["client"] for r in records if r["direction"] == direction and r["round"] == 1}
        assert len(clients) == 3


def test_each_downlink_costs_at_most_1_1_times_the_rounds_uplink(two_round_run):
    """Every client takes part every round, so each needs one link (none in round 1)."""
    records = two_round_run["ledger"]["records"]
    for round_ in (1, 2):
        ups = [r["bytes"] for r in records if r["direction"] == "up" and r["round"] == round_]
        downs = [r["bytes"] for r in records if r["direction"] == "down" and r["round"] == round_]
        assert max(downs) <= 1.1 * (sum(ups) / len(ups))


def test_tensorboard_events_are_written(two_round_run):
    assert list((two_round_run["dir"] / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ('pattern="xyz"', "pattern='xyz' is not allowed; choose one of ab, fab, aad"),
        (
            'model="no_such_package.nets:build"',
            "model='no_such_package.nets:build' is not allowed: cannot import module 'no_such_package.nets'",
        ),
    ],
)
def test_bad_config_stops_the_run_before_any_round_naming_key_value_and_allowed(
    simulation_superlink, tmp_path, overrides, message
):
    result = flwr_run(simulation_superlink, "-c", f'{overrides} run-dir="{tmp_path}"', timeout=300)
    output = result.stdout + result.stderr
    assert message in output
    assert "[ROUND 1" not in output and not list(tmp_path.glob("*/results.json"))  # its summary.json: "failed"


def test_a_vision_transformer_trains_through_the_simulation_within_the_ratio(simulation_superlink, tmp_path):
    """Not only the paper's CNN: a ViT (attention in_proj, class token, positional embedding decomposed)."""
    run = finished_run(simulation_superlink, tmp_path, 'model="vit" num-server-rounds=2 local-epochs=1 lr=0.1')
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight (576, 192): aad kron" in run["output"]
    rows = run["results"]
    assert all(r["accepted"] == 3 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2  # it learns (chance is 0.1)
    uploads = [r["bytes"] for r in run["ledger"]["records"] if r["direction"] == "up"]
    assert max(uploads) <= 1.05 * run["ledger"]["dense_up_bytes"] / 32


def _downlinks_by_gap(run: dict, stateless: bool) -> list[tuple[int, int]]:
    """(bytes, links the client lacked) of every downlink: the rounds since the one it held
    (since round 0 for a client that keeps nothing), read from who uploaded when."""
    records = run["ledger"]["records"]
    last: dict[str, int] = {}
    out = []
    for r in sorted({rec["round"] for rec in records}):
        for rec in records:
            if rec["round"] == r and rec["direction"] == "down":
                held = 0 if stateless else last.get(rec["client"], 0)
                out.append((rec["bytes"], r - 1 - held))
        for rec in records:
            if rec["round"] == r and rec["direction"] == "up":
                last[rec["client"]] = r - 1  # it synced to round r - 1, then trained
    return out


@pytest.mark.parametrize("client_state", ["keep", "none"])
def test_returning_clients_download_the_int4_links_they_lack_at_partial_participation(
    simulation_superlink, tmp_path, client_state
):
    run = finished_run(
        simulation_superlink,
        tmp_path,
        f'num-server-rounds=4 local-epochs=1 fraction-train=0.5 min-train-nodes=3 num-partitions=6 '
        f'downlink-codec="int4" client-state="{client_state}"',
        supernodes=6,
    )
    rows = run["results"]
    assert all(r["accepted"] == 3 and r["resync"] == 0 for r in rows[1:])  # every client reached the digest
    sent = _downlinks_by_gap(run, stateless=client_state == "none")
    no_link = min(b for b, gap in sent if gap == 0)
    link = max(b for b, gap in sent if gap == 1) - no_link
    assert link < ledger_link_bound(run) and any(gap >= 2 for _, gap in sent)
    for nbytes, gap in sent:  # the planner's price: framing plus one coded link per missed round
        assert abs(nbytes - (no_link + gap * link)) <= 64 * gap, (nbytes, gap)


def ledger_link_bound(run: dict) -> float:
    """An int4 link: an eighth of the float32 upload (1/32 of dense), plus scales and framing."""
    return 1.2 * run["ledger"]["dense_up_bytes"] / 32 / 8


def test_a_completed_run_says_so_in_its_summary(two_round_run):
    assert two_round_run["summary"]["status"] == "completed"


def test_a_failed_run_is_marked_failed_and_flwr_run_sh_exits_1_with_the_reason(simulation_superlink, tmp_path):
    """`flwr run --stream` exits 0 whatever the run's status (Flower 1.39), and a ServerApp that
    raised SystemExit was even recorded as `finished:completed`; scripts/flwr-run.sh asks the SuperLink."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "flwr-run.sh"), ".", "test", "-c", f'pattern="xyz" run-dir="{tmp_path}"'],
        cwd=ROOT,
        env=simulation_superlink,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, (result.stdout + result.stderr)[-4000:]
    assert "finished:failed: " in result.stderr
    assert "configuration error: pattern='xyz' is not allowed; choose one of ab, fab, aad" in result.stderr
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("configuration error: pattern='xyz'")
