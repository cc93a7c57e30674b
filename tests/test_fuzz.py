"""Fuzzing the reply reader: whatever a node sends, it is refused with a PayloadError or it decodes
to finite values; nothing else escapes, and a round fed all of it completes with a finite model.

Replies are built from a well-formed upload of each codec by a seeded numpy generator applying
zero to three mutations: random bits, extreme values (float32's limits, subnormals, NaN/Inf, int8
-128 or packed bytes of all ones or zeros under the largest scale, indices out of range), wrong
dtypes, sizes and ranks, missing and extra arrays, corrupt serialised bytes, and bad metrics
(num-examples 0, negative, 2^63 - 1, a list; the wrong round; a non-finite train-loss; a
fractional partition-id), each as it could arrive over the wire. Run with ``-s`` to see how many were rejected and accepted per codec.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmud.codec import INT8_CHUNK, Codec, PayloadError
from fedmud.config import UPLINKS as SCHEMES  # every scheme of the codec's table
from fedmud.config import parse_run_config
from fedmud.ledger import Ledger
from fedmud.rounds import ServerModel
from fedmud.seeds import round_seed
from server.strategy import FedMUD
from fedmud_wire import read_upload, upload_record
from .federation import reply_from

PAYLOADS_PER_CODEC = 400
ROUND = 3
SEED = round_seed(0, ROUND)
OTHER_DTYPES = ("float64", "float32", "float16", "int8", "int16", "int32", "int64", "uint8", "bool", "complex64", ">f4")


@pytest.fixture(scope="module")
def servers():
    servers = {}
    for scheme in SCHEMES:
        server = ServerModel(parse_run_config({"uplink": scheme}))
        server.round = ROUND - 1
        servers[scheme] = server
    return servers


def _limit(codec: Codec) -> int:
    return 2 * codec.payload_nbytes + 1024  # as the strategy's default max_upload_factor


# ------------------------------------------------------------------------- mutations
# Each takes (rng, parts, metrics, numel) and changes parts or metrics in place; they stack, so
# an array may already have another dtype, size or rank when the next one comes.
def _well_formed(rng, codec: Codec) -> dict[str, np.ndarray]:
    """An upload the client could send, its values spread over 16 orders of magnitude."""
    values = rng.standard_normal(codec.layout.numel) * 10.0 ** rng.uniform(-8, 8)
    return codec.encode(values.astype(np.float32))


def _pick(rng, parts) -> str:
    return str(rng.choice(sorted(parts)))


def _random_bits(rng, parts, metrics, numel):
    name = _pick(rng, parts)
    array = parts[name]
    parts[name] = np.frombuffer(rng.bytes(array.nbytes), dtype=array.dtype).reshape(array.shape).copy()


EXTREMES = {
    "f": [np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e38, 1e-45, -0.0, np.nan, np.inf, -np.inf, 65504.0],
    "i": [-128, 127, -1, 0, 2**31 - 1, -(2**31)],
}


def _extreme_values(rng, parts, metrics, numel):
    name = _pick(rng, parts)
    flat = parts[name].reshape(-1).copy()
    if flat.dtype.kind not in EXTREMES or not flat.size:
        return
    picks = rng.choice(np.asarray(EXTREMES[flat.dtype.kind], dtype=np.float64), size=int(rng.integers(1, 20)))
    if flat.dtype.kind == "i":
        picks = np.clip(picks, np.iinfo(flat.dtype).min, np.iinfo(flat.dtype).max)
    with np.errstate(over="ignore", invalid="ignore"):
        flat[rng.integers(0, flat.size, size=picks.size)] = picks.astype(flat.dtype)
    if name == "indices" and flat.dtype.kind == "i" and rng.random() < 0.5:  # just past the end
        flat[rng.integers(0, flat.size)] = min(numel, np.iinfo(flat.dtype).max)
    parts[name] = flat.reshape(parts[name].shape)


# the largest float32 scale whose product with 127 is finite (float32(max / 127) rounds up)
LARGEST_SCALE = np.nextafter(np.float32(np.finfo(np.float32).max / 127), np.float32(0))


def _code_limits(rng, parts, metrics, numel):
    """Codes at their limits (int8 -128/127, packed bytes all ones or zeros) under the largest
    scale that does not overflow at 127."""
    payload, scales = parts.get("payload"), parts.get("scales")
    if payload is None or scales is None or payload.dtype not in (np.int8, np.uint8) or scales.dtype != np.float32 or not scales.size:
        return
    scales, payload = scales.reshape(-1).copy(), payload.reshape(-1).copy()
    chunk = int(rng.integers(0, scales.size))
    scales[chunk] = LARGEST_SCALE
    if payload.size:
        if payload.dtype == np.int8:  # one value a byte, in the chunk where earlier tensors fill whole chunks
            payload[min(chunk * INT8_CHUNK + int(rng.integers(0, INT8_CHUNK)), payload.size - 1)] = rng.choice([-128, 127])
        else:  # a packed byte near the chunk (chunks of the mean length, values a byte from the sizes)
            length, per = numel / scales.size, max(1, min(8, -(-numel // payload.size)))
            value = int(chunk * length + rng.integers(0, max(1, int(length))))
            payload[min(value // per, payload.size - 1)] = rng.choice([0, 255])
    parts["scales"], parts["payload"] = scales.reshape(parts["scales"].shape), payload.reshape(parts["payload"].shape)


def _wrong_dtype(rng, parts, metrics, numel):
    name = _pick(rng, parts)
    with np.errstate(all="ignore"):
        parts[name] = parts[name].astype(str(rng.choice(OTHER_DTYPES)))


def _wrong_size(rng, parts, metrics, numel):
    name = _pick(rng, parts)
    flat = parts[name].reshape(-1)
    change = int(rng.integers(-flat.size, 8))
    parts[name] = flat[: flat.size + change] if change < 0 else np.concatenate([flat, np.zeros(change + 1, flat.dtype)])


def _wrong_rank(rng, parts, metrics, numel):
    name = _pick(rng, parts)
    flat = parts[name].reshape(-1)
    parts[name] = flat[:1].reshape(()) if flat.size and rng.random() < 0.3 else flat.reshape(1, -1)


def _missing_or_extra_array(rng, parts, metrics, numel):
    if rng.random() < 0.5:
        parts.pop(_pick(rng, parts))
    else:
        name = str(rng.choice(["payload", "scales", "values", "indices", "base-weights"]))
        parts[name] = rng.standard_normal(7).astype(np.float32)


BAD_METRICS = [  # each representable on the wire (a MetricRecord int is a signed 64-bit integer)
    ("num-examples", 0),
    ("num-examples", -5),
    ("num-examples", 2**63 - 1),
    ("num-examples", 40.5),
    ("num-examples", [1, 2]),
    ("server-round", ROUND - 1),
    ("server-round", float("nan")),
    ("train-loss", float("nan")),
    ("train-loss", float("inf")),
    ("train-loss", 2**63 - 1),
    ("train-loss", [0.1]),
    ("partition-id", 2.5),
    ("partition-id", float("inf")),
    ("partition-id", -1),
    ("partition-id", [3]),
]


def _bad_metrics(rng, parts, metrics, numel):
    key, value = BAD_METRICS[int(rng.integers(0, len(BAD_METRICS)))]
    if rng.random() < 0.1:
        metrics.pop(key, None)
    else:
        metrics[key] = value


MUTATIONS = (
    _random_bits,
    _extreme_values,
    _code_limits,
    _wrong_dtype,
    _wrong_size,
    _wrong_rank,
    _missing_or_extra_array,
    _bad_metrics,
)


def _corrupt_bytes(rng, array: np.ndarray) -> Array:
    """An Array whose serialised bytes are damaged: random, truncated, or a header that lies."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    how = int(rng.integers(0, 3))
    if how == 0:
        data = rng.bytes(len(data))
    elif how == 1:
        data = data[: int(rng.integers(0, len(data)))]
    else:
        data = data.replace(b"'shape': (", b"'shape': (9999999, ", 1)
    return Array(dtype=str(array.dtype), shape=tuple(array.shape), stype="numpy.ndarray", data=data)


