"""ClientApp: one FedMUD round per message, on this node's partition of the digits."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import identify, run_client_round
from fedmud.config import RunConfig
from fedmud.task import CLASSIFICATION

from .task import make_model, train_loader

app = ClientApp()


def load(partition_id: int, seed: int, run: RunConfig):
    """This node's training loader: run.data.num_partitions comes from the node config."""
    return train_loader(partition_id, seed, run.data.num_partitions, run.train.batch_size)


@app.train()
def train(msg: Message, context: Context) -> Message:
    # load, make_model and CLASSIFICATION are module-level objects, the same every round:
    # FedMUD builds this process's models once and keeps them.
    return run_client_round(msg, context, loader_fn=load, model_fn=make_model, task=CLASSIFICATION)


@app.query()
def query(msg: Message, context: Context) -> Message:
    # the server asks each node once which partition it holds, and samples partitions with the
    # run's seed: the same config and seed train the same clients in every run
    return identify(msg, context)
