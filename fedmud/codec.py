"""Named tensors <-> an encoded upload, with the bytes counted where they are produced.

Both parties derive the same :class:`~fedmud.model.UploadLayout` from the run
config, so names and shapes never travel: an upload is a few flat arrays (its
*parts*) in layout order. That keeps per-message framing constant and lets
validation be a handful of size/dtype/finiteness checks.

Schemes (``Codec.scheme``):

=========  =====================================  =====================  ==========
scheme     parts                                  bytes per value        encodes
=========  =====================================  =====================  ==========
float32    ``payload`` float32                    4                      the values
float16    ``payload`` float16                    2                      residual
int8       ``payload`` int8, ``scales`` float32   1 + 4 per chunk        residual
topk       ``values`` float32, ``indices`` int32  8 per kept value       residual
=========  =====================================  =====================  ==========

The lossy schemes encode the *residual* against a reference both parties know
(the round-start values: the global model's dense tensors and the seed-drawn
factors), so the server decodes ``reference + residual``. ``int8`` scales each
chunk (≤ 1024 values of one tensor) symmetrically by its largest magnitude
(nearest rounding);
``topk`` keeps the ``k`` largest magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

SCHEMES = ("float32", "float16", "int8", "topk")
INT8_CHUNK = 1024
Parts = dict[str, np.ndarray]


@dataclass(frozen=True)
class UploadLayout:
    """Names and shapes of everything a client uploads, in wire order (both sides derive it)."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)


class PayloadError(ValueError):
    """A payload that must not reach the model; the message says why."""


@dataclass
class CodecStats:
    """Counted where the compression happens (cf. PowerSGD's hook state)."""

    payloads: int = 0
    values: int = 0
    payload_bytes: int = 0


