"""Frozen factors depend only on (round seed, layer): identical in separate processes."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from fedmud.config import DecompositionConfig
from fedmud.mud import decompose
from fedmud.models import build_model

ROOT = Path(__file__).resolve().parents[1]
DRAW = """
import hashlib, torch
from fedmud.config import DecompositionConfig
from fedmud.mud import decompose
from fedmud.models import build_model
torch.manual_seed({torch_seed})
model = decompose(build_model("cnn-mnist"), DecompositionConfig(kind="{kind}"))
model.reset(123456789)
h = hashlib.sha256()
for name, layer in model.updates().items():
    for f in layer.update.factors:
        h.update(name.encode() + f.name.encode() + layer.factor(f.name).detach().numpy().tobytes())
print(h.hexdigest())
"""


def _digest_in_subprocess(kind: str, torch_seed: int) -> str:
    code = DRAW.format(kind=kind, torch_seed=torch_seed)
    # the project on the child's path explicitly: the test must not depend on how it was installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env, cwd="/")
    return result.stdout.strip()


def test_two_processes_draw_identical_factors():
    # different global torch seeds: the factors must not depend on global RNG state
    for kind in ("kron", "mat"):
        assert _digest_in_subprocess(kind, 1) == _digest_in_subprocess(kind, 2)


def test_different_rounds_draw_different_factors():
    model = decompose(build_model("cnn-mnist"), DecompositionConfig())
    layer = next(iter(model.updates().values()))
    model.reset(1)
    first = layer.factor("F1").clone()
    model.reset(2)
    assert not torch.equal(first, layer.factor("F1"))


def test_layers_draw_independent_factors():
    model = decompose(build_model("cnn-mnist"), DecompositionConfig(kind="mat"))
    model.reset(7)
    digests = {
        hashlib.sha256(layer.factor("F1").numpy().tobytes()).hexdigest() for layer in model.updates().values()
    }
    assert len(digests) == len(model.updates())
