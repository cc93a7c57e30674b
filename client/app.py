"""ClientApp: sync the global model held in node state, train the decomposed update, upload it.

:func:`run_client_round` is a client's whole round for any model and data; a Flower
app of your own calls it from its ``@app.train()`` with its own model factory and
training loader (see ``examples/custom-app``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from logging import INFO, WARNING

import numpy as np
import torch
from torch.utils.data import DataLoader
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

from fedmud.bounds import bound_reply
from fedmud.config import RunConfig, parse_run_config
from fedmud.data import client_loader
from fedmud.rounds import ClientModel, ModelFactory, SyncError, data_seed
from fedmud.secagg import code_grid
from fedmud.seeds import derive_seed, numpy_rng
from fedmud.task import Task
from fedmud.training import describe_device
from fedmud_wire import (
    downlink_round_seed,
    hide_weight,
    identity_record,
    pack_masked_vector,
    read_downlink,
    secure_upload_record,
    sync_error_record,
    upload_record,
)

app = ClientApp()
HELD_MODEL, HELD_SYNC, HELD_FEEDBACK = "global-model", "global-sync", "error-feedback"


@lru_cache(maxsize=2)
def _client_model(run: RunConfig, model_fn: ModelFactory | None, task: Task | None) -> ClientModel:
    """One ClientModel per (config, factory, task) in this process: built once, reused every round."""
    return ClientModel(run, _training_device(), model_fn, task)


@lru_cache(maxsize=1)
def _training_device() -> torch.device:
    """The device this process trains on, logged once: a node that fell back to the CPU must show it."""
    device, description = describe_device()
    log(INFO, "training device: %s", description)
    return device


def _run_config(context: Context) -> RunConfig:
    run = parse_run_config(context.run_config)
    # In simulation and deployment the node says how many partitions there are.
    partitions = context.node_config.get("num-partitions")
    if partitions is not None and partitions != run.data.num_partitions:
        run = replace(run, data=replace(run.data, num_partitions=int(partitions)))
    return run


def _held(context: Context) -> tuple[int, dict[str, torch.Tensor]] | None:
    """The global model this node kept from its last round, if any."""
    if HELD_MODEL not in context.state.array_records:
        return None
    round_held = int(context.state.config_records[HELD_SYNC]["round"])
    return round_held, context.state.array_records[HELD_MODEL].to_torch_state_dict()


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the rounds that run SecAgg+ (``secure-aggregation=true``):
    their messages carry its config record; any other message goes straight through. The weight
    the mod leaves readable in its reply is blanked: the server gets it only inside the sum. The
    masked vector the mod made (int64 values below the round's modulus) goes packed into
    log2(modulus) bits a value (the server unpacks it before it sums). Flower's quantiser rounds
    with numpy's global generator: in the collect stage it is seeded from the round seed and the
    partition, so a secure run repeats as a plain one does."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    seed = downlink_round_seed(msg.content)
    if seed is not None:
        np.random.seed(derive_seed(seed, "secure-quantisation", str(context.node_config.get("partition-id", 0))) % 2**32)
    reply = secaggplus_mod(msg, context, call_next)
    if reply.has_content():
        hide_weight(reply.content)
        pack_masked_vector(reply.content, int(context.state.config_records[RECORD_KEY_STATE]["mod_range"]))
    return reply


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    return run_client_round(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return identify(msg, context)


def identify(msg: Message, context: Context) -> Message:
    """The answer to the server's partition query: this node's ``partition-id``. The server samples
    partitions with the run's seed, so the same config and seed train the same clients whatever
    node ids Flower gives. Register it in an app of your own with ``@app.query()``."""
    return Message(content=identity_record(int(context.node_config.get("partition-id", 0))), reply_to=msg)


def run_client_round(
    msg: Message,
    context: Context,
    loader_fn: Callable[[int, int, RunConfig], DataLoader] | None = None,
    model_fn: ModelFactory | None = None,
    task: Task | None = None,
) -> Message:
    """One client round: sync the held global model, train the decomposed update, reply.

    ``loader_fn(partition_id, seed, run)``: this client's shuffled training loader,
    ``seed`` changing every round, ``run`` the validated :class:`~fedmud.config.RunConfig`
    (``run.data.num_partitions`` from the node config, ``run.train.batch_size``)
    (default: the config's ``dataset``, partitioned by ``partition``); ``model_fn``: builds the undecomposed model, the same function
    the server uses (default: the config's ``model``); ``task``: loss and metric
    (default: the config's ``task``). Pass the same objects every round (module-level
    functions), so the client's models are built once per process.
    """
    started = time.perf_counter()
    run = _run_config(context)
    downlink = read_downlink(msg.content)
    # the server runs SecAgg+ (secure-aggregation=true): this is its collect stage, and the reply is
    # the update for Flower's mod to mask
    secure = RECORD_KEY_CONFIGS in msg.content.config_records
    partition_id = int(context.node_config.get("partition-id", 0))
    client = _client_model(run, model_fn, task)

    keeps_state = run.client_state == "keep"
    held = _held(context) if keeps_state else None  # client-state=none: every download starts at round 0
    if held is not None and run.fault_corrupt_state_round == downlink.server_round:
        for tensor in held[1].values():  # fault injection: a corrupted local copy
            if tensor.is_floating_point():
                tensor.add_(1e-3)
    try:
        state = client.sync(held, downlink)
    except SyncError as err:
        context.state.array_records.pop(HELD_MODEL, None)
        if secure:  # SecAgg+ has no such reply: drop out; the full model comes next
            raise SyncError(f"partition {partition_id}: cannot sync ({err}); dropping out of this round") from None
        log(WARNING, "partition %d: cannot sync (%s); asking for the full model", partition_id, err)
        return Message(content=sync_error_record(downlink.server_round, partition_id), reply_to=msg)
    if keeps_state:
        context.state.array_records[HELD_MODEL] = ArrayRecord(state)
        context.state.config_records[HELD_SYNC] = ConfigRecord({"round": downlink.target_round})

    seed = data_seed(downlink.round_seed, partition_id)
    if loader_fn is None:
        loader = client_loader(run.data, partition_id, run.train.batch_size, seed=seed)
    else:
        loader = loader_fn(partition_id, seed, run)
    kept = context.state.array_records.get(HELD_FEEDBACK)
    training = time.perf_counter()
    payload, loss, feedback = client.train_round(
        downlink.round_seed, loader, None if kept is None else kept.to_torch_state_dict(), client_id=partition_id
    )
    if client.device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - training
    if feedback is not None:  # error feedback: what the lossy codec has not sent yet
        context.state.array_records[HELD_FEEDBACK] = ArrayRecord(feedback)
    if secure:
        reply = _secure_reply(client, run, downlink.round_seed, payload, len(loader.dataset), started, train_s, partition_id)
        return Message(content=reply, reply_to=msg)
    packed = client.codec.pack(payload)
    seconds = {"train-s": train_s, "client-s": time.perf_counter() - started}
    reply = upload_record(packed, len(loader.dataset), loss, downlink.server_round, partition_id, seconds)
    return Message(content=reply, reply_to=msg)


def _secure_reply(
    client: ClientModel, run: RunConfig, round_seed: int, payload, examples: int, started: float, train_s: float, partition_id: int
):
    """The update as the server would decode it, for SecAgg+ to mask, with the bounds the server
    would apply to a plain reply (:func:`fedmud.bounds.bound_reply`: its weight capped at
    ``max-examples``, 1 under DP; its norm kept within ``update-norm-bound``), since the server
    only ever sees the sum. Under DP it is not clipped again: it was clipped before its noise.
    With ``uplink=int8|int4`` the mod gets the update's codes on the round's shared grid, and its
    weight among them (:class:`fedmud.secagg.CodeGrid`), at weight 1.

    An update that is not finite (or above the bound with ``update-norm-action=reject``) is not
    sent: the client drops out of the round, and the protocol leaves it out of the sum.
    """
    update = client.upload_update(round_seed, payload)
    if not np.isfinite(update).all():
        raise FloatingPointError("the update is not finite (training diverged); dropping out of this round")
    bounded = bound_reply(update, examples, run.bounds, client.dp, reclip=False)
    if bounded.dropped:
        raise ValueError(f"{bounded.reasons[-1]} (update-norm-action=reject): dropping out of this round")
    for reason in bounded.reasons:
        log(WARNING, "%s", reason)
    seconds = {"train-s": train_s, "client-s": time.perf_counter() - started}
    grid = code_grid(run, client.dp, client.codec.layout.numel)
    if grid is None:
        return secure_upload_record(bounded.update, bounded.weight, seconds)
    codes = grid.encode(bounded.update, bounded.weight, round_seed, numpy_rng(round_seed, "secure-rounding", str(partition_id)))
    return secure_upload_record(codes, 1, seconds)
