"""FedMUD's ClientApp; the partition ``probe-drop-partition`` fails when it trains, i.e. under
secure aggregation after it has shared its keys (a dropout the protocol must survive)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import run_client_round, secure_aggregation_mod

app = ClientApp()


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    if int(context.node_config.get("partition-id", -2)) == int(context.run_config.get("probe-drop-partition", -1)):
        raise RuntimeError("probe: this client drops out of the round")
    return run_client_round(msg, context)
