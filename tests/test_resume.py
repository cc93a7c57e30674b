"""Checkpoint/resume and digest resync: in the library (a server restarted from its checkpoint) and
on Flower's real simulation runtime."""

import json

import pytest
import torch

from fedmud.checkpoint import load_checkpoint, restore, save_checkpoint
from fedmud.config import ConfigError, parse_run_config
from fedmud.ledger import Ledger
from fedmud.rounds import ClientModel, ServerModel
from fedmud.sync import CHAIN

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand

from .conftest import flwr_run
from .federation import Node, nodes_for, run_rounds, server_for
from .test_round_exchange import RUN_CONFIG, LoopbackGrid

FEDERATION = ("--federation-config", "num-supernodes=3 client-resources-num-cpus=2")


def _run(env, run_dir, config: str) -> dict:
    result = flwr_run(env, *FEDERATION, "-c", f'local-epochs=1 run-dir="{run_dir}" {config}')
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _only_run(run_dir):
    (path,) = [p for p in run_dir.iterdir() if p.is_dir()]
    return path


@pytest.mark.integration
def test_a_resumed_run_ends_with_exactly_the_weights_of_the_uninterrupted_run(simulation_superlink, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _run(simulation_superlink, whole, "num-server-rounds=3")
    _run(simulation_superlink, parts, "num-server-rounds=2")  # stops after round 2
    stopped = _only_run(parts)
    assert torch.load(stopped / "checkpoint.pt", weights_only=True)["server"]["round"] == 2
    _run(simulation_superlink, parts, f'num-server-rounds=3 resume="{stopped}"')

    expected = torch.load(_only_run(whole) / "checkpoint.pt", weights_only=True)["server"]
    resumed = torch.load(stopped / "checkpoint.pt", weights_only=True)["server"]
    assert resumed["round"] == expected["round"] == 3
    for name, tensor in expected["global_state"].items():
        assert torch.equal(resumed["global_state"][name], tensor), name
    rows = json.loads((stopped / "results.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # nothing merged twice, nothing lost


@pytest.mark.integration
def test_a_digest_mismatch_is_reported_and_fixed_by_a_full_resync_within_the_round(simulation_superlink, tmp_path):
    _run(simulation_superlink, tmp_path, "num-server-rounds=3 fault-corrupt-state-round=2")
    run = _only_run(tmp_path)
    rows = {r["round"]: r for r in json.loads((run / "results.json").read_text())}
    assert rows[2]["resync"] == 3  # every client's copy was corrupted ...
    assert rows[2]["accepted"] == 3  # ... and each trained on the full model, sent again in the same round
    assert rows[3]["accepted"] == 3 and rows[3]["resync"] == 0
    ledger = json.loads((run / "ledger.json").read_text())
    dense, down = ledger["dense_down_bytes"], {}
    for r in ledger["records"]:
        if r["direction"] == "down":
            down.setdefault(r["round"], []).append(r["bytes"])
    chains, full = [b for b in down[2] if b < dense / 10], [b for b in down[2] if b >= dense / 10]
    assert len(chains) == len(full) == 3 and all(b == pytest.approx(dense, rel=0.01) for b in full)
    assert all(b < dense / 10 for b in down[3])  # back on chains
    assert rows[3]["accuracy"] > 0.5


# ------------------------------------------------------------------------- in the library
def test_a_checkpoint_made_with_another_config_is_refused_naming_every_differing_key(tmp_path):
    save_checkpoint(tmp_path, ServerModel(parse_run_config({**FLOAT32_UP})), Ledger(), [])
    other = {"pattern": "fab", "lr": 0.1, "data-seed": 7, "uplink": "int8", "downlink": "full"}
    with pytest.raises(ConfigError) as err:
        load_checkpoint(tmp_path, parse_run_config({**FLOAT32_UP, **other, "stochastic-rounding": False, "num-server-rounds": 30, "max-examples": 10}))
    message = str(err.value)
    assert message.startswith(f"resume={str(tmp_path)!r} is not allowed; its checkpoint was made with another configuration")
    for difference in (
        "pattern='aad' (this run: 'fab')",
        "lr=0.05 (this run: 0.1)",
        "data-seed=42 (this run: 7)",
        "uplink='float32' (this run: 'int8')",
        "downlink='chain' (this run: 'full')",
    ):
        assert difference in message
    assert message.count("(this run:") == len(other)  # rounds and reply bounds may change on resume
    load_checkpoint(tmp_path, parse_run_config({**FLOAT32_UP, "num-server-rounds": 30, "max-examples": 10}))


@pytest.mark.parametrize(
    ("config", "stop_after", "fresh_nodes"),
    [
        ({"init": "hrp", "hrp-rounds": 2}, 1, True),  # stopped before the HRP directions are fixed
        ({"init": "hrp", "hrp-rounds": 2}, 2, True),  # ... and after: they come back with the weights
        ({"uplink": "int8", "error-feedback": True}, 2, False),
    ],
    ids=["hrp-before-directions", "hrp-after-directions", "int8-error-feedback"],
)
def test_a_server_restarted_from_its_checkpoint_ends_bitwise_as_the_uninterrupted_run(
    tmp_path, config, stop_after, fresh_nodes
):
    """Nodes that restart too (as in a new Flower run) rebuild the model by the chain from round 0;
    error feedback lives on the nodes, so with it they keep running across the server's restart."""
    run = parse_run_config({**FLOAT32_UP, "local-epochs": 1, **config})
    whole = server_for(run)
    run_rounds(whole, nodes_for(run), range(1, 5))

    first = server_for(run)
    nodes = nodes_for(run)
    run_rounds(first, nodes, range(1, stop_after + 1))
    save_checkpoint(tmp_path, first, Ledger(), [])
    resumed = server_for(run)
    restore(load_checkpoint(tmp_path, run), resumed)
    if fresh_nodes:
        nodes = {f"new-{name}": Node(n.partition, ClientModel(run, torch.device("cpu"))) for name, n in nodes.items()}
    sent = run_rounds(resumed, nodes, range(stop_after + 1, 5))
    assert {kind for _, _, kind in sent} == {CHAIN}  # fresh nodes too: the chain from round 0

    assert resumed.round == whole.round == 4
    expected = whole.global_state()
    for name, tensor in resumed.global_state().items():
        assert torch.equal(tensor, expected[name]), name
    assert resumed.digest == whole.digest
    if run.decomposition.init == "hrp":
        assert resumed.model.hrp_ready and whole.model.hrp_ready


def test_a_resume_that_would_end_before_its_checkpoints_round_is_refused_naming_the_smallest_allowed(tmp_path):
    server = ServerModel(parse_run_config({**FLOAT32_UP}))
    server.load(3, server.global_state())  # a run stopped after round 3
    save_checkpoint(tmp_path, server, Ledger(), [])
    with pytest.raises(ConfigError) as err:
        load_checkpoint(tmp_path, parse_run_config({**FLOAT32_UP, "num-server-rounds": 2}))
    assert str(err.value) == (
        f"num-server-rounds=2 is not allowed with resume={str(tmp_path)!r}: its checkpoint is after round 3, "
        "and a run cannot end before it; allowed: 3 or more"
    )
    load_checkpoint(tmp_path, parse_run_config({**FLOAT32_UP, "num-server-rounds": 3}))


def test_a_resumed_run_keeps_every_row_of_its_results_as_the_stopped_run_wrote_it(task_identity, tmp_path):
    """The whole ServerApp side (``run_server``) over real ClientApp rounds in this process: the
    last round before the stop keeps its timings, though its checkpoint was written before them."""
    from server.app import run_server

    config = {**RUN_CONFIG, "run-dir": str(tmp_path)}
    run_server(LoopbackGrid(events={}), {**config, "num-server-rounds": 1})
    stopped = _only_run(tmp_path)
    before = json.loads((stopped / "results.json").read_text())
    assert "round_s" in before[1] and "checkpoint_s" in before[1]

    run_server(LoopbackGrid(events={}), {**config, "num-server-rounds": 2, "resume": str(stopped)})
    rows = json.loads((stopped / "results.json").read_text())
    assert rows[:2] == before
    assert [r["round"] for r in rows] == [0, 1, 2] and "round_s" in rows[2]
    assert json.loads((stopped / "summary.json").read_text())["seconds"]["timed_rounds"] == 2
