"""Upload ratio of FedMUD's default decomposition on the models a new user tries first.

    python scripts/model_ratios.py

For each model and kind (kron, mat) at ``ratio=1/32`` with default settings: values
uploaded per round against the dense ``state_dict`` (its floating tensors), how many
tensors are decomposed, and which ≥2-D tensors stay dense and why. The same models are
asserted on in ``tests/test_any_model.py``.
"""

from __future__ import annotations

import torch
import torchvision.models as tvm
from torch import nn

from fedmud import DecompositionConfig, decompose


class TextClassifier(nn.Module):
    """nn.Embedding(5000, 128) + 2-layer nn.TransformerEncoder (dim 128, 4 heads) + nn.Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5000, 128)
        layer = nn.TransformerEncoderLayer(128, 4, dim_feedforward=256, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(128, 10)


class LSTMClassifier(nn.Module):
    """nn.Embedding(5000, 128) + 2-layer nn.LSTM(128) + nn.Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5000, 128)
        self.lstm = nn.LSTM(128, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, 10)


MODELS = {
    "resnet18(num_classes=10)": lambda: tvm.resnet18(num_classes=10),
    "mobilenet_v3_small(num_classes=10)": lambda: tvm.mobilenet_v3_small(num_classes=10),
    "VisionTransformer(32, patch 4, 6 layers, dim 192)": lambda: tvm.VisionTransformer(
        image_size=32, patch_size=4, num_layers=6, num_heads=4, hidden_dim=192, mlp_dim=384, num_classes=10
    ),
    "Embedding + 2-layer TransformerEncoder": TextClassifier,
    "Embedding + 2-layer LSTM": LSTMClassifier,
}


def main() -> None:
    print("| model | kind | upload / dense | ratio | decomposed tensors | ≥2-D tensors kept dense |")
    print("|---|---|---|---|---|---|")
    for name, build in MODELS.items():
        for kind in ("kron", "mat"):
            torch.manual_seed(0)
            model = decompose(build(), DecompositionConfig(kind=kind))
            up, dense = model.plan.upload, model.plan.dense_reference
            kept = [f"{t.name} ({t.reason})" for t in model.plan.tensors if not t.decomposed and len(t.shape) >= 2]
            print(f"| {name} | {kind} | {up:,} / {dense:,} | 1/{dense / up:.1f} | {len(model.decomposed_names)} | "
                  f"{'; '.join(kept) or '—'} |")


if __name__ == "__main__":
    main()
