"""Update parameterisations: how a layer's per-round update ΔW is built from factors.

An update is a sum of *terms*; each term is a product of two factors, an *anchor*
(drawn from the round seed) and its *partner*. Which factors are trained is the
pattern:

=======  =============================  ==============================  ================
pattern  ΔW                             trained                         aggregation
=======  =============================  ==============================  ================
``ab``   A·B                            A and B                         inexact (bilinear)
``fab``  F·B                            B (F frozen)                    exact, low rank
``aad``  F1·T1 + T2·F2                  T1 and T2 (F1, F2 frozen)       exact
=======  =============================  ==============================  ================

``·`` is a matrix product for :class:`LowRankUpdate` and a block-wise Kronecker
product for :class:`BlockKroneckerUpdate`. With ``fab`` and ``aad`` ΔW is linear in
what is trained, so the weighted mean of the clients' ΔW equals ΔW of the weighted
mean of their factors: the server aggregates factors and loses nothing.

The planner sizes them through a :class:`Sizing` (:class:`UpdateSizing` here); a method
whose parametrisation is not an update (FedPara's, :mod:`fedmud.methods.factorised`) brings
its own, and :func:`allocate_sizes` shares the ratio's budget among the tensors either way.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class FactorSpec:
    """One factor of an update: its name within the layer, shape and whether it is trained."""

    name: str
    shape: tuple[int, ...]
    trainable: bool
    iso_std: float  # std that makes the product with a unit-variance partner an isometry


@dataclass(frozen=True)
class Term:
    """One product ``left · right``; ``anchor`` names the factor drawn at full scale."""

    left: str
    right: str
    anchor: str

    @property
    def partner(self) -> str:
        return self.right if self.anchor == self.left else self.left


def _pattern_factors(
    pattern: str, left_shape: tuple[int, ...], right_shape: tuple[int, ...], left_std: float, right_std: float
) -> tuple[tuple[FactorSpec, ...], tuple[Term, ...]]:
    def spec(name: str, left: bool, trainable: bool) -> FactorSpec:
        return FactorSpec(name, left_shape if left else right_shape, trainable, left_std if left else right_std)

    if pattern == "ab":
        return (spec("A", True, True), spec("B", False, True)), (Term("A", "B", anchor="A"),)
    if pattern == "fab":
        return (spec("F", True, False), spec("B", False, True)), (Term("F", "B", anchor="F"),)
    if pattern == "aad":
        factors = (spec("F1", True, False), spec("T1", False, True), spec("T2", True, True), spec("F2", False, False))
        return factors, (Term("F1", "T1", anchor="F1"), Term("T2", "F2", anchor="F2"))
    raise ConfigError(f"pattern={pattern!r} is not allowed; choose one of ab, fab, aad")


class UpdateParameterisation:
    """Base: a layer's ΔW as a sum of factor products (see the module docstring)."""

    kind: str
    factors: tuple[FactorSpec, ...]
    terms: tuple[Term, ...]

    def __init__(self, weight_shape: tuple[int, ...], pattern: str) -> None:
        self.weight_shape = tuple(weight_shape)
        self.numel = math.prod(weight_shape)
        self.pattern = pattern

    @property
    def num_trainable(self) -> int:
        """Values uploaded per round for this layer."""
        return sum(math.prod(f.shape) for f in self.factors if f.trainable)

    def product(self, left: torch.Tensor, right: torch.Tensor, exact: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def add_products(self, base: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``base + Σ left·right`` over ``pairs``, in the layer's weight shape, differentiable.

        What a training step computes with (``base`` is the frozen ``W``); not bitwise
        reproducible across devices, unlike :meth:`delta_weight` with ``exact``. Subclasses
        compute it without materialising each product.
        """
        flat = sum(self.product(left, right) for left, right in pairs)
        return base + flat[: self.numel].reshape(self.weight_shape)

    def delta_weight(self, factors: Mapping[str, torch.Tensor], exact: bool = False) -> torch.Tensor:
        """ΔW in the layer's weight shape.

        ``exact`` computes with elementwise multiplications and additions in a fixed
        order only, so the result is bitwise the same on every machine and device
        (used for merges, which clients must reproduce to the bit).
        """
        flat = sum(self.product(factors[t.left], factors[t.right], exact) for t in self.terms)
        return flat[: self.numel].reshape(self.weight_shape)

    def describe(self) -> str:
        raise NotImplementedError


def matrix_shape(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """The matrix a tensor of two or more dimensions is viewed as.

    2-D (Linear, Embedding, attention ``in_proj_weight``, RNN ``weight_ih``/``weight_hh``):
    itself. More dimensions (convolutions, transposed too: ``(d0, d1, k1, k2, ...)``): the
    paper's ``(d0·k1, d1·k2·...)`` — Conv2d as ``(out·kh, in·kw)`` — unless the plain
    ``(d0, d1·k1·k2·...)`` is squarer, as for a depthwise convolution (``d1 = 1``), whose
    paper view would be a thin ``(C·k, k)``. Only the count matters to the algebra: ΔW is
    built flat and reshaped.
    """
    if len(weight_shape) == 2:
        return weight_shape[0], weight_shape[1]
    if len(weight_shape) > 2:
        paper = (weight_shape[0] * weight_shape[2], weight_shape[1] * math.prod(weight_shape[3:]))
        plain = (weight_shape[0], math.prod(weight_shape[1:]))
        return plain if sum(plain) < sum(paper) else paper
    raise ValueError(f"cannot view a tensor of shape {weight_shape} as a matrix; it needs two or more dimensions")


class LowRankUpdate(UpdateParameterisation):
    """ΔW (m×n) from rank-``r`` matrix factors (m×r)·(r×n).

    Parameters uploaded: ``r(m+n)`` for ``ab`` and ``aad``, ``r·n`` for ``fab``.
    Rank bound: ``r`` for ``ab``/``fab``, ``min(2r, m, n)`` for ``aad``.
    """

    kind = "mat"

    def __init__(self, weight_shape: tuple[int, ...], pattern: str, rank: int) -> None:
        super().__init__(weight_shape, pattern)
        self.m, self.n = matrix_shape(self.weight_shape)
        self.rank = rank
        self.factors, self.terms = _pattern_factors(
            pattern, (self.m, rank), (rank, self.n), 1 / math.sqrt(self.m), 1 / math.sqrt(self.n)
        )

    @staticmethod
    def cost(weight_shape: tuple[int, ...], pattern: str, rank: int) -> int:
        m, n = matrix_shape(weight_shape)
        return rank * n if pattern == "fab" else rank * (m + n)

    def add_products(self, base: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        out = base.reshape(self.m, self.n)
        for left, right in pairs:  # one GEMM each, accumulated into the output: no m×n temporaries
            out = torch.addmm(out, left, right)
        return out.reshape(self.weight_shape)

    def product(self, left: torch.Tensor, right: torch.Tensor, exact: bool = False) -> torch.Tensor:
        if not exact:
            return (left @ right).reshape(-1)
        out = left[:, :1] * right[:1, :]
        for k in range(1, self.rank):  # a fixed summation order, unlike a BLAS kernel's
            out = out + left[:, k : k + 1] * right[k : k + 1, :]
        return out.reshape(-1)

    def describe(self) -> str:
        return f"mat r={self.rank} ({self.m}x{self.n})"


class BlockKroneckerUpdate(UpdateParameterisation):
    """ΔW as ``K`` blocks, each ``kron(L_k, R_k)`` with L_k (a×a) and R_k (b×b).

    The flattened weight is cut into ``K = ceil(numel / (a·b)²)`` blocks of
    (ab)×(ab) values (the last one padded, the padding discarded).
    Parameters uploaded: ``K(a²+b²)`` for ``ab`` and ``aad``, ``K·b²`` for ``fab``.
    Rank bound per block: ``ab`` (full) for every pattern, against ``a²+b²``
    parameters: a low-rank matrix with the same parameter count reaches far less.
    """

    kind = "kron"

    def __init__(self, weight_shape: tuple[int, ...], pattern: str, left_size: int, right_size: int) -> None:
        super().__init__(weight_shape, pattern)
        self.a, self.b = left_size, right_size
        self.blocks = self.num_blocks(self.numel, left_size, right_size)
        self.factors, self.terms = _pattern_factors(
            pattern, (self.blocks, self.a, self.a), (self.blocks, self.b, self.b), 1 / self.a, 1 / self.b
        )

    @staticmethod
    def num_blocks(numel: int, a: int, b: int) -> int:
        return -(-numel // (a * a * b * b))

    @staticmethod
    def cost(weight_shape: tuple[int, ...], pattern: str, a: int, b: int) -> int:
        blocks = BlockKroneckerUpdate.num_blocks(math.prod(weight_shape), a, b)
        return blocks * b * b if pattern == "fab" else blocks * (a * a + b * b)

    def add_products(self, base: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        lefts, rights = zip(*pairs)
        return _BlockKroneckerSum.apply(base, self, len(pairs), *lefts, *rights)

    def product(self, left: torch.Tensor, right: torch.Tensor, exact: bool = False) -> torch.Tensor:
        # kron per block: out[k, i, p, j, q] = L[k, i, j] * R[k, p, q]; one multiplication per value,
        # so it is exact on every device.
        return (left[:, :, None, :, None] * right[:, None, :, None, :]).reshape(-1)

    def describe(self) -> str:
        return f"kron {self.blocks}x[{self.a}x{self.a} (x) {self.b}x{self.b}]"


def _blocks(flat: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """A flat run of whole blocks as (K, a, b, a, b): ``[k, i, p, j, q]`` is row ``i·b+p``, column
    ``j·b+q`` of block ``k``, where ``kron(L_k, R_k)`` holds ``L[k, i, j]·R[k, p, q]``."""
    return flat.view(-1, a, b, a, b)


def _spread(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, a, a) and (K, b, b) as broadcastable views whose product is the (K, a, b, a, b) blocks."""
    return left[:, :, None, :, None], right[:, None, :, None, :]


class _BlockKroneckerSum(torch.autograd.Function):
    """``base + Σ_t kron(L_t, R_t)`` blockwise, for one training step.

    Autograd through the broadcast products would materialise every term at the weight's
    size, sum them, add the base, and in the backward pass multiply the gradient by each
    factor at full size before reducing. Here the forward writes the output once per term
    (``addcmul`` into it), the whole blocks are views of the flat weight (only the last,
    padded block is copied), and each factor's gradient is a batched matrix product
    that reads the weight's gradient once:

    - ``∂R[k, p, q] = Σ_ij G[k, i, p, j, q]·L[k, i, j]``: for every (k, i, p), a 1×a by a×b product;
    - ``∂L[k, i, j] = Σ_pq G[k, i, p, j, q]·R[k, p, q]``: for every (k, i, p), an a×b by b×1 product.

    Gradients are computed only for the inputs that need them (the trained factors).
    """

    @staticmethod
    def forward(ctx, base, update, count, *factors):  # noqa: D102 (documented on the class)
        lefts, rights = factors[:count], factors[count:]
        a, b, numel = update.a, update.b, update.numel
        block = a * a * b * b
        whole = numel // block
        flat_base = base.reshape(-1)
        out = torch.empty(numel, dtype=base.dtype, device=base.device)
        main = _blocks(out[: whole * block], a, b)
        if whole:
            for t, (left, right) in enumerate(zip(lefts, rights)):
                spread = _spread(left[:whole], right[:whole])
                if t == 0:
                    torch.addcmul(_blocks(flat_base[: whole * block], a, b), *spread, out=main)
                else:
                    main.addcmul_(*spread)
        if whole < update.blocks:  # the last block, padded: computed apart and cut
            tail = sum(update.product(left[whole:], right[whole:]) for left, right in zip(lefts, rights))
            torch.add(flat_base[whole * block :], tail[: numel - whole * block], out=out[whole * block :])
        ctx.update, ctx.count = update, count
        ctx.save_for_backward(*factors)
        return out.view(update.weight_shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        update, count = ctx.update, ctx.count
        factors = ctx.saved_tensors
        lefts, rights = factors[:count], factors[count:]
        need = ctx.needs_input_grad[3:]
        a, b, numel = update.a, update.b, update.numel
        block = a * a * b * b
        flat = grad.reshape(-1)
        whole = numel // block
        pieces = [(_blocks(flat[: whole * block], a, b), slice(0, whole))] if whole else []
        if whole < update.blocks:  # the last block, padded so it has the same shape
            tail = torch.cat([flat[whole * block :], flat.new_zeros(update.blocks * block - numel)])
            pieces.append((_blocks(tail, a, b), slice(whole, update.blocks)))
        grads: list[torch.Tensor | None] = [None] * (2 * count)
        for t, (left, right) in enumerate(zip(lefts, rights)):
            if need[t]:  # ∂L: (K, a, b, a, b) @ (K, 1, b, b, 1) -> (K, a, b, a, 1), summed over p
                grads[t] = torch.cat([torch.matmul(g, right[k, None, :, :, None]).sum((2, 4)) for g, k in pieces])
            if need[count + t]:  # ∂R: (K, a, 1, 1, a) @ (K, a, b, a, b) -> (K, a, b, 1, b), summed over i
                grads[count + t] = torch.cat([torch.matmul(left[k, :, None, None, :], g).sum((1, 3)) for g, k in pieces])
        base_grad = grad if ctx.needs_input_grad[0] else None
        return (base_grad, None, None, *grads)


# --------------------------------------------------------------------------- allocation

_KRON_SIZES = range(2, 33)


@lru_cache(maxsize=4096)
def _candidates(kind: str, pattern: str, weight_shape: tuple[int, ...]) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(uploaded values, size parameters) for every admissible size of one tensor, cheapest first
    (among equal costs the most balanced Kronecker sizes first)."""
    if kind == "mat":
        m, n = matrix_shape(weight_shape)
        out = [(LowRankUpdate.cost(weight_shape, pattern, r), (r,)) for r in range(1, min(m, n) + 1)]
    else:
        numel = math.prod(weight_shape)
        out = []
        for a in _KRON_SIZES:
            for b in _KRON_SIZES:
                if (a * b) ** 2 > 4 * numel and (a, b) != (2, 2):
                    continue  # blocks much larger than the layer only add padding
                # balanced factors first among equal costs: a kron of near-square sizes wastes least
                out.append((BlockKroneckerUpdate.cost(weight_shape, pattern, a, b), (a, b)))
        out.sort(key=lambda c: (c[0], abs(c[1][0] - c[1][1])))
    return tuple(sorted(out, key=lambda c: c[0]))


def build_update(kind: str, pattern: str, weight_shape: tuple[int, ...], sizes: tuple[int, ...]) -> UpdateParameterisation:
    if kind == "mat":
        return LowRankUpdate(weight_shape, pattern, *sizes)
    if kind == "kron":
        return BlockKroneckerUpdate(weight_shape, pattern, *sizes)
    raise ConfigError(f"kind={kind!r} is not allowed; choose one of kron, mat")


class Sizing:
    """How the planner sizes one family of parameterisations: every admissible size of a
    tensor with the values it uploads, cheapest first (:meth:`candidates`), and what a size
    builds, in words. ``label`` names the family in errors."""

    label: str

    def candidates(self, weight_shape: tuple[int, ...]) -> tuple[tuple[int, tuple[int, ...]], ...]:
        raise NotImplementedError

    def smallest(self, weight_shape: tuple[int, ...]) -> int:
        """Values the smallest admissible size uploads (compare with the tensor's own size)."""
        return self.candidates(tuple(weight_shape))[0][0]

    def upload(self, weight_shape: tuple[int, ...], sizes: tuple[int, ...]) -> int:
        raise NotImplementedError

    def describe(self, weight_shape: tuple[int, ...], sizes: tuple[int, ...]) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class UpdateSizing(Sizing):
    """The sizes of a ``kind`` update trained in ``pattern`` (:func:`build_update`)."""

    kind: str
    pattern: str

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.pattern}"

    def candidates(self, weight_shape: tuple[int, ...]) -> tuple[tuple[int, tuple[int, ...]], ...]:
        return _candidates(self.kind, self.pattern, tuple(weight_shape))

    def upload(self, weight_shape: tuple[int, ...], sizes: tuple[int, ...]) -> int:
        return build_update(self.kind, self.pattern, weight_shape, sizes).num_trainable

    def describe(self, weight_shape: tuple[int, ...], sizes: tuple[int, ...]) -> str:
        return f"{self.pattern} {build_update(self.kind, self.pattern, weight_shape, sizes).describe()}"


def allocate_sizes(sizing: Sizing, weight_shapes: Mapping[str, tuple[int, ...]], budget: int) -> dict[str, tuple[int, ...]]:
    """Per-layer sizes (rank, or Kronecker factor sizes) whose uploads fit ``budget`` values.

    Every layer gets the largest size whose upload is at most ``rho`` times its weight
    count, with one ``rho`` for all layers found by bisection: the update's share of
    each layer is uniform, as in the paper, while the total stays under budget.
    Raises :class:`ConfigError` if even the smallest sizes exceed the budget.
    """
    options = {name: sizing.candidates(tuple(shape)) for name, shape in weight_shapes.items()}
    costs = {name: [c[0] for c in cands] for name, cands in options.items()}

    def pick(rho: float) -> dict[str, tuple[int, tuple[int, ...]]]:
        chosen = {}
        for name, cands in options.items():
            # the largest cost within rho of the tensor's size; the first (most balanced) of that cost
            last = bisect_right(costs[name], rho * math.prod(weight_shapes[name])) - 1
            chosen[name] = cands[bisect_left(costs[name], costs[name][last])] if last >= 0 else cands[0]
        return chosen

    def total(chosen: Mapping[str, tuple[int, tuple[int, ...]]]) -> int:
        return sum(c[0] for c in chosen.values())

    cheapest = pick(0.0)
    if total(cheapest) > budget:
        raise ConfigError(
            f"ratio is too small: the smallest {sizing.label} updates need {total(cheapest)} values "
            f"but only {budget} fit beside the dense layers; raise ratio or keep fewer layers dense"
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if total(pick(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return {name: sizes for name, (_, sizes) in pick(lo).items()}
