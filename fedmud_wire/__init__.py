"""The messages between ServerApp and ClientApp: the only place that knows record keys.

Both apps import it and neither owns it (``server/`` and ``client/`` do not import each other);
it is Flower-aware, so it stays out of the library ``fedmud/``, which never imports flwr.

Downlink (server -> client), a RecordDict with
- ``config``: server-round, round-seed, sync (``full`` | ``chain`` | ``anchor``), target-round,
  base-round, link-rounds, link-seeds, digest;
- ``arrays``: the full global model (``full``) or ``chain``: each link's coded arrays
  (``link-<round>-<part>``: ``payload``, and ``scales`` for the lossy link codes) and, in
  the round that fixed them, the HRP directions (``basis-<round>``); an ``anchor`` downlink
  (``client-state=none``) adds the anchor's coded arrays (``anchor-<part>``, of round base-round).

Uplink (client -> server): ``update`` (the codec's flat arrays: ``payload``, or
``payload`` + ``scales`` for int8/int4/int2/sign, ``values`` + ``indices`` for top-k; clients
send several parts packed into one uint8 ``packed`` array, which saves Flower's framing of
~300-500 bytes per array, and the server reads either form) and ``metrics``
(num-examples, train-loss, server-round, partition-id, and the client's seconds:
``train-s`` in local training, ``client-s`` in its whole round), or, when the client
could not sync, only ``metrics`` with ``sync-error`` set.

Partition query (server -> client, once per node, before the node is first sampled): a QUERY
message with ``config`` holding ``identify``; the reply's ``metrics`` hold the node's
``partition-id``, so rounds sample partitions, not Flower's node ids, which change every run.

Bytes are counted as Flower 1.39 moves them: a message's content is deflated into
content-addressed objects (RecordDict, records, Arrays, ArrayChunks) that are pushed
and pulled over gRPC; we sum the serialised size of each distinct object.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedmud.codec import Codec, Parts, PayloadError
from fedmud.secagg import pack_values, unpack_values
from fedmud.sync import ANCHOR, CHAIN, FULL, Anchor, Downlink, Link

UPDATE_KEY, PAYLOAD_KEY, METRICS_KEY = "update", "payload", "metrics"
ARRAYS_KEY, CHAIN_KEY, CONFIG_KEY = "arrays", "chain", "config"
ANCHOR_PREFIX = "anchor-"  # an anchor's arrays in an anchor downlink's chain record
TIMINGS = ("train-s", "client-s")  # a client's seconds in local training and in its whole round


def content_bytes(content: RecordDict) -> int:
    """Serialised bytes of every distinct object Flower sends for ``content``."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


# ---------------------------------------------------------------------------- downlink


def downlink_record(downlink: Downlink) -> RecordDict:
    """``downlink`` (:class:`fedmud.sync.Downlink`, completed for its round) as a message's content."""
    config = ConfigRecord(
        {
            "server-round": downlink.server_round,
            "round-seed": downlink.round_seed,
            "sync": downlink.kind,
            "target-round": downlink.target_round,
            "base-round": -1 if downlink.base_round is None else downlink.base_round,
            "link-rounds": [link.round for link in downlink.links],
            "link-seeds": [link.seed for link in downlink.links],
            "digest": downlink.digest,
        }
    )
    if downlink.kind == FULL:
        if downlink.full_state is None:
            raise ValueError("a full downlink needs the global state")
        return RecordDict({CONFIG_KEY: config, ARRAYS_KEY: ArrayRecord(dict(downlink.full_state))})
    arrays = {}
    for link in downlink.links:
        for part, array in link.parts.items():
            arrays[f"link-{link.round}-{part}"] = Array(array)
        if link.basis is not None:  # HRP directions fixed in this round
            arrays[f"basis-{link.round}"] = Array(link.basis)
    if downlink.kind == ANCHOR:
        if downlink.anchor is None:
            raise ValueError("an anchor downlink needs the anchor")
        for part, array in downlink.anchor.parts.items():
            arrays[f"{ANCHOR_PREFIX}{part}"] = Array(array)
    chain = ArrayRecord(arrays)
    return RecordDict({CONFIG_KEY: config, CHAIN_KEY: chain})


