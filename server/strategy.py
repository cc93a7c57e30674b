"""FedMUD strategy: FedAvg on Flower's Message API, with what differs overridden.

Differences from FedAvg:
- ``configure_train`` samples clients with the run's seeded RNG and builds each
  client's own downlink: the chain of aggregated updates it missed, or the full
  model (see :mod:`fedmud.sync`), with the round seed and the digest of the model
  it must end up with; every message's bytes go to the ledger;
- ``aggregate_train`` validates each reply (keys, round, size, dtype, finiteness),
  counts rejected, failed and out-of-sync replies, and merges the exact weighted
  mean if at least ``min_replies`` are valid, else skips the round with a reason;
- ``run`` drives the rounds itself so that a run can resume after a checkpoint,
  and after every round evaluates centrally, logs (console, TensorBoard, JSON) and
  writes the checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

from torch.utils.data import DataLoader
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmud.checkpoint import save_checkpoint
from fedmud.codec import PayloadError
from fedmud.config import RunConfig
from fedmud.ledger import DOWN, UP, Ledger
from fedmud.rounds import ServerModel
from fedmud.seeds import numpy_rng, round_seed
from fedmud.sync import FULL

from .wire import content_bytes, downlink_record, is_sync_error, read_upload


class FedMUD(FedAvg):
    """FedAvg whose clients sync by chains and upload a decomposed model update.

    Parameters
    ----------
    run : RunConfig
        The validated run configuration (decomposition, training, data, rounds, faults).
    server_model : ServerModel
        The global model, chain store and sync records; the source of truth.
    ledger : Ledger
        Where every message's bytes are recorded.
    run_dir : Path
        Where ``results.json``, ``ledger.json``, ``checkpoint.pt`` and TensorBoard logs go.
    test_data : DataLoader
        The held-out data the global model is evaluated on after every round.
    history : list[dict] (default: empty)
        Per-round rows of a resumed run.
    max_upload_factor : float (default: 2.0)
        Replies whose payload exceeds this multiple of the expected size are rejected.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling fractions, minima).
    """

    def __init__(
        self,
        run: RunConfig,
        server_model: ServerModel,
        ledger: Ledger,
        run_dir: Path,
        test_data: DataLoader,
        history: list[dict] | None = None,
        max_upload_factor: float = 2.0,
        **kwargs,
    ) -> None:
        super().__init__(fraction_evaluate=0.0, **kwargs)
        self.run = run
        self.server_model = server_model
        self.ledger = ledger
        self.run_dir = run_dir
        self.max_upload_bytes = int(max_upload_factor * server_model.codec.payload_nbytes) + 1024
        self.history: list[dict] = history or []
        self._round_stats: dict[int, dict] = {}
        self._test_loader = test_data
        self._started = time.monotonic() - (self.history[-1]["wall_s"] if self.history else 0.0)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    # ------------------------------------------------------------------ sampling and downlink
    def _sample(self, server_round: int, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.run.round_timeout
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < self.min_available_nodes and time.monotonic() < deadline:
            time.sleep(1.0)
            node_ids = sorted(grid.get_node_ids())
        size = min(len(node_ids), max(int(len(node_ids) * self.fraction_train), self.min_train_nodes))
        picked = numpy_rng(self.run.seed, "sample", str(server_round)).choice(len(node_ids), size, replace=False)
        return [node_ids[i] for i in sorted(picked)]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server = self.server_model
        seed = round_seed(self.run.seed, server_round)
        full_state = server.global_state()
        contents: dict = {}  # one content per distinct plan: clients with the same plan share it
        messages = []
        for node_id in self._sample(server_round, grid):
            plan = server.plan(str(node_id))
            key = (plan.kind, plan.base_round)
            if key not in contents:
                content = downlink_record(plan, server_round, seed, server.digest, full_state)
                contents[key] = (content, content_bytes(content))
            content, nbytes = contents[key]
            self.ledger.record(server_round, str(node_id), DOWN, nbytes)
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        kinds = [k[0] for k in contents]
        log(INFO, "configure_train: %d clients (%d chain, %d full plans)", len(messages), kinds.count("chain"), kinds.count(FULL))
        return messages

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server, codec = self.server_model, self.server_model.codec
        accepted, counts = [], {"rejected": 0, "failed": 0, "resync": 0}
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            if reply.has_error():
                counts["failed"] += 1
                server.records.unknown(node)
                log(WARNING, "round %d: node %s failed: %s", server_round, node, reply.error.reason)
                continue
            self.ledger.record(server_round, node, UP, content_bytes(reply.content))
            if is_sync_error(reply.content):
                counts["resync"] += 1
                server.records.unknown(node)
                log(WARNING, "round %d: node %s could not sync; it gets the full model next", server_round, node)
                continue
            try:
                payload, weight = read_upload(reply.content, codec, server_round, self.max_upload_bytes)
            except PayloadError as err:
                counts["rejected"] += 1
                server.records.unknown(node)
                log(WARNING, "round %d: rejected reply from node %s: %s", server_round, node, err)
                continue
            metrics = reply.content.metric_records["metrics"]
            accepted.append((int(metrics.get("partition-id", 0)), node, payload, weight, float(metrics["train-loss"])))
        accepted.sort(key=lambda a: (a[0], a[1]))  # a fixed summation order: resumed runs match bitwise

        target = server.round  # what every replying client now holds
        if len(accepted) < self.run.min_replies:
            log(
                WARNING,
                "round %d skipped: %d valid replies, min-replies is %d (rejected %d, failed %d, resync %d)",
                server_round, len(accepted), self.run.min_replies, counts["rejected"], counts["failed"], counts["resync"],
            )
            accepted_uploads = []
        else:
            accepted_uploads = accepted
        merged = server.apply_round(server_round, round_seed(self.run.seed, server_round), ((p, w) for _, _, p, w, _ in accepted_uploads))
        for _, node, _, _, _ in accepted:
            server.records.synced(node, target)
        total = sum(w for *_, w, _ in accepted)
        metrics = MetricRecord(
            {
                "accepted": merged,
                **counts,
                "train-loss": sum(l * w for *_, w, l in accepted) / total if total else float("nan"),
            }
        )
        self._round_stats[server_round] = dict(metrics)
        return ArrayRecord(server.global_state()), metrics

    # ------------------------------------------------------------------ the rounds
    def run_rounds(self, grid: Grid, first_round: int) -> None:
        """Rounds ``first_round`` .. ``run.rounds``: train, aggregate, evaluate, checkpoint."""
        if first_round == 1:
            self.evaluate(0)
        for server_round in range(first_round, self.run.rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, self.run.rounds)
            messages = self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=self.run.round_timeout)
            _, metrics = self.aggregate_train(server_round, replies)
            log(INFO, "\t└──> %s", dict(metrics))
            self.evaluate(server_round)
            save_checkpoint(self.run_dir, self.server_model, self.ledger, self.history)

    def evaluate(self, server_round: int) -> MetricRecord:
        """Centralised evaluation on the held-out split; logs and writes the round's row."""
        loss, accuracy = self.server_model.evaluate(self._test_loader)
        round_bytes = self.ledger.round_totals(server_round)
        total = self.ledger.totals()
        dense = self.ledger.dense_equivalent()
        row = {
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            "up_bytes": round_bytes[UP],
            "down_bytes": round_bytes[DOWN],
            "cum_up_bytes": total[UP],
            "cum_down_bytes": total[DOWN],
            "dense_cum_up_bytes": dense[UP],
            "dense_cum_down_bytes": dense[DOWN],
            "wall_s": time.monotonic() - self._started,
            **self._round_stats.get(server_round, {}),
        }
        self.history.append(row)
        for key in ("accuracy", "loss", "up_bytes", "down_bytes", "cum_up_bytes", "cum_down_bytes"):
            self.writer.add_scalar(key, row[key], server_round)
        self.writer.flush()
        (self.run_dir / "results.json").write_text(json.dumps(self.history, indent=1))
        self.ledger.save(self.run_dir / "ledger.json")
        log(
            INFO,
            "round %d: %s %.4f loss %.4f | up %s down %s | cumulative up %s down %s",
            server_round,
            self.server_model.task.metric_name,
            accuracy,
            loss,
            _mb(round_bytes[UP]),
            _mb(round_bytes[DOWN]),
            _mb(total[UP]),
            _mb(total[DOWN]),
        )
        return MetricRecord({"accuracy": accuracy, "loss": loss})


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.3f} MB"
