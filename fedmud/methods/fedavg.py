"""``method=fedavg``: every tensor trained and uploaded densely, through the same apps."""

from __future__ import annotations

from ..plan import DecompositionPlan, dense_plan
from .base import Method, register


class FedAvg(Method):
    """Dense FedAvg (McMahan et al., 2017): no tensor is parameterised; ``init`` is ignored."""

    name = "fedavg"
    help = "trains every layer densely through the same apps"

    def plan(self, model, config) -> DecompositionPlan:
        return dense_plan(model, self.name)


register(FedAvg())
