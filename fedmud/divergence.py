"""Is the global model diverging? Read from the results rows alone.

A run diverges when its held-out loss grows by orders of magnitude over the rounds: the
updates, or the DP noise on them, are more than the model can take, and it will not come
back. The README's old client-level DP example (50 nodes, 10 a round, ε = 4) went from a
loss of 2.3 before training to 299 after round 1 and 2.2e9 later, at chance accuracy, while
the run ended normally and stated its ε. This module says so; it never stops a run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .results import RoundResult

DIVERGENCE_FACTOR = 100.0  # two orders of magnitude above the lowest held-out loss before it


def divergence(history: Sequence[RoundResult], factor: float = DIVERGENCE_FACTOR) -> dict | None:
    """The first row of ``history`` whose held-out ``loss`` is not finite, or at least ``factor``
    times the lowest loss of the rows before it; None when no row is.

    Returns ``round``, ``loss`` (None when not finite), ``best_round``, ``best_loss`` and
    ``reason``, one line for the log (the summary's ``diverged``).
    """
    best: tuple[int, float] | None = None  # (round, loss)
    for row in history:
        loss = row.loss
        finite = math.isfinite(loss)
        if not finite or (best is not None and best[1] > 0 and loss >= factor * best[1]):
            what = f"held-out loss {loss:.3g}" if finite else "held-out loss is not finite"
            before = f"{loss / best[1]:.3g}× the lowest before it, {best[1]:.3g} at round {best[0]}" if finite else ""
            return {
                "round": row.round,
                "loss": loss if finite else None,
                "best_round": best[0] if best else None,
                "best_loss": best[1] if best else None,
                "reason": f"diverging since round {row.round}: {what}" + (f" ({before})" if before else ""),
            }
        if best is None or loss < best[1]:
            best = (row.round, loss)
    return None
