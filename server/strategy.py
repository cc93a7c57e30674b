"""FedMUD strategy: a Flower :class:`~flwr.serverapp.strategy.Strategy` on the Message API.

It subclasses ``Strategy`` itself, not ``FedAvg``: it samples, merges and drives the rounds its own
way, and every setting comes from the run config (sampling: :func:`fedmud.privacy.sample_round`).
Where it differs from FedAvg:
- ``configure_train`` samples clients with the run's seeded RNG and builds each
  client's own downlink: the chain of aggregated updates it missed, or the full
  model (see :mod:`fedmud.sync`), with the round seed and the digest of the model
  it must end up with; every message's bytes go to the ledger;
- ``aggregate_train`` validates each reply (keys, round, size, dtype, finiteness),
  caps its weight (``max-examples``) and bounds its update (``update-norm-bound``),
  counts rejected, failed, out-of-sync, capped, clipped and norm-rejected replies, and merges the exact weighted
  mean if at least ``min_replies`` are valid, else skips the round with a reason;
- ``run`` drives the rounds itself so that a run can resume after a checkpoint,
  and after every round evaluates centrally, logs (console, TensorBoard, JSON) and
  writes the checkpoint;
- each round pushes and pulls its messages itself: every reply is put down to the
  node its message went to (Flower's own error replies name the SuperLink), and a
  node that could not sync is sent the full model and trains within the same round;
- under ``secure-aggregation=true`` a round is Flower's SecAgg+ instead
  (:meth:`secure_train`, :mod:`server.secure`): the server gets only the sum; under
  ``dp`` nodes are Poisson-sampled and ε is logged after every round
  (:mod:`fedmud.privacy`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from logging import INFO, WARNING
from pathlib import Path

from torch.utils.data import DataLoader
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmud.bounds import EVENTS, NORM_REJECTED, Screened, check_mean_update
from fedmud.checkpoint import save_checkpoint
from fedmud.codec import PayloadError
from fedmud.config import RunConfig
from fedmud.divergence import divergence
from fedmud.ledger import CONTROL, DOWN, UP, Ledger
from fedmud.rounds import RoundTally, ServerModel
from fedmud.privacy import accounted_epsilon, sample_round
from fedmud.results import RoundResult, fields_of, to_json
from fedmud.seeds import round_seed
from fedmud.sync import FULL, Downlink

from .secure import secure_round
from fedmud_wire import (
    content_bytes,
    downlink_record,
    identify_record,
    is_sync_error,
    read_identity,
    read_upload,
    reply_seconds,
)

POLL_S = 0.05  # how often a round asks the SuperLink for replies (a pull is one small gRPC call)
IDENTIFY_TIMEOUT_S = 60.0  # how long the partition query waits for nodes' answers (at most round-timeout)
SERVER_PARTS = ("plan_s", "aggregate_s", "checkpoint_s")  # the server's own work among ROUND_PARTS
MERGE_REFUSED = "merge-refused"  # a round whose merge would have made the model non-finite


class FedMUD(Strategy):
    """A strategy whose clients sync by chains and upload a decomposed model update.

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
    history : list[RoundResult] (default: empty)
        Per-round rows of a resumed run.
    max_upload_factor : float (default: 2.0)
        Replies whose payload exceeds this multiple of the expected size are rejected.

    Sampling (``fraction-train``, ``min-train-nodes``, DP's Poisson rate) is read from ``run``
    in one place, :func:`fedmud.privacy.sample_round`; evaluation is centralised (:meth:`evaluate`).
    """

    def __init__(
        self,
        run: RunConfig,
        server_model: ServerModel,
        ledger: Ledger,
        run_dir: Path,
        test_data: DataLoader,
        history: list[RoundResult] | None = None,
        max_upload_factor: float = 2.0,
    ) -> None:
        self.run = run
        self.server_model = server_model
        self.ledger = ledger
        self.run_dir = run_dir
        self.max_upload_bytes = int(max_upload_factor * server_model.codec.payload_nbytes) + 1024
        self.history: list[RoundResult] = history or []
        self._round_stats: dict[int, dict] = {}  # round -> what its merge did, by RoundResult field
        self._round_seconds: dict[str, float] = {}  # this round: ROUND_PARTS and the clients' reported seconds
        self._sent: dict[str, int] = {}  # this round: message id -> the node it was sent to
        self._resent: set[int] = set()  # this round: nodes sent the full model again after a sync error
        self._test_loader = test_data
        self._population = 0  # nodes available when the round sampled
        self._partitions: dict[int, int | None] = {}  # node -> the partition it said it holds (None: no answer)
        self._started = time.monotonic() - (self.history[-1].wall_s if self.history else 0.0)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    # ------------------------------------------------------------------ sampling and downlink
    def _sample(self, server_round: int, grid: Grid) -> list[int]:
        """The round's nodes (:func:`fedmud.privacy.sample_round`: Poisson sampling under DP); keeps
        how many nodes there were to sample from (DP's release divides by rate × that).

        Nodes are sampled in the order of the partitions they hold (:meth:`_identify`), so the
        same seed trains the same partitions whatever node ids Flower gives them, as
        :func:`fedmud.rounds.simulate_in_process` does.
        """
        deadline = time.monotonic() + self.run.round_timeout
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < self.run.min_train_nodes and time.monotonic() < deadline:
            time.sleep(1.0)
            node_ids = sorted(grid.get_node_ids())
        self._population = len(node_ids)
        self._identify(grid, server_round, [node for node in node_ids if node not in self._partitions])
        known = sorted((self._partitions[n], n) for n in node_ids if self._partitions[n] is not None)
        candidates = [node for _, node in known] + [n for n in node_ids if self._partitions[n] is None]
        return sorted(candidates[i] for i in sample_round(self.run, server_round, range(len(candidates))))

    def _identify(self, grid: Grid, server_round: int, nodes: list[int]) -> None:
        """Ask ``nodes`` (once each) which partition they hold; the bytes go to the ledger's control part.

        A node that does not answer in time, or whose app has no query function (an app of
        the user's without ``@app.query()`` calling :func:`client.app.identify`), is sampled
        after the identified ones, by node id, which differs between runs: logged.
        """
        if not nodes:
            return
        messages = [Message(content=identify_record(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        for message in messages:
            self.ledger.record(server_round, str(message.metadata.dst_node_id), DOWN, content_bytes(message.content), CONTROL)
        returned = list(grid.push_messages(messages))
        asked = {
            _pushed_id(message, {i for i in returned if i}, by_position): message.metadata.dst_node_id
            for message, by_position in zip(messages, returned if len(returned) == len(messages) else [None] * len(messages))
        }
        asked.pop(None, None)
        self._partitions.update(dict.fromkeys(nodes))
        deadline = time.monotonic() + min(self.run.round_timeout, IDENTIFY_TIMEOUT_S)
        while asked and time.monotonic() < deadline:
            for reply in grid.pull_messages(sorted(asked)):
                node = asked.pop(reply.metadata.reply_to_message_id, None)
                if node is not None and not reply.has_error():
                    self.ledger.record(server_round, str(node), UP, content_bytes(reply.content), CONTROL)
                    self._partitions[node] = read_identity(reply.content)
            if asked:
                time.sleep(POLL_S)
        unknown = [n for n in nodes if self._partitions[n] is None]
        if unknown:
            log(
                WARNING,
                "node(s) %s did not say which partition they hold (a ClientApp without fedmud's query function, "
                "or no answer within %gs): they are sampled by node id, which differs between runs",
                _ids(unknown), min(self.run.round_timeout, IDENTIFY_TIMEOUT_S),
            )

    def _plans(self, server_round: int, grid: Grid) -> list[tuple[int, Downlink]]:
        """(node, downlink plan) for each node sampled this round."""
        plans = [(node_id, self.server_model.plan(str(node_id))) for node_id in self._sample(server_round, grid)]
        kinds = [kind for kind, _ in {(plan.kind, plan.base_round) for _, plan in plans}]
        log(INFO, "configure_train: %d clients (%d chain, %d full plans)", len(plans), kinds.count("chain"), kinds.count(FULL))
        return plans

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._downlinks(server_round, self._plans(server_round, grid))

    def _downlinks(self, server_round: int, plans: list[tuple[int, Downlink]], record: bool = True) -> list[Message]:
        """One TRAIN message per (node, plan), each recorded in the ledger as sent (``record``)."""
        server = self.server_model
        contents: dict = {}  # one content per distinct plan: clients with the same plan share it
        messages = []
        for node_id, plan in plans:
            key = (plan.kind, plan.base_round)
            if key not in contents:
                content = downlink_record(server.downlink(plan, server_round))
                contents[key] = (content, content_bytes(content))
            content, nbytes = contents[key]
            if record:
                self.ledger.record(server_round, str(node_id), DOWN, nbytes)
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages

    # ------------------------------------------------------------------ the exchange
    def _exchange(self, grid: Grid, server_round: int, messages: list[Message]) -> Iterator[Message]:
        """Send the round's downlinks; yield replies as they come, until all are in or ``round-timeout`` has passed.

        A generator, so that :meth:`aggregate_train` adds each reply to the mean and drops it
        before the next arrives: the server holds no round's worth of replies.

        A node that answers that it could not sync (it restarted and lost the model it held,
        or its copy is corrupt) is sent the full model at once and answers again within the
        round, so it trains in the round it was picked for instead of sitting it out. Once
        per node and round: a node that cannot apply the full model is not asked again.
        """
        deadline = time.monotonic() + self.run.round_timeout
        self._sent, self._resent = {}, set()
        pending = self._push(grid, server_round, messages)
        while pending:
            pulled = list(grid.pull_messages(sorted(pending)))
            pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
            pending |= self._push(grid, server_round, self._resync(server_round, pulled))
            yield from pulled
            del pulled
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        if pending:
            silent = sorted(self._sent[i] for i in pending)
            log(WARNING, "round %d: no reply within %gs from node(s) %s", server_round, self.run.round_timeout, _ids(silent))

    def _push(self, grid: Grid, server_round: int, messages: list[Message]) -> set[str]:
        """Push ``messages``; returns their ids, and keeps which node each went to (see :meth:`_node_of`)."""
        if not messages:
            return set()
        returned = list(grid.push_messages(messages))
        pushed = {i for i in returned if i}
        in_order = returned if len(returned) == len(messages) else [None] * len(messages)
        for message, by_position in zip(messages, in_order):
            message_id = _pushed_id(message, pushed, by_position)
            if message_id:
                self._sent[message_id] = message.metadata.dst_node_id
            else:
                log(WARNING, "round %d: the message to node %s could not be sent", server_round, message.metadata.dst_node_id)
        return pushed

    def _resync(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Full-model downlinks for the nodes in ``replies`` that could not sync, unless resent already."""
        lost = {self._node_of(r) for r in replies if not r.has_error() and is_sync_error(r.content)}
        nodes = sorted(lost - self._resent)
        if not nodes:
            return []
        self._resent.update(nodes)
        log(INFO, "round %d: node(s) %s could not sync; resending the full model", server_round, _ids(nodes))
        return self._downlinks(server_round, [(node, Downlink(FULL, self.server_model.round)) for node in nodes])

    def _node_of(self, reply: Message) -> int:
        """The node ``reply`` answers for: the one its message was sent to.

        Not ``reply.metadata.src_node_id``: a reply Flower makes itself (node unavailable,
        reply expired) comes from the SuperLink, so it would name the SuperLink's id (1).
        """
        return self._sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, screen and tally each reply as it comes (:class:`fedmud.rounds.RoundTally`); merge the mean.

        No reply is kept once the median norm bound is known (in a round without history the
        valid replies' decoded values wait for the round's own median): what is left of one is
        its node and loss. The merged model is the server model's; no ArrayRecord of it is built.
        """
        server = self.server_model
        counts = {"rejected": 0, "failed": 0, "resync": 0, **dict.fromkeys(EVENTS, 0), MERGE_REFUSED: 0}
        seed = round_seed(self.run.seed, server_round)
        tally, losses = RoundTally(server, seed), {}
        uploaded: set[str] = set()  # a node's first upload is the one that counts, once a round
        busy = 0.0  # seconds spent here, not waiting for replies
        for reply in replies:
            started = time.monotonic()
            valid = self._read_reply(server_round, seed, reply, counts, uploaded)
            if valid is not None:
                node, screened, losses[node] = valid
                tally.add(node, screened)
            busy += time.monotonic() - started
        started = time.monotonic()
        accepted, weights = [], {}
        for node, screened in tally.close():
            for event, reason in zip(screened.events, screened.reasons):
                counts[event] += 1
                log(WARNING, "round %d: node %s: %s", server_round, node, reason)
            if not screened.dropped:
                accepted.append(node)
                weights[node] = screened.weight
        target = server.round  # what every replying client now holds
        if not tally.enough:
            log(
                WARNING,
                "round %d skipped: %d valid replies, min-replies is %d (rejected %d, failed %d, resync %d)",
                server_round, len(accepted), self.run.min_replies, counts["rejected"], counts["failed"], counts["resync"],
            )
        merged = server.merge_mean(server_round, seed, tally.mean_to_merge(), self._population)
        if server.refused:
            counts[MERGE_REFUSED] = 1
            log(WARNING, "round %d skipped: %s; the model stays as it was", server_round, server.refused)
        for node, _ in tally.outcomes:  # a dropped reply's node did receive this round's model
            server.records.synced(node, target)
        total = sum(weights.values())
        metrics = MetricRecord(
            {
                "accepted": merged,
                **counts,
                "train-loss": sum(losses[n] * w for n, w in weights.items()) / total if total else float("nan"),
            }
        )
        self._round_stats[server_round] = fields_of(metrics)
        self._round_seconds["aggregate_s"] = busy + time.monotonic() - started
        return None, metrics

    def _read_reply(
        self, server_round: int, seed: int, reply: Message, counts: dict, uploaded: set[str]
    ) -> tuple[str, Screened, float] | None:
        """One reply: counted, validated and screened; (node, screened, train-loss) for a valid
        one, None for a reply that is left out (its count says why)."""
        server, node = self.server_model, str(self._node_of(reply))
        if reply.has_error():
            counts["failed"] += 1
            server.records.unknown(node)
            log(WARNING, "round %d: node %s failed: %s", server_round, node, reply.error.reason)
            return None
        self.ledger.record(server_round, node, UP, content_bytes(reply.content))
        self._add_seconds(reply_seconds(reply.content))
        if is_sync_error(reply.content):
            counts["resync"] += 1
            server.records.unknown(node)
            what = "resent the full model this round" if int(node) in self._resent else "it gets the full model next"
            log(WARNING, "round %d: node %s could not sync; %s", server_round, node, what)
            return None
        if node in uploaded:
            counts["rejected"] += 1
            log(WARNING, "round %d: rejected a second upload from node %s: a node counts once a round", server_round, node)
            return None
        uploaded.add(node)
        try:
            payload, examples = read_upload(reply.content, server.codec, server_round, self.max_upload_bytes)
            screened = server.screen(seed, payload, examples)  # max-examples, update-norm-bound
        except PayloadError as err:
            counts["rejected"] += 1
            server.records.unknown(node)
            log(WARNING, "round %d: rejected reply from node %s: %s", server_round, node, err)
            return None
        return node, screened, float(reply.content.metric_records["metrics"]["train-loss"])

    def _add_seconds(self, seconds: dict[str, float]) -> None:
        """Add a reply's reported seconds to the round's sums; a value above ``round-timeout``
        (no client of this round took longer) is left out, so the sums stay finite."""
        for key, value in seconds.items():
            if value <= self.run.round_timeout:
                name = "client_train_s" if key == "train-s" else "client_s"
                self._round_seconds[name] = self._round_seconds.get(name, 0.0) + value

    # ------------------------------------------------------------------ secure aggregation
    def secure_train(self, grid: Grid, server_round: int, plans: list[tuple[int, Downlink]]) -> MetricRecord:
        """The round as Flower's SecAgg+ (:mod:`server.secure`): the server gets the weighted mean
        of the updates of the clients that answered, never one client's, and merges it.

        What the server cannot check in a masked reply (finiteness, size, the weight) is bounded
        by the protocol's clipping range and the weight cap the clients apply; a node that drops
        out, or cannot sync, is left out of the mean and gets the full model next time.
        """
        server = self.server_model
        seed = round_seed(self.run.seed, server_round)
        downlinks = {m.metadata.dst_node_id: m.content for m in self._downlinks(server_round, plans, record=False)}
        bound, numel = self._secure_bound(), server.codec.layout.numel
        result = secure_round(grid, self.ledger, self.run, server.dp, server_round, downlinks, self._population, numel, seed, bound)
        started = time.monotonic()
        target = server.round  # what every client that answered holds now
        nodes = result.merged_nodes if result.mean_update is not None else []
        refused = "" if result.error else result.refused or check_mean_update(
            result.mean_update, bound + result.norm_slack if bound > 0 else 0.0, numel, result.value_range
        )
        if result.error or refused:
            log(WARNING, "round %d skipped: %s", server_round, result.error or refused)
            nodes = []
        elif len(nodes) < self.run.min_replies:
            log(WARNING, "round %d skipped: %d clients in the sum, min-replies is %d", server_round, len(nodes), self.run.min_replies)
        count = len(nodes) if len(nodes) >= self.run.min_replies else 0
        merged = server.merge_secure(server_round, seed, result.mean_update if count else None, count, self._population)
        if server.refused:
            log(WARNING, "round %d skipped: %s; the model stays as it was", server_round, server.refused)
        for node in nodes:
            server.records.synced(str(node), target)
        left_out = sorted(set(downlinks) - set(result.merged_nodes))
        if left_out:
            log(WARNING, "round %d: node(s) %s dropped out of secure aggregation", server_round, _ids(left_out))
        for node in sorted(set(downlinks) - set(nodes)):
            server.records.unknown(str(node))
        self._add_seconds(result.seconds)
        counts = {**dict.fromkeys(EVENTS, 0), NORM_REJECTED: int(bool(refused)), MERGE_REFUSED: int(bool(server.refused))}
        failed = len(downlinks) - len(result.merged_nodes)
        metrics = MetricRecord({"accepted": merged, "failed": failed, "rejected": 0, "resync": 0, **counts})
        self._round_stats[server_round] = fields_of(metrics)
        self._round_seconds["aggregate_s"] = time.monotonic() - started
        return metrics

    def _secure_bound(self) -> float:
        """The norm every honest update keeps under secure aggregation, so the mean must too:
        the update-norm bound, or the DP clip when no client adds noise (0: none)."""
        bounds, dp = [], self.server_model.dp
        if self.run.bounds.update_norm_bound > 0:
            bounds.append(self.run.bounds.update_norm_bound)
        if dp.on and dp.client_noise_std == 0:
            bounds.append(dp.clip)
        return min(bounds, default=0.0)

    # ------------------------------------------------------------------ the rounds
    # ------------------------------------------------------------------ Flower's Strategy, the rest
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        """No federated evaluation: the server evaluates the global model on held-out data (:meth:`evaluate`)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        """The run's settings are logged by ``server.app`` when it starts (the plan, the codecs, DP)."""

    def start(self, *args, **kwargs):
        """Not used: :meth:`run_rounds` drives the rounds (it resumes from a checkpoint and pushes,
        pulls and puts down every message itself)."""
        raise NotImplementedError("FedMUD's rounds are driven by run_rounds(grid, first_round), not Strategy.start")

    def run_rounds(self, grid: Grid, first_round: int) -> None:
        """Rounds ``first_round`` .. ``run.rounds``: train, aggregate, evaluate, checkpoint.

        Each step is timed (:data:`fedmud.results.ROUND_PARTS`) into the round's row, beside the seconds
        the clients report (``client_train_s``, ``client_s``: summed over the replies).
        """
        if first_round == 1:
            self.evaluate(0)
            self._write_results()
        for server_round in range(first_round, self.run.rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, self.run.rounds)
            self._round_seconds = {}
            started = clock = time.monotonic()

            def lap(part: str) -> None:
                nonlocal clock
                now = time.monotonic()
                self._round_seconds[part] = now - clock
                clock = now

            if self.run.privacy.secure_aggregation:
                plans = self._plans(server_round, grid)
                lap("plan_s")
                metrics = self.secure_train(grid, server_round, plans)
            else:
                messages = self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
                lap("plan_s")
                _, metrics = self.aggregate_train(server_round, self._exchange(grid, server_round, list(messages)))
            lap("clients_s")
            self._round_seconds["clients_s"] -= self._round_seconds["aggregate_s"]  # set by aggregate_train
            log(INFO, "\t└──> %s", dict(metrics))
            self.evaluate(server_round)
            lap("evaluate_s")
            save_checkpoint(self.run_dir, self.server_model, self.ledger, [row.as_dict() for row in self.history])
            lap("checkpoint_s")
            row = self.history[-1] = self.history[-1].replace(
                round_s=time.monotonic() - started, wall_s=time.monotonic() - self._started, **self._round_seconds
            )
            self._write_results()
            log(INFO, "round %d took %s", server_round, describe_round_time(row))

    def _write_results(self) -> None:
        (self.run_dir / "results.json").write_text(to_json(self.history))
        self.ledger.save(self.run_dir / "ledger.json")

    def evaluate(self, server_round: int) -> MetricRecord:
        """Centralised evaluation on the held-out split; logs the round and appends its row
        (written to results.json by :meth:`_write_results`)."""
        loss, accuracy = self.server_model.evaluate(self._test_loader)
        round_bytes = self.ledger.round_totals(server_round)
        total = self.ledger.totals()
        dense = self.ledger.dense_equivalent()
        row = RoundResult(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            up_bytes=round_bytes[UP],
            down_bytes=round_bytes[DOWN],
            cum_up_bytes=total[UP],
            cum_down_bytes=total[DOWN],
            dense_cum_up_bytes=dense[UP],
            dense_cum_down_bytes=dense[DOWN],
            wall_s=time.monotonic() - self._started,
            **self._round_stats.get(server_round, {}),
        )
        dp = self.server_model.dp
        if dp.on:  # every round sampled counts, merged or not, at the (σ, q) it ran at: ε survives any resume
            row = row.replace(**(dp.round_record() if server_round > 0 else {}))
            row = row.replace(epsilon=accounted_epsilon([*self.history, row], dp.delta))
        self.history.append(row)
        for key in ("accuracy", "loss", "up_bytes", "down_bytes", "cum_up_bytes", "cum_down_bytes"):
            self.writer.add_scalar(key, getattr(row, key), server_round)
        self.writer.flush()
        if row.epsilon is not None:
            self.writer.add_scalar("epsilon", row.epsilon, server_round)
            log(INFO, "round %d: ε = %.4g at δ = %g", server_round, row.epsilon, self.server_model.dp.delta)
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
        diverged = divergence(self.history)
        if diverged:
            log(WARNING, "round %d: the model is %s", server_round, diverged["reason"])
        return MetricRecord({"accuracy": accuracy, "loss": loss})


def server_seconds(row: RoundResult) -> float:
    """A round's seconds in the server's own work (:data:`SERVER_PARTS`; an untimed part counts 0)."""
    return sum(getattr(row, part) or 0.0 for part in SERVER_PARTS)


def describe_round_time(row: RoundResult) -> str:
    """'5.31 s: clients 4.10 s (training 3.52 s summed over the replies), evaluation 0.40 s, server 0.81 s'."""
    server = server_seconds(row)
    training = f" (training {row.client_train_s:.2f} s summed over the replies)" if row.client_train_s is not None else ""
    return (
        f"{row.round_s or 0.0:.2f} s: clients {row.clients_s or 0.0:.2f} s{training}, "
        f"evaluation {row.evaluate_s or 0.0:.2f} s, server {server:.2f} s"
    )


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.3f} MB"


def _ids(nodes: Iterable[int]) -> str:
    return ", ".join(map(str, nodes))


def _pushed_id(message: Message, pushed: set[str], by_position: str | None) -> str | None:
    """The id ``Grid.push_messages`` gave ``message``.

    Flower 1.39's grids write it into the message's metadata; failing that, the list
    they return keeps the order of the messages (``None`` for one not pushed).
    """
    own = message.metadata.message_id
    return own if own in pushed else by_position
