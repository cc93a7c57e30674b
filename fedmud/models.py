"""Models: the paper's CNNs, other built-ins, and your own, all made by *model factories*.

A model factory is a callable returning a ``torch.nn.Module``. It is called with the
keyword arguments it declares among

- ``num_classes: int``: the dataset's number of classes;
- ``input_shape: tuple[int, ...]``: one example's shape without the batch dimension,
  e.g. ``(1, 28, 28)`` for images or ``(L,)`` for token sequences;
- ``vocab_size: int | None``: token datasets only (largest token id + 1), else None;

and with all three when it takes ``**kwargs``. The run config's ``model`` is ``auto``,
a built-in name (:data:`BUILTIN_MODELS`) or your factory as ``package.module:factory``,
which must be importable in every process that builds the model (the ServerApp and
each ClientApp). Every party builds round 0 itself from the run seed, so a factory must
build the same architecture every time and draw its initial weights from torch's
global generator only (as ``nn.Module`` constructors do).

Built-ins (parameters at 10 classes for 1×28×28 / 3×32×32 inputs):

====================== ============================================================
``cnn-mnist``          the paper's CNN for 1×28×28 images (391k)
``cnn-cifar``          the paper's CNN for 3×32×32 images (399k)
``resnet18``           torchvision ResNet-18, CIFAR stem: 3×3 stride-1 first conv, no
                       max-pool; any C×H×W image (11.2M)
``mobilenet-v3-small`` torchvision MobileNetV3-Small, first conv taking C channels;
                       any C×H×W image (1.5M)
``vit``                torchvision VisionTransformer, 6 layers, 4 heads, width 192,
                       MLP 384; square C×H×H images, patch 7 for 28×28 and 4 for 32×32
                       (1.8M)
``text-transformer``   token embedding (128) + learned positions + 2 Transformer
                       encoder layers (4 heads, FF 256), mean-pooled; token data only
``lstm``               2-layer LSTM (hidden 128), linear head on the last step; token
                       data (with an embedding), feature sequences (T, F) or images
                       read as H rows of C·W features (sequential MNIST) (214k / 249k)
====================== ============================================================

``auto`` picks ``cnn-mnist`` for 1×28×28 and ``cnn-cifar`` for 3×32×32 images; for
other data name a model. A built-in that does not fit the data is refused with a
ConfigError saying what it takes and which built-ins fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .data import DatasetInfo, custom_data, dataset_info, is_builtin
from .errors import ConfigError, is_import_string
from .factories import call_factory, load_factory, refusal, register_builtins, type_phrase
from .hf import hf_factory, is_hf_source
from .text import check_vocabulary

if TYPE_CHECKING:
    from .config import DataConfig

ModelFactory = Callable[..., nn.Module]


class DoesNotFit(ValueError):
    """A built-in model cannot take this data; the message says what it takes."""


class CNN(nn.Module):
    """Four 3×3 conv blocks (conv, BatchNorm, ReLU, 2×2 max-pool) and a linear classifier.

    The FedMUD paper's CNN for 28×28 inputs: channels 32-64-128-256, no biases,
    28→14→7→3→1 spatially, so the classifier sees 256 features (``spatial=1``).
    For 32×32 inputs the map ends at 2×2 (``spatial=4``).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, spatial: int = 1) -> None:
        super().__init__()
        widths = [in_channels, 32, 64, 128, 256]
        blocks: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            blocks += [
                nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=2, stride=2),
            ]
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(widths[-1] * spatial, num_classes, bias=False)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class TextTransformer(nn.Module):
    """Token embedding + learned positional embedding, a Transformer encoder, mean pooling, linear classifier.

    The positions are a bare parameter of shape (1, L, width). No padding mask: padding
    is a token like any other, which keeps the model a plain function of its input.
    """

    def __init__(
        self, vocab_size: int, seq_len: int, num_classes: int, width: int = 128, heads: int = 4, layers: int = 2
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(1, seq_len, width) * 0.02)

        def make_layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, batch_first=True)

        self.encoder = nn.TransformerEncoder(make_layer(), num_layers=layers, enable_nested_tensor=False)
        self.encoder.layers = nn.ModuleList(make_layer() for _ in range(layers))  # each drawn, not copies of one
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, tokens):
        return self.classifier(self.encoder(self.embedding(tokens) + self.position).mean(dim=1))


