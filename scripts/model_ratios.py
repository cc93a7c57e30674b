"""Upload ratio of FedMUD's default decomposition on the models a new user tries first.

    python scripts/model_ratios.py

For each model and kind (kron, mat) at ``ratio=1/32`` with default settings: bytes
uploaded per round against the dense ``state_dict``'s floating tensors at float32 (the ratio
budgets bytes; with ``vector-uplink=auto`` 1-D tensors may go at int8), how many
tensors are decomposed, and which ≥2-D tensors stay dense and why. The same models are
asserted on in ``tests/test_any_model.py``, which defines them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fedmud import DecompositionConfig, decompose

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_any_model import MODELS  # noqa: E402 - the very models the test asserts on


def main() -> None:
    print("| model | kind | upload / dense bytes | ratio | decomposed tensors | ≥2-D tensors kept dense |")
    print("|---|---|---|---|---|---|")
    for name, (build, _) in MODELS.items():
        for kind in ("kron", "mat"):
            torch.manual_seed(0)
            model = decompose(build(), DecompositionConfig(kind=kind))
            up, dense = model.plan.upload_bytes, model.plan.dense_reference_bytes
            kept = [f"{t.name} ({t.reason})" for t in model.plan.tensors if not t.decomposed and len(t.shape) >= 2]
            print(f"| {name} | {kind} | {up:,} / {dense:,} | 1/{dense / up:.1f} | {len(model.parametrised_names)} | "
                  f"{'; '.join(kept) or '—'} |")


if __name__ == "__main__":
    main()
