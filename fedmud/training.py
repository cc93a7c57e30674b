"""Local training and evaluation (plain PyTorch), for any model and task."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import TrainConfig
from .task import CLASSIFICATION, Task


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to(batch, device: torch.device):
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def train_local(
    model: nn.Module, loader: DataLoader, config: TrainConfig, device: torch.device, task: Task = CLASSIFICATION
) -> float:
    """SGD over the trainable parameters for ``config.local_epochs``; returns the mean loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    total, count = 0.0, 0
    for _ in range(config.local_epochs):
        for x, y in loader:
            x, y = _to(x, device), _to(y, device)
            optimiser.zero_grad(set_to_none=True)
            loss = task.loss(model(x), y)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(y)
            count += len(y)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, task: Task = CLASSIFICATION
) -> tuple[float, float]:
    """(mean loss, mean metric) on ``loader``; the metric is accuracy for classification."""
    model.eval()
    loss, metric, count = 0.0, 0.0, 0
    for x, y in loader:
        x, y = _to(x, device), _to(y, device)
        out = model(x)
        loss += task.loss(out, y).item() * len(y)
        metric += task.metric(out, y)
        count += len(y)
    return loss / max(count, 1), metric / max(count, 1)
