"""The user's own model and data, shared by the ServerApp and the ClientApp.

Nothing here knows about FedMUD: a plain ``nn.Module`` factory and plain torch
DataLoaders over scikit-learn's embedded handwritten digits (1,797 8×8 images,
10 classes; no download).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SPLIT_SEED = 42  # the same train/test split and partitions in every process
TEST_FRACTION = 0.2


class RowConvNet(nn.Module):
    """A small 1-D convolutional network that reads a digit row by row.

    Input (batch, 8, 8): the 8 pixel columns are the channels, the 8 rows the sequence.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(8, 64, kernel_size=3, padding=1),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Conv1d(64, 128, kernel_size=3, padding=1),
            nn.BatchNorm1d(128),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * 8, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_model() -> nn.Module:
    """The model factory both apps pass to FedMUD: no arguments, returns the undecomposed model.

    FedMUD calls it under ``torch.manual_seed(run seed)``, so every process builds the
    same initial weights.
    """
    return RowConvNet()


@lru_cache(maxsize=1)
def _split() -> tuple[TensorDataset, TensorDataset]:
    """(train, test): a fixed, stratified split of the digits, pixels scaled to [0, 1]."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32).transpose(0, 2, 1)  # (n, column, row)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    as_tensors = lambda a, b: TensorDataset(torch.from_numpy(a), torch.from_numpy(b))  # noqa: E731
    return as_tensors(x_train, y_train), as_tensors(x_test, y_test)


def partition(partition_id: int, num_partitions: int) -> TensorDataset:
    """This client's share of the training split: a slice of one seeded permutation (IID)."""
    train, _ = _split()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
    indices = torch.from_numpy(np.array_split(order, num_partitions)[partition_id])
    return TensorDataset(*(t[indices] for t in train.tensors))


def train_loader(partition_id: int, seed: int, num_partitions: int, batch_size: int) -> DataLoader:
    """The ClientApp's ``loader_fn`` once the node's partition count and the batch size are bound.

    ``seed`` changes every round (FedMUD passes round seed + partition id): it drives the shuffle.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(partition(partition_id, num_partitions), batch_size=batch_size, shuffle=True, generator=generator)


def test_loader(batch_size: int = 256) -> DataLoader:
    """The held-out split the ServerApp evaluates the global model on."""
    return DataLoader(_split()[1], batch_size=batch_size)
