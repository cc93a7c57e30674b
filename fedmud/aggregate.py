"""Exact weighted aggregation of uploads.

Uploads are flat payloads in one layout, so aggregation is a weighted mean of
vectors, accumulated one reply at a time: server memory stays O(model) whatever
the number of clients, and a reply can be dropped as soon as it is added. For
``fab`` and ``aad`` this mean of factors *is* the mean of the clients' ΔW (ΔW is
linear in what is trained); for ``ab`` it is not.

The sum does not depend on the order the replies arrive in. Each contribution
``weight · values`` is exact in float64 (a float32 value times an integer weight
below 2**29), and contributions are summed with an error-free transformation
(Knuth's TwoSum): the running sum and the rounding errors it dropped are kept
apart, so the float64 result is the exact sum rounded once, up to ~n² 2⁻¹⁰⁶ relative
for n replies; rounded to float32 it is the same bits in any order (a tie closer than
that to a float32 rounding boundary has a probability below 10⁻¹⁹ per value with
1,000 replies). Resumed runs and reruns therefore merge bitwise alike although
Flower hands replies over in the order they come.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class WeightedMean:
    """Streaming, order-independent weighted mean: ``add`` each payload, then ``result``."""

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self._error: np.ndarray | None = None  # the rounding errors of the running sum, summed
        self._weight = 0.0
        self.count = 0

    def add(self, values: np.ndarray, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        contribution = values.astype(np.float64) * weight
        if self._sum is None:
            self._sum, self._error = contribution, np.zeros_like(contribution)
        elif self._sum.shape != contribution.shape:
            raise ValueError(f"payload of shape {values.shape} cannot join a mean of shape {self._sum.shape}")
        else:  # TwoSum: total = sum + contribution exactly, as total (rounded) + lost
            total = self._sum + contribution
            back = total - self._sum
            self._error += (self._sum - (total - back)) + (contribution - back)
            self._sum = total
        self._weight += weight
        self.count += 1

    def result(self) -> np.ndarray:
        if self._sum is None:
            raise ValueError("no payload was added")
        return ((self._sum + self._error) / self._weight).astype(np.float32)

    def total(self) -> np.ndarray:
        """The weighted sum itself, Σ weight · values, in float64."""
        if self._sum is None:
            raise ValueError("no payload was added")
        return self._sum + self._error


def aggregate_factors(payloads: Iterable[tuple[np.ndarray, float]]) -> np.ndarray:
    """Weighted mean of ``(payload, weight)`` pairs."""
    mean = WeightedMean()
    for values, weight in payloads:
        mean.add(values, weight)
    return mean.result()
