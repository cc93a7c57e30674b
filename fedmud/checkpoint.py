"""Server checkpoints: written atomically every round, enough to resume bitwise, read without running code.

A checkpoint holds the server model's own state (:meth:`ServerModel.state_dict`:
global weights and round, the chain store, every client's sync record, the link
code's carried error), the ledger, the metric history, the RNG states and the run config it
was made under. It is written to a temporary file and renamed over the old one,
so a crash leaves either the previous checkpoint or the new one, never half.

It holds only tensors and plain values (numpy arrays and RNG states are stored as
tensors and lists), so it is read with ``torch.load(weights_only=True)``: a pickle
planted in the file is refused, not run. A sha256 of its content (:func:`content_digest`)
is stored beside it, so a file damaged after it was written, or with non-finite
weights, is refused with one message naming the file, never resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, RunConfig, run_config_key
from .ledger import Ledger
from .rounds import ServerModel

CHECKPOINT = "checkpoint.pt"
FORMAT = 2  # 2: readable with weights_only=True, with a content digest
# Keys that must match for a resumed run to be the same run.
_FIXED = (
    "decomposition", "uplink", "model", "seed", "data", "train", "downlink", "downlink_codec", "client_state",
    "anchor_codec", "init_weights", "privacy",
)
# What a checkpoint holds, section by section (read before anything in it is used).
_LAYOUT = {
    "": ("format", "server", "ledger", "history", "rng", "run", "digest"),
    "server": ("round", "global_state", "chain", "chain_oldest_kept", "records"),
    "rng": ("python", "numpy", "torch"),
}


def new_run_dir(parent: Path, name: str) -> Path:
    """``parent/name``, created by this call; ``name-1``, ``name-2``, ... when another run holds it.

    The directory is made exclusively (``mkdir`` fails when it exists), so two runs started
    in the same second never write into one directory.
    """
    parent.mkdir(parents=True, exist_ok=True)
    suffix = 0
    while True:
        path = parent / (f"{name}-{suffix}" if suffix else name)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            suffix += 1


def save_checkpoint(run_dir: Path, server: ServerModel, ledger: Ledger, history: list[dict]) -> Path:
    state = {
        "format": FORMAT,
        "server": _server_to_file(server.state_dict()),
        "ledger": _plain(ledger.to_dict()),
        "history": json.loads(json.dumps(history)),  # as results.json has it: plain numbers, copied
        "rng": {"python": random.getstate(), "numpy": _numpy_rng_to_file(), "torch": torch.get_rng_state()},
        "run": asdict(server.run),
    }
    state["digest"] = content_digest(state)
    path = run_dir / CHECKPOINT
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path, run: RunConfig) -> dict[str, Any]:
    """The checkpoint in ``run_dir``, after checking it is intact and was made by the same run configuration.

    Raises :class:`ConfigError` naming the file and what is wrong when it cannot be read safely,
    lacks a part, does not match its digest or holds non-finite tensors; naming every key that
    differs when it was made under another configuration (so one attempt shows all there is to
    fix); and when ``num-server-rounds`` is below the round it was made after.
    """
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"resume={str(run_dir)!r} is not allowed; it has no {CHECKPOINT}")
    state = _read(run_dir, path)
    differences = config_differences(state["run"], asdict(run))
    if differences:
        raise ConfigError(
            f"resume={str(run_dir)!r} is not allowed; its checkpoint was made with another configuration: "
            f"{'; '.join(differences)}. Resume with the checkpoint's values or start a new run"
        )
    done = state["server"]["round"]
    if run.rounds < done:
        raise ConfigError(
            f"{run_config_key(('rounds',))}={run.rounds} is not allowed with resume={str(run_dir)!r}: its checkpoint "
            f"is after round {done}, and a run cannot end before it; allowed: {done} or more"
        )
    return state


def _read(run_dir: Path, path: Path) -> dict[str, Any]:
    """The checkpoint in ``path``, read without running code, whole, matching its digest and finite."""

    def damaged(what: str) -> ConfigError:
        return ConfigError(
            f"resume={str(run_dir)!r} is not allowed; its checkpoint {str(path)!r} {what}. "
            "Resume from an intact checkpoint, or start a new run"
        )

    if path.stat().st_size == 0:
        raise damaged("is empty")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever the file holds, the run stops with one message
        named = re.search(r"GLOBAL ([\w.]+)", str(err))  # the weights-only unpickler refused to import it
        if named:
            raise damaged(
                f"refers to {named.group(1)}, which a checkpoint never holds (planted, or written by a FedMUD "
                "before checkpoints were read safely); nothing in it was run"
            ) from None
        raise damaged(f"cannot be read: it is truncated or not a checkpoint ({_load_error(err)})") from None
    missing = _missing_parts(state)
    if missing:
        raise damaged(f"lacks {', '.join(missing)} (written by an older FedMUD or not a FedMUD checkpoint)")
    try:
        digest = content_digest({k: v for k, v in state.items() if k != "digest"})
    except TypeError as err:
        raise damaged(f"holds {err}") from None
    if digest != state["digest"]:
        raise damaged("does not match its digest: it was changed or damaged after it was written")
    bad = _first_non_finite(state["server"])
    if bad is not None:
        raise damaged(f"holds non-finite values in {bad}")
    return state


def _load_error(err: Exception) -> str:
    """The line of a ``torch.load`` failure that says what is wrong (the weights-only unpickler's own reason)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0].split(". This is an internal miniz error")[0] if lines else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _missing_parts(state: Any) -> list[str]:
    """The parts of a checkpoint (:data:`_LAYOUT`) ``state`` lacks, as ``'server.round'``."""
    if not isinstance(state, dict):
        return [f"everything (it holds a {type(state).__name__}, not a checkpoint's dict)"]
    missing = []
    for section, keys in _LAYOUT.items():
        part = state if not section else state.get(section)
        if section and not isinstance(part, dict):
            if section in state:
                missing.append(f"{section!r} (a {type(part).__name__}, not a dict)")
            continue  # missing itself: named with the top level
        missing += [repr(f"{section}.{key}" if section else key) for key in keys if key not in part]
    return missing


def _first_non_finite(server: dict[str, Any]) -> str | None:
    """Where the first NaN or ±inf among the server state's floating tensors is, e.g. ``global_state['fc.weight']``."""
    for where, tensor in _tensors(server, ""):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return where
    return None


def _tensors(obj: Any, where: str):
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{where}[{key!r}]" if where else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{where}[{i}]")


