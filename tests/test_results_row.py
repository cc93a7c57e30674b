"""The results row (:class:`fedmud.results.RoundResult`): the columns results.json has, in the order the
server writes them, read back from this version's files and every earlier version's."""

from __future__ import annotations

import json
import math

import pytest

from fedmud.divergence import divergence
from fedmud.ledger import strict_json
from fedmud.results import (
    CLIENT_SECONDS,
    ROUND_PARTS,
    TIMED_AFTER_CHECKPOINT,
    RoundResult,
    fields_of,
    from_json,
    read_results,
    to_json,
)

EVALUATED = [  # every row: the held-out evaluation and the bytes
    "round", "accuracy", "loss", "up_bytes", "down_bytes", "cum_up_bytes", "cum_down_bytes",
    "dense_cum_up_bytes", "dense_cum_down_bytes", "wall_s",
]
MERGED = ["accepted", "rejected", "failed", "resync", "capped", "clipped", "norm-rejected", "merge-refused", "train-loss"]
DP = ["noise_multiplier", "sampling_rate", "epsilon"]
TIMED = ["round_s", "plan_s", "client_train_s", "client_s", "aggregate_s", "clients_s", "evaluate_s", "checkpoint_s"]
# The keys of each row, in order, as server/strategy.py wrote them before the row had a type
# (captured from run_server's results.json: round 0, then a training round; without and with dp)
WRITTEN = {
    "round 0": EVALUATED,
    "training round": EVALUATED + MERGED + TIMED,
    "dp round 0": EVALUATED + ["epsilon"],
    "dp training round": EVALUATED + MERGED + DP + TIMED,
}


def results_row(round: int, **fields) -> RoundResult:
    """A row of round ``round`` with ``fields``; the columns every row has that a test does not set are 0."""
    every = dict.fromkeys(("accuracy", "loss", "wall_s"), 0.0) | dict.fromkeys(EVALUATED[3:-1], 0)
    return RoundResult(round=round, **{**every, **fields})


def _written(keys: list[str], round: int = 2) -> dict:
    """A row with ``keys`` in that order, each with a value of its type (distinct, to catch a swap)."""
    row = {}
    for i, key in enumerate(keys):
        kind = RoundResult.__dataclass_fields__[fields_of({key: 0}).popitem()[0]].type
        row[key] = round if key == "round" else (i + 1 if kind.startswith("int") else (i + 1) / 7)
    return row


# ---------------------------------------------------------------------------- one declaration
def test_the_row_declares_every_column_once_in_the_order_the_server_writes_them():
    assert list(results_row(1).as_dict()) == EVALUATED  # optional columns absent: left out
    every = {name: 1 for name in RoundResult.__dataclass_fields__}
    assert list(RoundResult(**every).as_dict()) == EVALUATED + MERGED + DP + TIMED
    assert set(TIMED_AFTER_CHECKPOINT) == {"wall_s", *TIMED} and set(ROUND_PARTS + CLIENT_SECONDS) == set(TIMED[1:])


@pytest.mark.parametrize("kind", WRITTEN)
def test_a_row_round_trips_with_the_keys_values_and_bytes_the_server_wrote(kind):
    written = [_written(EVALUATED, 0) | ({"epsilon": 0.5} if kind.startswith("dp") else {}), _written(WRITTEN[kind])]
    rows = [RoundResult.from_dict(row) for row in written]
    assert [list(row.as_dict()) for row in rows] == [list(row) for row in written]
    assert [row.as_dict() for row in rows] == written
    assert to_json(rows) == strict_json(written)  # results.json byte for byte
    assert from_json(to_json(rows)) == rows


def test_the_strategys_metric_names_map_to_fields_and_an_unknown_one_is_refused():
    assert fields_of({"accepted": 3, "norm-rejected": 1, "merge-refused": 0, "train-loss": 0.5}) == {
        "accepted": 3, "norm_rejected": 1, "merge_refused": 0, "train_loss": 0.5,
    }
    with pytest.raises(ValueError, match="no results-row field for 'dropped'; allowed: round, accuracy, "):
        fields_of({"dropped": 1})


# ---------------------------------------------------------------------------- what is on disk
def test_null_is_a_number_that_was_not_finite_and_is_written_as_null_again():
    diverged, skipped = _written(EVALUATED, 0) | {"loss": math.inf}, _written(EVALUATED + MERGED) | {"train-loss": math.nan}
    text = strict_json([diverged, skipped])
    assert '"loss": null' in text and '"train-loss": null' in text
    rows = from_json(text)
    assert math.isnan(rows[0].loss) and math.isnan(rows[1].train_loss)
    assert to_json(rows) == text
    assert divergence(rows)["round"] == 0  # not finite: diverged


