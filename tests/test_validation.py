"""Every reply is validated before it can reach the model; bad ones are rejected and counted."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmud.codec import PayloadError
from fedmud.config import parse_run_config
from fedmud.ledger import Ledger
from fedmud.rounds import ServerModel
from server.strategy import FedMUD
from server.wire import read_upload, sync_error_record, upload_record

ROUND = 3


@pytest.fixture(scope="module")
def server():
    return ServerModel(parse_run_config({}))


@pytest.fixture
def good(server):
    return np.random.default_rng(0).standard_normal(server.codec.layout.numel).astype(np.float32)


def _limit(server):
    return 2 * server.codec.payload_nbytes


def test_a_well_formed_reply_passes(server, good):
    payload, weight = read_upload(upload_record(good, 40, 0.1, ROUND), server.codec, ROUND, _limit(server))
    assert np.array_equal(payload["payload"], good) and weight == 40.0


def _without_update(server, good):
    return RecordDict({"metrics": MetricRecord({"num-examples": 40, "server-round": ROUND})})


def _wrong_shape(server, good):
    return upload_record(good[:-7], 40, 0.1, ROUND)


def _wrong_dtype(server, good):
    return upload_record(good.astype(np.float64)[: len(good) // 2], 40, 0.1, ROUND)


def _nan(server, good):
    bad = good.copy()
    bad[5] = np.nan
    return upload_record(bad, 40, 0.1, ROUND)


def _inf(server, good):
    bad = good.copy()
    bad[-1] = np.inf
    return upload_record(bad, 40, 0.1, ROUND)


def _oversized(server, good):
    return upload_record(np.concatenate([good] * 3), 40, 0.1, ROUND)


def _stale(server, good):
    return upload_record(good, 40, 0.1, ROUND - 1)


def _extra_array(server, good):
    content = upload_record(good, 40, 0.1, ROUND)
    content.array_records["update"]["base-weights"] = Array(good)
    return content


def _no_examples(server, good):
    return upload_record(good, 0, 0.1, ROUND)


BAD = {
    "missing key": (_without_update, "lacks 'update'"),
    "wrong shape": (_wrong_shape, "shape"),
    "wrong dtype": (_wrong_dtype, "dtype is float64"),
    "NaN": (_nan, "non-finite"),
    "Inf": (_inf, "non-finite"),
    "oversized": (_oversized, "limit"),
    "stale round": (_stale, f"answers round {ROUND - 1}, this is round {ROUND}"),
    "extra array": (_extra_array, "expected only 'payload'"),
    "no examples": (_no_examples, "num-examples is 0"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_reply_is_rejected_with_its_reason(kind, server, good):
    make, reason = BAD[kind]
    with pytest.raises(PayloadError, match=reason):
        read_upload(make(server, good), server.codec, ROUND, _limit(server))


# ------------------------------------------------------------------------- in the strategy
@pytest.fixture
def task_identity():
    """Messages are made inside a run; give this process the identity a ServerApp would have."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _reply(node_id: int, content: RecordDict) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(content=content, reply_to=request)


def test_strategy_merges_only_valid_replies_and_counts_the_rest(task_identity, tmp_path, good):
    run = parse_run_config({"min-replies": 1})
    server = ServerModel(run)
    server.round = ROUND - 1
    strategy = FedMUD(run, server, Ledger(), tmp_path, test_data=[])
    before = {n: t.clone() for n, t in server.global_state().items()}
    replies = [_reply(1, upload_record(good, 40, 0.2, ROUND, partition_id=0))]
    replies += [_reply(10 + i, make(server, good)) for i, (make, _) in enumerate(BAD.values())]
    replies.append(_reply(99, sync_error_record(ROUND, 5)))
    _, metrics = strategy.aggregate_train(ROUND, replies)
    assert (metrics["accepted"], metrics["rejected"], metrics["resync"]) == (1, len(BAD), 1)
    after = server.global_state()
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert torch.equal(after["classifier.weight"], server.codec.unflatten(good)["classifier.weight"])  # the one valid upload
    assert server.records.get("1", None) == ROUND - 1 and server.records.get("10", 0) is None
    strategy.writer.close()


def test_strategy_skips_a_round_below_min_replies(task_identity, tmp_path, good):
    run = parse_run_config({"min-replies": 2})
    server = ServerModel(run)
    server.round = ROUND - 1
    strategy = FedMUD(run, server, Ledger(), tmp_path, test_data=[])
    digest = server.digest
    _, metrics = strategy.aggregate_train(ROUND, [_reply(1, upload_record(good, 40, 0.2, ROUND)), _reply(2, _nan(server, good))])
    assert metrics["accepted"] == 0 and metrics["rejected"] == 1
    assert server.digest == digest and not server.chain.links
    strategy.writer.close()


# ------------------------------------------------------------------------- compressed uploads, HRP links
@pytest.mark.parametrize("scheme", ["int8", "topk"])
def test_compressed_replies_cross_the_wire_and_a_tampered_one_is_rejected(scheme, good):
    server = ServerModel(parse_run_config({"uplink": scheme}))
    parts = server.codec.encode(good)
    received, _ = read_upload(upload_record(parts, 40, 0.1, ROUND), server.codec, ROUND, _limit(server))
    assert all(np.array_equal(received[k], parts[k]) for k in parts)
    bad = {k: v.copy() for k, v in parts.items()}
    if scheme == "int8":
        bad["scales"][0] = np.nan
    else:
        bad["indices"][0] = server.codec.layout.numel + 5
    with pytest.raises(PayloadError, match="non-finite|must lie in"):
        read_upload(upload_record(bad, 40, 0.1, ROUND), server.codec, ROUND, _limit(server))
    with pytest.raises(PayloadError, match="expected only"):
        read_upload(upload_record(good, 40, 0.1, ROUND), server.codec, ROUND, _limit(server))


def test_the_hrp_basis_rides_on_its_chain_link_through_the_wire():
    from fedmud.sync import CHAIN, Downlink, Link
    from server.wire import downlink_record, read_downlink

    payload, basis = np.arange(6, dtype=np.float32), np.full(4, 0.5, dtype=np.float32)
    links = (Link(1, 11, payload, basis), Link(2, 22, payload + 1))
    got = read_downlink(downlink_record(Downlink(CHAIN, 2, 0, links), 3, 33, "d", None))
    assert [link.round for link in got.links] == [1, 2]
    assert np.array_equal(got.links[0].basis, basis) and got.links[1].basis is None
    assert np.array_equal(got.links[1].payload, payload + 1)