def content_digest(state: Any) -> str:
    """sha256 of a canonical serialisation of ``state``: every value tagged with its type, every
    tensor with its dtype, shape and bytes, dicts in their order. Raises ``TypeError`` naming a
    value that is neither a tensor nor a plain value (what ``weights_only`` loading refuses)."""
    h = hashlib.sha256()
    _feed(h, state, "checkpoint")
    return h.hexdigest()


def _feed(h, obj: Any, where: str) -> None:
    if obj is None:
        h.update(b"N")
    elif type(obj) is bool:
        h.update(b"T" if obj else b"F")
    elif type(obj) is int:
        text = str(obj).encode()
        h.update(b"i%d:" % len(text) + text)
    elif type(obj) is float:
        h.update(b"f" + struct.pack("<d", obj))
    elif type(obj) in (str, bytes):
        data = obj.encode() if type(obj) is str else obj
        h.update((b"s" if type(obj) is str else b"b") + b"%d:" % len(data) + data)
    elif type(obj) in (list, tuple):
        h.update((b"l" if type(obj) is list else b"t") + b"%d:" % len(obj))
        for i, value in enumerate(obj):
            _feed(h, value, f"{where}[{i}]")
    elif type(obj) is dict:
        h.update(b"d%d:" % len(obj))
        for key, value in obj.items():
            _feed(h, key, f"{where} key")
            _feed(h, value, f"{where}[{key!r}]")
    elif type(obj) is torch.Tensor:
        tensor = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"x{tensor.dtype}|{tuple(obj.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    else:
        raise TypeError(f"a {type(obj).__name__} at {where}")


def _plain(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers (what ``weights_only`` loading accepts)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(value) for value in obj)
    return obj


def _server_to_file(state: dict[str, Any]) -> dict[str, Any]:
    """The server state with its chain's numpy arrays (link parts, HRP bases) as tensors."""
    as_tensor = lambda a: None if a is None else torch.from_numpy(np.array(a, copy=True))  # noqa: E731
    chain = [
        (r, seed, {k: as_tensor(v) for k, v in parts.items()}, as_tensor(basis)) for r, seed, parts, basis in state["chain"]
    ]
    return {**state, "chain": chain, "records": _plain(state["records"])}


def _server_from_file(state: dict[str, Any]) -> dict[str, Any]:
    as_array = lambda t: None if t is None else t.numpy()  # noqa: E731
    chain = [
        (r, seed, {k: as_array(v) for k, v in parts.items()}, as_array(basis)) for r, seed, parts, basis in state["chain"]
    ]
    return {**state, "chain": chain}


def _numpy_rng_to_file() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _numpy_rng_from_file(saved: dict[str, Any]) -> tuple:
    return (saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"], saved["gauss"])


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key=saved (this run: now)`` for every fixed setting that differs, named as in the run config.

    A key the checkpoint does not record (made before the key existed) counts as its default,
    the behaviour it was made with.
    """
    defaults = asdict(RunConfig())
    if "task" in saved:  # made before the task key moved into the data section (2026-12)
        saved = {**saved, "data": {"task": saved["task"], **(saved.get("data") or {})}}
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
    server.load_state_dict(_server_from_file(state["server"]))
    random.setstate(state["rng"]["python"])
    np.random.set_state(_numpy_rng_from_file(state["rng"]["numpy"]))
    torch.set_rng_state(state["rng"]["torch"])
    return Ledger.from_dict(state["ledger"]), list(state["history"])
