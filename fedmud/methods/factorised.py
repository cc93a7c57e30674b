"""Methods that parameterise the weights themselves: ``fedlmt`` and ``fedpara`` (no MUD).

Each planned tensor is computed from trained factors alone (``W`` unused): FedLMT's rank-r
product ``U·V`` (:class:`FactorizedWeight`), FedPara's low-rank Hadamard product
(:class:`HadamardLowRankWeight`). The factors persist across rounds and are averaged as they
are; the ranks are sized so that the upload meets ``ratio``, as MUD's updates are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..decomposition import Sizing, UpdateSizing, matrix_shape
from ..plan import DecompositionPlan, TensorPlan, plan_to_ratio
from .base import Method, register

if TYPE_CHECKING:
    from ..config import DecompositionConfig


class FactorizedWeight(nn.Module):
    """FedLMT-style parametrisation: the weight itself is ``U·V`` (rank ``r``), ``W`` unused.

    ``U`` is (m, r) and ``V`` (r, n) in the (m, n) view of :func:`~fedmud.decomposition.matrix_shape`;
    both are drawn with std ``sqrt(t / sqrt(r))`` so that ``U·V`` has the std ``t = 1/sqrt(fan_in)``.
    Parameters: ``r(m+n)`` against ``m·n``.
    """

    def __init__(self, shape: tuple[int, ...], rank: int, device: torch.device) -> None:
        super().__init__()
        self.shape = tuple(shape)
        m, n = matrix_shape(self.shape)
        std = math.sqrt((1 / math.sqrt(math.prod(self.shape[1:]))) / math.sqrt(rank))
        self.U = nn.Parameter(torch.randn(m, rank, device=device) * std)
        self.V = nn.Parameter(torch.randn(rank, n, device=device) * std)
        self.rank = rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.U @ self.V).reshape(self.shape)


class HadamardLowRankWeight(nn.Module):
    """FedPara's parametrisation: the weight itself is the low-rank Hadamard product
    ``(X1·Y1ᵀ) ⊙ (X2·Y2ᵀ)``, ``W`` unused.

    X1, X2 are (m, r) and Y1, Y2 (n, r) in the (m, n) view of :func:`~fedmud.decomposition.matrix_shape`
    (a convolution as the repository views it, like FedLMT). Parameters: ``2r(m+n)`` against
    ``m·n``; rank up to ``min(r², m, n)``.

    Init: every factor i.i.d. N(0, s²) with ``s = (t/r)^(1/4)``. Each inner product is a sum of
    ``r`` products of two factors (variance ``r·s⁴``), and the two are independent with mean 0,
    so every entry of the weight has variance ``(r·s⁴)² = t²``. ``t² = 1/(3·fan_in)`` is the
    variance of PyTorch's default init of Linear and convolution weights (kaiming-uniform with
    ``a=√5``: U(±1/√fan_in)). Flower's FedPara baseline (after the authors' code) draws each
    factor with He init instead, which leaves the product's scale to ``r`` and the shapes.
    """

    def __init__(self, shape: tuple[int, ...], rank: int, device: torch.device) -> None:
        super().__init__()
        self.shape = tuple(shape)
        m, n = matrix_shape(self.shape)
        target_std = 1 / math.sqrt(3 * math.prod(self.shape[1:]))
        std = (target_std / rank) ** 0.25
        self.X1 = nn.Parameter(torch.randn(m, rank, device=device) * std)
        self.Y1 = nn.Parameter(torch.randn(n, rank, device=device) * std)
        self.X2 = nn.Parameter(torch.randn(m, rank, device=device) * std)
        self.Y2 = nn.Parameter(torch.randn(n, rank, device=device) * std)
        self.rank = rank

    @staticmethod
    def cost(shape: tuple[int, ...], rank: int) -> int:
        """Values uploaded: ``2r(m+n)``, twice a rank-r factorisation's."""
        m, n = matrix_shape(shape)
        return 2 * rank * (m + n)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return ((self.X1 @ self.Y1.T) * (self.X2 @ self.Y2.T)).reshape(self.shape)


@lru_cache(maxsize=4096)
def _hadamard_candidates(weight_shape: tuple[int, ...]) -> tuple[tuple[int, tuple[int, ...]], ...]:
    m, n = matrix_shape(weight_shape)
    return tuple((HadamardLowRankWeight.cost(weight_shape, r), (r,)) for r in range(1, min(m, n) + 1))


@dataclass(frozen=True)
class HadamardSizing(Sizing):
    """FedPara's inner ranks ``r`` = 1..min(m, n), each uploading ``2r(m+n)``."""

    label = "hadamard"

    def candidates(self, weight_shape: tuple[int, ...]) -> tuple[tuple[int, tuple[int, ...]], ...]:
        return _hadamard_candidates(tuple(weight_shape))

    def upload(self, weight_shape: tuple[int, ...], sizes: tuple[int, ...]) -> int:
        return HadamardLowRankWeight.cost(weight_shape, *sizes)

    def describe(self, weight_shape: tuple[int, ...], sizes: tuple[int, ...]) -> str:
        (r,) = sizes
        m, n = matrix_shape(weight_shape)
        return f"hadamard r={r} ({m}x{n}, rank <= {min(r ** 2, m, n)})"


class FedLMT(Method):
    """FedLMT (Liu et al., 2024): the model's weights are rank-r factorisations, trained and averaged."""

    name = "fedlmt"
    help = "factorises the model itself (W = U·V, no MUD)"
    replaces_weight = True

    def plan(self, model: nn.Module, config: DecompositionConfig) -> DecompositionPlan:
        return plan_to_ratio(model, config, UpdateSizing("mat", "ab"))  # U·V is sized as a rank-r A·B

    def parametrisation(self, tensor: TensorPlan, config: DecompositionConfig, device: torch.device) -> nn.Module:
        return FactorizedWeight(tensor.shape, *tensor.sizes, device)


class FedPara(Method):
    """FedPara (Hyeon-Woo et al., 2022): the weights are low-rank Hadamard products, trained and averaged."""

    name = "fedpara"
    help = "parameterises the model as FedPara's low-rank Hadamard product (W = (X1·Y1ᵀ) ⊙ (X2·Y2ᵀ), no MUD)"
    replaces_weight = True

    def plan(self, model: nn.Module, config: DecompositionConfig) -> DecompositionPlan:
        return plan_to_ratio(model, config, HadamardSizing())

    def parametrisation(self, tensor: TensorPlan, config: DecompositionConfig, device: torch.device) -> nn.Module:
        return HadamardLowRankWeight(tensor.shape, *tensor.sizes, device)


register(FedLMT())
register(FedPara())
