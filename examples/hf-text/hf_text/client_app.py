"""ClientApp: one FedMUD round per message, on this node's partition of the docstrings."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import identify, run_client_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    # No loader, model or task of our own: the config's dataset is tokenised once in this process
    # and partitioned by partition-id; the config's model and task are built once and kept.
    return run_client_round(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    # the server asks each node once which partition it holds
    return identify(msg, context)
