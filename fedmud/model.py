"""Model update decomposition (MUD) on a PyTorch model.

:func:`decompose` wraps every ``nn.Linear`` / ``nn.Conv2d`` not kept dense in a
:class:`DecomposedLayer`: the base weight ``W`` is frozen for the round and the
layer computes with ``W + ΔW(factors)``. A round is::

    model.reset(round_seed)      # every party draws the same factors from the seed
    ... train ...                # only trainable factors and dense tensors move
    model.merge()                # W <- W + ΔW, on the server after aggregation

What crosses the network is :meth:`DecomposedModel.uploaded_state`: trained factors,
biases, dense layers and BatchNorm (affine and running statistics). The global model
is :meth:`DecomposedModel.global_state`, named as the undecomposed model's state_dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .config import ConfigError, DecompositionConfig
from .decomposition import UpdateParameterisation, allocate_sizes, build_update, matrix_shape
from .seeds import derive_seed, draw_normal

HRP_PREFIX = "hrp_"


class DecomposedLayer(nn.Module):
    """A Linear or Conv2d whose round update ΔW is built from factors.

    Frozen factors are buffers, trained ones parameters; all are redrawn by
    :meth:`reset`. With ``compensate`` the round-start update ΔW(T0) is subtracted,
    so the layer starts the round computing with ``W`` exactly.
    """

    def __init__(self, base: nn.Module, update: UpdateParameterisation, config: DecompositionConfig) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"only nn.Linear and nn.Conv2d can be decomposed, not {type(base).__name__}")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.update = update
        self.config = config
        fan_in = math.prod(base.weight.shape[1:])
        self._partner_std = config.init_scale / (math.sqrt(fan_in) * config.frozen_scale)
        for spec in update.factors:
            zeros = torch.zeros(spec.shape, device=base.weight.device)
            if spec.trainable:
                self.register_parameter(spec.name, nn.Parameter(zeros))
            else:
                self.register_buffer(spec.name, zeros, persistent=False)
        self.register_buffer("offset", torch.zeros_like(base.weight), persistent=False)
        if config.init == "hrp":  # directions fixed after the preheat; part of the global model
            for term in update.terms:
                anchor = next(f for f in update.factors if f.name == term.anchor)
                self.register_buffer(HRP_PREFIX + anchor.name, torch.zeros(anchor.shape, device=base.weight.device))
            self.register_buffer(HRP_PREFIX + "set", torch.zeros((), device=base.weight.device))

    @property
    def hrp_ready(self) -> bool:
        return self.config.init == "hrp" and bool(getattr(self, HRP_PREFIX + "set").item())

    def factor(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def delta_weight(self, exact: bool = False) -> torch.Tensor:
        """ΔW from the current factors, in the weight's shape (``exact``: bitwise reproducible)."""
        return self.update.delta_weight({f.name: self.factor(f.name) for f in self.update.factors}, exact)

    def effective_weight(self) -> torch.Tensor:
        return self.base.weight + self.offset + self.delta_weight()

    @torch.no_grad()
    def reset(self, seed: int) -> None:
        """Draw every factor from ``seed`` (on CPU, then moved): identical on every device."""
        device = self.base.weight.device
        hrp = self.hrp_ready
        zero_partners = self.config.init == "zero" or hrp
        for term in self.update.terms:
            anchor = next(f for f in self.update.factors if f.name == term.anchor)
            if hrp:
                self.factor(anchor.name).copy_(getattr(self, HRP_PREFIX + anchor.name))
            else:
                std = self.config.frozen_scale * anchor.iso_std
                self.factor(anchor.name).copy_(draw_normal(anchor.shape, derive_seed(seed, anchor.name), std, device))
            partner = next(f for f in self.update.factors if f.name == term.partner)
            if zero_partners:
                self.factor(partner.name).zero_()
            else:
                values = draw_normal(partner.shape, derive_seed(seed, partner.name), self._partner_std, device)
                self.factor(partner.name).copy_(values)
        self.offset.zero_()
        if self.config.init in ("nonzero-compensated", "hrp") and not zero_partners:
            self.offset.copy_(-self.delta_weight(exact=True))

    @torch.no_grad()
    def set_hrp_directions(self, delta: torch.Tensor) -> None:
        """Fix the anchors' directions from ``delta``, the preheat's merged update (see :mod:`.projection`)."""
        from .projection import hrp_directions

        for name, value in hrp_directions(self.update, delta, self.config.frozen_scale).items():
            getattr(self, HRP_PREFIX + name).copy_(value)
        getattr(self, HRP_PREFIX + "set").fill_(1.0)

    def anchors(self) -> dict[str, torch.Tensor]:
        """The frozen factors of this round."""
        return {f.name: self.factor(f.name).detach() for f in self.update.factors if not f.trainable}

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the round's update into the base weight, W <- W + offset + ΔW, then clear."""
        self.base.weight.add_(self.offset + self.delta_weight(exact=True))
        self.clear()

    @torch.no_grad()
    def clear(self) -> None:
        """Zero every factor and the offset: the layer computes with W alone."""
        for spec in self.update.factors:
            self.factor(spec.name).zero_()
        self.offset.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        if isinstance(self.base, nn.Linear):
            return F.linear(x, weight, self.base.bias)
        return self.base._conv_forward(x, weight, self.base.bias)


