"""Methods as plug-ins: each federated training method is one :class:`Method` in a file of its own.

A method owns the values ``init`` may take, how a model is planned, the parametrisation
registered on each planned tensor, its cross-key checks and its preheat (``init=hrp``)
hooks. :class:`~fedmud.mud.DecomposedModel` and the run config read them from
:data:`METHODS`; a new method is a file that calls :func:`register`, plus its tests.

Built in: ``fedmud`` (:mod:`.fedmud`), ``fedavg`` (:mod:`.fedavg`), ``fedlmt`` and
``fedpara`` (:mod:`.factorised`), ``lora`` and ``ffa-lora`` (:mod:`.lora`).
"""

from __future__ import annotations

from ..plan import with_frozen
from .base import INITS, METHODS, Method, method_named, register

# the built-ins, in the order the config table lists them: importing each registers it
from . import fedmud  # noqa: E402,F401  isort: skip
from . import fedavg  # noqa: E402,F401  isort: skip
from . import factorised  # noqa: E402,F401  isort: skip
from . import lora  # noqa: E402,F401  isort: skip

BUILTIN_METHODS = tuple(METHODS)


def plan_decomposition(model, config):
    """The :class:`~fedmud.plan.DecompositionPlan` of ``model`` under ``config.method``: the method
    plans the trained tensors, and every frozen one (``requires_grad=False``) stays as it is.

    Raises :class:`~fedmud.errors.ConfigError` when the method's target cannot be reached.
    """
    return with_frozen(method_named(config.method).plan(model, config), model)


__all__ = ["BUILTIN_METHODS", "INITS", "METHODS", "Method", "method_named", "plan_decomposition", "register"]
