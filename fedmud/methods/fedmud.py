"""``method=fedmud``: model update decomposition (MUD), the FedMUD paper's method.

Each planned tensor gets a :class:`DecomposedUpdate`, ``W -> W + offset + ΔW(factors)``: a
round's update in block-wise Kronecker (BKD, ``kind=kron``) or low-rank (``kind=mat``) factors,
trained in ``pattern`` (``aad``: aggregation-aware, exact), drawn from the round seed by
``reset`` and folded into ``W`` by the merge after aggregation. ``init=hrp`` preheats at a high
rank and then fixes the anchors' directions from the preheat's change (:mod:`fedmud.projection`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..codec import SCHEMES
from ..decomposition import UpdateParameterisation, UpdateSizing, build_update
from ..errors import ConfigError
from ..plan import DecompositionPlan, TensorPlan, plan_to_ratio
from ..seeds import derive_seed, draw_normal
from .base import Method, register

if TYPE_CHECKING:
    from ..config import DecompositionConfig, RunConfig
    from ..mud import DecomposedModel

HRP_PREFIX = "hrp_"
START_PREFIX = "start_"  # a trained factor's value at the round's start (not persistent)


class DecomposedUpdate(nn.Module):
    """The parametrisation ``W -> W + offset + ΔW(factors)`` of one tensor.

    Frozen factors are buffers, trained ones parameters; all are redrawn by
    :meth:`reset`. With ``compensate`` the round-start update ΔW(T0) is subtracted
    (``offset = -ΔW(T0)``), so the tensor starts the round equal to ``W`` exactly. The
    round-start trained factors T0 are kept, not the offset: for ``fab`` and ``aad``, whose
    ΔW is linear in what is trained, a training step computes ``W + ΔW(T - T0)``, with no
    tensor of the weight's size besides ``W`` and the output; merges compute
    ``offset + ΔW(T)`` exactly, as every party must. With ``init=hrp`` the anchors'
    directions (set once, after the preheat) are persistent buffers: part of the global model.
    """

    def __init__(self, update: UpdateParameterisation, config: DecompositionConfig, device: torch.device) -> None:
        super().__init__()
        self.update = update
        self.config = config
        fan_in = math.prod(update.weight_shape[1:])
        self._partner_std = config.init_scale / (math.sqrt(fan_in) * config.frozen_scale)
        for spec in update.factors:
            zeros = torch.zeros(spec.shape, device=device)
            if spec.trainable:
                self.register_parameter(spec.name, nn.Parameter(zeros))
            else:
                self.register_buffer(spec.name, zeros, persistent=False)
        self._compensated = False  # whether the round's trained factors started non-zero and are compensated
        for spec in update.factors:
            if spec.trainable:
                self.register_buffer(START_PREFIX + spec.name, torch.zeros(spec.shape, device=device), persistent=False)
        if config.init == "hrp":  # directions fixed after the preheat; part of the global model
            for term in update.terms:
                self.register_buffer(HRP_PREFIX + term.anchor, torch.zeros(self._spec(term.anchor).shape, device=device))
            self.register_buffer(HRP_PREFIX + "set", torch.zeros((), device=device))

    def _spec(self, name: str):
        return next(f for f in self.update.factors if f.name == name)

    @property
    def hrp_ready(self) -> bool:
        return self.config.init == "hrp" and bool(getattr(self, HRP_PREFIX + "set").item())

    def factor(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def delta_weight(self, exact: bool = False) -> torch.Tensor:
        """ΔW from the current factors, in the tensor's shape (``exact``: bitwise reproducible)."""
        return self.update.delta_weight({f.name: self.factor(f.name) for f in self.update.factors}, exact)

    def _start(self, name: str) -> torch.Tensor:
        return getattr(self, START_PREFIX + name)

    def offset(self, exact: bool = False) -> torch.Tensor | None:
        """``-ΔW(T0)``, the compensation of the round-start update (None when there is none)."""
        if not self._compensated:
            return None
        start = {f.name: self._start(f.name) if f.trainable else self.factor(f.name) for f in self.update.factors}
        return -self.update.delta_weight(start, exact)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # Why the compensation is folded into the factors: the round must start at W exactly, so the
        # tensor is W + ΔW(T) - ΔW(T0). Subtracting a stored ΔW(T0) would keep one more tensor of the
        # weight's size per layer and add it every step. Under fab and aad each term is L·R with one
        # side frozen for the round (the anchor), so ΔW is linear in the trained side: L·R - L0·R =
        # (L - L0)·R, one term of the same size. Under ab both sides train and ΔW is bilinear
        # (A·B - A0·B0 does not factor), so -A0·B0 is added as terms of their own, each as small as
        # a factor pair. Either way the products are summed blockwise into W in one pass
        # (add_products) and nothing of the weight's size is built besides W and the output.
        pairs = []
        for term in self.update.terms:
            left, right = self.factor(term.left), self.factor(term.right)
            if self._compensated and self.update.pattern != "ab":  # ΔW(T) - ΔW(T0) = ΔW(T - T0)
                if term.partner == term.left:
                    left = left - self._start(term.left)
                else:
                    right = right - self._start(term.right)
            pairs.append((left, right))
        if self._compensated and self.update.pattern == "ab":  # bilinear: subtract A0·B0 as a term of its own
            pairs += [(-self._start(t.left), self._start(t.right)) for t in self.update.terms]
        return self.update.add_products(weight, pairs)

    @torch.no_grad()
    def reset(self, seed: int) -> None:
        """Draw every factor from ``seed`` (on CPU, then moved): identical on every device."""
        device = self.factor(self.update.factors[0].name).device
        hrp = self.hrp_ready
        zero_partners = self.config.init == "zero" or hrp
        for term in self.update.terms:
            anchor = self._spec(term.anchor)
            if hrp:
                self.factor(anchor.name).copy_(getattr(self, HRP_PREFIX + anchor.name))
            else:
                std = self.config.frozen_scale * anchor.iso_std
                self.factor(anchor.name).copy_(draw_normal(anchor.shape, derive_seed(seed, anchor.name), std, device))
            partner = self._spec(term.partner)
            if zero_partners:
                self.factor(partner.name).zero_()
            else:
                values = draw_normal(partner.shape, derive_seed(seed, partner.name), self._partner_std, device)
                self.factor(partner.name).copy_(values)
        for spec in self.update.factors:
            if spec.trainable:
                self._start(spec.name).copy_(self.factor(spec.name))
        self._compensated = self.config.init in ("nonzero-compensated", "hrp") and not zero_partners

    @torch.no_grad()
    def set_hrp_directions(self, delta: torch.Tensor) -> None:
        """Fix the anchors' directions from ``delta``, the preheat's merged update (see :mod:`.projection`)."""
        from ..projection import hrp_directions

        for name, value in hrp_directions(self.update, delta, self.config.frozen_scale).items():
            getattr(self, HRP_PREFIX + name).copy_(value)
        getattr(self, HRP_PREFIX + "set").fill_(1.0)

    def anchors(self) -> dict[str, torch.Tensor]:
        """The frozen factors of this round."""
        return {f.name: self.factor(f.name).detach() for f in self.update.factors if not f.trainable}

    @torch.no_grad()
    def merged_increment(self) -> torch.Tensor:
        """``offset + ΔW`` computed exactly: what :meth:`DecomposedModel.merge` adds to ``W``."""
        offset = self.offset(exact=True)
        delta = self.delta_weight(exact=True)
        return delta if offset is None else offset + delta

    @torch.no_grad()
    def clear(self) -> None:
        """Zero every factor and the offset: the tensor equals ``W``."""
        for spec in self.update.factors:
            self.factor(spec.name).zero_()
            if spec.trainable:
                self._start(spec.name).zero_()
        self._compensated = False


