"""FedMUD's ClientApp, with dropouts: the partitions ``probe-drop-partitions`` ("1,3") fail when they
train, i.e. under secure aggregation after they have shared their keys; ``probe-lost-partitions``
fail at the first message of a secure round, before they share anything (a node lost between rounds)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import run_client_round, secure_aggregation_mod

app = ClientApp()


def _partitions(context: Context, key: str) -> set[int]:
    return {int(p) for p in str(context.run_config.get(key, "")).split(",") if p.strip()}


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))


def lost_mod(msg: Message, context: Context, call_next) -> Message:
    if _partition(context) in _partitions(context, "probe-lost-partitions"):
        raise RuntimeError("probe: this client is lost before the round")
    return call_next(msg, context)


@app.train(mods=[lost_mod, secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    if _partition(context) in _partitions(context, "probe-drop-partitions"):
        raise RuntimeError("probe: this client drops out of the round")
    return run_client_round(msg, context)
