"""Model factories: the built-ins, ``auto``, and the user's own named as ``package.module:factory``.

User factories live in ``tests/factories.py``, written as a user would; datasets named
``tests.factories:...`` give the models data of the shapes they need.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict

import pytest
import torch
from torch import nn

from fedmud.config import MODELS, ConfigError, DataConfig, parse_run_config
from fedmud.data import DatasetInfo
from fedmud.factories import call_factory
from fedmud.models import (
    BUILTIN_MODELS,
    CNN,
    build_model,
    model_factory,
    resolve_model,
    vit_patch_size,
)

IMAGES = DataConfig(dataset="tests.factories:image_tensors")  # 1×28×28, 4 classes
TOKENS = DataConfig(dataset="tests.factories:token_tensors")  # (12,), vocabulary 30, 3 classes
FEATURES = DataConfig(dataset="tests.factories:hugging_face")  # (8,) floats, 5 classes

MATCHING = [
    ("cnn-mnist", DatasetInfo((1, 28, 28), 10)),
    ("cnn-cifar", DatasetInfo((3, 32, 32), 100)),
    ("resnet18", DatasetInfo((3, 32, 32), 10)),
    ("resnet18", DatasetInfo((1, 28, 28), 10)),
    ("mobilenet-v3-small", DatasetInfo((3, 32, 32), 10)),
    ("mobilenet-v3-small", DatasetInfo((1, 28, 28), 10)),
    ("vit", DatasetInfo((3, 32, 32), 10)),
    ("vit", DatasetInfo((1, 28, 28), 10)),
    ("text-transformer", DatasetInfo((12,), 3, vocab_size=30)),
    ("lstm", DatasetInfo((1, 28, 28), 10)),
    ("lstm", DatasetInfo((12,), 3, vocab_size=30)),
    ("lstm", DatasetInfo((20, 6), 4)),
]


def built_in(name: str, info: DatasetInfo) -> nn.Module:
    """A built-in called exactly as the system calls any model factory."""
    return call_factory("model", name, BUILTIN_MODELS[name], **asdict(info))


def example_batch(info: DatasetInfo, n: int = 2) -> torch.Tensor:
    if info.vocab_size is not None:
        return torch.randint(0, info.vocab_size, (n, *info.input_shape))
    return torch.randn(n, *info.input_shape)


@pytest.mark.parametrize(("name", "info"), MATCHING, ids=[f"{n}-{i.input_shape}" for n, i in MATCHING])
def test_every_built_in_builds_for_matching_data_and_trains(name, info):
    torch.manual_seed(0)
    model = built_in(name, info).train()
    logits = model(example_batch(info))
    assert logits.shape == (2, info.num_classes)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_registry_holds_every_built_in_name_of_the_config():
    assert set(MODELS) == {"auto", *BUILTIN_MODELS}


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_built_ins_follow_the_factory_contract_and_say_what_they_are(name):
    factory = BUILTIN_MODELS[name]
    assert set(inspect.signature(factory).parameters) <= {"num_classes", "input_shape", "vocab_size"}
    assert factory.__doc__ and len(factory.__doc__.strip()) > 20


def test_the_paper_cnns_are_unchanged():
    mnist = built_in("cnn-mnist", DatasetInfo((1, 28, 28), 10))
    cifar = built_in("cnn-cifar", DatasetInfo((3, 32, 32), 10))
    assert isinstance(mnist, CNN) and isinstance(cifar, CNN)
    assert sum(p.numel() for p in mnist.parameters()) == 390_880
    assert cifar.classifier.in_features == 1024


def test_resnet18_has_a_cifar_stem_on_the_data_channels():
    model = built_in("resnet18", DatasetInfo((1, 28, 28), 10))
    assert (model.conv1.in_channels, model.conv1.kernel_size, model.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)


def test_mobilenet_first_conv_takes_the_data_channels():
    model = built_in("mobilenet-v3-small", DatasetInfo((1, 28, 28), 10))
    assert model.features[0][0].in_channels == 1


@pytest.mark.parametrize(("size", "patch"), [(28, 7), (32, 4), (64, 16), (96, 16), (24, 4), (30, None)])
def test_vit_patch_size_is_7_on_28_4_on_32_else_the_largest_leaving_a_4x4_grid(size, patch):
    assert vit_patch_size(size) == patch


def test_vit_is_the_small_configuration_with_its_own_patch_projection_for_grayscale():
    model = built_in("vit", DatasetInfo((1, 28, 28), 10))
    assert (model.image_size, model.patch_size, model.hidden_dim, model.mlp_dim) == (28, 7, 192, 384)
    assert len(model.encoder.layers) == 6 and model.encoder.layers[0].self_attention.num_heads == 4
    assert model.conv_proj.in_channels == 1


def test_text_transformer_has_learned_positions_and_two_independently_drawn_layers():
    model = built_in("text-transformer", DatasetInfo((12,), 3, vocab_size=30))
    assert model.embedding.num_embeddings == 30 and model.position.shape == (1, 12, 128)
    first, second = model.encoder.layers
    assert not torch.equal(first.linear1.weight, second.linear1.weight)


def test_lstm_reads_an_image_as_rows_and_tokens_through_an_embedding():
    rows = built_in("lstm", DatasetInfo((3, 32, 32), 10))
    assert rows.embedding is None and rows.lstm.input_size == 3 * 32 and rows.lstm.num_layers == 2
    tokens = built_in("lstm", DatasetInfo((12,), 3, vocab_size=30))
    assert tokens.embedding.num_embeddings == 30 and tokens.lstm.hidden_size == 128


def test_auto_picks_the_paper_cnn_for_28x28_images():
    assert resolve_model("auto", IMAGES) == "cnn-mnist"
    model = build_model("auto", IMAGES)
    assert isinstance(model, CNN) and model.classifier.out_features == 4


def test_auto_on_other_data_asks_for_a_model_and_lists_those_that_fit():
    with pytest.raises(ConfigError) as err:
        build_model("auto", TOKENS)
    message = str(err.value)
    assert message.startswith(f"model='auto' is not allowed with dataset={TOKENS.dataset!r}")
    assert "input shape (12,)" in message and "text-transformer, lstm" in message


@pytest.mark.parametrize(
    ("name", "data", "takes", "fits"),
    [
        ("text-transformer", IMAGES, "token sequences", "auto, cnn-mnist, resnet18"),
        ("cnn-mnist", TOKENS, "1×28×28 images", "text-transformer, lstm"),
        ("resnet18", FEATURES, "C×H×W images", "no built-in fits"),
    ],
)
def test_a_built_in_that_does_not_fit_the_data_is_refused(name, data, takes, fits):
    with pytest.raises(ConfigError) as err:
        build_model(name, data)
    message = str(err.value)
    assert message.startswith(f"model={name!r} is not allowed with dataset={data.dataset!r}")
    assert takes in message and fits in message and "'package.module:factory'" in message


def test_built_ins_build_on_user_data():
    assert build_model("text-transformer", TOKENS)(torch.randint(0, 30, (5, 12))).shape == (5, 3)
    assert build_model("lstm", IMAGES)(torch.randn(5, 1, 28, 28)).shape == (5, 4)


def test_a_user_factory_gets_the_data_shape_and_classes():
    model = build_model("tests.factories:linear_model", IMAGES)
    assert model[1].in_features == 784 and model[1].out_features == 4


def test_a_factory_declaring_nothing_is_called_bare():
    assert isinstance(build_model("tests.factories:no_arguments", IMAGES), nn.Linear)


def test_a_factory_taking_kwargs_gets_every_argument():
    assert build_model("tests.factories:any_arguments", TOKENS).received == {
        "num_classes": 3,
        "input_shape": (12,),
        "vocab_size": 30,
    }


def test_model_factory_defers_building_and_each_call_gives_a_fresh_model():
    make = model_factory("cnn-mnist", IMAGES)
    torch.manual_seed(3)
    first = make()
    torch.manual_seed(3)
    second = make()
    assert first is not second
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_model_factory_checks_the_import_before_any_model_is_built():
    with pytest.raises(ConfigError, match="cannot import module"):
        model_factory("nope.mod:f", IMAGES)


EXPECTED = f"expected a built-in name ({', '.join(MODELS)}) or 'package.module:factory'"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("nope.mod:f", "cannot import module 'nope.mod' (ModuleNotFoundError: No module named 'nope')"),
        ("tests.factories:missing", "module 'tests.factories' has no attribute 'missing'"),
        ("tests.factories:NOT_CALLABLE", "tests.factories:NOT_CALLABLE is an int, not callable"),
        ("tests.factories:raises", "the factory raised RuntimeError: cannot build for 4 classes"),
        ("tests.factories:needs_depth", "the factory requires argument(s) 'depth', which are not passed"),
    ],
)
def test_an_unusable_model_factory_names_key_value_reason_and_what_is_expected(value, reason):
    with pytest.raises(ConfigError) as err:
        build_model(value, IMAGES)
    message = str(err.value)
    assert message.startswith(f"model={value!r} is not allowed: {reason}")
    assert message.endswith(EXPECTED)


def test_a_factory_returning_something_else_than_a_module_is_refused():
    with pytest.raises(ConfigError) as err:
        build_model("tests.factories:returns_dict", IMAGES)
    assert str(err.value) == (
        "model='tests.factories:returns_dict' is not allowed: the factory returned a dict; expected a torch.nn.Module"
    )


@pytest.mark.parametrize("value", ["auto", "vit", "tests.factories:linear_model", "my_pkg.models:Net.build"])
def test_config_accepts_built_in_names_and_import_strings(value):
    assert parse_run_config({"model": value}).model == value


@pytest.mark.parametrize("value", ["resnet", "my_pkg.models", "my_pkg:", ":f", "a b:c", 3])
def test_config_refuses_other_model_values_listing_the_built_ins(value):
    with pytest.raises(ConfigError) as err:
        parse_run_config({"model": value})
    message = str(err.value)
    assert message.startswith(f"model={value!r} is not allowed; choose one of {', '.join(MODELS)}")
    assert "'package.module:factory'" in message
