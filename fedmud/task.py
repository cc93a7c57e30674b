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
that higher is better everywhere), ``sequence-classification`` (classification of texts: the same
loss and accuracy, over a sequence classifier's ``logits``), and ``causal-lm``: next-token cross-entropy on a language
model's ``logits`` (batch, length, vocabulary) against ``labels`` (batch, length; ``-100``
where no token is predicted, as Hugging Face pads), the means over predicted tokens, not
sequences; the metric is next-token accuracy and perplexity is ``exp(loss)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .errors import ConfigError

IGNORE = -100  # a label that is not predicted (padding), as Hugging Face and PyTorch use it


@dataclass(frozen=True)
class Task:
    """loss: ``(output, target) -> mean loss`` (a scalar tensor, differentiated);
    metric: ``(output, target) -> float``, the *sum* over the batch (so means over a
    split are exact); metric_name: how it is logged (``accuracy`` by default);
    count: ``target -> int``, what the loss is the mean over and the metric the sum over
    (examples by default; predicted tokens for ``causal-lm``), so means over a split weigh each alike."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: Callable[[torch.Tensor, torch.Tensor], float]
    metric_name: str = "accuracy"
    count: Callable[[torch.Tensor], int] = len


def _correct(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output.argmax(1) == target).sum().item())


def _neg_sum_squared_error(output: torch.Tensor, target: torch.Tensor) -> float:
    per_example = (output - target).pow(2).reshape(len(output), -1).mean(1)
    return -float(per_example.sum().item())


def _next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts label t+1: (logits of positions 0..L-2, labels 1..L-1), flattened."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"causal-lm reads logits of shape (batch, length, vocabulary) and labels (batch, length); got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(*_next_token(logits, labels), ignore_index=IGNORE)


def _next_token_correct(logits: torch.Tensor, labels: torch.Tensor) -> float:
    flat, target = _next_token(logits, labels)
    kept = target != IGNORE
    return float((flat[kept].argmax(1) == target[kept]).sum().item())


def _predicted_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum().item())


CLASSIFICATION = Task(loss=F.cross_entropy, metric=_correct, metric_name="accuracy")
REGRESSION = Task(loss=F.mse_loss, metric=_neg_sum_squared_error, metric_name="neg_mse")
CAUSAL_LM = Task(
    loss=_next_token_loss, metric=_next_token_correct, metric_name="token_accuracy", count=_predicted_tokens
)
# sequence-classification is classification named for text (what the text data path is told, and what
# Hugging Face calls the head): the same loss and metric over the logits a sequence classifier returns
BUILTIN_TASKS = {
    "classification": CLASSIFICATION,
    "sequence-classification": CLASSIFICATION,
    "regression": REGRESSION,
    "causal-lm": CAUSAL_LM,
}


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
