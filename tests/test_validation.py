"""Every reply is validated before it can reach the model; bad ones are rejected and counted."""

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, MetricRecord, RecordDict

from fedmud.codec import PayloadError
from fedmud.config import parse_run_config
from fedmud.ledger import Ledger
from fedmud.rounds import ServerModel
from server.strategy import FedMUD
from .federation import reply_from
from fedmud_wire import content_bytes, read_upload, sync_error_record, upload_record

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand

ROUND = 3


@pytest.fixture(scope="module")
def server():
    return ServerModel(parse_run_config({**FLOAT32_UP}))


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


def _lying_header(server, good):
    """A 200-byte array whose .npy header declares 10^12 values (numpy would allocate them first)."""
    content = upload_record(good, 40, 0.1, ROUND)
    header = np.lib.format.header_data_from_array_1_0(good)
    header["shape"] = (10**12,)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    data = buffer.getvalue() + good[:32].tobytes()
    content.array_records["update"]["payload"] = Array(dtype="float32", shape=(10**12,), stype="numpy.ndarray", data=data)
    return content


def _nan_train_loss(server, good):
    return upload_record(good, 40, float("nan"), ROUND)


def _fractional_partition(server, good):
    content = upload_record(good, 40, 0.1, ROUND)
    content.metric_records["metrics"]["partition-id"] = 2.5
    return content


def _examples_as_a_list(server, good):
    content = upload_record(good, 40, 0.1, ROUND)
    content.metric_records["metrics"]["num-examples"] = [40, 40]
    return content


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
    "examples as a list": (_examples_as_a_list, r"num-examples is \[40, 40\]"),
    "lying header": (_lying_header, "header declares 4000000000000 bytes of data, it carries 128"),
    "NaN train-loss": (_nan_train_loss, "train-loss is nan, expected a finite number"),
    "fractional partition-id": (_fractional_partition, "partition-id is 2.5, expected a non-negative integer"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_reply_is_rejected_with_its_reason(kind, server, good):
    make, reason = BAD[kind]
    with pytest.raises(PayloadError, match=reason):
        read_upload(make(server, good), server.codec, ROUND, _limit(server))


# ------------------------------------------------------------------------- in the strategy
def test_strategy_merges_only_valid_replies_and_counts_the_rest(task_identity, tmp_path, good):
    run = parse_run_config({**FLOAT32_UP, "min-replies": 1, "downlink-codec": "float32"})  # merged as sent, to compare
    server = ServerModel(run)
    server.round = ROUND - 1
    strategy = FedMUD(run, server, Ledger(), tmp_path, test_data=[])
    before = {n: t.clone() for n, t in server.global_state().items()}
    replies = [reply_from(1, upload_record(good, 40, 0.2, ROUND, partition_id=0))]
    replies += [reply_from(10 + i, make(server, good)) for i, (make, _) in enumerate(BAD.values())]
    replies.append(reply_from(99, sync_error_record(ROUND, 5)))
    _, metrics = strategy.aggregate_train(ROUND, replies)
    assert (metrics["accepted"], metrics["rejected"], metrics["resync"]) == (1, len(BAD), 1)
    after = server.global_state()
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert torch.equal(after["classifier.weight"], server.codec.layout.unflatten(good)["classifier.weight"])  # the one valid upload
    assert server.records.get("1", None) == ROUND - 1 and server.records.get("10", 0) is None
    strategy.writer.close()


def test_strategy_skips_a_round_below_min_replies(task_identity, tmp_path, good):
    run = parse_run_config({**FLOAT32_UP, "min-replies": 2})
    server = ServerModel(run)
    server.round = ROUND - 1
    strategy = FedMUD(run, server, Ledger(), tmp_path, test_data=[])
    digest = server.digest
    _, metrics = strategy.aggregate_train(ROUND, [reply_from(1, upload_record(good, 40, 0.2, ROUND)), reply_from(2, _nan(server, good))])
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


def test_links_keep_their_coded_parts_and_hrp_basis_through_the_wire():
    from fedmud.sync import CHAIN, Downlink, Link
    from fedmud_wire import downlink_record, read_downlink

    payload, basis = np.arange(6, dtype=np.float32), np.full(4, 0.5, dtype=np.float32)
    scales = np.ones(2, dtype=np.float32)
    links = (Link(1, 11, {"payload": payload}, basis), Link(2, 22, {"payload": payload.astype(np.int8), "scales": scales}))
    got = read_downlink(downlink_record(Downlink(CHAIN, 2, 0, links).for_round(3, 33, "d")))
    assert (got.kind, got.target_round, got.base_round, got.server_round, got.round_seed, got.digest) == (CHAIN, 2, 0, 3, 33, "d")
    assert got.full_state is None
    assert [link.round for link in got.links] == [1, 2]
    assert np.array_equal(got.links[0].basis, basis) and got.links[1].basis is None
    assert np.array_equal(got.links[0].payload, payload)
    assert set(got.links[1].parts) == {"payload", "scales"} and np.array_equal(got.links[1].parts["scales"], scales)


def test_an_int8_code_of_minus_128_is_rejected_before_it_decodes_to_inf():
    """The encoder sends codes in [-127, 127]; -128 times the largest scale that passes the 127 check is -inf."""
    server = ServerModel(parse_run_config({"uplink": "int8"}))
    parts = server.codec.encode(np.ones(server.codec.layout.numel, np.float32))
    largest = np.nextafter(np.float32(np.finfo(np.float32).max / 127), np.float32(0))
    parts["scales"][0], parts["payload"][0] = largest, -128
    with pytest.raises(PayloadError, match="payload holds -128; int8 values must lie in"):
        read_upload(upload_record(parts, 40, 0.1, ROUND), server.codec, ROUND, _limit(server))


def test_a_residual_that_overflows_when_added_to_the_reference_is_rejected():
    server = ServerModel(parse_run_config({"uplink": "int8"}))
    parts = server.codec.encode(np.full(server.codec.layout.numel, 1e38, np.float32))  # a valid residual
    reference = np.full(server.codec.layout.numel, 3e38, np.float32)
    with pytest.raises(PayloadError, match="values overflow float32 when added to the reference"):
        server.codec.decode(parts, reference)


@pytest.mark.parametrize("uplink", ["int8", "int4", "sign", "topk"])
def test_a_packed_upload_is_one_array_that_unpacks_to_the_parts_and_a_short_one_is_rejected(uplink):
    server = ServerModel(parse_run_config({"uplink": uplink}))
    parts = server.codec.encode(np.random.default_rng(0).standard_normal(server.codec.layout.numel).astype(np.float32))
    packed = server.codec.pack(parts)
    assert list(packed) == ["packed"] and packed["packed"].nbytes == server.codec.payload_nbytes
    received, _ = read_upload(upload_record(packed, 40, 0.1, ROUND), server.codec, ROUND, _limit(server))
    assert all(np.array_equal(received[name], parts[name]) for name in parts)
    assert content_bytes(upload_record(packed, 40, 0.1, ROUND)) < content_bytes(upload_record(parts, 40, 0.1, ROUND))
    with pytest.raises(PayloadError, match="bytes, expected"):
        read_upload(upload_record({"packed": packed["packed"][:-1]}, 40, 0.1, ROUND), server.codec, ROUND, _limit(server))
