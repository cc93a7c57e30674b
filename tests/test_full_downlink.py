"""downlink = full: every downlink is the whole model, clients reach the digest, and the model is
the same as with float32 chains (a lossy link code changes what is merged, by design)."""

import pytest
import torch

from fedmud.config import parse_run_config
from fedmud.sync import CHAIN, FULL

from .conftest import finished_run
from .federation import nodes_for, run_rounds, server_for


def test_every_downlink_is_the_full_model_and_every_client_reaches_the_digest():
    run = parse_run_config({"downlink": "full", "local-epochs": 1})
    server = server_for(run)
    sent = run_rounds(server, nodes_for(run), range(1, 4))  # a client that misses the digest raises SyncError
    assert len(sent) == 2 * 3 and {kind for _, _, kind in sent} == {FULL}
    assert server.plan("never-seen").kind == server.plan("node-0").kind == FULL  # though a chain is cheaper


def test_full_and_float32_chain_downlinks_end_with_the_same_model_bitwise():
    models, kinds = {}, {}
    for downlink in ("full", "chain"):
        run = parse_run_config({"downlink": downlink, "downlink-codec": "float32", "local-epochs": 1})
        server = server_for(run)
        kinds[downlink] = {kind for _, _, kind in run_rounds(server, nodes_for(run), range(1, 4))}
        models[downlink] = server.global_state()
    assert kinds == {"full": {FULL}, "chain": {CHAIN}}
    assert all(torch.equal(models["full"][n], models["chain"][n]) for n in models["chain"])


@pytest.mark.integration
def test_a_full_downlink_run_sends_the_model_every_round_and_loses_no_client(simulation_superlink, tmp_path):
    run = finished_run(simulation_superlink, tmp_path, 'downlink="full" num-server-rounds=2 local-epochs=1')
    rows, ledger = run["results"], run["ledger"]
    assert all(r["accepted"] == 3 and r["resync"] == 0 and r["rejected"] == 0 for r in rows[1:])  # digest reached
    downs = [r["bytes"] for r in ledger["records"] if r["direction"] == "down"]
    assert len(downs) == 3 * 2
    assert all(b == pytest.approx(ledger["dense_down_bytes"], rel=0.01) for b in downs)  # the whole model each time
    assert run["summary"]["downlink"] == "full" and rows[-1]["accuracy"] > 0.5
