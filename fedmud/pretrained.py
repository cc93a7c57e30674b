"""Pretrained weights as round 0: ``init-weights``, a state_dict file every party loads.

Every party (the server and each client) builds the model from the run seed and then
loads the same file, so the digest, checkpoints and the chain downlink all start from
the pretrained model. A party whose file differs ends with another round-0 model: its
digest differs after the first downlink, and the server sends it the full model.

The file is what ``torch.save(model.state_dict(), path)`` writes for the undecomposed
model (or a dict holding it under ``state_dict`` or ``model``), read with
``torch.load(weights_only=True)``: no code in it runs. A model factory that loads its
own pretrained weights needs no file: every party calls it, and the digest checks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError


def resolve(path: str) -> Path:
    """``init-weights`` as an absolute path (``~`` expanded, relative to the current directory)."""
    return Path(path).expanduser().resolve()


@lru_cache(maxsize=2)
def _read(path: str, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file torch cannot read: name it and say why
        raise ConfigError(
            f"init-weights={path!r} is not allowed: it is not a state_dict torch.load can read ({err}); "
            "save one with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"init-weights={path!r} is not allowed: it holds a {type(state).__name__}, not a mapping of tensor "
            "names to tensors; save one with torch.save(model.state_dict(), path)"
        )
    return dict(state)


def read_state(path: str) -> dict[str, torch.Tensor]:
    """The state_dict in ``path`` (read once per process while the file is unchanged)."""
    file = resolve(path)
    if not file.is_file():
        raise ConfigError(f"init-weights={path!r} is not allowed: no such file ({file})")
    stat = file.stat()
    return _read(str(file), stat.st_mtime_ns, stat.st_size)


def first_mismatch(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor (in the model's order) the file lacks or holds in another shape or kind,
    then the first the model lacks; None when they match."""
    for name, tensor in own.items():
        if name not in given:
            return f"{name!r} is missing from the file (the model's is {tuple(tensor.shape)})"
        theirs = given[name]
        if tuple(theirs.shape) != tuple(tensor.shape):
            return f"{name!r} has shape {tuple(theirs.shape)} in the file, {tuple(tensor.shape)} in the model"
        if theirs.is_floating_point() != tensor.is_floating_point():
            return f"{name!r} is {theirs.dtype} in the file, {tensor.dtype} in the model"
    extra = [n for n in given if n not in own]
    if extra:
        return f"{extra[0]!r} is in the file but not in the model"
    return None


@torch.no_grad()
def load_init_weights(model: nn.Module, path: str) -> None:
    """Copy the file's tensors into ``model`` (undecomposed), in the model's dtypes.

    Raises :class:`ConfigError` naming the file and the first mismatching tensor when the
    file's names or shapes are not the model's, or the first tensor holding NaN or ±inf once
    cast to the model's dtype.
    """
    given = read_state(path)
    own = model.state_dict()
    mismatch = first_mismatch(own, given)
    if mismatch is not None:
        differ = sum(
            1 for n, t in own.items()
            if n not in given or tuple(given[n].shape) != tuple(t.shape)
            or given[n].is_floating_point() != t.is_floating_point()
        )
        differ += sum(1 for n in given if n not in own)
        raise ConfigError(
            f"init-weights={path!r} does not match the model: {mismatch} ({differ} of the model's {len(own)} "
            f"tensors differ); allowed: a state_dict of this model, e.g. torch.save(model.state_dict(), path)"
        )
    cast = {n: given[n].to(t.dtype) for n, t in own.items()}
    bad = first_non_finite(cast)
    if bad is not None:
        raise ConfigError(f"init-weights={path!r} is not allowed: {bad}; allowed: finite weights")
    model.load_state_dict(cast)


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first floating tensor of ``state`` holding NaN or ±inf, described; None when all are finite.

    Checked in the model's dtypes: a float64 1e300 is finite in the file and inf in a float32 model.
    """
    for name, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                nan = int(torch.isnan(tensor).sum())
                return (
                    f"{name!r} holds {tensor.numel() - int(finite.sum())} non-finite of its {tensor.numel()} values "
                    f"({nan} NaN) as {tensor.dtype}, the model's dtype"
                )
    return None
