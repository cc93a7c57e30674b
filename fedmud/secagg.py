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

That is the ``float32`` upload. ``int8`` and ``int4`` sum codes instead (:class:`CodeGrid`): each
client rotates its weighted update by one random rotation drawn from the round's seed (a
randomised Hadamard transform, :func:`rotate`), which spreads its norm evenly over the
coordinates, and rounds each coordinate without bias onto ``2·half + 1`` levels of one grid that
every client shares, set by the norm every honest update keeps (``update-norm-bound`` or
``dp-clip``). A sum of n clients' codes then needs ``n · 2·half < 2^bits``: 8 bits a value for up
to 18 clients at int4, where the float32 upload's field needs 30. The server sums the codes,
rotates back and divides by the clients' summed weights, which travel in the same vector as a few
base-``2·half + 1`` digits, so no plaintext weight leaves a client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .seeds import numpy_rng

if TYPE_CHECKING:
    from .config import RunConfig
    from .privacy import Mechanism

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


# ---------------------------------------------------------------------------- codes that sum
GRID_HALVES = {"int8": 127, "int4": 7}  # the uploads a secure round can sum as codes: their levels' half-width
GRID_SIGMAS = 4.0  # the grid's range in standard deviations of a rotated coordinate of an update at the bound


def _hadamard(block: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform of a vector whose length is a power of two (its own inverse)."""
    out = np.array(block, dtype=np.float64)
    width = 1
    while width < out.size:
        pairs = out.reshape(-1, 2, width)
        out = np.concatenate([pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]], axis=1).reshape(-1)
        width *= 2
    return out / math.sqrt(out.size)


def rotation_span(numel: int) -> int:
    """The largest power of two within ``numel``: the length each of :func:`rotate`'s two passes mixes."""
    return 1 << (max(numel, 1).bit_length() - 1)


def _signs(seed: int, span: int) -> tuple[np.ndarray, np.ndarray]:
    rng = numpy_rng(seed, "secure-rotation")
    return tuple(rng.choice(np.array([-1.0, 1.0]), size=span) for _ in range(2))


def rotate(vector: np.ndarray, seed: int) -> np.ndarray:
    """``vector`` times an orthogonal matrix drawn from ``seed``: random signs and a Hadamard transform
    on its first ``span`` coordinates, then (unless that was all) again on its last ``span``
    (:func:`rotation_span`, more than half the length), so no length needs padding. Over the signs,
    each output coordinate of a vector of norm r has a variance of at most r²/span, however the
    input's norm was spread."""
    out = np.array(vector, dtype=np.float64).reshape(-1)
    span = rotation_span(out.size)
    first, second = _signs(seed, span)
    out[:span] = _hadamard(first * out[:span])
    if span < out.size:
        out[out.size - span :] = _hadamard(second * out[out.size - span :])
    return out


def unrotate(vector: np.ndarray, seed: int) -> np.ndarray:
    """:func:`rotate`'s inverse (its transpose)."""
    out = np.array(vector, dtype=np.float64).reshape(-1)
    span = rotation_span(out.size)
    first, second = _signs(seed, span)
    if span < out.size:
        out[out.size - span :] = second * _hadamard(out[out.size - span :])
    out[:span] = first * _hadamard(out[:span])
    return out


@dataclass(frozen=True)
class CodeGrid:
    """The grid a secure round's clients round their updates onto, so the round sums small integers.

    A client's vector is its rotated ``weight/max_weight · update`` as codes in ``[-half, half]``
    (``numel`` of them), then its weight in ``digits`` base-``2·half + 1`` digits, each shifted to
    the same range. Flower's quantiser carries such integers exactly (:attr:`flower_range`,
    :attr:`flower_levels`: one level per code), so the masks sum the codes themselves.
    """

    half: int  # codes in [-half, half]
    numel: int  # the update's length
    bound: float  # the norm every honest update keeps (update-norm-bound, or dp-clip)
    max_weight: int  # the most a client's weight can be (max-examples, 1 under DP)
    noise_std: float = 0.0  # the noise a client adds to each coordinate (dp=client), which rotation keeps Gaussian

    @property
    def range(self) -> float:
        """The largest rotated coordinate the grid holds: GRID_SIGMAS standard deviations of one of an
        update at the bound (plus the client's noise); beyond it a coordinate is clipped."""
        return GRID_SIGMAS * math.sqrt(self.bound**2 / rotation_span(self.numel) + self.noise_std**2)

    @property
    def step(self) -> float:
        return self.range / self.half

    @property
    def base(self) -> int:
        return 2 * self.half + 1

    @property
    def digits(self) -> int:
        """Base-``2·half + 1`` digits that write any weight up to ``max_weight``."""
        count, top = 1, self.base
        while top <= self.max_weight:
            count, top = count + 1, top * self.base
        return count

    @property
    def length(self) -> int:
        """Values a client's vector holds: the codes, then the weight's digits."""
        return self.numel + self.digits

    @property
    def flower_range(self) -> float:
        """Flower's ``clipping_range`` that maps a code ``z`` to the integer ``z + half`` exactly."""
        return float(self.half)

    @property
    def flower_levels(self) -> int:
        """Flower's ``quantization_range``: ``2·half``, one level per code, so its scale is exactly 1."""
        return 2 * self.half

    def field_bits(self, clients: int) -> int:
        """The bits of the smallest field in which ``clients`` clients' shifted codes sum exactly
        (each at most ``2·half``, as is Flower's quantised weight); at least 8 (:func:`pack_values`)."""
        return max(8, (clients * self.flower_levels).bit_length())

    def encode(self, update: np.ndarray, weight: float, seed: int, rng: np.random.Generator) -> np.ndarray:
        """A client's vector (float64 holding integers in [-half, half]): ``update`` weighted, rotated by the
        round's ``seed`` and rounded without bias onto the grid (``rng`` draws the rounding), then the weight."""
        if not 0 < weight <= self.max_weight or weight != int(weight):
            raise ValueError(f"a weight must be a whole number in [1, {self.max_weight}], got {weight}")
        rotated = rotate(np.asarray(update, dtype=np.float64) * (weight / self.max_weight), seed)
        if rotated.size != self.numel:
            raise ValueError(f"the update has {rotated.size} values, the grid {self.numel}")
        scaled = np.clip(rotated, -self.range, self.range) / self.step
        low = np.floor(scaled)
        codes = low + (rng.random(scaled.size) < scaled - low)
        digits, rest = [], int(weight)
        for _ in range(self.digits):
            rest, digit = divmod(rest, self.base)
            digits.append(digit - self.half)
        return np.concatenate([np.clip(codes, -self.half, self.half), np.asarray(digits, dtype=np.float64)])

    def decode(self, sums: np.ndarray, clients: int, seed: int) -> tuple[np.ndarray | None, int, str]:
        """(the weighted mean update, the summed weight, "") from the integer sums of ``clients`` clients'
        vectors, or (None, 0, why) when the sums cannot be theirs (the masks did not cancel, or the weights do not add
        up): each coordinate's sum lies in [-clients·half, clients·half], and the summed weight in
        [clients, clients · max_weight]."""
        sums = np.asarray(sums, dtype=np.float64)
        if sums.shape != (self.length,):
            return None, 0, f"the unmasked sum has shape {sums.shape}, expected ({self.length},): a node sent a malformed vector"
        if not np.isfinite(sums).all() or np.abs(sums).max(initial=0.0) > clients * self.half:
            return None, 0, (
                f"the unmasked sum has a code beyond ±{clients * self.half} ({clients} clients of codes in "
                f"±{self.half}): the masks did not cancel (a node sent a malformed vector)"
            )
        digits = sums[self.numel :] + clients * self.half
        total = sum(int(round(d)) * self.base**k for k, d in enumerate(digits))
        if not clients <= total <= clients * self.max_weight:
            return None, 0, f"the clients' weights sum to {total}, outside [{clients}, {clients * self.max_weight}] for {clients} clients"
        mean = unrotate(sums[: self.numel] * self.step, seed) * (self.max_weight / total)
        return mean, total, ""

    def norm_slack(self, clients: int, weight: float) -> float:
        """How far the rounding moves a mean of ``clients`` clients of summed ``weight`` in norm, at most
        but for chance: 1.5 times its root mean square (each coordinate's rounding errs by a zero-mean
        amount of variance at most step²/4, independently)."""
        return 1.5 * self.step * math.sqrt(clients * self.numel) / 2 * self.max_weight / weight


def code_grid(run: RunConfig, dp: Mechanism, numel: int) -> CodeGrid | None:
    """The grid a secure round of ``run`` sums an update of ``numel`` values on (None: ``uplink=float32``,
    which sums values in a fine field instead, :func:`size_field`). Server and clients build it alike
    from the run config: its bound is the tighter of ``update-norm-bound`` and the DP clip, and a client
    under ``dp=client`` adds its share of the noise before it rounds."""
    if not run.privacy.secure_aggregation or run.uplink.codec not in GRID_HALVES:
        return None
    bounds = [b for b in (run.bounds.update_norm_bound, dp.clip if dp.on else 0.0) if b > 0]
    return CodeGrid(
        half=GRID_HALVES[run.uplink.codec],
        numel=numel,
        bound=min(bounds),
        max_weight=1 if dp.on else run.bounds.max_examples,
        noise_std=dp.client_noise_std,
    )
