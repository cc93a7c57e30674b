"""A round's results row (:class:`RoundResult`): the one declaration of what ``results.json`` holds.

The server appends a row after it evaluates the global model (round 0: the model before any
training), adds the round's timings once its checkpoint is written, and writes every row to
``results.json`` after every round (:func:`to_json`). The summary, the privacy accounting, the
divergence check, the bench and ``scripts/round_time.py`` read the rows back as
:class:`RoundResult` (:func:`read_results`, :meth:`RoundResult.from_dict`).

On disk a row is a JSON object with the fields in the order declared here; a key is the
field's name, except the three spelt as the round's Flower metrics are (``norm-rejected``,
``merge-refused``, ``train-loss``). An optional field is left out where the round did not have
it (round 0's counts and timings, ``epsilon`` outside DP, the clients' seconds when no reply
reported them). A number that is not finite (a skipped round's NaN ``train-loss``, a diverged
loss) is written as null, strict JSON, and read back as NaN. Every column added since the first
version is optional, so rows written by earlier versions read back too (they ran without it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .ledger import strict_json


def _key(name: str) -> dict:
    """A field whose results.json key is not its name (Flower's metric names have hyphens)."""
    return {"key": name}


@dataclass(frozen=True)
class RoundResult:
    """One round of a run: the held-out evaluation, the bytes, what the merge did, DP, the time.

    Bytes are serialised message bytes as the ledger counts them (all clients, the partition
    queries and SecAgg+'s protocol messages included); seconds are wall-clock seconds of the
    ServerApp unless named ``client_*``.
    """

    round: int  # the server round; 0 is the initial model, before any training
    accuracy: float  # the task's metric on the held-out data (the key says accuracy whatever the metric)
    loss: float  # the held-out loss
    up_bytes: int  # bytes uploaded this round
    down_bytes: int  # bytes sent down this round
    cum_up_bytes: int  # bytes uploaded up to and including this round
    cum_down_bytes: int  # bytes sent down up to and including this round
    dense_cum_up_bytes: int  # what dense FedAvg would have uploaded for the same messages, cumulative
    dense_cum_down_bytes: int  # what dense FedAvg would have sent down for the same messages, cumulative
    wall_s: float  # seconds since the server's rounds started (a resumed run carries on) at the round's end
    # what the round's merge did; training rounds only
    accepted: int | None = None  # replies merged into the global model (0: the round was skipped)
    rejected: int | None = None  # replies refused by validation (keys, round, size, dtype, finiteness) or as a second upload
    failed: int | None = None  # error replies (node unavailable, the ClientApp failed); secure: nodes left out of the sum
    resync: int | None = None  # nodes that could not reach the round's model from what they held (sent the full model)
    capped: int | None = None  # replies whose num-examples counted as max-examples
    clipped: int | None = None  # replies whose update was scaled down to its norm bound
    # replies dropped for their update's norm (secure aggregation: 1 when the mean was refused)
    norm_rejected: int | None = field(default=None, metadata=_key("norm-rejected"))
    # 1 when merging would have made the model non-finite: the round was skipped, the model kept
    merge_refused: int | None = field(default=None, metadata=_key("merge-refused"))
    # the valid replies' training loss, weighted as in the mean; NaN when none was valid; absent under secure aggregation
    train_loss: float | None = field(default=None, metadata=_key("train-loss"))
    # client-level differential privacy; dp runs only
    noise_multiplier: float | None = None  # the noise multiplier σ the round ran at (training rounds)
    sampling_rate: float | None = None  # q, the Poisson sampling rate the round ran at (training rounds)
    epsilon: float | None = None  # ε at the run's dp-delta after this round, composed over every round that ran
    # where the round's time went, in seconds; written after the round's checkpoint, training rounds only
    round_s: float | None = None  # the whole round, sampling to checkpoint
    plan_s: float | None = None  # sampling and building the downlinks
    client_train_s: float | None = None  # the clients' local training, as they report it, summed over the replies
    client_s: float | None = None  # the clients' whole rounds, as they report them, summed over the replies
    aggregate_s: float | None = None  # validating, screening and merging the replies (not waiting for them)
    clients_s: float | None = None  # sending the downlinks until the last reply, less aggregate_s
    evaluate_s: float | None = None  # the held-out evaluation
    checkpoint_s: float | None = None  # writing the checkpoint

    def as_dict(self) -> dict:
        """The row as ``results.json`` holds it, keys in declared order, optional fields left out
        where absent; non-finite numbers stay floats here (:func:`to_json` writes them as null)."""
        values = ((name, getattr(self, name)) for name in _NAMES)
        return {_KEYS[name]: value for name, value in values if value is not None or name in _REQUIRED}

    @classmethod
    def from_dict(cls, row: Mapping) -> RoundResult:
        """The row ``row`` (a ``results.json`` object, of this version or an earlier one) reads as.

        Raises ValueError naming the round and the key for a row that lacks a column every
        version writes, has a key no version writes, or a value of the wrong type.
        """
        if not isinstance(row, Mapping):
            raise ValueError(f"a results row is a JSON object; got {type(row).__name__}: {row!r:.80}")
        where = f"results row of round {row['round']!r}" if "round" in row else "results row"
        unknown = [key for key in row if key not in _NAME_OF]
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_NAME_OF)}")
        missing = [_KEYS[name] for name in _REQUIRED if _KEYS[name] not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(map(repr, missing))}; every row has {', '.join(_REQUIRED)}")
        return cls(**{_NAME_OF[key]: _value(where, key, value, _TYPES[_NAME_OF[key]]) for key, value in row.items()})

    def replace(self, **fields) -> RoundResult:
        """This row with ``fields`` (by field name) changed or added."""
        return dataclasses.replace(self, **fields)


