"""What local training minimises and evaluation reports: the task.

The default is classification (cross-entropy; accuracy). Another task plugs in
with ``task = "package.module:factory"`` in the run config: the factory takes no
arguments and returns a :class:`Task`, e.g. for regression::

    def regression() -> Task:
        return Task(
            loss=torch.nn.functional.mse_loss,
            metric=lambda out, y: -torch.nn.functional.mse_loss(out, y, reduction="sum").item(),
            metric_name="neg_mse",
        )

``regression`` is built in (mean squared error; the metric is the negated MSE, so
that higher is better everywhere).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .config import ConfigError


@dataclass(frozen=True)
class Task:
    """loss: ``(output, target) -> mean loss`` (a scalar tensor, differentiated);
    metric: ``(output, target) -> float``, the *sum* over the batch (so means over a
    split are exact); metric_name: how it is logged (``accuracy`` by default)."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: Callable[[torch.Tensor, torch.Tensor], float]
    metric_name: str = "accuracy"


def _correct(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output.argmax(1) == target).sum().item())


def _neg_sum_squared_error(output: torch.Tensor, target: torch.Tensor) -> float:
    per_example = (output - target).pow(2).reshape(len(output), -1).mean(1)
    return -float(per_example.sum().item())


CLASSIFICATION = Task(loss=F.cross_entropy, metric=_correct, metric_name="accuracy")
REGRESSION = Task(loss=F.mse_loss, metric=_neg_sum_squared_error, metric_name="neg_mse")
BUILTIN_TASKS = {"classification": CLASSIFICATION, "regression": REGRESSION}


def resolve_task(value: str) -> Task:
    """The task a run config names: a built-in name or ``package.module:factory``."""
    if value in BUILTIN_TASKS:
        return BUILTIN_TASKS[value]
    from .factories import call_factory, load_factory

    task = call_factory("task", value, load_factory("task", value))
    if not isinstance(task, Task):
        raise ConfigError(
            f"task={value!r} is not allowed: the factory returned a {type(task).__name__}, "
            f"expected a fedmud.task.Task"
        )
    return task
