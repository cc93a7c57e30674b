"""Server time and peak memory of one round's aggregation against the number of replies.

    python scripts/server_scale.py                               # cnn and resnet18, 10/100/1000 replies (~2 min)
    python scripts/server_scale.py --models cnn --replies 10,100 --out /tmp/scale.json

What it measures: the ServerApp strategy's ``aggregate_train`` (:class:`server.strategy.FedMUD`)
on N real Flower reply messages (``upload_record`` of a float32 upload of the model at the
default decomposition, each with its own random values), consumed one at a time as
``_exchange`` hands them over when it pulls them: each is validated, decoded, screened and
added to the running weighted mean, then dropped; after the last one the mean is merged into
the global model (link coding, digest). Replies are made by a generator, so at most one exists
at a time, as when the SuperLink hands them over; the seconds spent making them are measured
apart and left out.

Reported per (model, N): seconds in aggregation (total and per reply), and the peak of memory
allocated during the round above what was allocated before it (``tracemalloc``: numpy's and
Python's allocations, which is where replies and the mean live), once for the streaming round
and once with the N replies held in a list first (what a strategy that collects a round's
replies before aggregating keeps). The flat memory of the first and the growing memory of the
second are the point. Written as JSON (default ``docs/perf/server_scale.json``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from bench.suites import FLOAT32_UP
from fedmud.config import parse_run_config
from fedmud.ledger import Ledger
from fedmud.rounds import ServerModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("docs/perf/server_scale.json")
MODELS = {"cnn": {**FLOAT32_UP}, "resnet18": {"model": "resnet18", "dataset": "cifar10", **FLOAT32_UP}}  # float32 replies, as made below


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--replies", default="10,100,1000", help="comma-separated reply counts (default 10,100,1000)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, help=f"JSON path (default {DEFAULT_OUT} in the repository)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in MODELS for m in args.models):
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    try:
        args.replies = [int(n) for n in args.replies.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--replies {args.replies!r}: give comma-separated integers")
    if not args.replies or min(args.replies) < 1 or args.threads < 1:
        parser.error("--replies and --threads must be >= 1")
    return args


def one_round(run_config: dict, replies: int, held: bool) -> dict:
    """Aggregate ``replies`` replies in round 1 of a fresh server; seconds and peak bytes."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.strategy import FedMUD
    from fedmud_wire import upload_record
    from tests.federation import reply_from

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as inside a ServerApp
    run = parse_run_config(run_config)
    server = ServerModel(run)
    numel = server.codec.layout.numel
    base = server.codec.layout.flatten(server.model.uploaded_state())
    making = [0.0]

    def make(i: int):
        started = time.perf_counter()
        values = base + np.random.default_rng(i).standard_normal(numel, dtype=np.float32) * 1e-3
        reply = reply_from(100 + i, upload_record(server.codec.pack(server.codec.encode(values)), 40, 0.5, 1, i))
        making[0] += time.perf_counter() - started
        return reply

    with tempfile.TemporaryDirectory() as tmp:
        strategy = FedMUD(run, server, Ledger(), Path(tmp), test_data=[])
        try:
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            started = time.perf_counter()
            stream = [make(i) for i in range(replies)] if held else (make(i) for i in range(replies))
            _, metrics = strategy.aggregate_train(1, stream)
            seconds = time.perf_counter() - started - making[0]
            peak = tracemalloc.get_traced_memory()[1] - before
            tracemalloc.stop()
        finally:
            strategy.writer.close()
    assert metrics["accepted"] == replies, dict(metrics)
    return {"seconds": seconds, "seconds_per_reply": seconds / replies, "peak_bytes": peak, "upload_values": numel}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    cases = []
    for model in args.models:
        one_round(MODELS[model], 2, held=False)  # warm-up: first-call costs (imports, allocator) left out
        for replies in args.replies:
            streamed = one_round(MODELS[model], replies, held=False)
            held = one_round(MODELS[model], replies, held=True)
            cases.append({"model": model, "replies": replies, "streamed": streamed, "held_in_a_list": held})
            print(
                f"{model:9s} {replies:5d} replies: {streamed['seconds']:7.2f} s "
                f"({1e3 * streamed['seconds_per_reply']:.1f} ms/reply), peak {streamed['peak_bytes'] / 1e6:8.1f} MB "
                f"streamed, {held['peak_bytes'] / 1e6:8.1f} MB with the replies held",
                flush=True,
            )
    out = args.out or ROOT / DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/server_scale.py", shlex.join(argv if argv is not None else sys.argv[1:])]).strip()
    out.write_text(json.dumps({"command": command, "threads": args.threads, "cases": cases}, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