class FactorizedLayer(nn.Module):
    """FedLMT-style: the weight itself is ``U·V`` (rank ``r``), both factors trained and averaged.

    ``U`` is (m, r) and ``V`` (r, n) in the (m, n) view of :class:`~.decomposition.LowRankUpdate`;
    both are drawn with std ``sqrt(t / sqrt(r))`` so that ``U·V`` has the std ``t = 1/sqrt(fan_in)``.
    """

    def __init__(self, base: nn.Module, rank: int) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"only nn.Linear and nn.Conv2d can be factorised, not {type(base).__name__}")
        self.shape = tuple(base.weight.shape)
        m, n = matrix_shape(self.shape)
        std = math.sqrt((1 / math.sqrt(math.prod(self.shape[1:]))) / math.sqrt(rank))
        self.U = nn.Parameter(torch.randn(m, rank, device=base.weight.device) * std)
        self.V = nn.Parameter(torch.randn(rank, n, device=base.weight.device) * std)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone())
        self.conv_args = (
            None if isinstance(base, nn.Linear) else (base.stride, base.padding, base.dilation, base.groups)
        )
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.U @ self.V).reshape(self.shape)
        if self.conv_args is None:
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, *self.conv_args)


@dataclass(frozen=True)
class UploadLayout:
    """Names and shapes of everything a client uploads, in wire order."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)


def _weight_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _resolve_dense(model: nn.Module, requested: tuple[str, ...]) -> set[str]:
    layers = _weight_layers(model)
    dense = set()
    for name in requested:
        if name == "first":
            dense.add(layers[0])
        elif name == "last":
            dense.add(layers[-1])
        elif name in layers:
            dense.add(name)
        else:
            raise ConfigError(
                f"dense-layers contains {name!r}, which is not a Linear/Conv2d layer of the model; "
                f"allowed: first, last, {', '.join(layers)}"
            )
    return dense


def _uploaded_dense_state(model: nn.Module, skip_weights: set[str]) -> list[tuple[str, torch.Tensor]]:
    """Parameters and float buffers (BatchNorm running stats) trained densely, in state_dict order."""
    out = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in skip_weights or not torch.is_floating_point(tensor):
            continue  # decomposed weights travel as factors; num_batches_tracked stays local
        out.append((name, tensor))
    return out


def _copy_into(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise KeyError(f"{what} does not match the model: missing {missing}, unexpected {extra}")
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{what}: {name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}")
        tensor.copy_(state[name])


class DecomposedModel(nn.Module):
    """A model whose selected layers train a decomposed update (see module docstring)."""

    def __init__(self, model: nn.Module, config: DecompositionConfig) -> None:
        super().__init__()
        self.config = config
        self.dense_reference_numel = sum(t.numel() for _, t in _uploaded_dense_state(model, set()))
        # the undecomposed model's state (names, shapes, dtypes): what dense FedAvg sends down
        self.reference_state = {n: torch.empty_like(t, device="meta") for n, t in model.state_dict().items()}
        if config.method != "fedmud":  # fedavg: every layer dense; fedlmt: factorised below
            decomposed: dict[str, tuple[int, ...]] = {}
        else:
            dense = _resolve_dense(model, config.dense_layers)
            decomposed = {
                name: tuple(model.get_submodule(name).weight.shape) for name in _weight_layers(model) if name not in dense
            }
        skip = {f"{name}.weight" for name in decomposed}
        dense_numel = sum(t.numel() for _, t in _uploaded_dense_state(model, skip))
        target = math.floor(config.ratio * self.dense_reference_numel) if config.method != "fedavg" else None
        if config.method == "fedlmt":
            _factorise(model, config, target)
        if decomposed:
            budget = target - dense_numel
            if budget <= 0:
                floor = dense_numel / self.dense_reference_numel
                raise ConfigError(
                    f"ratio={config.ratio:.6g} is too small: the dense layers and BatchNorm alone upload "
                    f"{dense_numel} of the {target} values allowed; allowed: ratio > {floor:.4g} "
                    f"(1/{1 / floor:.0f}) with dense-layers={','.join(config.dense_layers)}"
                )
            sizes = allocate_sizes(config.kind, config.pattern, decomposed, budget)
            for name, shape in decomposed.items():
                update = build_update(config.kind, config.pattern, shape, sizes[name])
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, DecomposedLayer(model.get_submodule(name), update, config))
        self.model = model
        self.decomposed_names = tuple(decomposed)

    # ------------------------------------------------------------------ structure
    def layers(self) -> dict[str, DecomposedLayer]:
        return {name: self.model.get_submodule(name) for name in self.decomposed_names}

    def _factor_names(self) -> set[str]:
        return {f"{lname}.{f.name}" for lname, layer in self.layers().items() for f in layer.update.factors}

    def _global_items(self) -> dict[str, torch.Tensor]:
        """Base weights and everything dense, named as in the undecomposed model."""
        factors = self._factor_names()
        return {
            name.replace(".base.", "."): tensor
            for name, tensor in self.model.state_dict(keep_vars=True).items()
            if name not in factors
        }

    def _uploaded_items(self) -> dict[str, torch.Tensor]:
        """Trained factors and dense float tensors; frozen factors and offsets are not persistent."""
        base_weights = {f"{lname}.base.weight" for lname in self.decomposed_names}
        return {
            name.replace(".base.", "."): tensor
            for name, tensor in self.model.state_dict(keep_vars=True).items()
            if name not in base_weights and torch.is_floating_point(tensor) and HRP_PREFIX not in name
        }

    def upload_layout(self) -> UploadLayout:
        return UploadLayout(tuple((n, tuple(t.shape)) for n, t in self._uploaded_items().items()))

    # ------------------------------------------------------------------ state
    def uploaded_state(self) -> dict[str, torch.Tensor]:
        """What a client sends: trained factors and densely trained tensors (detached)."""
        return {n: t.detach() for n, t in self._uploaded_items().items()}

    def global_state(self) -> dict[str, torch.Tensor]:
        """The global model, keyed like the undecomposed model's state_dict."""
        return {n: t.detach() for n, t in self._global_items().items()}

    @torch.no_grad()
    def load_uploaded_state(self, state: Mapping[str, torch.Tensor]) -> None:
        _copy_into(self._uploaded_items(), state, "uploaded state")

    @torch.no_grad()
    def load_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        _copy_into(self._global_items(), state, "global state")

    # ------------------------------------------------------------------ round
    def reset(self, round_seed: int) -> None:
        """Draw every layer's factors from (round seed, layer name)."""
        for name, layer in self.layers().items():
            layer.reset(derive_seed(round_seed, name))

    def merge(self) -> None:
        """Fold every layer's update into its base weight; afterwards the model computes with W."""
        for layer in self.layers().values():
            layer.merge()

    def clear(self) -> None:
        """Zero every layer's factors: the model computes with W."""
        for layer in self.layers().values():
            layer.clear()

    # ------------------------------------------------------------------ high-rank preheating
    @property
    def hrp_ready(self) -> bool:
        return any(layer.hrp_ready for layer in self.layers().values())

    def set_hrp_directions(self, initial: Mapping[str, torch.Tensor]) -> None:
        """Fix every layer's anchor directions from the update since ``initial`` (a global state)."""
        for name, layer in self.layers().items():
            layer.set_hrp_directions(layer.base.weight - initial[f"{name}.weight"].to(layer.base.weight.device))

    def hrp_state(self) -> dict[str, torch.Tensor]:
        """The preheat's directions (empty unless ``init=hrp``), named as in :meth:`global_state`."""
        return {n: t for n, t in self.global_state().items() if HRP_PREFIX in n}

    @torch.no_grad()
    def load_hrp_state(self, state: Mapping[str, torch.Tensor]) -> None:
        items = {n: t for n, t in self._global_items().items() if HRP_PREFIX in n}
        _copy_into(items, state, "HRP directions")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ reporting
    def summary(self) -> list[str]:
        lines = []
        for name, layer in self.layers().items():
            u = layer.update
            lines.append(f"{name}: {tuple(u.weight_shape)} {u.pattern} {u.describe()} uploads {u.num_trainable}/{u.numel}")
        layout = self.upload_layout()
        lines.append(
            f"upload {layout.numel} values vs dense {self.dense_reference_numel}: "
            f"ratio {layout.numel / self.dense_reference_numel:.5f} (1/{self.dense_reference_numel / layout.numel:.1f})"
        )
        return lines


def _factorise(model: nn.Module, config: DecompositionConfig, target: int) -> None:
    """FedLMT: replace every layer not kept dense by ``U·V`` with ranks that fit ``target`` values."""
    dense = _resolve_dense(model, config.dense_layers)
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in _weight_layers(model) if name not in dense}
    skip = {f"{name}.weight" for name in shapes}
    budget = target - sum(t.numel() for _, t in _uploaded_dense_state(model, skip))
    if budget <= 0:
        raise ConfigError(f"ratio={config.ratio:.6g} is too small for method='fedlmt': the dense layers alone exceed it")
    ranks = allocate_sizes("mat", "ab", shapes, budget)
    for name in shapes:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FactorizedLayer(model.get_submodule(name), *ranks[name]))


def decompose(model: nn.Module, config: DecompositionConfig) -> DecomposedModel:
    """Wrap ``model`` per ``config``; factors are zero (it computes as ``model``) until :meth:`reset`."""
    return DecomposedModel(model, config)
