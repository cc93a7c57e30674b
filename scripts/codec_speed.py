"""Encode + decode time of every scaled code for an upload of 1.5 million values (seconds).

    python scripts/codec_speed.py

A speed figure, printed, not asserted in a test: these machines are shared. For scale, a
float32 copy of the same vector is timed in the same run and each code is given as a ratio to it.
"""

from __future__ import annotations

import time

import numpy as np

from fedmud.codec import SCHEMES, Codec
from fedmud.layout import UploadLayout


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    layout = UploadLayout((("a", (1000, 1000)), ("b", (500, 999)), ("c", (7,))))
    x = np.random.default_rng(0).standard_normal(layout.numel).astype(np.float32)
    copy = best_of(lambda: x.copy())
    print(f"{layout.numel} values; float32 copy {copy * 1e3:.2f} ms")
    for name, scheme in SCHEMES.items():
        if not scheme.chunk:
            continue
        codec = Codec(layout, name)
        for label, rng in (("nearest", None), ("stochastic", np.random.default_rng(0))):
            seconds = best_of(lambda: codec.decode_vector(codec.encode(x, rng)))
            print(f"{name:5s} {label:10s} encode+decode {seconds * 1e3:7.1f} ms ({seconds / copy:.0f}x a copy)")


if __name__ == "__main__":
    main()