class LSTMClassifier(nn.Module):
    """A stacked LSTM whose last step feeds a linear classifier.

    Token ids (N, L) pass through an embedding first; images (N, C, H, W) are read as
    H steps of C·W features (sequential MNIST); feature sequences (N, T, F) as they are.
    """

    def __init__(
        self,
        num_classes: int,
        features: int | None = None,
        vocab_size: int | None = None,
        hidden: int = 128,
        layers: int = 2,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden) if vocab_size is not None else None
        self.lstm = nn.LSTM(hidden if vocab_size is not None else features, hidden, num_layers=layers, batch_first=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        if self.embedding is not None:
            x = self.embedding(x)
        elif x.dim() == 4:  # (N, C, H, W) -> (N, H, C·W)
            x = x.permute(0, 2, 1, 3).flatten(2)
        steps, _ = self.lstm(x)
        return self.classifier(steps[:, -1])


# --- what each built-in takes ---------------------------------------------------------------

VIT_PATCHES = {28: 7, 32: 4}  # a 4×4 grid on MNIST-sized images, 8×8 on CIFAR-sized ones


def vit_patch_size(size: int) -> int | None:
    """``vit``'s patch for H×H images: 7 for 28, 4 for 32, else the largest of 16, 8, 7, 4 leaving a grid ≥ 4×4."""
    if size in VIT_PATCHES:
        return VIT_PATCHES[size]
    return next((p for p in (16, 8, 7, 4) if size % p == 0 and size // p >= 4), None)


def _is_image(shape: tuple[int, ...], vocab: int | None) -> bool:
    return len(shape) == 3 and vocab is None


def _is_tokens(shape: tuple[int, ...], vocab: int | None) -> bool:
    return len(shape) == 1 and vocab is not None


@dataclass(frozen=True)
class Takes:
    """What a built-in accepts: words for messages and the test itself, on (input_shape, vocab_size)."""

    words: str
    accepts: Callable[[tuple[int, ...], int | None], bool]


TAKES: dict[str, Takes] = {
    "cnn-mnist": Takes("1×28×28 images", lambda s, v: _is_image(s, v) and s == (1, 28, 28)),
    "cnn-cifar": Takes("3×32×32 images", lambda s, v: _is_image(s, v) and s == (3, 32, 32)),
    "resnet18": Takes("C×H×W images", _is_image),
    "mobilenet-v3-small": Takes("C×H×W images", _is_image),
    "vit": Takes(
        "square C×H×H images with H divisible by 16, 8, 7 or 4 into a grid of at least 4×4 patches",
        lambda s, v: _is_image(s, v) and s[1] == s[2] and vit_patch_size(s[1]) is not None,
    ),
    "text-transformer": Takes("token sequences (L,) with a vocabulary", _is_tokens),
    "lstm": Takes(
        "token sequences (L,), feature sequences (T, F) or C×H×W images",
        lambda s, v: _is_tokens(s, v) or (len(s) in (2, 3) and v is None),
    ),
}


def _data_words(input_shape: tuple[int, ...], vocab_size: int | None) -> str:
    tokens = f" (token ids, vocabulary {vocab_size})" if vocab_size is not None else ""
    return f"input shape {tuple(input_shape)}{tokens}"


def _require(name: str, input_shape: tuple[int, ...], vocab_size: int | None = None) -> None:
    """Refuse data that the built-in ``name`` cannot take."""
    takes = TAKES[name]
    if not takes.accepts(tuple(input_shape), vocab_size):
        raise DoesNotFit(f"{name} takes {takes.words}, the data has {_data_words(input_shape, vocab_size)}")


# --- the built-in factories -----------------------------------------------------------------


def cnn_mnist(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The paper's CNN for 1×28×28 images: 28→14→7→3→1, the classifier sees 256 features."""
    _require("cnn-mnist", input_shape)
    return CNN(in_channels=1, num_classes=num_classes, spatial=1)


def cnn_cifar(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The paper's CNN for 3×32×32 images: 32→16→8→4→2, the classifier sees 1,024 features."""
    _require("cnn-cifar", input_shape)
    return CNN(in_channels=3, num_classes=num_classes, spatial=4)


def resnet18(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """torchvision's ResNet-18 as used on CIFAR: 3×3 stride-1 first conv on the data's channels, no max-pool."""
    _require("resnet18", input_shape)
    from torchvision.models import resnet18 as torchvision_resnet18

    model = torchvision_resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits convs
    model.maxpool = nn.Identity()
    return model


def mobilenet_v3_small(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """torchvision's MobileNetV3-Small, its first conv taking the data's channels."""
    _require("mobilenet-v3-small", input_shape)
    from torchvision.models import mobilenet_v3_small as torchvision_mobilenet

    model = torchvision_mobilenet(num_classes=num_classes)
    first = model.features[0][0]
    if first.in_channels != input_shape[0]:
        model.features[0][0] = nn.Conv2d(
            input_shape[0], first.out_channels, first.kernel_size, first.stride, first.padding, bias=False
        )
        nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


def vit(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """A small Vision Transformer: torchvision's VisionTransformer, 6 layers, 4 heads, width 192, MLP 384.

    image_size is the data's H; the patch is 7 for 28×28 (4×4 patches), 4 for 32×32
    (8×8 patches), else see :func:`vit_patch_size`. Non-RGB data gets its own patch
    projection, initialised as torchvision initialises it.
    """
    _require("vit", input_shape)
    from torchvision.models import VisionTransformer

    channels, size = input_shape[0], input_shape[1]
    patch = vit_patch_size(size)
    model = VisionTransformer(
        image_size=size,
        patch_size=patch,
        num_layers=6,
        num_heads=4,
        hidden_dim=192,
        mlp_dim=384,
        num_classes=num_classes,
    )
    if channels != 3:
        model.conv_proj = nn.Conv2d(channels, 192, kernel_size=patch, stride=patch)
        nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / (channels * patch * patch)))
        nn.init.zeros_(model.conv_proj.bias)
    return model


def text_transformer(num_classes: int, input_shape: tuple[int, ...], vocab_size: int | None) -> nn.Module:
    """A small Transformer text classifier (:class:`TextTransformer`) for token sequences (L,)."""
    _require("text-transformer", input_shape, vocab_size)
    return TextTransformer(vocab_size, input_shape[0], num_classes)


def lstm(num_classes: int, input_shape: tuple[int, ...], vocab_size: int | None) -> nn.Module:
    """A 2-layer LSTM classifier (:class:`LSTMClassifier`): tokens, feature sequences or images as rows."""
    _require("lstm", input_shape, vocab_size)
    if vocab_size is not None:
        return LSTMClassifier(num_classes, vocab_size=vocab_size)
    features = input_shape[0] * input_shape[2] if len(input_shape) == 3 else input_shape[1]  # C·W or F
    return LSTMClassifier(num_classes, features=features)


BUILTIN_MODELS: dict[str, ModelFactory] = {
    "cnn-mnist": cnn_mnist,
    "cnn-cifar": cnn_cifar,
    "resnet18": resnet18,
    "mobilenet-v3-small": mobilenet_v3_small,
    "vit": vit,
    "text-transformer": text_transformer,
    "lstm": lstm,
}
AUTO = {(1, 28, 28): "cnn-mnist", (3, 32, 32): "cnn-cifar"}  # the paper's CNN for its image sizes
# the `model` key's allowed names (fedmud.config reads them from here); any other is a user factory
MODELS = ("auto", *BUILTIN_MODELS)
register_builtins("model", MODELS)


# --- picking and building -------------------------------------------------------------------


def _as_config(data: DataConfig | str | None) -> DataConfig:
    """The data section: ``None`` is the default one, a dataset name alone ``DataConfig(dataset=name)``."""
    # imported here: fedmud.config declares the `model` key's names from this module
    from .config import DataConfig

    if data is None:
        return DataConfig()
    return DataConfig(dataset=data) if isinstance(data, str) else data


def _auto(info: DatasetInfo) -> str | None:
    return AUTO.get(tuple(info.input_shape)) if info.vocab_size is None else None


def fitting_models(info: DatasetInfo) -> list[str]:
    """The model names that take this data: ``auto`` when it picks one, then every built-in that fits."""
    fits = [n for n in BUILTIN_MODELS if TAKES[n].accepts(tuple(info.input_shape), info.vocab_size)]
    return (["auto"] if _auto(info) else []) + fits


def resolve_model(name: str, data: DataConfig | str | None = None) -> str:
    """The concrete model ``name`` stands for on ``data``: ``auto`` picks the paper's CNN for its images.

    A built-in that does not fit the data is refused; an import string is returned as it is.
    """
    if is_import_string(name) or is_hf_source(name):
        return name
    if name not in MODELS:
        raise ConfigError(
            f"model={name!r} is not allowed; choose one of {', '.join(MODELS)}, 'package.module:factory' "
            "or 'hf:DIRECTORY'"
        )
    data = _as_config(data)
    info = dataset_info(data)
    has = _data_words(info.input_shape, info.vocab_size)
    concrete = _auto(info) if name == "auto" else name
    if concrete is None:
        reason = f"auto picks cnn-mnist for 1×28×28 and cnn-cifar for 3×32×32 images, the data has {has}"
    elif not TAKES[concrete].accepts(tuple(info.input_shape), info.vocab_size):
        reason = f"{concrete} takes {TAKES[concrete].words}, the data has {has}"
    else:
        return concrete
    fits = fitting_models(info)
    choose = f"choose one of {', '.join(fits)} or" if fits else "no built-in fits it; give"
    raise ConfigError(
        f"model={name!r} is not allowed with dataset={data.dataset!r}: {reason}; "
        f"{choose} your own model as 'package.module:factory'"
    )


def model_factory(name: str, data: DataConfig | str | None = None) -> Callable[[], nn.Module]:
    """A zero-argument callable building a fresh model ``name`` for ``data``.

    Name, fit and import are checked now (ConfigError); the factory runs on each call.
    """
    data = _as_config(data)
    concrete = resolve_model(name, data)
    info = dataset_info(data)
    if is_hf_source(concrete):
        make = hf_factory(concrete, info.num_classes, info.vocab_size, data.task)
    else:
        factory = BUILTIN_MODELS.get(concrete) or load_factory("model", concrete)
        kwargs = {"num_classes": info.num_classes, "input_shape": tuple(info.input_shape), "vocab_size": info.vocab_size}

        def make() -> nn.Module:
            return call_factory("model", concrete, factory, **kwargs)

    # text's tokenizer, which a vocabulary too large for the model's embedding is blamed on
    tokenizer = None if is_builtin(data.dataset) else custom_data(data).tokenizer

    def build() -> nn.Module:
        model = make()
        if not isinstance(model, nn.Module):
            raise refusal("model", concrete, f"the factory returned {type_phrase(model)}", "a torch.nn.Module")
        if info.vocab_size is not None:
            check_vocabulary(model, info.vocab_size, tokenizer, concrete, data.dataset)
        return model

    return build


def build_model(name: str, data: DataConfig | str | None = None) -> nn.Module:
    """A fresh model ``name`` (``auto``, a built-in or ``package.module:factory``) for ``data``."""
    return model_factory(name, data)()
