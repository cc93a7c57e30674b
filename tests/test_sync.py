"""Compressed downlink: chains reproduce the server's model bitwise; otherwise the full model."""

import numpy as np
import pytest
import torch

from fedmud.config import LINK_CODECS, parse_run_config
from fedmud.rounds import ClientModel, ServerModel, SyncError, simulate_in_process
from fedmud.seeds import round_seed
from fedmud.sync import CHAIN, FULL, ChainStore, Downlink, Link, SyncRecords, chain_bytes, plan_downlink, state_digest

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand


def _upload(server: ServerModel, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"payload": (0.01 * rng.standard_normal(server.codec.layout.numel)).astype(np.float32)}


def _chain(server: ServerModel, base_round: int) -> Downlink:
    """The chain from ``base_round`` to the server's round, as the server sends it in the next round."""
    plan = Downlink(CHAIN, server.round, base_round, tuple(server.chain.since(base_round)))
    return server.downlink(plan, server.round + 1)


def _run_rounds(server: ServerModel, rounds: range, clients: int = 3) -> None:
    for r in rounds:
        uploads = [(_upload(server, 100 * r + c), 10.0 + c) for c in range(clients)]
        server.apply_round(r, round_seed(server.run.seed, r), uploads)


@pytest.mark.parametrize("kind", ["kron", "mat"])
@pytest.mark.parametrize("init", ["nonzero", "nonzero-compensated", "hrp"])
def test_a_new_client_reaches_the_server_model_bitwise_from_the_chain(kind, init):
    run = parse_run_config({**FLOAT32_UP, "kind": kind, "init": init, "hrp-rounds": 2})
    server = ServerModel(run)
    _run_rounds(server, range(1, 4))
    plan = plan_downlink(0, server.round, server.chain, link_bytes=1, full_bytes=10**9)
    assert plan.kind == CHAIN and [link.round for link in plan.links] == [1, 2, 3]
    client = ClientModel(run, torch.device("cpu"))
    state = client.sync(None, server.downlink(plan, server.round + 1))
    expected = server.global_state()
    assert all(torch.equal(state[n], expected[n]) for n in expected)
    if init == "hrp":  # the directions were fixed after round 2 and rode on its link
        assert [link.basis is not None for link in plan.links] == [False, True, False]
        assert client.global_model.hrp_ready and server.model.hrp_ready


def _client_holding_round_2():
    """A server that ran rounds 1-2 and a client synced to it by the chain from round 0."""
    run = parse_run_config({**FLOAT32_UP})
    server = ServerModel(run)
    _run_rounds(server, range(1, 3))
    client = ClientModel(run, torch.device("cpu"))
    return server, client, client.sync(None, _chain(server, 0))


def test_a_client_holding_round_k_needs_only_the_links_after_k():
    server, client, held = _client_holding_round_2()
    _run_rounds(server, range(3, 5))
    plan = plan_downlink(2, server.round, server.chain, link_bytes=1, full_bytes=100)
    assert [link.round for link in plan.links] == [3, 4]
    state = client.sync((2, held), server.downlink(plan, server.round + 1))
    assert state_digest(state) == server.digest


def test_a_corrupted_local_model_fails_the_digest():
    server, client, held = _client_holding_round_2()
    _run_rounds(server, range(3, 4))
    held["features.4.weight"] += 1e-3  # a decomposed layer: chains add to it, never replace it
    with pytest.raises(SyncError, match="digest"):
        client.sync((2, held), _chain(server, 2))


def test_a_chain_from_another_round_is_refused():
    run = parse_run_config({**FLOAT32_UP})
    client = ClientModel(run, torch.device("cpu"))
    with pytest.raises(SyncError, match="holds round 1"):
        client.sync((1, client.initial_state), Downlink(CHAIN, 0, 0, digest="x"))


def test_the_full_model_is_applied_and_checked():
    run = parse_run_config({**FLOAT32_UP})
    server = ServerModel(run)
    _run_rounds(server, range(1, 3))
    client = ClientModel(run, torch.device("cpu"))
    state = client.sync(None, server.downlink(Downlink(FULL, server.round), server.round + 1))
    assert state_digest(state) == server.digest


def test_unknown_state_or_a_costly_chain_gets_the_full_model():
    store = ChainStore()
    for r in range(1, 6):
        store.add(Link(r, r, {"payload": np.zeros(1, np.float32)}))
    assert plan_downlink(None, 5, store, link_bytes=10, full_bytes=100).kind == FULL
    assert plan_downlink(4, 5, store, link_bytes=10, full_bytes=100).kind == CHAIN
    assert plan_downlink(0, 5, store, link_bytes=30, full_bytes=100).kind == FULL  # 5 links cost 150
    store.prune(keep=2)
    assert plan_downlink(2, 5, store, link_bytes=1, full_bytes=100).kind == FULL  # link 3 is gone
    assert [link.round for link in plan_downlink(3, 5, store, 1, 100).links] == [4, 5]


