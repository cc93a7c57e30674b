"""FedMUD's ClientApp, with dropouts: the partitions ``probe.drop-partitions`` ("1,3") fail when they
train, i.e. under secure aggregation after they have shared their keys; ``probe.lost-partitions``
fail at the first message of a secure round, before they share anything (a node lost between rounds);
``probe.malform-partitions`` send a malformed masked vector (``probe.malform``: ``reshape`` to (1, n),
``short`` one value fewer, ``one`` a single value, ``zeros`` all zero; several, comma-separated, are
taken in turn, one a round), as a hostile node could."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.app import identify, run_client_round, secure_aggregation_mod

app = ClientApp()


def _partitions(context: Context, key: str) -> set[int]:
    return {int(p) for p in str(context.run_config.get(key, "")).split(",") if p.strip()}


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))


def lost_mod(msg: Message, context: Context, call_next) -> Message:
    if _partition(context) in _partitions(context, "probe.lost-partitions"):
        raise RuntimeError("probe: this client is lost before the round")
    return call_next(msg, context)


def malform_mod(msg: Message, context: Context, call_next) -> Message:
    """Outside the SecAgg+ mod: tampers with the masked vector it has just made."""
    reply = call_next(msg, context)
    if _partition(context) not in _partitions(context, "probe.malform-partitions") or not reply.has_content():
        return reply
    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or Key.MASKED_PARAMETERS not in configs:
        return reply
    vectors = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
    kinds = str(context.run_config.get("probe.malform", "reshape")).split(",")
    count = context.state.config_records.get("probe", {}).get("malformed", 0)  # one kind a round, in turn
    context.state.config_records["probe"] = ConfigRecord({"malformed": count + 1})
    how = kinds[count % len(kinds)].strip()
    tamper = {
        "reshape": lambda v: v.reshape(1, -1),
        "short": lambda v: v[:-1],
        "one": lambda v: v[:1],
        "zeros": np.zeros_like,
    }[how]
    configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(tamper(v)) for v in vectors]
    return reply


@app.train(mods=[lost_mod, malform_mod, secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    if _partition(context) in _partitions(context, "probe.drop-partitions"):
        raise RuntimeError("probe: this client drops out of the round")
    return run_client_round(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return identify(msg, context)
