"""Server checkpoints: written atomically every round, enough to resume bitwise.

A checkpoint holds the global weights and round, the chain store, every client's
sync record, the ledger, the metric history, the RNG states and the run config it
was made under. It is written to a temporary file and renamed over the old one,
so a crash leaves either the previous checkpoint or the new one, never half.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, RunConfig
from .ledger import Ledger
from .rounds import ServerModel
from .sync import ChainStore, Link

CHECKPOINT = "checkpoint.pt"
# Keys that must match for a resumed run to be the same run.
_FIXED = ("decomposition", "uplink", "model", "task", "seed", "data", "train", "downlink")


def save_checkpoint(run_dir: Path, server: ServerModel, ledger: Ledger, history: list[dict]) -> Path:
    state = {
        "round": server.round,
        "global_state": server.global_state(),
        "chain": [(link.round, link.seed, link.payload, link.basis) for link in server.chain.links],
        "chain_oldest_kept": server.chain.oldest_kept,
        "records": dict(server.records.held),
        "ledger": ledger.to_dict(),
        "history": history,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "run": asdict(server.run),
    }
    path = run_dir / CHECKPOINT
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path, run: RunConfig) -> dict[str, Any]:
    """The checkpoint in ``run_dir``, after checking it was made by the same run configuration."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"resume={str(run_dir)!r} is not allowed; it has no {CHECKPOINT}")
    state = torch.load(path, weights_only=False)
    saved, now = state["run"], asdict(run)
    for key in _FIXED:
        if saved[key] != now[key]:
            raise ConfigError(
                f"resume={str(run_dir)!r} is not allowed; its checkpoint was made with {key}={saved[key]!r}, "
                f"this run has {now[key]!r}"
            )
    return state


def restore(state: dict[str, Any], server: ServerModel) -> tuple[Ledger, list[dict]]:
    """Put a loaded checkpoint back into ``server``; returns (ledger, history)."""
    server.load(state["round"], state["global_state"])
    server.chain = ChainStore([Link(*link) for link in state["chain"]], state["chain_oldest_kept"])
    server.records.held = dict(state["records"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return Ledger.from_dict(state["ledger"]), list(state["history"])
