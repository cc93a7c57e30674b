"""Model update decomposition (MUD) on any PyTorch model.

:func:`decompose` has the run's method (:mod:`fedmud.methods`) plan every floating tensor of
the model and registers the method's parametrisation (``torch.nn.utils.parametrize``) on each
tensor it plans; under ``method=fedmud`` that is a
:class:`~fedmud.methods.fedmud.DecomposedUpdate`, ``W -> W + ΔW(factors)``. The module keeps
running its own forward, and reads ``W + ΔW(factors)`` wherever it reads the tensor
(Linear, convolutions, Embedding, attention ``in_proj_weight``, LSTM/GRU weights, a
bare ``nn.Parameter``). The base weight ``W`` is frozen for the round. A round is::

    model.reset(round_seed)      # every party draws the same factors from the seed
    ... train ...                # only trainable factors and dense tensors move
    model.merge()                # W <- W + ΔW, on the server after aggregation

Names: a decomposed tensor keeps its ``state_dict`` name (``encoder.layers.0.self_attn.in_proj_weight``)
and its factors are that name plus the factor (``...in_proj_weight.T1``).
What crosses the network is :meth:`DecomposedModel.uploaded_state`: trained factors
and every dense floating tensor (biases, norms and their running statistics, dense
layers). The global model is :meth:`DecomposedModel.global_state`, named as the
undecomposed model's state_dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layout import UploadLayout
from .methods import method_named, plan_decomposition
from .methods.fedmud import DecomposedUpdate
from .plan import DecompositionPlan, aliases, unique_state
from .seeds import derive_seed

if TYPE_CHECKING:
    from .config import DecompositionConfig

# a parametrised tensor's state_dict entries: "<module.>parametrizations.<tensor>.original" and
# "<module.>parametrizations.<tensor>.0.<factor>"
_PARAMETRISED = re.compile(r"^(?P<module>(?:.*\.)?)parametrizations\.(?P<tensor>[^.]+)\.(?:original|0\.(?P<part>.+))$")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module holding the tensor, its attribute name) for a state_dict name."""
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _public_name(raw: str) -> str:
    """A parametrised model's state_dict name as the undecomposed model's (factors: tensor + '.' + factor)."""
    match = _PARAMETRISED.match(raw)
    if match is None:
        return raw
    tensor = match["module"] + match["tensor"]
    return tensor if match["part"] is None else f"{tensor}.{match['part']}"


