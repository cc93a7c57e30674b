"""The round's exchange with real Flower messages and the real ClientApp round, in one process.

Each node runs :func:`client.app.run_client_round` on its own Flower ``Context``; a
restarted node gets a fresh one (its state is gone, its node id is kept, as with
authenticated SuperNodes), and a node that dies is answered for by the SuperLink's
own error reply (Flower 1.39's ``create_message_error_unavailable_res_message``,
whose source is the SuperLink, node 1). See ``test_deployment.py`` for the same
with real processes.
"""

import uuid

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from client.app import identify, run_client_round
from fedmud.config import parse_run_config
from fedmud.data import test_loader as held_out_loader
from fedmud.ledger import DOWN, UP, Ledger
from fedmud.rounds import ServerModel
from server import strategy as strategy_module
from server.app import measure_message_sizes
from server.strategy import FedMUD
from fedmud_wire import upload_record
from .federation import InProcessGrid

RUN_CONFIG = {"num-server-rounds": 3, "local-epochs": 1, "min-train-nodes": 2, "round-timeout": 600}
NODES = {101: 0, 202: 1, 303: 2}  # node id -> partition id (of 10: small, quick rounds)


class LoopbackGrid(InProcessGrid):
    """Flower's Grid over nodes in this process. ``events[round]``: what happens to which node
    just before that round's first message is delivered: ``restart`` (fresh state) or ``die``."""

    def __init__(self, events: dict[int, list[tuple[str, int]]]) -> None:
        self.contexts = {node: self._fresh(node) for node in NODES}
        self.events = events
        self.dead: set[int] = set()
        self.replies: dict[str, Message] = {}

    @staticmethod
    def _fresh(node: int) -> Context:
        node_config = {"partition-id": NODES[node], "num-partitions": 10}
        return Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config=RUN_CONFIG)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            if message.metadata.message_type == MessageType.TRAIN:
                self._happen(int(message.content.config_records["config"]["server-round"]))
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do
            ids.append(message.metadata.message_id)
            self.replies[message.metadata.message_id] = self._answer(message)
        return ids

    def _happen(self, server_round: int) -> None:
        for what, node in self.events.pop(server_round, []):
            if what == "restart":
                self.contexts[node] = self._fresh(node)
            else:
                self.dead.add(node)

    def _answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if node in self.dead:
            return create_message_error_unavailable_res_message(message.metadata, "node_unavail")
        if message.metadata.message_type == MessageType.QUERY:  # which partition: the ClientApp's @app.query()
            return identify(message, self.contexts[node])
        return run_client_round(message, self.contexts[node])


    def get_node_ids(self):
        return list(NODES)



@pytest.fixture
def logged(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(strategy_module, "log", lambda level, fmt, *args: lines.append(fmt % args))
    return lines


def test_a_restarted_node_trains_in_its_round_and_a_dead_node_is_named(task_identity, logged, tmp_path):
    run = parse_run_config(RUN_CONFIG)
    server = ServerModel(run)
    server.full_bytes, server.link_bytes = measure_message_sizes(server)[2:]  # chains are planned by size
    ledger = Ledger()
    fedmud = FedMUD(run, server, ledger, tmp_path, held_out_loader(run.data))
    # before round 3 node 202 restarts (it held round 1's model) and node 303 dies
    grid = LoopbackGrid(events={3: [("restart", 202), ("die", 303)]})
    try:
        fedmud.run_rounds(grid, first_round=1)
    finally:
        fedmud.writer.close()
    rows = {row.round: row for row in fedmud.history}
    assert [rows[r].accepted for r in (1, 2)] == [3, 3]

    # node 202 lost its model, said so, got the full model and trained in the same round
    assert (rows[3].accepted, rows[3].resync, rows[3].failed) == (2, 1, 1)
    assert "round 3: node(s) 202 could not sync; resending the full model" in logged
    assert sorted(d for r, c, d, _ in ledger.records if (r, c) == (3, "202")) == [DOWN, DOWN, UP, UP]
    assert sorted(d for r, c, d, _ in ledger.records if (r, c) == (3, "101")) == [DOWN, UP]
    assert server.records.get("202", None) == 2

    # node 303 died: the SuperLink's error reply is put down to 303, not to node 1
    assert any(line.startswith("round 3: node 303 failed: ") for line in logged), logged
    assert not any("node 1 " in line for line in logged), logged
    assert server.records.get("303", 0) is None and server.records.get("1", "never seen") == "never seen"
    assert [c for r, c, d, _ in ledger.records if (r, d) == (3, DOWN)].count("303") == 1
    assert all(row.accepted <= len(NODES) for row in rows.values() if row.accepted is not None)


def test_a_second_upload_from_a_node_is_not_counted(task_identity, logged, tmp_path):
    run = parse_run_config({})
    server = ServerModel(run)
    fedmud = FedMUD(run, server, Ledger(), tmp_path, test_data=[])
    request = Message(content=RecordDict(), dst_node_id=7, message_type="train")
    payload = server.codec.encode(server.codec.layout.flatten(server.model.uploaded_state()))
    replies = [Message(content=upload_record(payload, 40, 0.1, 1), reply_to=request) for _ in range(2)]
    try:
        _, metrics = fedmud.aggregate_train(1, replies)
    finally:
        fedmud.writer.close()
    assert (metrics["accepted"], metrics["rejected"]) == (1, 1)
    assert "round 1: rejected a second upload from node 7: a node counts once a round" in logged