def fuzzed_reply(rng, codec: Codec) -> RecordDict:
    """One reply: a well-formed upload with 0-3 mutations (a few with their bytes corrupted or a record missing)."""
    parts = _well_formed(rng, codec)
    metrics = {"num-examples": int(rng.integers(1, 500)), "train-loss": 0.5, "server-round": ROUND, "partition-id": 0}
    for index in rng.integers(0, len(MUTATIONS), size=int(rng.integers(0, 4))):
        if parts:  # every mutation but _bad_metrics picks an array
            MUTATIONS[index](rng, parts, metrics, codec.layout.numel)
    arrays = {name: Array(np.ascontiguousarray(array)) for name, array in parts.items()}
    if arrays and rng.random() < 0.05:
        name = rng.choice(sorted(arrays))
        arrays[name] = _corrupt_bytes(rng, parts[name])
    content = RecordDict({"update": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    roll = rng.random()
    if roll < 0.02:
        content = RecordDict({"metrics": MetricRecord(metrics)})
    elif roll < 0.04:
        content = RecordDict({"update": ArrayRecord(arrays), "metrics": ConfigRecord({"num-examples": 1})})
    return content


def _reference(server: ServerModel) -> np.ndarray:
    """The round-start values residuals are decoded against (as ``ServerModel.reference`` draws them)."""
    server.model.reset(SEED)
    values = server.codec.layout.flatten(server.model.uploaded_state())
    server.model.clear()
    return values


def _read(content: RecordDict, server: ServerModel, reference: np.ndarray) -> tuple[np.ndarray, int]:
    """The reader the strategy uses: wire checks, codec validation, decode against the reference."""
    parts, examples = read_upload(content, server.codec, ROUND, _limit(server.codec))
    return server.codec.decode(parts, reference if server.codec.residual else None), examples


# ------------------------------------------------------------------------- the properties
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_fuzzed_reply_is_refused_with_a_payload_error_or_decodes_to_finite_values(scheme, servers):
    server = servers[scheme]
    rng = np.random.default_rng(17 + SCHEMES.index(scheme))
    outcomes, escaped, reference = {"rejected": 0, "accepted": 0}, [], _reference(server)
    for i in range(PAYLOADS_PER_CODEC):
        content = fuzzed_reply(rng, server.codec)
        try:
            values, examples = _read(content, server, reference)
        except PayloadError:
            outcomes["rejected"] += 1
            continue
        except Exception as err:  # noqa: BLE001 - the property: nothing but PayloadError
            escaped.append(f"payload {i}: {type(err).__name__}: {err}")
            continue
        assert values.dtype == np.float32 and values.shape == (server.codec.layout.numel,)
        assert np.isfinite(values).all(), f"payload {i} decodes to non-finite values"
        assert examples > 0
        outcomes["accepted"] += 1
    print(f"\n{scheme}: {PAYLOADS_PER_CODEC} payloads, {outcomes['rejected']} rejected, {outcomes['accepted']} accepted")
    assert not escaped, "\n".join(escaped[:10])
    assert min(outcomes.values()) >= PAYLOADS_PER_CODEC // 10  # the fuzz reaches both sides


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_round_fed_every_fuzzed_reply_completes_with_a_finite_model(scheme, task_identity, tmp_path):
    """Through the strategy, with the norm bound on: each reply is counted once, and the model stays finite."""
    run = parse_run_config({"uplink": scheme, "update-norm-bound": 100.0, "max-examples": 1000})
    server = ServerModel(run)
    server.round = ROUND - 1
    strategy = FedMUD(run, server, Ledger(), tmp_path, test_data=[])
    rng = np.random.default_rng(99 + SCHEMES.index(scheme))
    replies = []
    for node in range(1, PAYLOADS_PER_CODEC // 4 + 1):
        request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        replies.append(Message(content=fuzzed_reply(rng, server.codec), reply_to=request))
    _, metrics = strategy.aggregate_train(ROUND, replies)
    strategy.writer.close()
    assert metrics["accepted"] + metrics["rejected"] + metrics["norm-rejected"] == len(replies)
    assert metrics["accepted"] > 0 and metrics["rejected"] > 0
    assert all(torch.isfinite(t).all() for t in server.global_state().values() if t.is_floating_point())


# ------------------------------------------------------------------------- with the shipped defaults
# Every codec and method shipped, each with every other key at its default (median-norm-bound 10,
# int4 chain links with server error feedback, max-examples 100,000, no fixed norm bound).
DEFAULT_RUNS = {
    **{scheme: {"uplink": scheme} for scheme in SCHEMES},
    "int4-stochastic": {"uplink": "int4", "stochastic-rounding": True},
    "int2-stochastic-ef": {"uplink": "int2", "stochastic-rounding": True, "error-feedback": True},
    "sign-ef": {"uplink": "sign", "error-feedback": True},
    "fedpara": {"method": "fedpara"},
    "fedlmt": {"method": "fedlmt"},
    "fedavg": {"method": "fedavg"},
    "lora": {"method": "lora"},
    "ffa-lora": {"method": "ffa-lora"},
}
HONEST, TRIALS = 4, 12
LINK_SLACK = 1.5  # what the int4 link code may add to a merged update's norm (measured: below 1.1)


def _honest_reply(rng, server: ServerModel, node: int) -> Message:
    """A client's upload whose update (decoded upload minus the round-start values) has norm 1."""
    update = rng.standard_normal(server.codec.layout.numel)
    update /= np.linalg.norm(update)
    reference = server.reference(SEED)
    values = update if server.codec.residual else reference + update
    parts = server.codec.encode(values.astype(np.float32))
    return reply_from(node, upload_record(server.codec.pack(parts), 100, 0.5, ROUND, node))


def _merged_update(server: ServerModel) -> np.ndarray:
    """What the round's link moved the upload's values by (zeros when nothing merged)."""
    links = [link for link in server.chain.links if link.round == ROUND]
    reference = server.reference(SEED).astype(np.float64)
    if not links:
        return np.zeros_like(reference)
    codec = server.link_codec
    values = codec.decode(codec.validate(dict(links[0].parts)), reference.astype(np.float32) if codec.residual else None)
    return values.astype(np.float64) - reference


@pytest.mark.parametrize("name", sorted(DEFAULT_RUNS))
def test_with_the_defaults_no_single_reply_crashes_a_round_or_moves_the_model_beyond_the_median_bound(
    name, task_identity, tmp_path
):
    """Four honest replies (updates of norm 1) and one fuzzed reply a round, with and without norm
    history: no exception escapes, the model stays finite, and the merged update's norm stays within
    median-norm-bound times an honest update's (plus the link code's slack)."""
    run = parse_run_config(DEFAULT_RUNS[name])
    server = ServerModel(run)
    server.round = ROUND - 1
    start = copy.deepcopy(server.state_dict())
    strategy = FedMUD(run, server, Ledger(), tmp_path, test_data=[])
    rng = np.random.default_rng(2024 + sorted(DEFAULT_RUNS).index(name))
    worst, outcomes = 0.0, {"accepted": 0, "rejected": 0}
    try:
        for trial in range(TRIALS):
            server.load_state_dict(copy.deepcopy(start))
            server.recent_norms = [[1.0] * HONEST] if trial % 2 else []  # known median, or the round's own
            replies = [_honest_reply(rng, server, node) for node in range(1, HONEST + 1)]
            replies.insert(int(rng.integers(0, HONEST + 1)), reply_from(99, fuzzed_reply(rng, server.codec)))
            _, metrics = strategy.aggregate_train(ROUND, replies)
            outcomes["accepted" if metrics["accepted"] == HONEST + 1 else "rejected"] += 1
            assert all(torch.isfinite(t).all() for t in server.global_state().values() if t.is_floating_point())
            worst = max(worst, float(np.linalg.norm(_merged_update(server))))
    finally:
        strategy.writer.close()
    print(f"\n{name}: {outcomes}, largest merged update norm {worst:.3f} (honest updates: 1)")
    assert worst <= run.bounds.median_norm_bound * LINK_SLACK, worst
    assert min(outcomes.values()) > 0  # the fuzz reaches both sides
