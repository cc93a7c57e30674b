"""The integers a secure-aggregation round sums in, sized per round, and how its masked values travel.

SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020, as Flower runs it) maps each coordinate of a
client's ``weight/max_weight · update`` from [-c, c] (the clipping range: the DP clip's range,
``update-norm-bound``, or Flower's 8) onto ``levels`` integers, by stochastic rounding, adds masks
modulo ``2^bits`` and sends the masked integers. Two things size the field:

- the step ``2c/levels`` is a coordinate's quantisation error at full weight (a client of
  ``max-examples`` examples; under DP every client weighs 1): :data:`STEP` bounds it, so the
  clip or norm bound sets the levels, ``levels >= 2c/STEP``;
- the masks cancel only if the sum of the round's quantised values is below the modulus, and n
  clients sum to at most ``n · levels`` (a client's quantised weight is one more such value), so
  ``bits`` is the smallest with ``n · levels < 2^bits``; the levels then take all the room the
  field leaves, ``(2^bits - 1) // n`` (at most 2^31 - 1: Flower's quantiser rounds into int32).

A value then needs ``bits`` bits, not Flower's 64: :func:`pack_values` sends each in exactly
that many (the masked values are uniform over the field, so nothing codes them shorter), and
:func:`unpack_values` restores Flower's int64 before the server sums them. At the default range
([-8, 8]) a round of 4 clients needs 29 bits, of 10 clients 30, of up to 63 clients 32; past
that a value needs more than 32 bits. A mean of clients holding on average ``e`` examples carries
each coordinate within ``step · max-examples / e`` of the exact mean (stochastic rounding is
unbiased; measured on the merged weights: within about twice that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STEP = 2.0**-22  # the most a coordinate of a full-weight client's update is off by (2.4e-7)
MAX_LEVELS = (1 << 31) - 1  # Flower's quantiser rounds into int32
SUM_BITS = 63  # Flower's server adds the clients' masked values in int64 before it reduces them
_CHUNK = 1 << 16  # values packed at a time: the bit matrix of a chunk is 64 bytes a value


@dataclass(frozen=True)
class Field:
    """The integers of one secure round: ``levels`` per coordinate, sums modulo ``2^bits``."""

    bits: int  # a masked value's bits, as it travels
    levels: int  # Flower's quantization_range: the integers [-c, c] maps onto
    clients: int  # the most clients whose values the round sums
    clipping_range: float  # c

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def step(self) -> float:
        """A full-weight coordinate's quantisation error at most (one level)."""
        return 2 * self.clipping_range / self.levels

    def describe(self) -> str:
        return (
            f"field 2^{self.bits} ({self.bits} bits a value): {self.levels:,} levels over "
            f"[-{self.clipping_range:g}, {self.clipping_range:g}], a step of {self.step:.2g}"
        )


def size_field(clients: int, clipping_range: float, step: float = STEP) -> Field:
    """The smallest field whose sum of ``clients`` clients' values is exact, at a step of at most
    ``step`` over [-clipping_range, clipping_range] (the step is coarser only where that needs more
    than Flower's 2^31 - 1 levels).

    Raises ValueError when no field fits Flower's 64-bit sums: ``clients`` times the modulus must
    stay below 2^63 (at most about 260,000 clients a round at the default range).
    """
    if clients < 1 or not clipping_range > 0 or not step > 0:
        raise ValueError(f"a field needs clients >= 1 (got {clients}), a clipping range > 0 (got {clipping_range}) and a step > 0")
    needed = min(math.ceil(2 * clipping_range / step), MAX_LEVELS)
    bits = max(8, (clients * needed).bit_length())  # clients · needed <= 2^bits - 1
    if bits + clients.bit_length() > SUM_BITS:
        raise ValueError(
            f"secure aggregation cannot sum {clients:,} clients a round exactly: {needed:,} levels each need a "
            f"2^{bits} field, and Flower adds {clients:,} such values in 64-bit integers; sample fewer clients a "
            f"round (fraction-train) or narrow the clipping range (dp-clip, update-norm-bound)"
        )
    return Field(bits, min((((1 << bits) - 1) // clients), MAX_LEVELS), clients, float(clipping_range))


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that hold ``count`` values of ``bits`` bits."""
    return -(-count * bits // 8)


def pack_values(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [0, 2^bits) into ``bits`` bits each, along the last axis (little-endian bit
    order: value i is bits [i·bits, (i+1)·bits) of the bytes), as uint8; ``bits`` >= 8, so the
    padding of the last byte never holds a whole value."""
    values = np.asarray(values)
    if not 8 <= bits <= 64:
        raise ValueError(f"bits must be in [8, 64], got {bits}")
    if values.size and (values.min() < 0 or (bits < 64 and int(values.max()) >> bits)):
        raise ValueError(f"values must lie in [0, 2^{bits})")
    rows = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
    count = rows.shape[1]
    out = np.zeros((rows.shape[0], packed_nbytes(count, bits)), dtype=np.uint8)
    for r, row in enumerate(rows):
        stream = np.zeros(out.shape[1] * 8, dtype=np.uint8)
        for start in range(0, count, _CHUNK):
            chunk = np.ascontiguousarray(row[start : start + _CHUNK], dtype="<u8").reshape(-1, 1)
            matrix = np.unpackbits(chunk.view(np.uint8), axis=1, bitorder="little")[:, :bits]
            stream[start * bits : (start + len(chunk)) * bits] = matrix.reshape(-1)
        out[r] = np.packbits(stream, bitorder="little")
    return out.reshape(values.shape[:-1] + out.shape[-1:]) if values.ndim else out[0]


def unpack_values(packed: np.ndarray, bits: int) -> np.ndarray:
    """:func:`pack_values`' inverse, as int64 (Flower's dtype): every whole value of ``bits`` bits
    the bytes along the last axis hold (a byte short holds one value fewer)."""
    packed = np.asarray(packed, dtype=np.uint8)
    if not 8 <= bits <= 63:
        raise ValueError(f"bits must be in [8, 63], got {bits}")
    rows = packed.reshape(-1, packed.shape[-1])
    count = rows.shape[1] * 8 // bits
    out = np.zeros((rows.shape[0], count), dtype=np.int64)
    weights = np.left_shift(np.uint64(1), np.arange(bits, dtype=np.uint64))
    for r, row in enumerate(rows):
        stream = np.unpackbits(row, bitorder="little")
        for start in range(0, count, _CHUNK):
            stop = min(start + _CHUNK, count)
            matrix = stream[start * bits : stop * bits].reshape(-1, bits).astype(np.uint64)
            out[r, start:stop] = (matrix * weights).sum(axis=1, dtype=np.uint64).astype(np.int64)
    return out.reshape(packed.shape[:-1] + (count,))