# Rows as each earlier version wrote them (server/strategy.py at the commit named; json.dumps with
# indent=1 and NaN literals until 440cb52 wrote strict JSON). Values are made up; keys and order are theirs.
EARLIER = {
    "fa19147 (foundation)": EVALUATED + ["accepted", "rejected", "failed", "train-loss"],
    "e2e2c2a (resync)": EVALUATED + ["accepted", "rejected", "failed", "resync", "train-loss"],
    "6a07aff (bounds)": EVALUATED + MERGED[:-2] + ["train-loss"],
    "55e7cac (timings)": EVALUATED + MERGED[:-2] + ["train-loss"] + TIMED,
    "5273285 (dp: epsilon alone)": EVALUATED + MERGED[:-2] + ["train-loss", "epsilon"] + TIMED,
    "5273285 (secure aggregation)": EVALUATED + ["accepted", "failed", "rejected", *MERGED[3:-2], "epsilon"] + TIMED,
    "440cb52 (merge-refused, σ and q)": EVALUATED + MERGED + DP + TIMED,
    "4312fc6 (secure aggregation, the last untyped row)": EVALUATED + ["accepted", "failed", "rejected", *MERGED[3:-1]] + TIMED,
}


@pytest.mark.parametrize("version", EARLIER)
def test_a_results_json_written_by_an_earlier_version_reads_back_with_every_value(version, tmp_path):
    skipped = _written(EARLIER[version], round=1) | ({"train-loss": math.nan} if "train-loss" in EARLIER[version] else {})
    rows = [_written(EVALUATED, 0), skipped, _written(EARLIER[version], round=2)]
    path = tmp_path / "results.json"
    strict = not version.startswith(("fa1", "e2e", "6a0", "55e", "527"))
    path.write_text(strict_json(rows) if strict else json.dumps(rows, indent=1))  # NaN as the old writer had it

    read = read_results(path)
    assert [row.round for row in read] == [0, 1, 2]
    assert json.loads(to_json(read)) == json.loads(strict_json(rows))  # every key and value, NaN as null
    if "secure" not in version:  # secure rows had failed before rejected; the row's order has them after
        assert [list(row.as_dict()) for row in read] == [list(row) for row in rows]


def test_a_row_without_a_column_every_version_writes_is_refused_naming_it():
    row = _written(EVALUATED, 3)
    del row["loss"]
    with pytest.raises(ValueError) as err:
        RoundResult.from_dict(row)
    assert str(err.value) == (
        "results row of round 3: missing 'loss'; every row has round, accuracy, loss, up_bytes, down_bytes, "
        "cum_up_bytes, cum_down_bytes, dense_cum_up_bytes, dense_cum_down_bytes, wall_s"
    )


def test_a_key_no_version_writes_and_a_value_of_the_wrong_type_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"^results row of round 2: unknown key\(s\) 'dropped'; allowed: round, "):
        RoundResult.from_dict(_written(EVALUATED) | {"dropped": 1})
    with pytest.raises(ValueError, match=r"^results row of round 2: accepted=1.5 is not allowed; allowed: an integer$"):
        RoundResult.from_dict(_written(EVALUATED) | {"accepted": 1.5})
    with pytest.raises(ValueError, match=r"^results row of round 2: loss='2.3' is not allowed; allowed: a number"):
        RoundResult.from_dict(_written(EVALUATED) | {"loss": "2.3"})
    with pytest.raises(ValueError, match="results.json holds a list of rows; got dict"):
        from_json("{}")


def test_the_server_writes_each_row_with_the_declared_keys_in_order_and_reads_it_back_byte_for_byte(task_identity, tmp_path):
    """The whole ServerApp side (``run_server``) over real ClientApp rounds in this process, under DP."""
    from server.app import run_server

    from .test_round_exchange import RUN_CONFIG, LoopbackGrid

    dp = {"dp": "server", "dp-noise-multiplier": 0.5}
    run_server(LoopbackGrid(events={}), {**RUN_CONFIG, "num-server-rounds": 1, "run-dir": str(tmp_path), **dp})
    (results,) = tmp_path.glob("*/results.json")
    text = results.read_text()
    assert [list(row) for row in json.loads(text)] == [WRITTEN["dp round 0"], WRITTEN["dp training round"]]
    assert to_json(read_results(results)) == text


# ---------------------------------------------------------------------------- its readers
def test_a_resumed_run_takes_the_last_rounds_timings_from_results_json_in_the_order_the_round_wrote_them(tmp_path):
    from server.app import _with_round_timings

    written = [RoundResult.from_dict(_written(keys, r)) for r, keys in enumerate((EVALUATED, WRITTEN["dp training round"]))]
    (tmp_path / "results.json").write_text(to_json(written))
    checkpointed = written[1].replace(**dict.fromkeys(TIMED), wall_s=0.25)  # saved before the round was timed
    assert _with_round_timings([written[0], checkpointed], tmp_path) == written
    assert list(_with_round_timings([checkpointed], tmp_path)[0].as_dict()) == WRITTEN["dp training round"]

    other = checkpointed.replace(accuracy=0.5)  # not the row results.json holds: stays untimed
    assert _with_round_timings([other], tmp_path) == [other]


def test_the_round_time_line_and_the_servers_seconds_read_the_row():
    from server.strategy import describe_round_time, server_seconds

    seconds = dict(plan_s=0.1, client_train_s=3.52, aggregate_s=0.2, clients_s=4.1, evaluate_s=0.4, checkpoint_s=0.51)
    row = results_row(1, round_s=5.31, **seconds)
    assert server_seconds(row) == pytest.approx(0.81)
    assert describe_round_time(row) == (
        "5.31 s: clients 4.10 s (training 3.52 s summed over the replies), evaluation 0.40 s, server 0.81 s"
    )
    assert describe_round_time(results_row(0)) == "0.00 s: clients 0.00 s, evaluation 0.00 s, server 0.00 s"
