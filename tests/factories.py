"""Model and dataset factories as a user would write them, named in tests as ``tests.factories:NAME``."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

NOT_CALLABLE = 42


# --- model factories ------------------------------------------------------------------------


def linear_model(num_classes, input_shape):
    """A linear classifier on the flattened input: declares two of the three arguments."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def dropout_mlp(num_classes, input_shape):
    """A two-layer classifier with dropout between: local training draws random masks, as every
    Hugging Face transformer does."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, num_classes)
    )


def no_arguments():
    """Declares nothing: called bare."""
    return nn.Linear(784, 10)


class Received(nn.Module):
    """A module that remembers the keyword arguments its factory got."""

    def __init__(self, received: dict) -> None:
        super().__init__()
        self.received = received
        self.layer = nn.Linear(1, 1)


def any_arguments(**kwargs):
    """Takes ``**kwargs``: receives every argument on offer."""
    return Received(kwargs)


def needs_depth(num_classes, depth):
    """Requires an argument nobody passes."""
    return nn.Linear(depth, num_classes)


def returns_dict(num_classes):
    return {"num_classes": num_classes}


def raises(num_classes):
    raise RuntimeError(f"cannot build for {num_classes} classes")


# --- dataset factories ----------------------------------------------------------------------


def _blobs(n: int, num_classes: int, shape: tuple[int, ...], generator: torch.Generator):
    """Gaussian blobs: each class has its own mean image, so a model can learn them."""
    labels = torch.arange(n) % num_classes
    means = torch.randn(num_classes, *shape, generator=generator)
    return means[labels] + 0.5 * torch.randn(n, *shape, generator=generator), labels


def image_tensors(seed=0, test_fraction=0.2):
    """240 1×28×28 float images of 4 classes as torch TensorDatasets, split by ``test_fraction``."""
    x, y = _blobs(240, 4, (1, 28, 28), torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(y))
    return TensorDataset(x[n_test:], y[n_test:]), TensorDataset(x[:n_test], y[:n_test])


def token_tensors():
    """Token sequences (12,) over a vocabulary of 30, 3 classes, the label's token repeated in front."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 30, (150, 12), generator=g)
    labels = torch.arange(150) % 3
    tokens[:, :3] = labels[:, None]
    return TensorDataset(tokens[:120], labels[:120]), TensorDataset(tokens[120:], labels[120:])


def hugging_face():
    """A Hugging Face ``datasets.Dataset`` per split: a float ``features`` column (8,) and a ``label`` column."""
    from datasets import Dataset as HFDataset

    def split(n, seed):
        x, y = _blobs(n, 5, (8,), torch.Generator().manual_seed(seed))
        return HFDataset.from_dict({"features": x.double().numpy().tolist(), "label": y.tolist()})

    return split(200, 0), split(50, 1)


class ArrayItems(Dataset):
    """A map-style Dataset yielding (NumPy array, NumPy int) with ``.targets`` and ``.classes``."""

    classes = ("zero", "one", "two", "three", "four", "five")  # six declared, labels use four

    def __init__(self, n: int, seed: int) -> None:
        x, y = _blobs(n, 4, (3, 8, 8), torch.Generator().manual_seed(seed))
        self.x, self.targets = x.numpy(), y.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], np.int64(self.targets[i])


def array_items():
    return ArrayItems(160, 0), ArrayItems(40, 1)


class Remembered(TensorDataset):
    """A TensorDataset that remembers the keyword arguments its factory got."""

    def __init__(self, received: dict, *tensors) -> None:
        super().__init__(*tensors)
        self.received = received


def any_dataset_arguments(**kwargs):
    """Takes ``**kwargs``: receives root, seed and test_fraction."""
    train, test = image_tensors()
    return Remembered(kwargs, *train.tensors), test


def no_dataset_arguments():
    return image_tensors()


# --- datasets that cannot be used ------------------------------------------------------------


def hugging_face_without_label():
    from datasets import Dataset as HFDataset

    table = HFDataset.from_dict({"features": [[0.0, 1.0]] * 10, "target": [0, 1] * 5})
    return table, table


class InputsOnly(Dataset):
    """Items are bare inputs, no labels."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i):
        return torch.zeros(4)


def torch_without_labels():
    return InputsOnly(), InputsOnly()


def float_labels():
    x = torch.randn(10, 4)
    return TensorDataset(x, torch.rand(10)), TensorDataset(x, torch.rand(10))


def one_dataset():
    return image_tensors()[0]


def empty_train():
    _, test = image_tensors()
    return TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64)), test


class NoLogits(nn.Module):
    """A model whose output holds no predictions a task can read (a backbone's features)."""

    def __init__(self, input_shape) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16))

    def forward(self, x):
        return {"hidden_states": self.body(x)}


def no_logits(input_shape):
    """A backbone without a head: its output is a dict of features, not predictions."""
    return NoLogits(input_shape)


def timm_resnet(num_classes, input_shape):
    """timm's ResNet-10-T (random weights): BatchNorm, strided and 1x1 convolutions, its own head."""
    import timm

    return timm.create_model("resnet10t", num_classes=num_classes, in_chans=input_shape[0], pretrained=False)