_FIELDS = dataclasses.fields(RoundResult)
_NAMES = tuple(f.name for f in _FIELDS)
_KEYS = {f.name: f.metadata.get("key", f.name) for f in _FIELDS}  # field name -> results.json key
_NAME_OF = {key: name for name, key in _KEYS.items()}  # results.json key -> field name
_REQUIRED = tuple(f.name for f in _FIELDS if f.default is dataclasses.MISSING)  # every version writes them
_TYPES = {f.name: int if f.type.startswith("int") else float for f in _FIELDS}

# where a round's time goes, in the order it is spent (their sum is ``round_s``, but for the gaps between)
ROUND_PARTS = ("plan_s", "clients_s", "aggregate_s", "evaluate_s", "checkpoint_s")
# what the clients' replies report of their time, summed over the replies
CLIENT_SECONDS = ("client_train_s", "client_s")
# the fields the server sets once a round's checkpoint is written (it times the checkpoint too),
# so a checkpoint's last row lacks them: a resumed run takes them from results.json
TIMED_AFTER_CHECKPOINT = ("round_s", "wall_s", *CLIENT_SECONDS, *ROUND_PARTS)


def fields_of(metrics: Mapping) -> dict:
    """``metrics`` (keys as results.json spells them: a round's Flower metrics) by field name,
    for ``RoundResult(...)`` or :meth:`RoundResult.replace`; raises ValueError for a key no row has."""
    unknown = [key for key in metrics if key not in _NAME_OF]
    if unknown:
        raise ValueError(f"no results-row field for {', '.join(map(repr, unknown))}; allowed: {', '.join(_NAME_OF)}")
    return {_NAME_OF[key]: value for key, value in metrics.items()}


def _value(where: str, key: str, value, kind: type):
    """``value`` as read, checked to be of ``kind``; null for a float is a number that was not finite."""
    if kind is float and value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        allowed = "a number (null: not finite)" if kind is float else "an integer"
        raise ValueError(f"{where}: {key}={value!r} is not allowed; allowed: {allowed}")
    return value


def to_json(rows: Iterable[RoundResult]) -> str:
    """``results.json``'s text: the rows in order, strict JSON (non-finite numbers as null), indented."""
    return strict_json([row.as_dict() for row in rows])


def from_json(text: str) -> list[RoundResult]:
    """The rows of a ``results.json`` text (strict, or an earlier version's with NaN literals).

    Raises ValueError for text that is not JSON, not a list, or holds a row :meth:`RoundResult.from_dict` refuses.
    """
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError(f"results.json holds a list of rows; got {type(rows).__name__}")
    return [RoundResult.from_dict(row) for row in rows]


def read_results(path: Path) -> list[RoundResult]:
    """The rows of the ``results.json`` at ``path`` (see :func:`from_json`)."""
    return from_json(Path(path).read_text())
