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

import torch
from torch.utils.data import DataLoader
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.common import log

from fedmud.config import RunConfig, parse_run_config
from fedmud.data import client_loader
from fedmud.rounds import ClientModel, ModelFactory, SyncError
from fedmud.task import Task
from fedmud.training import describe_device
from fedmud_wire import read_downlink, sync_error_record, upload_record

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


@app.train()
def train(msg: Message, context: Context) -> Message:
    return run_client_round(msg, context)


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
    partition_id = int(context.node_config.get("partition-id", 0))
    client = _client_model(run, model_fn, task)

    keeps_state = run.client_state == "keep"
    held = _held(context) if keeps_state else None  # client-state=none: every download starts at round 0
    if held is not None and run.fault_corrupt_state_round == downlink.server_round:
        for tensor in held[1].values():  # fault injection: a corrupted local copy
            if tensor.is_floating_point():
                tensor.add_(1e-3)
    try:
        state = client.sync(held, downlink.kind, downlink.digest, downlink.full_state, downlink.base_round, downlink.links)
    except SyncError as err:
        log(WARNING, "partition %d: cannot sync (%s); asking for the full model", partition_id, err)
        context.state.array_records.pop(HELD_MODEL, None)
        return Message(content=sync_error_record(downlink.server_round, partition_id), reply_to=msg)
    if keeps_state:
        context.state.array_records[HELD_MODEL] = ArrayRecord(state)
        context.state.config_records[HELD_SYNC] = ConfigRecord({"round": downlink.target_round})

    seed = downlink.round_seed + partition_id
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
    packed = client.codec.pack(payload)
    seconds = {"train-s": train_s, "client-s": time.perf_counter() - started}
    reply = upload_record(packed, len(loader.dataset), loss, downlink.server_round, partition_id, seconds)
    return Message(content=reply, reply_to=msg)
