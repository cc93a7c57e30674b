"""A federation without the transport: a ServerModel and ClientModels doing what the strategy and
the ClientApps do each round, for tests that need several rounds in seconds."""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from torch.utils.data import DataLoader, TensorDataset

from fedmud.rounds import ClientModel, ServerModel
from fedmud.seeds import round_seed

if TYPE_CHECKING:
    from flwr.app import Message


@dataclass
class Node:
    """A client as a SuperNode keeps it between rounds: its model, the global round it holds, its error feedback."""

    partition: int
    model: ClientModel
    held: tuple | None = None
    feedback: dict | None = None


def loader(partition: int, server_round: int) -> DataLoader:
    """48 random 1x28x28 images of this partition and round (the CNN's input), in a fixed order."""
    g = torch.Generator().manual_seed(1000 * partition + server_round)
    data = TensorDataset(torch.randn(48, 1, 28, 28, generator=g), torch.randint(0, 10, (48,), generator=g))
    return DataLoader(data, batch_size=16)


def server_for(run) -> ServerModel:
    """A ServerModel with the downlink sizes the ServerApp measures for the default CNN (a link is
    ~1/32 of the model), so chains are planned as in a real run."""
    server = ServerModel(run)
    server.link_bytes, server.full_bytes = 49_190, 1_571_559
    return server


def nodes_for(run) -> dict[str, Node]:
    return {f"node-{p}": Node(p, ClientModel(run, torch.device("cpu"))) for p in range(2)}


def run_rounds(server: ServerModel, nodes: dict[str, Node], rounds: range) -> list[tuple[int, str, str]]:
    """What the strategy and the ClientApps do each round, without the transport; returns the
    downlinks sent as (round, node, kind). A node that cannot reach the digest raises SyncError."""
    sent = []
    for r in rounds:
        seed, target, uploads = round_seed(server.run.seed, r), server.round, []
        for name, node in nodes.items():
            downlink = server.downlink(server.plan(name), r)
            sent.append((r, name, downlink.kind))
            state = node.model.sync(node.held, downlink)
            node.held = (target, state)
            parts, _, node.feedback = node.model.train_round(seed, loader(node.partition, r), node.feedback, node.partition)
            uploads.append((parts, 48))
        server.apply_round(r, seed, uploads)
        for name in nodes:
            server.records.synced(name, target)
    return sent


def reply_from(node_id: int, content) -> Message:
    """A reply from ``node_id`` to a train message sent to it (real Flower messages, no network)."""
    from flwr.app import Message, MessageType, RecordDict

    request = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(content=content, reply_to=request)



class InProcessGrid(Grid):
    """A base for Flower Grids whose nodes live in this process: a subclass's ``push_messages``
    answers each message at once into ``self.replies`` (message id -> reply) and lists its nodes in
    ``get_node_ids``; pulling, and sending and receiving, are the same for every such grid."""

    replies: dict

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


class LoopbackGrid(InProcessGrid):
    """Flower's Grid over the real ClientApp in this process, node 100 + p holding partition p; each
    message is serialised and read back on its way, as it is between machines (Flower's mod changes what it reads)."""

    def __init__(self, nodes: int, run_config: dict) -> None:
        self.contexts = {
            100 + p: Context(run_id=1, node_id=100 + p, node_config={"partition-id": p, "num-partitions": run_config["num-partitions"]},
                             state=RecordDict(), run_config=run_config)
            for p in range(nodes)
        }
        self.replies: dict = {}

    def push_messages(self, messages):
        from client.app import app as client_app

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(message.metadata.message_id)
            received = copy.copy(message)  # as the node receives it: serialised and read back
            received.content = recorddict_from_proto(recorddict_to_proto(message.content))
            self.replies[message.metadata.message_id] = client_app(received, self.contexts[message.metadata.dst_node_id])
        return ids

    def get_node_ids(self):
        return list(self.contexts)


@contextmanager
def as_server_app() -> Iterator[None]:
    """Messages are made inside a run: give this process, meanwhile, the identity a ServerApp would have."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def readme_secure_example() -> tuple[dict, dict]:
    """(federation config, run config) of the README's secure-aggregation example."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text().split("## Privacy", 1)[1].split("\n## ", 1)[0]
    command = next(block for block in section.split("flwr run ")[1:] if "secure-aggregation=true" in block).replace("\\\n", " ")
    federation = re.search(r'--federation-config "([^"]+)"', command).group(1)
    return parse_config_args([federation]), parse_config_args([re.search(r"-c '([^']+)'", command).group(1)])