def downlink_round_seed(content: RecordDict) -> int | None:
    """The round seed a message's downlink carries (None: the message has no downlink, e.g. a SecAgg+
    stage other than the collect stage)."""
    config = content.config_records.get(CONFIG_KEY)
    seed = None if config is None else config.get("round-seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def read_downlink(content: RecordDict) -> Downlink:
    """The :class:`fedmud.sync.Downlink` a message carries, as the server built it.

    Its links' arrays are checked when the client decodes them (a bad chain is a sync error).
    """
    config = content.config_records[CONFIG_KEY]
    kind = str(config["sync"])
    if kind not in (FULL, CHAIN, ANCHOR):
        raise ValueError(f"unknown sync kind {kind!r}, expected {FULL!r}, {CHAIN!r} or {ANCHOR!r}")
    links: tuple[Link, ...] = ()
    full_state = anchor = None
    if kind == FULL:
        full_state = content.array_records[ARRAYS_KEY].to_torch_state_dict()
    else:
        chain = content.array_records[CHAIN_KEY]
        links = tuple(
            Link(int(r), int(s), _link_parts(chain, int(r)), chain[f"basis-{r}"].numpy() if f"basis-{r}" in chain else None)
            for r, s in zip(config["link-rounds"], config["link-seeds"])
        )
    base = int(config["base-round"])
    if kind == ANCHOR:
        chain = content.array_records[CHAIN_KEY]
        parts = {key[len(ANCHOR_PREFIX) :]: chain[key].numpy() for key in chain.keys() if key.startswith(ANCHOR_PREFIX)}
        anchor = Anchor(base, parts)
    return Downlink(
        kind=kind,
        target_round=int(config["target-round"]),
        base_round=None if base < 0 else base,
        links=links,
        server_round=int(config["server-round"]),
        round_seed=int(config["round-seed"]),
        digest=str(config["digest"]),
        full_state=full_state,
        anchor=anchor,
    )


def _link_parts(chain: ArrayRecord, round_: int) -> dict[str, np.ndarray]:
    """The coded arrays of round ``round_``'s link (the client's link codec validates them)."""
    prefix = f"link-{round_}-"
    return {key[len(prefix) :]: chain[key].numpy() for key in chain.keys() if key.startswith(prefix)}


# ---------------------------------------------------------------------------- partition query
def identify_record() -> RecordDict:
    """The server's question to a node it has not sampled yet: which partition is yours?"""
    return RecordDict({CONFIG_KEY: ConfigRecord({"identify": 1})})


def identity_record(partition_id: int) -> RecordDict:
    """A node's answer to :func:`identify_record`."""
    return RecordDict({METRICS_KEY: MetricRecord({"partition-id": int(partition_id)})})


def read_identity(content: RecordDict) -> int | None:
    """The partition a node's answer names; None for an answer that is not a non-negative integer."""
    metrics = content.metric_records.get(METRICS_KEY)
    value = None if metrics is None else metrics.get("partition-id")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# ---------------------------------------------------------------------------- uplink
def upload_record(
    parts: Mapping[str, np.ndarray] | np.ndarray,
    num_examples: int,
    train_loss: float,
    server_round: int,
    partition_id: int = 0,
    seconds: Mapping[str, float] | None = None,
) -> RecordDict:
    """A client's reply: the codec's flat arrays (or one float32 payload) and its metrics.

    ``seconds``: where the client's time went (:data:`TIMINGS`: ``train-s``, ``client-s``).
    """
    if isinstance(parts, np.ndarray):
        parts = {PAYLOAD_KEY: parts}
    timings = {key: float(value) for key, value in (seconds or {}).items() if key in TIMINGS}
    return RecordDict(
        {
            UPDATE_KEY: ArrayRecord({name: Array(array) for name, array in parts.items()}),
            METRICS_KEY: MetricRecord(
                {
                    "num-examples": int(num_examples),
                    "train-loss": float(train_loss),
                    "server-round": int(server_round),
                    "partition-id": int(partition_id),
                    **timings,
                }
            ),
        }
    )


def reply_seconds(content: RecordDict) -> dict[str, float]:
    """The client's reported seconds (:data:`TIMINGS`) that are finite and >= 0; the rest are left out.

    They only feed the run's time report, so a bad value is dropped rather than the reply.
    """
    return secure_reply_seconds(content.metric_records.get(METRICS_KEY) or {})


def sync_error_record(server_round: int, partition_id: int) -> RecordDict:
    """A client's reply when it could not reach the expected global model."""
    return RecordDict(
        {METRICS_KEY: MetricRecord({"server-round": server_round, "partition-id": partition_id, "sync-error": 1})}
    )


def is_sync_error(content: RecordDict) -> bool:
    metrics = content.metric_records.get(METRICS_KEY)
    return metrics is not None and metrics.get("sync-error") == 1


def read_upload(content: RecordDict, codec: Codec, server_round: int, max_bytes: int) -> tuple[Parts, int]:
    """(parts, num-examples claimed) of a reply safe to aggregate, else :class:`PayloadError` saying why.

    The metrics the server reads (train-loss, partition-id) are checked too, so that no
    reply can stop the round. The claimed count is returned as sent, an exact integer of
    any size: the server caps it (``max-examples``, :func:`fedmud.bounds.cap_examples`).
    """
    if UPDATE_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
        raise PayloadError(f"reply lacks {UPDATE_KEY!r} arrays or {METRICS_KEY!r} metrics; has {sorted(content.keys())}")
    arrays, metrics = content.array_records[UPDATE_KEY], content.metric_records[METRICS_KEY]
    expected = sorted(codec.parts)  # the parts, or all of them packed in one array (what clients send)
    if sorted(arrays.keys()) not in (expected, sorted(codec.wire_parts)):
        raise PayloadError(f"update holds {sorted(arrays.keys())}, expected only {', '.join(map(repr, expected))}")
    answered = metrics.get("server-round")
    if answered != server_round:
        raise PayloadError(f"reply answers round {answered}, this is round {server_round}")
    examples = metrics.get("num-examples")
    if not isinstance(examples, int) or examples <= 0:
        raise PayloadError(f"num-examples is {examples!r}, expected a positive integer")
    _check_reply_metrics(metrics)
    size = sum(len(array.data) for array in arrays.values())
    if size > max_bytes:
        raise PayloadError(f"payload has {size} bytes, the limit is {max_bytes}")
    try:
        parts = {name: _numpy(array) for name, array in arrays.items()}
    except PayloadError:
        raise
    except Exception as err:  # a corrupt buffer must not stop the round
        raise PayloadError(f"payload does not decode: {err}") from None
    return codec.validate(parts), examples


def _numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, once its header declares no more bytes than it carries: numpy allocates
    the declared size before reading, so a 100-byte reply could otherwise ask for terabytes."""
    buffer = io.BytesIO(array.data)
    version = np.lib.format.read_magic(buffer)
    if version not in ((1, 0), (2, 0)):
        raise PayloadError(f"payload is .npy format {version[0]}.{version[1]}, expected 1.0 or 2.0")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(buffer)
    declared, carried = math.prod(shape) * dtype.itemsize, len(array.data) - buffer.tell()
    if declared > carried:
        raise PayloadError(f"payload header declares {declared} bytes of data, it carries {carried}")
    return array.numpy()


def _check_reply_metrics(metrics: MetricRecord) -> None:
    """train-loss a finite number, partition-id (optional) a non-negative integer: the server reads both."""
    loss = metrics.get("train-loss")
    if not _finite_number(loss):
        raise PayloadError(f"train-loss is {loss!r}, expected a finite number")
    partition = metrics.get("partition-id", 0)
    if not isinstance(partition, int) or partition < 0:
        raise PayloadError(f"partition-id is {partition!r}, expected a non-negative integer")


def _finite_number(value: object) -> bool:
    """An int or float (not a bool) that is a finite float: a metric value the server can add up."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


# ---------------------------------------------------------------------------- secure aggregation
# Under ``secure-aggregation=true`` a round is Flower's SecAgg+ protocol (server/secure.py, and
# Flower's ``secaggplus_mod`` on the client). Its TRAIN messages carry a ``secaggplus`` config
# record; the one of the collect stage also carries the downlink above. The client answers it
# in Flower's FitRes layout, which the mod reads, masks and clears: the update (decoded upload
# minus the round-start values) and the weight leave the client only inside the
# masked vector. What stays readable is the client's seconds (``fitres.metrics``). The masked
# vector travels packed, log2(modulus) bits a value (the server sizes the field each round,
# :func:`fedmud.secagg.size_field`), and is unpacked to Flower's int64 before it is summed.
def secure_upload_record(update: np.ndarray, weight: int, seconds: Mapping[str, float] | None = None) -> RecordDict:
    """A client's collect-stage reply, for Flower's ``secaggplus_mod`` to mask."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    timings = {key: float(value) for key, value in (seconds or {}).items() if key in TIMINGS}
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        # float64: Flower quantises in the dtype it is given (the array itself never leaves the client)
        parameters=ndarrays_to_parameters([np.asarray(update, dtype=np.float64)]),
        num_examples=int(weight),
        metrics=timings,
    )
    return fitres_to_recorddict(fitres, keep_input=False)


def hide_weight(content: RecordDict) -> None:
    """Blank the plaintext weight Flower's mod leaves in a masked reply (it is in the masked vector)."""
    key = "fitres.num_examples"
    if key in content.metric_records:
        content.metric_records[key] = MetricRecord({"num_examples": 0})


def pack_masked_vector(content: RecordDict, modulus: int) -> None:
    """Send a masked reply's values (Flower's int64, each in [0, ``modulus``)) in log2(``modulus``)
    bits each (:func:`fedmud.secagg.pack_values`): 4 bytes or fewer instead of 8 in a field of 2^32
    or less. The integers are those Flower's mod made; only their encoding changes."""
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or Key.MASKED_PARAMETERS not in configs:
        return
    bits = int(modulus).bit_length() - 1
    vectors = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
    configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(pack_values(v, bits)) for v in vectors]


def unpack_masked_vector(content: RecordDict, modulus: int) -> None:
    """The server's inverse of :func:`pack_masked_vector`, before Flower's workflow sums the
    vectors: each uint8 vector back to Flower's int64 values. Any other array (a client that sends
    Flower's own int64, or a malformed one) is left as it came, for the workflow and the mean's
    checks to judge."""
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or Key.MASKED_PARAMETERS not in configs:
        return
    bits = int(modulus).bit_length() - 1
    vectors = []
    for data in configs[Key.MASKED_PARAMETERS]:
        vector = bytes_to_ndarray(data)
        if vector.dtype == np.uint8 and vector.ndim:
            data = ndarray_to_bytes(unpack_values(vector, bits))
        vectors.append(data)
    configs[Key.MASKED_PARAMETERS] = vectors


def secure_reply_seconds(metrics: Mapping[str, object]) -> dict[str, float]:
    """The seconds in ``metrics`` (:data:`TIMINGS`) that are finite and >= 0: a masked reply's
    ``fitres.metrics``, or a plain reply's metrics (:func:`reply_seconds`)."""
    return {key: float(metrics[key]) for key in TIMINGS if _finite_number(metrics.get(key)) and metrics[key] >= 0}
