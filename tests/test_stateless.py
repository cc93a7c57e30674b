"""Stateless clients (``client-state=none``) over long runs: the anchor and the chain since it.

A stateless client's download stays within 1/8 of the full model at every round, it reaches the
digest the server sends, and the server's own model is the one it would be without the anchor.
"""

import numpy as np
import pytest
import torch

from fedmud.config import ConfigError, parse_run_config
from fedmud.rounds import ClientModel, ServerModel, payload_sizes, round_start, simulate_in_process
from fedmud.seeds import round_seed
from fedmud.sync import ANCHOR, CHAIN, FULL, STATELESS_BUDGET, chain_bytes, state_digest

STATELESS = {"client-state": "none", "downlink-codec": "int8", "uplink": "int8"}


def _uploads(server: ServerModel, r: int, clients: int = 2) -> list[tuple[dict[str, np.ndarray], float]]:
    """int8 uploads of the same small residuals on any server (a residual code: no client's base enters)."""
    rng = np.random.default_rng(r)
    codec = server.codec
    return [(codec.encode(0.01 * rng.standard_normal(codec.layout.numel).astype(np.float32)), 10.0) for _ in range(clients)]


def _priced(server: ServerModel, plan) -> int:
    """Bytes of ``plan`` as the server prices it."""
    if plan.kind == FULL:
        return server.full_bytes
    own = server.anchor_framing + plan.anchor.nbytes if plan.kind == ANCHOR else server.message_bytes
    return chain_bytes(plan.links, server.link_bytes) + own


def _stateless_server(overrides: dict | None = None) -> ServerModel:
    server = ServerModel(parse_run_config({**STATELESS, **(overrides or {})}))
    server.full_bytes, server.link_bytes, server.anchor_framing, server.message_bytes = payload_sizes(server)
    return server


def test_a_stateless_download_stays_within_an_eighth_of_the_full_model_across_anchor_refreshes():
    server = _stateless_server()
    client = ClientModel(server.run, torch.device("cpu"))
    kinds, anchors = [], set()
    for r in range(1, 61):
        plan = server.plan("c")
        assert _priced(server, plan) <= STATELESS_BUDGET * server.full_bytes, (r, plan.kind, len(plan.links))
        state = client.sync(None, server.downlink(plan, r))  # raises SyncError unless the digest matches
        assert state_digest(state) == (server.stateless_digest if plan.kind == ANCHOR else server.digest)
        kinds.append(plan.kind)
        server.apply_round(r, round_seed(server.run.seed, r), _uploads(server, r))
        anchors.add(None if server.anchor is None else server.anchor.round)
    assert kinds[0] == CHAIN and kinds[-1] == ANCHOR
    assert len(anchors - {None}) >= 3  # refreshed several times


def test_the_anchor_never_touches_the_servers_model():
    with_anchor, without = _stateless_server(), _stateless_server({"anchor-codec": "none"})
    for r in range(1, 41):
        for server in (with_anchor, without):
            server.apply_round(r, round_seed(server.run.seed, r), _uploads(server, r))
    assert with_anchor.anchor is not None and without.anchor is None
    assert with_anchor.digest == without.digest
    assert with_anchor.stateless_digest != with_anchor.digest  # the stateless clients hold W + the anchor's error