def _copy_into(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise KeyError(f"{what} does not match the model: missing {missing}, unexpected {extra}")
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{what}: {name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}")
        tensor.copy_(state[name])


class DecomposedModel(nn.Module):
    """A model whose planned tensors are parametrised by its method (see the module docstring).

    ``config.method`` names the :class:`~fedmud.methods.Method` that plans the model
    (:attr:`plan`, a :class:`~fedmud.plan.DecompositionPlan`) and builds the parametrisation of
    each planned tensor: MUD's :class:`~fedmud.methods.fedmud.DecomposedUpdate`, FedLMT's and
    FedPara's factorised weights, LoRA's persistent adapters; ``fedavg`` plans none. Which
    state is uploaded and which is global follows from what the method says its
    parametrisations are (:class:`~fedmud.methods.Method`), never from its name.
    """

    def __init__(self, model: nn.Module, config: DecompositionConfig) -> None:
        super().__init__()
        self.config = config
        self.method = method_named(config.method)
        self.plan: DecompositionPlan = plan_decomposition(model, config)
        self.dense_reference_numel = self.plan.dense_reference
        # the undecomposed model's state (names, shapes, dtypes): what dense FedAvg sends down
        self.reference_state = {n: torch.empty_like(t, device="meta") for n, t in unique_state(model).items()}
        self.layout_version = 0  # bumped whenever a tensor's shape in the upload changes (HRP LoRA's switch)
        # Why parametrisations: each planned tensor becomes W + ΔW(factors) through
        # torch.nn.utils.parametrize, so the user's module runs its own forward unchanged (any model:
        # a CNN, a Hugging Face transformer, a timm net) and reads its weight from the parametrisation.
        # W itself (``original``) is frozen: of a planned tensor only the factors train, so only they have gradients
        # and optimiser state, and a merge is the one place W changes. A weight tied to others (an
        # embedding shared with the output layer) gets the same parametrisation object on every
        # alias, so all of them read one W + ΔW and the update is uploaded once.
        planned = self.plan.decomposed()
        tied = aliases(model)
        for name, tensor_plan in planned.items():
            device = model.get_parameter(name).device
            parametrisation = self.method.parametrisation(tensor_plan, config, device)
            for alias in tied.get(name, [name]):  # a tied weight: every module reads W + ΔW of one update
                owner, attr = _owner(model, alias)
                parametrize.register_parametrization(owner, attr, parametrisation)
                owner.parametrizations[attr].original.requires_grad_(False)
        self.parametrised_names: tuple[str, ...] = tuple(planned)
        self.frozen_names = frozenset(t.name for t in self.plan.tensors if t.frozen)  # global, never uploaded
        self.model = model

    # ------------------------------------------------------------------ structure
    def parametrisations(self) -> dict[str, nn.Module]:
        """Tensor name -> the parametrisation module its method registered on it."""
        out = {}
        for name in self.parametrised_names:
            owner, attr = _owner(self.model, name)
            out[name] = owner.parametrizations[attr][0]
        return out

    def updates(self) -> dict[str, DecomposedUpdate]:
        """Tensor name -> its round update (a method that ``merges``, as MUD); empty otherwise."""
        return self.parametrisations() if self.method.merges else {}

    def base_weight(self, name: str) -> torch.Tensor:
        """``W`` of a decomposed tensor: the value the round's update is added to."""
        owner, attr = _owner(self.model, name)
        return owner.parametrizations[attr].original

    def effective_weight(self, name: str) -> torch.Tensor:
        """What the model computes with: ``W + offset + ΔW`` for a decomposed tensor."""
        owner, attr = _owner(self.model, name)
        return getattr(owner, attr)

    def state_items(self) -> dict[str, torch.Tensor]:
        """Every state tensor once (tied weights and their factors under the first name), publicly
        named, not detached."""
        return {_public_name(n): t for n, t in unique_state(self.model, keep_vars=True).items()}

    def _parts(self, trainable: bool) -> set[str]:
        """Public names of the parametrisations' trained parameters (``trainable``), or of all their
        persistent state (parameters and buffers)."""
        out = set()
        for name, module in self.parametrisations().items():
            if trainable:
                out |= {f"{name}.{part}" for part, p in module.named_parameters() if p.requires_grad}
            else:
                out |= {f"{name}.{part}" for part in module.state_dict()}
        return out

    def _global_items(self) -> dict[str, torch.Tensor]:
        """Base weights, what persists of the parametrisations, and everything dense, named as in
        the undecomposed model. Left out: a merged method's trained factors (they are drawn again
        every round) and the unused ``W`` of a method that ``replaces_weight`` (FedLMT's ``U``, ``V``
        and FedPara's ``X1``, ``Y1``, ``X2``, ``Y2`` are the tensor)."""
        skip = self._parts(trainable=True) if self.method.merges else set()
        if self.method.replaces_weight:
            skip |= set(self.parametrised_names)
        return {n: t for n, t in self.state_items().items() if n not in skip}

    def _uploaded_items(self) -> dict[str, torch.Tensor]:
        """The parametrisations' trained parameters and the dense floating tensors; never ``W`` under
        a parametrisation nor its buffers (frozen factors, HRP directions, ffa-lora's A), nor a tensor
        the model's owner froze."""
        trained = self._parts(trainable=True)
        skip = set(self.parametrised_names) | (self._parts(trainable=False) - trained) | self.frozen_names
        return {n: t for n, t in self.state_items().items() if n not in skip and torch.is_floating_point(t)}

    def upload_layout(self) -> UploadLayout:
        items = self._uploaded_items()
        statistics = frozenset(
            f"{prefix}.{stat}" if prefix else stat
            for prefix, module in self.model.named_modules()
            if isinstance(module, nn.modules.batchnorm._NormBase)
            for stat in ("running_mean", "running_var")
        ) & set(items)
        return UploadLayout(tuple((n, tuple(t.shape)) for n, t in items.items()), statistics)

    # ------------------------------------------------------------------ state
    def uploaded_state(self) -> dict[str, torch.Tensor]:
        """What a client sends: trained factors and densely trained tensors (detached)."""
        return {n: t.detach() for n, t in self._uploaded_items().items()}

    def global_state(self) -> dict[str, torch.Tensor]:
        """The global model, keyed like the undecomposed model's state_dict."""
        return {n: t.detach() for n, t in self._global_items().items()}

    @torch.no_grad()
    def load_uploaded_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an (aggregated, decoded) upload; norm layers' running variances are kept >= 0.

        A lossy code (``sign`` decodes every value of a chunk to ± its mean magnitude) can push
        a small variance below zero, and BatchNorm's evaluation would then take a square root of
        a negative number. The clamp is elementwise, so server and clients stay bitwise equal.
        """
        _copy_into(self._uploaded_items(), state, "uploaded state")
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_var is not None:
                module.running_var.clamp_(min=0.0)

    @torch.no_grad()
    def load_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a global state; parametrisations take the shapes its tensors have where their method
        allows it (LoRA's adapters: the rank before or after the preheat)."""
        self.layout_version += self.method.fit_state(self, state, "global state")
        _copy_into(self._global_items(), state, "global state")

    # ------------------------------------------------------------------ round
    def reset(self, round_seed: int) -> None:
        """Draw every update's factors from (round seed, tensor name)."""
        for name, update in self.updates().items():
            update.reset(derive_seed(round_seed, name))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every update into its base weight, ``W <- W + offset + ΔW``; then the model computes with W."""
        for name, update in self.updates().items():
            self.base_weight(name).add_(update.merged_increment())
            update.clear()

    def clear(self) -> None:
        """Zero every update's factors: the model computes with W."""
        for update in self.updates().values():
            update.clear()

    # ------------------------------------------------------------------ high-rank preheating
    @property
    def hrp_ready(self) -> bool:
        """Whether the preheat is over (MUD's directions are set, LoRA's adapters have their final rank)."""
        return self.method.hrp_ready(self)

    def set_hrp_directions(self, initial: Mapping[str, torch.Tensor]) -> None:
        """End the preheat (``initial``: the global state before it), as the method does: MUD fixes
        every update's anchor directions from the change; LoRA replaces every adapter by its top-r SVD."""
        self.method.end_preheat(self, initial)

    def hrp_state(self) -> dict[str, torch.Tensor]:
        """What the end of the preheat fixed, named as in :meth:`global_state` (empty unless
        ``init=hrp``): MUD's directions, or LoRA's truncated adapters."""
        names = self.method.hrp_names(self)
        return {n: t.detach() for n, t in self.state_items().items() if n in names}

    def hrp_layout(self) -> UploadLayout:
        """Names and shapes of :meth:`hrp_state` once the preheat is over (what rides on that link)."""
        return self.method.hrp_layout(self)

    @torch.no_grad()
    def load_hrp_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.layout_version += self.method.fit_state(self, state, "HRP state")
        names = {n for n, _ in self.hrp_layout().entries}
        _copy_into({n: t for n, t in self.state_items().items() if n in names}, state, "HRP state")

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ reporting
    def summary(self) -> list[str]:
        """One line per floating tensor (how it is decomposed, or why it is dense), then the total."""
        return self.plan.lines()


def decompose(model: nn.Module, config: DecompositionConfig) -> DecomposedModel:
    """Plan ``model`` per ``config`` and parametrise it in place; factors are zero (it computes
    as ``model``) until :meth:`DecomposedModel.reset`."""
    return DecomposedModel(model, config)
