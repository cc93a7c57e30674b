"""What a method is to the rest of the system, and the registry of methods by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..layout import UploadLayout
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import DecompositionConfig, RunConfig
    from ..mud import DecomposedModel
    from ..plan import DecompositionPlan, TensorPlan

# How a decomposed update's factors start (``init``); the methods that ignore ``init`` accept these too.
INITS = ("zero", "nonzero", "nonzero-compensated", "hrp")


class Method:
    """One way to federate a model: which tensors it parameterises and how, and its hooks.

    :class:`~fedmud.mud.DecomposedModel` asks its method and never branches on a method's
    name; the run config's ``method`` and ``init`` keys read :data:`METHODS`. A method is a
    subclass in a file of its own, registered with :func:`register` (the built-ins by
    importing :mod:`fedmud.methods`), plus its tests. Its parametrisation is an
    ``nn.Module`` registered on each planned tensor with ``torch.nn.utils.parametrize``,
    ``forward(W) -> the tensor the model computes with``; its trainable parameters are what a
    client uploads for that tensor, its persistent buffers are part of the global model only.

    The class attributes say what the method's parametrisations are:

    - ``merges``: a round's update, drawn by ``reset(seed)`` each round and folded into W by
      ``merged_increment()`` / ``clear()`` after aggregation (MUD); its trained factors are not
      part of the global model. Otherwise the parametrisation persists across rounds and its
      trained tensors are averaged as they are (LoRA's adapters, FedLMT's factors).
    - ``replaces_weight``: the tensor is computed from the factors alone (FedLMT, FedPara); W is
      not part of the global model.
    """

    name: str = ""
    help: str = ""  # what it does, in Markdown: the README's config table, after the name
    inits: tuple[str, ...] = INITS  # the values ``init`` may take (a method may ignore it)
    default_init: str = "nonzero-compensated"  # what ``init=auto`` means
    # what ``uplink=auto`` means; under secure aggregation, where the masks sum values or codes on a grid
    # every client shares, a code here means int8 on that grid where the run sets it, else float32
    default_uplink: str = "float32"
    preheats: bool = False  # whether it takes init=hrp (a high-rank preheat, then its SVD)
    merges: bool = False
    replaces_weight: bool = False

    def plan(self, model: nn.Module, config: DecompositionConfig) -> DecompositionPlan:
        """Every floating tensor of ``model``: parameterised (with its sizes) or dense (and why)."""
        raise NotImplementedError

    def parametrisation(self, tensor: TensorPlan, config: DecompositionConfig, device: torch.device) -> nn.Module:
        """The module registered on one planned tensor."""
        raise NotImplementedError(f"method={self.name!r} parameterises no tensor")

    def carries_error(self, pattern: str) -> bool:
        """Whether what a lossy code loses can be carried into the next round (error feedback, and
        the server's residual under a lossy downlink): true for tensors trained as they are, and for
        a ``merges`` method only if its update is linear in what is trained and is a
        :class:`~fedmud.methods.fedmud.DecomposedUpdate`, whose factors :mod:`fedmud.feedback`
        projects the error onto. When false, ``downlink-codec=auto`` is ``float32``."""
        return not self.merges

    def check(self, run: RunConfig) -> None:
        """Refuse, with :class:`~fedmud.errors.ConfigError`, what this method cannot run."""

    # ---------------------------------------------------------------- init=hrp
    def hrp_ready(self, model: DecomposedModel) -> bool:
        """Whether the preheat is over."""
        return False

    def end_preheat(self, model: DecomposedModel, initial: Mapping[str, torch.Tensor]) -> None:
        """End the preheat; ``initial`` is the global state before it."""

    def hrp_names(self, model: DecomposedModel) -> set[str]:
        """The global state's names that the end of the preheat fixed (sent once on the downlink)."""
        return set()

    def hrp_layout(self, model: DecomposedModel) -> UploadLayout:
        """Names and shapes of those tensors once the preheat is over."""
        return UploadLayout(tuple((n, tuple(t.shape)) for n, t in model.hrp_state().items()))

    def fit_state(self, model: DecomposedModel, state: Mapping[str, torch.Tensor], what: str) -> int:
        """Reshape the parametrisations to ``state``'s tensors where the method allows it (LoRA's
        adapters change rank after the preheat); returns how many changed."""
        return 0


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` a value of the ``method`` key (and of :func:`method_named`)."""
    if not method.name or method.name in METHODS:
        raise ValueError(f"a method needs a name of its own; {method.name!r} is empty or registered")
    METHODS[method.name] = method
    return method


def method_named(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method={name!r} is not allowed; choose one of {', '.join(METHODS)}") from None