def test_a_float32_upload_from_a_stateless_client_moves_the_server_as_without_the_anchor():
    """A float32 upload carries values trained from Ŵ; the server moves them by W - Ŵ, so the
    anchor's error never enters W: the same changes reach the same model as without the anchor."""
    servers = [_stateless_server({"uplink": "float32", "anchor-codec": codec}) for codec in ("int2", "none")]
    clients = [ClientModel(server.run, torch.device("cpu")) for server in servers]
    for r in range(1, 41):
        delta = 0.01 * np.random.default_rng(r).standard_normal(servers[0].codec.layout.numel).astype(np.float32)
        for server, client in zip(servers, clients):
            seed = round_seed(server.run.seed, r)
            client.sync(None, server.downlink(server.plan("c"), r))
            client.model.load_global_state(client.global_model.global_state())
            start = round_start(client.model, client.codec, seed)  # what the client trains from
            server.apply_round(r, seed, [({"payload": start + delta}, 10.0)])
    assert servers[0].anchor is not None
    # equal up to where a link's int8 code rounds the two apart (its error feedback sends the rest)
    apart = max((servers[0].global_state()[n] - t).abs().max().item() for n, t in servers[1].global_state().items())
    anchor_error = max((servers[0].stateless.global_state()[n] - t).abs().max().item() for n, t in servers[0].global_state().items())
    assert apart < 1e-3 and 100 * apart < anchor_error, (apart, anchor_error)


def test_a_resumed_server_plans_the_same_anchor_and_digest():
    server = _stateless_server()
    for r in range(1, 41):
        server.apply_round(r, round_seed(server.run.seed, r), _uploads(server, r))
    resumed = _stateless_server()
    resumed.load_state_dict(server.state_dict())
    assert resumed.anchor.round == server.anchor.round and resumed.stateless_digest == server.stateless_digest
    plans = [(p.kind, p.base_round, [link.round for link in p.links]) for p in (resumed.plan("c"), server.plan("c"))]
    assert plans[0] == plans[1] and plans[0][0] == ANCHOR


def test_an_anchor_too_large_for_the_budget_is_refreshed_every_round():
    server = _stateless_server({"anchor-codec": "int8"})  # ~7 bits a value deflated: above 1/8 alone
    for r in range(1, 41):
        server.apply_round(r, round_seed(server.run.seed, r), _uploads(server, r))
        if server.anchor is not None:  # a download: the anchor alone, or the chain from round 0 if cheaper
            assert server.anchor.round == r and _priced(server, server.plan("c")) <= server.anchor.nbytes
    assert server.anchor is not None


def test_a_deflated_int4_anchor_fits_an_eighth_with_room_for_links():
    server = _stateless_server({"anchor-codec": "int4"})
    r = 0
    while server.anchor is None:
        r += 1
        server.apply_round(r, round_seed(server.run.seed, r), _uploads(server, r))
    assert server.anchor.nbytes + 2 * server.link_bytes < STATELESS_BUDGET * server.full_bytes  # int8 links here


def test_a_damaged_anchor_is_a_sync_error():
    from fedmud.rounds import DEFLATED, SyncError
    from fedmud.sync import Anchor, Downlink

    server = _stateless_server()
    r = 0
    while server.anchor is None:
        r += 1
        server.apply_round(r, round_seed(server.run.seed, r), _uploads(server, r))
    plan = server.downlink(server.plan("c"), r + 1)
    cut = Anchor(plan.anchor.round, {DEFLATED: plan.anchor.parts[DEFLATED][:-10]})
    with pytest.raises(SyncError, match="anchor of round .* does not decode"):
        ClientModel(server.run, torch.device("cpu")).sync(None, Downlink(**{**plan.__dict__, "anchor": cut}))


def test_an_anchor_is_refused_with_the_hrp_preheat():
    with pytest.raises(ConfigError, match="anchor-codec='int4' is not allowed with init='hrp'"):
        parse_run_config({"client-state": "none", "init": "hrp"})
    assert parse_run_config({"client-state": "none", "init": "hrp", "anchor-codec": "none"}).anchor_codec == "none"


def test_in_process_stateless_clients_train_and_stay_within_the_budget():
    """simulate_in_process plans by payload sizes with an anchor: the anchor is refreshed, clients sync."""
    run = parse_run_config({**STATELESS, "uplink": "float32", "num-partitions": 20, "fraction-train": 0.05,
                            "min-train-nodes": 1, "local-epochs": 1, "num-server-rounds": 40})
    seen = []

    def on_start(server):
        plan = server.plan
        server.plan = lambda c: seen.append((_priced(server, p := plan(c)), p.kind, server.full_bytes)) or p

    server, history, _, _ = simulate_in_process(run, on_start=on_start, eval_every=20)
    assert server.anchor is not None and any(kind == ANCHOR for _, kind, _ in seen)
    assert all(b <= STATELESS_BUDGET * full for b, _, full in seen)
    assert history[-1] > 0.5 and np.isnan(history[1])


