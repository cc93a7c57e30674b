"""Local training and evaluation (plain PyTorch), for any model and task."""

from __future__ import annotations

import contextlib
import os
import re
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import TrainConfig
from .model_io import check_first, forward, split_batch
from .task import CLASSIFICATION, Task

AUTOCAST = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # TrainConfig.autocast

# The oldest NVIDIA driver branch each CUDA major version runs on (NVIDIA, "CUDA Minor
# Version Compatibility": 13.x >= 580, 12.x >= 525, 11.x >= 450); a torch wheel carries
# its own CUDA runtime, so the driver is the only part the host must provide.
MIN_DRIVER = {"13": "580", "12": "525", "11": "450"}


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return describe_device()[0]


def describe_device() -> tuple[torch.device, str]:
    """The device local training runs on, and one line naming the GPU or saying why the CPU.

    A client that falls back to the CPU still trains, only many times slower, so
    nothing else shows it; this line in the SuperNode's log does. When CUDA fails to
    start, ``torch.cuda.is_available()`` says why in a warning (a driver too old for
    this torch, a broken install) and returns False; the warning is caught here so
    the reason lands in the line instead of scrolling past once.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        index = torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        return torch.device("cuda"), f"CUDA device {index}: {name} ({_torch_build()})"
    return torch.device("cpu"), f"CPU: {_why_not_cuda([str(w.message) for w in caught])}"


def _torch_build() -> str:
    cuda = torch.version.cuda
    return f"torch {torch.__version__}, " + (f"built for CUDA {cuda}" if cuda else "built without CUDA")


def _why_not_cuda(warned: list[str]) -> str:
    """Why CUDA is not used: torch built without it, the driver's own complaint, or no device."""
    cuda = torch.version.cuda
    if not cuda:
        return f"torch {torch.__version__} is built without CUDA"
    if warned:
        reason = _first_sentence(warned[0])
        if "too old" in reason:
            needs = MIN_DRIVER.get(cuda.split(".")[0])
            floor = f"; CUDA {cuda} needs NVIDIA driver >= {needs}" if needs else ""
            return f"the NVIDIA driver is too old for this torch: {reason} ({_torch_build()}{floor})"
        return f"CUDA did not start: {reason} ({_torch_build()})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return f"no CUDA device visible ({_torch_build()}{hidden})"


def _first_sentence(message: str) -> str:
    """torch's CUDA warnings: 'CUDA initialization: <what>. <advice> (Triggered internally at ...)'."""
    message = message.removeprefix("CUDA initialization:").strip()
    match = re.match(r"(.+?\.)(\s|$)", message, re.DOTALL)
    return (match.group(1) if match else message).strip()


def train_local(
    model: nn.Module, loader: DataLoader, config: TrainConfig, device: torch.device, task: Task = CLASSIFICATION
) -> float:
    """SGD or Adam (``config.optimizer``) over the trainable parameters for ``config.local_epochs``;
    returns the mean loss. Batches and outputs are read by :mod:`fedmud.model_io`; the first batch
    is checked (:func:`~fedmud.model_io.check_first`)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        optimiser = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimiser = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    total, count = 0.0, 0
    precision = AUTOCAST[config.autocast]
    # fp16's small range underflows gradients: scale the loss (CUDA's scaler; bf16 has float32's range)
    scaler = torch.amp.GradScaler(device.type, enabled=precision is torch.float16 and device.type == "cuda")
    first = True
    for _ in range(config.local_epochs):
        for raw in loader:
            batch = split_batch(raw).to(device)
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=precision) if precision else contextlib.nullcontext():
                if first:
                    loss = check_first(model, batch, task, "local training")[1]
                    first = False
                else:
                    loss = task.loss(forward(model, batch), batch.target)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            n = task.count(batch.target)
            total += loss.item() * n
            count += n
    return total / max(count, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, task: Task = CLASSIFICATION
) -> tuple[float, float]:
    """(mean loss, mean metric) on ``loader``; the metric is accuracy for classification."""
    model.eval()
    loss, metric, count = 0.0, 0.0, 0
    for raw in loader:
        batch = split_batch(raw).to(device)
        if count == 0:
            _, batch_loss, batch_metric = check_first(model, batch, task, "evaluation", metric=True)
        else:
            out = forward(model, batch)
            batch_loss, batch_metric = task.loss(out, batch.target), task.metric(out, batch.target)
        n = task.count(batch.target)
        loss += batch_loss.item() * n
        metric += batch_metric
        count += n
    return loss / max(count, 1), metric / max(count, 1)