def test_skipped_rounds_leave_no_link():
    run = parse_run_config({**FLOAT32_UP})
    server = ServerModel(run)
    _run_rounds(server, range(1, 2))
    digest = server.digest
    assert server.apply_round(2, round_seed(0, 2), []) == 0
    assert server.digest == digest and server.round == 2
    assert [link.round for link in server.chain.since(0)] == [1]


def test_partial_participation_downlink_costs_less_than_dense():
    """10 of 100 clients a round for 20 rounds, with the sizes measured for the default CNN."""
    link_bytes, full_bytes = 49_190, 1_571_559
    store, records = ChainStore(), SyncRecords()
    rng = np.random.default_rng(0)
    sent = 0
    for r in range(1, 21):
        for client in rng.choice(100, 10, replace=False):
            plan = plan_downlink(records.get(str(client), 0), r - 1, store, link_bytes, full_bytes)
            sent += full_bytes if plan.kind == FULL else len(plan.links) * link_bytes
            records.synced(str(client), r - 1)
        store.add(Link(r, r, {"payload": np.zeros(1, np.float32)}))
        store.prune(keep=full_bytes // link_bytes)
    dense = 20 * 10 * full_bytes
    assert sent < dense / 2


LOSSY_LINKS = [c for c in LINK_CODECS if c != "float32"]


def _delta_uploads(server: ServerModel, r: int, clients: int = 3) -> list[tuple[dict[str, np.ndarray], float]]:
    """Uploads that move the round-start values by the same deltas on any server (float32 uploads)."""
    rng = np.random.default_rng(r)
    reference = server.reference(round_seed(server.run.seed, r))
    return [
        ({"payload": (reference + 0.01 * rng.standard_normal(reference.size)).astype(np.float32)}, 10.0 + c)
        for c in range(clients)
    ]


@pytest.mark.parametrize("codec", LOSSY_LINKS)
@pytest.mark.parametrize("method", ["fedmud", "fedavg"])
def test_a_lossy_link_code_keeps_a_stateful_client_bitwise_equal_to_the_server(codec, method):
    run = parse_run_config({**FLOAT32_UP, "downlink-codec": codec, "method": method})
    server = ServerModel(run)
    client = ClientModel(run, torch.device("cpu"))
    held = None
    for r in range(1, 5):
        server.apply_round(r, round_seed(run.seed, r), _delta_uploads(server, r))
        base = 0 if held is None else held[0]
        state = client.sync(held, _chain(server, base))
        held = (r, state)
        assert state_digest(state) == server.digest
    assert server.chain.links[-1].parts.keys() == server.link_codec.wire_parts.keys()  # one array on the wire


@pytest.mark.parametrize("codec", LOSSY_LINKS)
@pytest.mark.parametrize("method", ["fedmud", "fedavg"])
def test_server_error_feedback_loses_nothing_of_the_aggregated_updates(codec, method):
    """Σ merged + E = Σ aggregated: the lossy-link model plus the carried error is the float32-link model."""
    exact = ServerModel(parse_run_config({**FLOAT32_UP, "method": method, "downlink-codec": "float32"}))
    lossy = ServerModel(parse_run_config({**FLOAT32_UP, "method": method, "downlink-codec": codec}))
    for r in range(1, 5):
        for server in (exact, lossy):
            server.apply_round(r, round_seed(0, r), _delta_uploads(server, r))
    carried = lossy.link_feedback.state()
    dense_error = lossy.link_codec.layout.unflatten(carried["dense"].numpy())
    got, want = lossy.global_state(), exact.global_state()
    updates = lossy.model.updates()
    assert updates or method == "fedavg"
    gap = rest = 0.0  # largest |lossy - exact| and |lossy + E - exact| over every uploaded tensor
    for name, tensor in want.items():
        error = carried[f"weight/{name}"] if name in updates else dense_error.get(name)
        if error is None:  # a buffer: never uploaded, equal on both
            assert torch.equal(got[name], tensor), name
            continue
        gap = max(gap, float((got[name] - tensor).abs().max()))
        rest = max(rest, float((got[name] + error.reshape(tensor.shape) - tensor).abs().max()))
    # float32 rounding of a sum over 4 rounds on values up to ~1 (BatchNorm weights): a few ulp
    assert gap > 0 and rest < max(gap / 20, 5e-7), (gap, rest)


def test_a_returning_client_gets_the_cheapest_path_and_is_sent_what_the_planner_priced():
    """At int8 links, a client 3 rounds behind gets the chain; one too far behind (or unknown) the full model."""
    from server.app import measure_message_sizes
    from fedmud_wire import content_bytes, downlink_record

    run = parse_run_config({**FLOAT32_UP, "downlink-codec": "int8"})
    server = ServerModel(run)
    _, _, server.full_bytes, server.link_bytes = measure_message_sizes(server)
    for r in range(1, 8):
        server.apply_round(r, round_seed(run.seed, r), _delta_uploads(server, r))
    full_record = downlink_record(Downlink(FULL, server.round).for_round(8, 1, server.digest, server.global_state()))
    full_sent = content_bytes(full_record)
    assert abs(full_sent - server.full_bytes) < 0.01 * server.full_bytes  # measured on random weights
    for held in (None, 0, 4, 6):
        server.records.held = {} if held is None else {"c": held}
        plan = server.plan("c") if held is not None else plan_downlink(None, server.round, server.chain, 1, 1)
        sent = content_bytes(downlink_record(plan.for_round(8, 1, server.digest, server.global_state() if plan.kind == FULL else None)))
        if held is None:
            assert plan.kind == FULL
            continue
        chain_sent = content_bytes(downlink_record(Downlink(CHAIN, server.round, held, tuple(server.chain.since(held))).for_round(8, 1, server.digest)))
        assert plan.kind == CHAIN and sent == chain_sent
        assert sent < full_sent
        # priced as the planner does: links at the measured size, plus the message's framing
        assert abs(sent - chain_bytes(plan.links, server.link_bytes)) < 2_000


def test_stateless_clients_are_planned_from_round_0():
    run = parse_run_config({**FLOAT32_UP, "downlink-codec": "int8", "client-state": "none"})
    server = ServerModel(run)
    server.link_bytes, server.full_bytes = 12_000, 1_571_559
    for r in range(1, 4):
        server.apply_round(r, round_seed(run.seed, r), _delta_uploads(server, r))
    server.records.synced("c", 3)  # ignored: the client keeps nothing
    plan = server.plan("c")
    assert plan.kind == CHAIN and plan.base_round == 0 and [link.round for link in plan.links] == [1, 2, 3]
    state = ClientModel(run, torch.device("cpu")).sync(None, server.downlink(plan, server.round + 1))
    assert state_digest(state) == server.digest


@pytest.mark.parametrize("damage", ["missing", "extra", "wrong-shape"])
def test_a_damaged_full_model_is_a_sync_error_like_a_damaged_chain(damage):
    """The client answers 'cannot sync' (and is sent the full model again within the round) instead
    of failing the round with an error reply."""
    run = parse_run_config({**FLOAT32_UP})
    server, client = ServerModel(run), ClientModel(run, torch.device("cpu"))
    state = dict(server.global_state())
    name = next(iter(state))
    if damage == "missing":
        del state[name]
    elif damage == "extra":
        state["not.in.the.model"] = torch.zeros(3)
    else:
        state[name] = torch.zeros(tuple(state[name].shape) + (2,))
    with pytest.raises(SyncError, match="the full model does not load"):
        client.sync(None, Downlink(FULL, 0, digest=server.digest, full_state=state))
    assert client.sync(None, server.downlink(Downlink(FULL, 0), 1))  # the resend syncs


def test_the_in_process_loop_counts_each_message_as_it_is_sent():
    """Both clients hold round 0 (nothing to download in round 1), then get one link a round, and
    each uploads its coded arrays; a pricing function (here a framing of 700 B) counts each downlink;
    a full downlink is counted by its model and cannot be counted before it carries one."""
    run = parse_run_config({"num-server-rounds": 3, "local-epochs": 1, "num-partitions": 2, "uplink": "int8"})
    links = []
    server, _, uploaded, downloaded = simulate_in_process(
        run, on_round=lambda r, s: links.append(s.chain.links[-1].nbytes), downlink_nbytes=lambda d: 700 + d.nbytes
    )
    assert downloaded == [2 * 700, 2 * (700 + links[0]), 2 * (700 + links[1])]
    assert uploaded == [2 * server.codec.payload_nbytes] * 3
    full = server.downlink(Downlink(FULL, server.round), server.round + 1)
    assert full.nbytes == server.full_bytes > 20 * links[0]
    with pytest.raises(ValueError, match="for_round"):
        Downlink(FULL, server.round).nbytes