def test_an_anchor_downlink_travels_as_a_message_and_syncs_the_client():
    from fedmud_wire import downlink_record, read_downlink

    server = _stateless_server()
    r = 0
    while server.anchor is None or server.anchor.round == r:  # until an anchor has a link after it
        r += 1
        server.apply_round(r, round_seed(server.run.seed, r), _uploads(server, r))
    plan = server.plan("c")
    assert plan.kind == ANCHOR and plan.links
    received = read_downlink(downlink_record(server.downlink(plan, r + 1)))
    assert received.anchor.round == plan.base_round and [link.round for link in received.links] == [link.round for link in plan.links]
    state = ClientModel(server.run, torch.device("cpu")).sync(None, received)
    assert state_digest(state) == server.stateless_digest


@pytest.mark.integration
def test_a_flower_run_keeps_every_stateless_download_within_an_eighth_and_ends_as_in_process(simulation_superlink, tmp_path):
    """float32 links (1/32 of the model each) pass the budget after four rounds: anchors follow. The
    same config in process, planned by the sizes the Flower server measured, ends bitwise alike."""
    import re

    from server.app import measure_message_sizes, measure_stateless

    from .conftest import finished_run

    config = {"num-server-rounds": 8, "local-epochs": 1, "num-partitions": 3, "min-train-nodes": 3,
              "client-state": "none", "downlink-codec": "float32"}
    flwr = finished_run(simulation_superlink, tmp_path, " ".join(
        f"{k}={v}" if isinstance(v, int) else f'{k}="{v}"' for k, v in config.items()
    ))
    full = int(re.search(r"downlink: full model (\d+) B", flwr["output"]).group(1))
    link = int(re.search(r"one chain link (\d+) B", flwr["output"]).group(1))
    assert all(r["accepted"] == 3 and r["resync"] == 0 for r in flwr["results"][1:])  # every client reached the digest
    down = [(rec["round"], rec["bytes"]) for rec in flwr["ledger"]["records"] if rec["direction"] == "down"]
    assert len(down) == 8 * 3
    assert all(nbytes <= STATELESS_BUDGET * full for _, nbytes in down), (full, down)
    assert 7 * link > STATELESS_BUDGET * full  # the chain from round 0 would have exceeded it by round 8
    assert max(nbytes for r, nbytes in down if r == 8) < 5 * link  # round 8: an anchor and few links

    def flower_sizes(server):
        _, _, server.full_bytes, server.link_bytes = measure_message_sizes(server)
        server.anchor_framing, server.message_bytes, _ = measure_stateless(server)

    server, history, _, _ = simulate_in_process(parse_run_config(config), on_start=flower_sizes)
    assert server.anchor is not None
    assert [row["accuracy"] for row in flwr["results"]] == history
    checkpoint = torch.load(flwr["dir"] / "checkpoint.pt", weights_only=True)["server"]
    assert state_digest(checkpoint["global_state"]) == server.digest


def test_a_checkpoint_keeps_the_anchor(tmp_path):
    from fedmud.checkpoint import load_checkpoint, restore, save_checkpoint
    from fedmud.ledger import Ledger

    server = _stateless_server({"num-server-rounds": 50})
    while server.anchor is None:
        r = server.round + 1
        server.apply_round(r, round_seed(server.run.seed, r), _uploads(server, r))
    save_checkpoint(tmp_path, server, Ledger(), [])
    resumed = _stateless_server({"num-server-rounds": 50})
    restore(load_checkpoint(tmp_path, resumed.run), resumed)
    assert (resumed.anchor.round, resumed.stateless_digest) == (server.anchor.round, server.stateless_digest)