def topk_count(numel: int, dense_numel: int, ratio: float) -> int:
    """Values ``topk`` keeps so that it sends ``ratio`` of dense float32 bytes (8 bytes per value).

    Never more than ``numel // 2``: beyond that, values and indices (8 bytes each) would cost
    more than sending all ``numel`` values as float32 (4 bytes each).
    """
    return max(1, min(numel // 2, math.floor(ratio * dense_numel * 4 / 8)))


@dataclass
class Codec:
    layout: UploadLayout
    scheme: str = "float32"
    k: int = 0  # values kept by ``topk``
    stats: CodecStats = field(default_factory=CodecStats)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise PayloadError(f"codec {self.scheme!r} is not supported; choose one of {', '.join(SCHEMES)}")
        if self.scheme == "topk" and not 0 < self.k <= self.layout.numel:
            raise PayloadError(f"topk needs 0 < k <= {self.layout.numel}, got k={self.k}")
        # int8 chunks: at most INT8_CHUNK values, never across two tensors (their scales differ)
        starts, offset = [], 0
        for _, shape in self.layout.entries:
            size = math.prod(shape)
            starts.extend(range(offset, offset + size, INT8_CHUNK))
            offset += size
        self._chunk_starts = np.asarray(starts, dtype=np.int64)
        self._chunk_sizes = np.diff(np.append(self._chunk_starts, offset))

    # ------------------------------------------------------------------ layout
    @property
    def residual(self) -> bool:
        """Whether the codec encodes values relative to the round-start reference."""
        return self.scheme != "float32"

    @property
    def parts(self) -> dict[str, tuple[np.dtype, int]]:
        """Name -> (dtype, size) of every array an upload holds."""
        n = self.layout.numel
        if self.scheme == "float32":
            return {"payload": (np.dtype(np.float32), n)}
        if self.scheme == "float16":
            return {"payload": (np.dtype(np.float16), n)}
        if self.scheme == "int8":
            return {"payload": (np.dtype(np.int8), n), "scales": (np.dtype(np.float32), self._chunk_starts.size)}
        return {"values": (np.dtype(np.float32), self.k), "indices": (np.dtype(np.int32), self.k)}

    @property
    def payload_nbytes(self) -> int:
        return sum(dtype.itemsize * size for dtype, size in self.parts.values())

    def flatten(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        """``state`` in layout order as one float32 vector."""
        parts = []
        for name, shape in self.layout.entries:
            tensor = state[name]
            if tuple(tensor.shape) != shape:
                raise PayloadError(f"{name} has shape {tuple(tensor.shape)}, the layout says {shape}")
            parts.append(tensor.detach().reshape(-1).to("cpu", torch.float32))
        return torch.cat(parts).numpy()

    def unflatten(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """Split a float32 vector back into named tensors."""
        if flat.shape != (self.layout.numel,):
            raise PayloadError(f"vector shape is {flat.shape}, expected ({self.layout.numel},)")
        tensor = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
        out, offset = {}, 0
        for name, shape in self.layout.entries:
            size = math.prod(shape)
            out[name] = tensor[offset : offset + size].reshape(shape)
            offset += size
        return out

    # ------------------------------------------------------------------ encode / decode
    def encode(self, values: np.ndarray) -> Parts:
        """Encode a float32 vector: the values (``float32``) or a residual (lossy schemes)."""
        values = np.asarray(values, dtype=np.float32)
        if self.scheme == "float32":
            out = {"payload": values.copy()}
        elif self.scheme == "float16":
            out = {"payload": values.astype(np.float16)}
        elif self.scheme == "int8":
            scales = (np.maximum.reduceat(np.abs(values), self._chunk_starts) / 127.0).astype(np.float32)
            safe = np.repeat(np.where(scales > 0, scales, 1.0), self._chunk_sizes)
            q = np.clip(np.rint(values / safe), -127, 127).astype(np.int8)
            out = {"payload": q, "scales": scales}
        else:
            idx = np.argpartition(np.abs(values), -self.k)[-self.k :]
            idx.sort()
            out = {"values": values[idx].astype(np.float32), "indices": idx.astype(np.int32)}
        self.stats.payloads += 1
        self.stats.values += values.size
        self.stats.payload_bytes += sum(a.nbytes for a in out.values())
        return out

    def validate(self, parts: Mapping[str, np.ndarray]) -> Parts:
        """``parts`` if they are a well-formed upload, else raise PayloadError saying what is wrong."""
        expected = self.parts
        if not isinstance(parts, Mapping):
            raise PayloadError(f"upload is a {type(parts).__name__}, expected arrays {sorted(expected)}")
        if set(parts) != set(expected):
            raise PayloadError(f"upload holds {sorted(parts)}, expected {sorted(expected)} for codec {self.scheme}")
        for name, (dtype, size) in expected.items():
            array = parts[name]
            if not isinstance(array, np.ndarray):
                raise PayloadError(f"{name} is a {type(array).__name__}, expected a numpy array")
            if array.dtype != dtype:
                raise PayloadError(f"{name} dtype is {array.dtype}, expected {dtype}")
            if array.ndim != 1 or array.size != size:
                raise PayloadError(f"{name} shape is {array.shape}, expected ({size},)")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise PayloadError(f"{name} has {int((~np.isfinite(array)).sum())} non-finite values")
        if self.scheme == "topk":
            idx = parts["indices"]
            if idx.size and (idx.min() < 0 or idx.max() >= self.layout.numel):
                raise PayloadError(f"indices must lie in [0, {self.layout.numel - 1}]")
            if np.unique(idx).size != idx.size:
                raise PayloadError("indices repeat")
        if self.scheme == "int8":
            if (parts["payload"] == -128).any():  # the encoder never sends it; with a large scale it overflows
                raise PayloadError("payload holds -128; int8 values must lie in [-127, 127]")
            scales = parts["scales"]
            if (scales < 0).any():
                raise PayloadError("scales must be non-negative")
            with np.errstate(over="ignore"):
                overflow = ~np.isfinite(scales * np.float32(127))
            if overflow.any():  # the decoded values would be infinite
                raise PayloadError(
                    f"{int(overflow.sum())} scales overflow float32 when multiplied by 127 (largest {scales.max():.3g})"
                )
        return dict(parts)

    def decode_vector(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float32 vector an upload stands for: values (``float32``) or the residual."""
        parts = self.validate(parts)
        if self.scheme in ("float32", "float16"):
            return parts["payload"].astype(np.float32)
        if self.scheme == "int8":
            return parts["payload"].astype(np.float32) * np.repeat(parts["scales"], self._chunk_sizes)
        out = np.zeros(self.layout.numel, dtype=np.float32)
        out[parts["indices"]] = parts["values"]
        return out

    def decode(self, parts: Mapping[str, np.ndarray], reference: np.ndarray | None = None) -> np.ndarray:
        """The uploaded values as a float32 vector: ``reference + residual`` for lossy schemes."""
        vector = self.decode_vector(parts)
        if not self.residual:
            return vector
        if reference is None:
            raise PayloadError(f"codec {self.scheme} decodes a residual and needs the round-start reference")
        with np.errstate(over="ignore"):
            values = (reference.astype(np.float32) + vector).astype(np.float32)
        overflow = int((~np.isfinite(values)).sum())  # finite residuals near float32's limit plus the reference
        if overflow:
            raise PayloadError(f"{overflow} values overflow float32 when added to the reference")
        return values
