"""The paper's CNNs."""

from __future__ import annotations

from torch import nn

from .config import ConfigError


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


# Input (channels, size) each model is built for; the class count comes from the dataset.
MODEL_INPUTS = {"cnn-mnist": (1, 28), "cnn-cifar": (3, 32)}


def resolve_model(name: str, dataset: str = "mnist5k") -> str:
    """The concrete model for ``name`` on ``dataset``: ``auto`` picks the one built for its images."""
    from .data import dataset_spec

    spec = dataset_spec(dataset)
    fits = [m for m, shape in MODEL_INPUTS.items() if shape == (spec.channels, spec.size)]
    if name == "auto":
        return fits[0]
    if name not in MODEL_INPUTS:
        raise ConfigError(f"model={name!r} is not allowed; choose one of auto, {', '.join(MODEL_INPUTS)}")
    if name not in fits:
        c, s = MODEL_INPUTS[name]
        raise ConfigError(
            f"model={name!r} is not allowed with dataset={dataset!r}: the model takes {c}×{s}×{s} images, "
            f"the dataset has {spec.channels}×{spec.size}×{spec.size}; choose model auto or {fits[0]}"
        )
    return name


def build_model(name: str, dataset: str = "mnist5k") -> nn.Module:
    """The paper's CNN for ``dataset`` (``name``: ``auto``, ``cnn-mnist`` or ``cnn-cifar``)."""
    from .data import dataset_spec

    resolved, spec = resolve_model(name, dataset), dataset_spec(dataset)
    if resolved == "cnn-mnist":  # 28→14→7→3→1
        return CNN(in_channels=1, num_classes=spec.num_classes, spatial=1)
    return CNN(in_channels=3, num_classes=spec.num_classes, spatial=4)  # cnn-cifar: 32→16→8→4→2
