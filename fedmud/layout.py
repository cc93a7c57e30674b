"""The upload's layout: named tensors <-> one float32 vector, in wire order.

Every party derives the same :class:`UploadLayout` from the model
(:meth:`fedmud.mud.DecomposedModel.upload_layout`); data flows one way, model → vector
(:meth:`UploadLayout.flatten`) → codec (:class:`fedmud.codec.Codec`: vector ↔ coded parts) →
bytes, and back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .errors import PayloadError


@dataclass(frozen=True)
class UploadLayout:
    """Names and shapes of everything a client uploads, in wire order (both sides derive it)."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]
    # norm layers' running statistics: codes below 8 bits send these as int8 (see Codec)
    statistics: frozenset[str] = frozenset()

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)

    def subset(self, names: set[str] | frozenset[str]) -> tuple[UploadLayout, np.ndarray]:
        """The entries named in ``names`` (in layout order) and their indices in the flat vector."""
        entries, index, offset = [], [], 0
        for name, shape in self.entries:
            size = math.prod(shape)
            if name in names:
                entries.append((name, shape))
                index.append(np.arange(offset, offset + size))
            offset += size
        flat = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
        return UploadLayout(tuple(entries)), flat

    def flatten(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        """``state`` in layout order as one float32 vector."""
        parts = []
        for name, shape in self.entries:
            tensor = state[name]
            if tuple(tensor.shape) != shape:
                raise PayloadError(f"{name} has shape {tuple(tensor.shape)}, the layout says {shape}")
            parts.append(tensor.detach().reshape(-1).to("cpu", torch.float32))
        return torch.cat(parts).numpy()

    def unflatten(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """Split a float32 vector back into named tensors."""
        if flat.shape != (self.numel,):
            raise PayloadError(f"vector shape is {flat.shape}, expected ({self.numel},)")
        tensor = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
        out, offset = {}, 0
        for name, shape in self.entries:
            size = math.prod(shape)
            out[name] = tensor[offset : offset + size].reshape(shape)
            offset += size
        return out
