"""How a batch is fed to a model and where its predictions are: the one adapter between any
model and a :class:`~fedmud.task.Task`.

Batches (what a ``DataLoader`` yields):

- ``(inputs, target)``: ``model(inputs)``: image and tensor datasets, torchvision's, ours;
- a mapping, as every Hugging Face tokenizer and collator makes (``input_ids``,
  ``attention_mask``, ``labels``): ``model(**batch)`` without the target, which is ``labels``
  (or ``label``); the model's own loss is not computed, the task's is;
- ``(mapping, target)``: ``model(**mapping)``, the target beside it.

Outputs: a tensor (the logits or predictions), a tuple or list (its first element, as Hugging
Face models return with ``return_dict=False``), or a mapping or ``ModelOutput`` with ``logits``
(every Hugging Face head; ``prediction_logits``, ``last_hidden_state`` are not predictions
and are refused by name).

The first batch of every training and evaluation pass goes through :func:`check_first`: a model
whose output the task cannot read, or a batch the model cannot take, stops there with one message
naming the model, what it got and returned, and what the task expects, instead of a torch error
from deep inside the loss after the run has started.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

TARGET_KEYS = ("labels", "label")  # where a mapping batch keeps its target (Hugging Face: labels)


class ModelIOError(ConfigError):
    """A model and a task that do not fit together; the message says which part and what is allowed."""


@dataclass(frozen=True)
class Batch:
    """One batch as the model takes it: positional ``args`` or keyword ``kwargs``, and the target."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(
            tuple(_to(a, device) for a in self.args),
            {k: _to(v, device) for k, v in self.kwargs.items()},
            _to(self.target, device),
        )

    def __len__(self) -> int:
        return len(self.target)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: " + ", ".join(_describe(v) for v in value[:3])
    return f"a {type(value).__name__}"


def split_batch(batch: Any) -> Batch:
    """A loader's batch as :class:`Batch` (see the module docstring for the forms taken)."""
    if isinstance(batch, Mapping):
        target_key = next((k for k in TARGET_KEYS if k in batch), None)
        if target_key is None:
            raise ModelIOError(
                f"a batch is {_describe(batch)}, without a target: a mapping batch must hold one of "
                f"{', '.join(TARGET_KEYS)} (or be yielded as (mapping, target))"
            )
        inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        return Batch((), inputs, batch[target_key])
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, target = batch
        if isinstance(inputs, Mapping):
            return Batch((), dict(inputs), target)
        return Batch((inputs,), {}, target)
    raise ModelIOError(
        f"a batch is {_describe(batch)}; allowed: (inputs, target), a mapping with labels, or (mapping, target)"
    )


def predictions(output: Any) -> torch.Tensor:
    """The tensor a task reads from a model's output (see the module docstring)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelIOError(
        f"the model returned {_describe(output)}; the task reads a tensor, a tuple whose first element is "
        "one, or a mapping / ModelOutput with logits"
    )


def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's predictions for ``batch``."""
    return predictions(model(*batch.args, **batch.kwargs))


def check_first(
    model: nn.Module, batch: Batch, task, where: str, metric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(predictions, loss, the metric's sum when ``metric``) of the first batch of a pass, or one
    :class:`ModelIOError` saying what did not fit: the batch the model was given, what it
    returned, what the task expects. A mapping batch the forward refuses is compared with the
    forward's parameters: the message names the inputs it lacks and the keys it does not take."""
    inner = getattr(model, "model", model)
    name = type(inner).__name__
    given = ", ".join([_describe(a) for a in batch.args] + [f"{k}={_describe(v)}" for k, v in batch.kwargs.items()])
    try:
        output = model(*batch.args, **batch.kwargs)
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as err:
        keys = _key_mismatch(inner, batch) if batch.kwargs else ""
        raise ModelIOError(f"{where}: the model {name} cannot take a batch of {given}{keys}: {err}") from None
    out = predictions(output)
    try:
        loss = task.loss(out, batch.target)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"the loss is {_describe(loss)}, expected a scalar tensor")
        value = float(task.metric(out, batch.target)) if metric else None
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        raise ModelIOError(
            f"{where}: the task ({task.metric_name}) cannot read the model {name}'s output: it returned "
            f"{_describe(output)}, read as predictions {_describe(out)}, against targets {_describe(batch.target)}: {err}"
        ) from None
    return out, loss, value


def _key_mismatch(model: nn.Module, batch: Batch) -> str:
    """For a mapping batch the forward refused: the inputs it lacks (the forward's parameters without a
    default, else its first one, which a Hugging Face model reads as input_ids or pixel_values), the
    keys it does not name, and its parameters; '' when the keys are not the problem."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return ""
    named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in parameters if p.name in named and p.default is p.empty]
    missing = [n for n in (required or named[:1]) if n not in batch.kwargs]
    unnamed = [k for k in batch.kwargs if k not in named]
    if not (missing or unnamed):
        return ""
    parts = [f"it lacks {', '.join(missing)}"] if missing else []
    if unnamed:
        parts.append(f"{', '.join(unnamed)} {'is' if len(unnamed) == 1 else 'are'} not among the forward's parameters")
    shown = ", ".join(named[:8]) + (", ..." if len(named) > 8 else "")
    return (
        f" ({'; '.join(parts)}; {type(model).__name__}.forward takes {shown}: name the batch's keys after them, "
        f"the target as {' or '.join(TARGET_KEYS)})"
    )
