"""Per-round, per-layer seeds: every party draws identical frozen factors.

A factor is a pure function of (round seed, layer name, factor name). Values are
drawn on the CPU with PyTorch's CPU generator and only then moved to the target
device, so a CUDA client and a CPU server hold bit-identical factors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch


def round_seed(run_seed: int, server_round: int) -> int:
    """The seed of a round: derived, not stored, so a resumed run draws the same."""
    return derive_seed(run_seed, f"round/{server_round}")


def derive_seed(seed: int, *names: str) -> int:
    """A 63-bit seed from a parent seed and names (stable across processes and platforms)."""
    digest = hashlib.blake2b(f"{seed}/{'/'.join(names)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_normal(shape: tuple[int, ...], seed: int, std: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, std²) values of ``shape`` from ``seed``, drawn on CPU then moved to ``device``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float32) * std
    return values.to(device)


def numpy_rng(seed: int, *names: str) -> np.random.Generator:
    """A numpy generator for server-side choices (client sampling), derived like the factors."""
    return np.random.default_rng(derive_seed(seed, *names))


def sample_size(nodes: int, fraction: float, minimum: int) -> int:
    """How many of ``nodes`` clients a round trains: ``max(int(nodes * fraction), minimum)``, all when fewer."""
    return min(nodes, max(int(nodes * fraction), minimum))


def sample_clients(seed: int, server_round: int, node_ids: Sequence[int], fraction: float, minimum: int) -> list[int]:
    """The clients of ``server_round``: a function of (run seed, round, the nodes available), so a
    resumed run picks those the uninterrupted run would.

    :func:`sample_size` of the nodes, drawn without replacement from the sorted ids; returned sorted.
    """
    ids = sorted(node_ids)
    size = sample_size(len(ids), fraction, minimum)
    picked = numpy_rng(seed, "sample", str(server_round)).choice(len(ids), size, replace=False)
    return [ids[i] for i in sorted(picked)]
