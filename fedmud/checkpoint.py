"""Server checkpoints: written atomically every round, enough to resume bitwise.

A checkpoint holds the server model's own state (:meth:`ServerModel.state_dict`:
global weights and round, the chain store, every client's sync record, the link
code's carried error), the ledger, the metric history, the RNG states and the run config it
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

from .config import ConfigError, RunConfig, run_config_key
from .ledger import Ledger
from .rounds import ServerModel

CHECKPOINT = "checkpoint.pt"
# Keys that must match for a resumed run to be the same run.
_FIXED = (
    "decomposition", "uplink", "model", "task", "seed", "data", "train", "downlink", "downlink_codec", "client_state",
    "init_weights", "privacy",
)


def save_checkpoint(run_dir: Path, server: ServerModel, ledger: Ledger, history: list[dict]) -> Path:
    state = {
        "server": server.state_dict(),
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
    """The checkpoint in ``run_dir``, after checking it was made by the same run configuration.

    A checkpoint made under another configuration is refused with every key that
    differs, named as in the run config, so one attempt shows all there is to fix.
    """
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"resume={str(run_dir)!r} is not allowed; it has no {CHECKPOINT}")
    state = torch.load(path, weights_only=False)
    differences = config_differences(state["run"], asdict(run))
    if differences:
        raise ConfigError(
            f"resume={str(run_dir)!r} is not allowed; its checkpoint was made with another configuration: "
            f"{'; '.join(differences)}. Resume with the checkpoint's values or start a new run"
        )
    return state


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key=saved (this run: now)`` for every fixed setting that differs, named as in the run config.

    A key the checkpoint does not record (made before the key existed) counts as its default,
    the behaviour it was made with.
    """
    defaults = asdict(RunConfig())
    out = []
    for section in _FIXED:
        new = now[section]
        if isinstance(new, dict):  # a nested config: compare field by field
            old = saved.get(section) or {}
            pairs = [((section, name), old.get(name, defaults[section][name]), value) for name, value in new.items()]
        else:
            pairs = [((section,), saved.get(section, defaults[section]), new)]
        out += [f"{run_config_key(path)}={a!r} (this run: {b!r})" for path, a, b in pairs if a != b]
    return out


def restore(state: dict[str, Any], server: ServerModel) -> tuple[Ledger, list[dict]]:
    """Put a loaded checkpoint back into ``server``; returns (ledger, history)."""
    server.load_state_dict(state["server"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return Ledger.from_dict(state["ledger"]), list(state["history"])
