"""A float32 vector <-> an encoded upload, with the bytes counted where they are produced.

The vector is the model's upload laid out by :class:`~fedmud.layout.UploadLayout`, which both
parties derive from the run config, so names and shapes never travel: an upload is a few flat
arrays (its *parts*) in layout order; the codec reads the layout only for its tensors' sizes
(a chunk never spans two tensors). That keeps per-message framing constant and lets
validation be a handful of size/dtype/finiteness checks.

Schemes: one table, :data:`SCHEMES` (name -> :class:`Scheme`), read by the config (the
names ``uplink`` and ``downlink-codec`` allow), by :class:`Codec` (parts, encode,
validate, decode); the bench may read it too. Bits per value count the float32 scales (32 bits a
chunk of ``chunk`` values; a tensor's last chunk may be shorter, so a little more):

=========  ==============================================  ==================  =====  ==========
scheme     parts                                           bits per value      chunk  encodes
=========  ==============================================  ==================  =====  ==========
float32    ``payload`` float32                             32                  --     the values
float16    ``payload`` float16                             16                  --     residual
int8       ``payload`` int8, ``scales`` float32            8 + 32/1024 = 8.03  1024   residual
int4       ``payload`` uint8 (2 codes a byte), ``scales``  4 + 32/512 = 4.06   512    residual
int2       ``payload`` uint8 (4 codes a byte), ``scales``  2 + 32/512 = 2.06   512    residual
sign       ``payload`` uint8 (8 bits a byte), ``scales``   1 + 32/512 = 1.06   512    residual
topk       ``values`` float32, ``indices`` int32           64 per kept value   --     residual
=========  ==============================================  ==================  =====  ==========

The lossy schemes encode the *residual* against a reference both parties know (the
round-start values), so the server decodes ``reference + residual``; a chunk is at most ``chunk``
values of one tensor. ``int8``, ``int4`` and ``int2`` are one uniform quantiser
(:class:`Uniform`), ``sign`` is :class:`Sign`; with a generator (``stochastic-rounding``) each
rounds at random, unbiased. Why the chunk sizes, levels and packing are what they are, with the
errors measured: docs/codecs.md.

Packed payloads hold the codes in layout order, the first in a byte's highest bits (as
``np.packbits``); ``int4``/``int2`` send ``u`` = level + ``(codes - 1)/2``. The padding bits
of the last byte must be zero and an ``int4`` code of 15 is refused (so is ``int8``'s -128),
so every payload accepted is one the encoder can produce, up to its scales.
``topk`` keeps the ``k`` largest magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .errors import PayloadError
from .layout import UploadLayout

Parts = dict[str, np.ndarray]
PartSizes = dict[str, tuple[np.dtype, int]]


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


# --------------------------------------------------------------------------- chunks and bit packing
@dataclass(frozen=True, eq=False)
class Chunks:
    """Runs of at most ``size`` values of one tensor, each with its own scale."""

    starts: np.ndarray  # int64 offsets into the upload vector
    sizes: np.ndarray

    @classmethod
    def of(cls, layout: UploadLayout, size: int) -> Chunks:
        """``layout`` cut into chunks of ``size`` values (none when ``size`` is 0)."""
        starts, offset = [], 0
        for _, shape in layout.entries:
            numel = math.prod(shape)
            if size:
                starts.extend(range(offset, offset + numel, size))
            offset += numel
        starts = np.asarray(starts, dtype=np.int64)
        return cls(starts, np.diff(np.append(starts, offset)))

    def __len__(self) -> int:
        return self.starts.size

    def peak(self, values: np.ndarray) -> np.ndarray:
        """Largest magnitude of each chunk."""
        return np.maximum.reduceat(np.abs(values), self.starts) if len(self) else np.zeros(0, values.dtype)

    def mean_abs(self, values: np.ndarray) -> np.ndarray:
        """Mean magnitude of each chunk (summed in float64)."""
        if not len(self):
            return np.zeros(0)
        return np.add.reduceat(np.abs(values), self.starts, dtype=np.float64) / self.sizes

    def spread(self, per_chunk: np.ndarray) -> np.ndarray:
        """One value per chunk, repeated over the chunk's values."""
        return np.repeat(per_chunk, self.sizes)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that hold ``n`` codes of ``bits`` bits (8 // bits codes a byte)."""
    return -(-n // (8 // bits))


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit codes (uint8, each < 2**bits) into bytes, the first in the highest bits."""
    per = 8 // bits
    padded = np.zeros(packed_nbytes(codes.size, bits) * per, dtype=np.uint8)
    padded[: codes.size] = codes
    padded = padded.reshape(-1, per)
    out = np.zeros(padded.shape[0], dtype=np.uint8)
    for slot in range(per):  # a loop over the codes in a byte (at most 8), not over values
        out |= padded[:, slot] << np.uint8(bits * (per - 1 - slot))
    return out


def unpack(payload: np.ndarray, bits: int) -> np.ndarray:
    """Every ``bits``-bit code the bytes hold, padding included (``pack``'s inverse)."""
    per, mask = 8 // bits, np.uint8((1 << bits) - 1)
    out = np.empty((payload.size, per), dtype=np.uint8)
    for slot in range(per):
        out[:, slot] = (payload >> np.uint8(bits * (per - 1 - slot))) & mask
    return out.reshape(-1)


def _check_padding(payload: np.ndarray, bits: int, n: int) -> None:
    spare = (payload.size * (8 // bits) - n) * bits  # unused low bits of the last byte
    if spare and int(payload[-1]) & ((1 << spare) - 1):
        raise PayloadError(f"the last payload byte's {spare} padding bits must be zero")


def _check_scales(scales: np.ndarray, top: float) -> None:
    """Non-negative, and ``scale · top`` (the largest decoded magnitude) finite in float32."""
    if (scales < 0).any():
        raise PayloadError("scales must be non-negative")
    with np.errstate(over="ignore"):
        overflow = ~np.isfinite(scales * np.float32(top))
    if overflow.any():  # the decoded values would be infinite
        raise PayloadError(
            f"{int(overflow.sum())} scales overflow float32 when multiplied by {top:g} (largest {scales.max():.3g})"
        )


# --------------------------------------------------------------------------- the schemes
@dataclass(frozen=True, kw_only=True)
class Scheme:
    """One row of the table: the arrays a scheme sends and how it codes values into them.

    name: the config's name for it (``uplink``, ``downlink-codec``).
    bits: payload bits per value (per kept value for a sparse scheme), scales not counted.
    residual: codes values minus the round-start reference (every lossy scheme does).
    chunk: values per float32 scale (0: no scales); a chunk never crosses a tensor.
    sparse: sends a selection of the values (``topk``), so it cannot code a chain link.

    Subclasses define ``parts``, ``encode``, ``decode`` and, beyond the sizes, dtypes and
    finiteness every codec checks, ``check``; each takes the :class:`Codec` for the layout.
    """

    name: str
    bits: int
    residual: bool = True
    chunk: int = 0
    sparse: bool = False

    @property
    def bits_per_value(self) -> float:
        """Payload and scale bits per value (per kept value for a sparse scheme)."""
        return self.bits + (32 / self.chunk if self.chunk else 0.0)

    def parts(self, codec: Codec) -> PartSizes:
        raise NotImplementedError

    def encode(self, codec: Codec, values: np.ndarray, rng: np.random.Generator | None) -> Parts:
        raise NotImplementedError

    def check(self, codec: Codec, parts: Parts) -> None:
        """Raise PayloadError for what sizes, dtypes and finiteness do not catch."""

    def decode(self, codec: Codec, parts: Parts) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Plain(Scheme):
    """Every value as a float of ``dtype``."""

    dtype: type

    def parts(self, codec: Codec) -> PartSizes:
        return {"payload": (np.dtype(self.dtype), codec.layout.numel)}

    def encode(self, codec: Codec, values: np.ndarray, rng: np.random.Generator | None) -> Parts:
        return {"payload": values.astype(self.dtype)}  # a copy, also for float32

    def decode(self, codec: Codec, parts: Parts) -> np.ndarray:
        return parts["payload"].astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class Uniform(Scheme):
    """``codes`` levels ``scale·(u - top)``, ``u`` in 0..codes-1, ``top = (codes - 1)/2``.

    The step (the chunk's float32 scale) is ``max|x| / top``, so the outer levels are the
    chunk's extremes and nothing is clipped; with ``mean_step`` > 0 nearest rounding takes
    ``min(mean_step · mean|x|, max|x| / top)`` instead and clips beyond the outer levels.
    Nearest rounding errs by at most ``scale/2`` inside the outer levels. Stochastic rounding
    always steps by ``max|x| / top`` and picks the upper neighbour with probability
    ``index - floor(index)``: ``E[decoded] = x`` and the error is below ``scale``.
    8-bit codes travel as int8 ``u - top``; fewer bits are packed.
    """

    codes: int
    mean_step: float = 0.0

    def __post_init__(self) -> None:
        fits = 2 <= self.codes <= 2**self.bits and (self.bits != 8 or self.codes % 2)  # int8: u - top is whole
        if self.bits not in (1, 2, 4, 8) or not fits:
            raise ValueError(f"{self.name}: {self.codes} codes do not fit {self.bits} bits")

    @property
    def top(self) -> float:
        """The outermost level, in steps from zero."""
        return (self.codes - 1) / 2

    @property
    def wire_dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.bits == 8 else np.uint8)

    def parts(self, codec: Codec) -> PartSizes:
        n = codec.layout.numel
        size = n if self.bits == 8 else packed_nbytes(n, self.bits)
        return {"payload": (self.wire_dtype, size), "scales": (np.dtype(np.float32), len(codec.chunks))}

    def encode(self, codec: Codec, values: np.ndarray, rng: np.random.Generator | None) -> Parts:
        chunks = codec.chunks
        scales = chunks.peak(values) / self.top
        if rng is None and self.mean_step:
            scales = np.minimum(self.mean_step * chunks.mean_abs(values), scales)
        scales = scales.astype(np.float32)
        steps = chunks.spread(np.where(scales > 0, scales, 1.0))
        index = values / steps + self.top  # float64, in 0..codes-1 up to rounding
        index = np.rint(index) if rng is None else np.floor(index + rng.random(index.size))
        u = np.clip(index, 0, self.codes - 1).astype(np.uint8)
        payload = (u.astype(np.int16) - int(self.top)).astype(np.int8) if self.bits == 8 else pack(u, self.bits)
        return {"payload": payload, "scales": scales}

    def _levels(self, codec: Codec, payload: np.ndarray) -> np.ndarray:
        """The code of every value, in steps from zero (float32)."""
        if self.bits == 8:
            return payload.astype(np.float32)
        return unpack(payload, self.bits)[: codec.layout.numel].astype(np.float32) - np.float32(self.top)

    def check(self, codec: Codec, parts: Parts) -> None:
        payload = parts["payload"]
        if self.bits == 8:
            low = -int(self.top)
            if payload.size and payload.min() < low:  # never sent; with a large scale it overflows
                raise PayloadError(f"payload holds {payload.min()}; {self.name} values must lie in [{low}, {-low}]")
        else:
            _check_padding(payload, self.bits, codec.layout.numel)
            if self.codes < 2**self.bits and payload.size:
                highest = int(unpack(payload, self.bits).max())
                if highest >= self.codes:
                    raise PayloadError(f"payload holds code {highest}; {self.name} codes must lie in [0, {self.codes - 1}]")
        _check_scales(parts["scales"], self.top)

    def decode(self, codec: Codec, parts: Parts) -> np.ndarray:
        return self._levels(codec, parts["payload"]) * codec.chunks.spread(parts["scales"])


@dataclass(frozen=True, kw_only=True)
class Sign(Scheme):
    """One bit a value (1: non-negative) and a float32 scale a chunk; decodes ``±scale``.

    Nearest: ``scale = mean|x|`` of the chunk, the scaled sign of EF-signSGD. Stochastic:
    ``scale = m = max|x|`` and + with probability ``(1 + x/m)/2``, so ``E[decoded] = x``.
    """

    bits: int = 1

    def parts(self, codec: Codec) -> PartSizes:
        n = codec.layout.numel
        return {"payload": (np.dtype(np.uint8), packed_nbytes(n, 1)), "scales": (np.dtype(np.float32), len(codec.chunks))}

    def encode(self, codec: Codec, values: np.ndarray, rng: np.random.Generator | None) -> Parts:
        chunks = codec.chunks
        if rng is None:
            scales = chunks.mean_abs(values).astype(np.float32)
            positive = values >= 0
        else:
            scales = chunks.peak(values).astype(np.float32)
            peaks = chunks.spread(np.where(scales > 0, scales, 1.0).astype(np.float64))
            positive = rng.random(values.size) < (1 + values / peaks) / 2
        return {"payload": np.packbits(positive), "scales": scales}

    def check(self, codec: Codec, parts: Parts) -> None:
        _check_padding(parts["payload"], 1, codec.layout.numel)
        _check_scales(parts["scales"], 1.0)

    def decode(self, codec: Codec, parts: Parts) -> np.ndarray:
        positive = np.unpackbits(parts["payload"], count=codec.layout.numel).astype(bool)
        scales = codec.chunks.spread(parts["scales"])
        return np.where(positive, scales, -scales).astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class TopK(Scheme):
    """The codec's ``k`` largest magnitudes with their int32 indices (the rest decode to 0)."""

    def parts(self, codec: Codec) -> PartSizes:
        return {"values": (np.dtype(np.float32), codec.k), "indices": (np.dtype(np.int32), codec.k)}

    def encode(self, codec: Codec, values: np.ndarray, rng: np.random.Generator | None) -> Parts:
        idx = np.argpartition(np.abs(values), -codec.k)[-codec.k :]
        idx.sort()
        return {"values": values[idx].astype(np.float32), "indices": idx.astype(np.int32)}

    def check(self, codec: Codec, parts: Parts) -> None:
        idx, numel = parts["indices"], codec.layout.numel
        if idx.size and (idx.min() < 0 or idx.max() >= numel):
            raise PayloadError(f"indices must lie in [0, {numel - 1}]")
        if np.unique(idx).size != idx.size:
            raise PayloadError("indices repeat")

    def decode(self, codec: Codec, parts: Parts) -> np.ndarray:
        out = np.zeros(codec.layout.numel, dtype=np.float32)
        out[parts["indices"]] = parts["values"]
        return out


SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        Plain(name="float32", bits=32, residual=False, dtype=np.float32),
        Plain(name="float16", bits=16, dtype=np.float16),
        Uniform(name="int8", bits=8, codes=255, chunk=1024),
        Uniform(name="int4", bits=4, codes=15, chunk=512),
        # 4 levels ±0.5, ±1.5 steps: the MSE-optimal uniform 4-level quantiser of a Gaussian steps
        # 0.996σ = 1.25·E|x|; levels -1, 0, 1 spanning max|x| leave most values at 0 (module docstring)
        Uniform(name="int2", bits=2, codes=4, chunk=512, mean_step=1.25),
        Sign(name="sign", chunk=512),
        TopK(name="topk", bits=64, sparse=True),
    )
}
INT8_CHUNK = SCHEMES["int8"].chunk
PACKED = "packed"  # several parts in one array on the wire (Codec.pack)
INT8_PREFIX = "int8-"  # parts of the tensors a split code sends as int8 (Codec._int8_split)


# --------------------------------------------------------------------------- the codec
@dataclass
class Codec:
    """One scheme of :data:`SCHEMES` applied to one layout; counts what it encodes in ``stats``."""

    layout: UploadLayout
    scheme: str = "float32"
    k: int = 0  # values kept by ``topk``
    int8_names: frozenset[str] = frozenset()  # tensors sent as int8 when the scheme has more bits
    stats: CodecStats = field(default_factory=CodecStats)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise PayloadError(f"codec {self.scheme!r} is not supported; choose one of {', '.join(SCHEMES)}")
        self.spec = SCHEMES[self.scheme]
        if self.spec.sparse and not 0 < self.k <= self.layout.numel:
            raise PayloadError(f"{self.scheme} needs 0 < k <= {self.layout.numel}, got k={self.k}")
        self.chunks = Chunks.of(self.layout, self.spec.chunk)
        self._split = self._int8_split()

    def _int8_split(self) -> tuple[np.ndarray, Codec, np.ndarray, Codec] | None:
        """Some tensors travel as int8 (their residual), the rest in the scheme:

        - below 8 bits, norm layers' running statistics (``layout.statistics``). They are not
          gradients: ``sign`` and ``int2`` have no zero level, so a variance that did not move
          would still be sent as ± a step, and a small one can go negative (BatchNorm's
          evaluation then divides by the square root of a negative number). int8 keeps zero at
          zero and errs by at most 1/254 of a chunk's largest change;
        - above 8 bits, :attr:`int8_names` (the plan's vectors under ``vector-uplink``): their
          bytes leave the ratio to the factors. A float32 code then sends the residual too, so
          the whole upload decodes as ``reference + residual``.
        """
        entries = {name for name, _ in self.layout.entries}
        if self.spec.sparse or self.spec.bits == 8:
            return None
        if self.spec.bits < 8:
            names = self.layout.statistics & entries if self.spec.residual else set()
        else:
            names = self.int8_names & entries
        if not names:
            return None
        main_layout, main_index = self.layout.subset(entries - names)
        int8_layout, int8_index = self.layout.subset(names)
        return main_index, Codec(main_layout, self.scheme), int8_index, Codec(int8_layout, "int8")

    # ------------------------------------------------------------------ layout
    @property
    def residual(self) -> bool:
        """Whether the codec encodes values relative to the round-start reference (a split code does)."""
        return self.spec.residual or self._split is not None

    @property
    def parts(self) -> PartSizes:
        """Name -> (dtype, size) of every array an upload holds."""
        if self._split is not None:
            _, main, _, int8 = self._split
            return {**main.parts, **{INT8_PREFIX + name: size for name, size in int8.parts.items()}}
        return self.spec.parts(self)

    @property
    def payload_nbytes(self) -> int:
        return sum(dtype.itemsize * size for dtype, size in self.parts.values())

    @property
    def wire_parts(self) -> PartSizes:
        """The arrays a message carries: the parts, or one ``packed`` uint8 array when there are several.

        Flower frames every array with ~300-500 bytes of its own (header, chunk, record entry);
        a sign-coded upload of the default CNN carries 2.6 kB in four arrays and 2.2 kB of
        framing, so multi-part codes travel as one array.
        """
        if len(self.parts) == 1:
            return self.parts
        return {PACKED: (np.dtype(np.uint8), self.payload_nbytes)}

    def pack(self, parts: Mapping[str, np.ndarray]) -> Parts:
        """``parts`` as :attr:`wire_parts`: their bytes concatenated in :attr:`parts` order."""
        if len(self.parts) == 1:
            return dict(parts)
        return {PACKED: np.concatenate([np.ascontiguousarray(parts[name]).view(np.uint8).reshape(-1) for name in self.parts])}

    def unpack(self, parts: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """The parts of a packed message (anything else is returned as it is, for :meth:`validate`)."""
        if len(self.parts) == 1 or not isinstance(parts, Mapping) or set(parts) != {PACKED}:
            return parts
        packed = parts[PACKED]
        if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 1:
            raise PayloadError(f"{PACKED} must be a 1-D uint8 array, got {getattr(packed, 'dtype', type(packed).__name__)}")
        if packed.size != self.payload_nbytes:
            raise PayloadError(f"{PACKED} has {packed.size} bytes, expected {self.payload_nbytes} for codec {self.scheme}")
        out, offset = {}, 0
        for name, (dtype, size) in self.parts.items():
            nbytes = dtype.itemsize * size
            out[name] = packed[offset : offset + nbytes].copy().view(dtype)
            offset += nbytes
        return out

    # ------------------------------------------------------------------ encode / decode
    def encode(self, values: np.ndarray, rng: np.random.Generator | None = None) -> Parts:
        """Encode a float32 vector: the values (``float32``) or a residual (lossy schemes).

        ``rng``: the ``int*`` and ``sign`` codes round stochastically (unbiased) with it,
        to the nearest level without it; the other schemes ignore it.
        """
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (self.layout.numel,):
            raise PayloadError(f"vector shape is {values.shape}, expected ({self.layout.numel},)")
        if self._split is not None:
            main_index, main, int8_index, int8 = self._split
            out = {
                **main.encode(values[main_index], rng),
                **{INT8_PREFIX + n: a for n, a in int8.encode(values[int8_index], rng).items()},
            }
        else:
            out = self.spec.encode(self, values, rng)
        self.stats.payloads += 1
        self.stats.values += values.size
        self.stats.payload_bytes += sum(a.nbytes for a in out.values())
        return out

    def validate(self, parts: Mapping[str, np.ndarray]) -> Parts:
        """``parts`` (or their :meth:`pack`) if they are a well-formed upload, else raise PayloadError
        saying what is wrong."""
        parts = self.unpack(parts)
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
        parts = dict(parts)
        if self._split is not None:
            _, main, _, int8 = self._split
            main.validate({n: a for n, a in parts.items() if not n.startswith(INT8_PREFIX)})
            int8.validate({n[len(INT8_PREFIX) :]: a for n, a in parts.items() if n.startswith(INT8_PREFIX)})
        else:
            self.spec.check(self, parts)
        return parts

    def decode_vector(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float32 vector an upload stands for: values (``float32``) or the residual."""
        parts = self.validate(parts)
        if self._split is None:
            return self.spec.decode(self, parts)
        main_index, main, int8_index, int8 = self._split
        out = np.empty(self.layout.numel, dtype=np.float32)
        out[main_index] = main.spec.decode(main, {n: a for n, a in parts.items() if not n.startswith(INT8_PREFIX)})
        out[int8_index] = int8.spec.decode(
            int8, {n[len(INT8_PREFIX) :]: a for n, a in parts.items() if n.startswith(INT8_PREFIX)}
        )
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