class ModelUpdateDecomposition(Method):
    """MUD with BKD and AAD (the paper's defaults: ``kind=kron``, ``pattern=aad``)."""

    name = "fedmud"
    help = "trains a decomposed update of every layer not kept dense"
    preheats = True
    merges = True
    # issue 27's evidence: int4 uploads rounded without bias match float32 at 1/7 of the bytes on the
    # paper's CNN (docs/bench/p10-tuned) and on a language model (docs/finetune-lm.md, "Codecs")
    default_uplink = "int4"

    def plan(self, model: nn.Module, config: DecompositionConfig) -> DecompositionPlan:
        return plan_to_ratio(model, config, UpdateSizing(config.kind, config.pattern))

    def parametrisation(self, tensor: TensorPlan, config: DecompositionConfig, device: torch.device) -> nn.Module:
        return DecomposedUpdate(build_update(config.kind, config.pattern, tensor.shape, tensor.sizes), config, device)

    def carries_error(self, pattern: str) -> bool:
        return pattern != "ab"  # A·B is bilinear: the error cannot be written in the next round's factors

    def check(self, run: RunConfig) -> None:
        if run.decomposition.pattern != "ab":
            return
        if run.uplink.error_feedback:
            raise ConfigError(
                "error-feedback=true is not allowed with pattern='ab': the error is projected onto the next "
                "round's factors, which needs an update linear in them; choose pattern aad or fab"
            )
        if SCHEMES[run.downlink_codec].residual:
            raise ConfigError(
                f"downlink-codec={run.downlink_codec!r} is not allowed with pattern='ab': the server keeps what "
                "the code lost as a weight update and projects it onto the next round's factors, which needs an "
                "update linear in them; choose pattern aad or fab, or downlink-codec float32"
            )

    def hrp_ready(self, model: DecomposedModel) -> bool:
        return any(update.hrp_ready for update in model.updates().values())

    def end_preheat(self, model: DecomposedModel, initial: Mapping[str, torch.Tensor]) -> None:
        """Fix every update's anchor directions from the change since ``initial``."""
        for name, update in model.updates().items():
            base = model.base_weight(name)
            update.set_hrp_directions(base - initial[name].to(base.device))

    def hrp_names(self, model: DecomposedModel) -> set[str]:
        return {
            f"{name}.{buffer}"
            for name, update in model.updates().items()
            for buffer, _ in update.named_buffers()
            if buffer.startswith(HRP_PREFIX)
        }


register(ModelUpdateDecomposition())
