"""Bounds on what one reply can do to the global model: its weight and the size of its update.

A reply passes :func:`fedmud.codec.Codec.validate` when it is well formed, but two of
its numbers are still the sender's word. ``num-examples`` weighs it in the mean, and
the server cannot count a client's data: one node claiming 10^15 examples would
outweigh every other node. :func:`cap_examples` counts such a claim as
``max-examples``. Its update (the decoded upload minus the round-start values both
sides know) can be as large as float32 allows; :func:`bound_update` keeps its L2 norm
within ``update-norm-bound`` by scaling it down (``clip``) or dropping the reply
(``reject``). Both are logged and counted by the server, so an operator sees them. :func:`bound_reply`
applies them, with DP's clip and weight, in one place: the server to each plain reply, a
client to its own update under secure aggregation, where the server sees only the sum.

Without a fixed bound an operator would have to guess a scale, so by default
(``median-norm-bound``, 10) an update's norm is bounded relative to its peers':
at most that multiple of the (lower) median update norm of the replies of the last
round that had any, or of the round's own replies in a round with no such history.
One reply cannot move the median of three or more, so no single client moves the
model by more than the multiple times what an honest client moves it by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: privacy imports this module
    from .config import BoundsConfig
    from .privacy import Mechanism

CAPPED, CLIPPED, NORM_REJECTED = "capped", "clipped", "norm-rejected"
EVENTS = (CAPPED, CLIPPED, NORM_REJECTED)


@dataclass(frozen=True)
class Screened:
    """One valid reply after the bounds: what merges, with what weight, and what was changed."""

    values: np.ndarray | None  # the decoded upload to merge; None when the norm bound dropped it
    weight: float
    events: tuple[str, ...] = ()  # among EVENTS
    reasons: tuple[str, ...] = ()  # one line per event, for the log
    norm: float = 0.0  # the update's L2 norm after the fixed bounds (measured when the median bound is on)

    @property
    def dropped(self) -> bool:
        return self.values is None


def cap_examples(claimed: int, cap: int) -> tuple[float, str]:
    """(weight, reason): ``claimed`` counted as at most ``cap``; reason is empty when not capped.

    Works on Python ints, so a claim too large for a float (10^400) is capped, not an error.
    """
    if claimed <= cap:
        return float(claimed), ""
    shown = f"{claimed:.3g}" if claimed < 10**300 else f"~10^{len(str(claimed)) - 1}"
    return float(cap), f"num-examples {shown} is above max-examples, counted as {cap}"


def update_norm(update: np.ndarray) -> float:
    """L2 norm in float64: a float32 sum of squares of large finite values would overflow."""
    return float(np.linalg.norm(update.astype(np.float64, copy=False)))


def bound_update(
    update: np.ndarray, bound: float, action: str, what: str = "update-norm-bound"
) -> tuple[np.ndarray | None, str, str]:
    """(update, event, reason) with the update's norm kept within ``bound`` (0: no bound).

    ``clip`` scales an update above the bound down to it (its direction is kept);
    ``reject`` returns None for it. Event and reason are empty when nothing changed;
    ``what`` names the bound in the reason.
    """
    if bound <= 0:
        return update, "", ""
    norm = update_norm(update)
    if norm <= bound:
        return update, "", ""
    if action == "reject":
        return None, NORM_REJECTED, f"update norm {norm:.4g} is above {what} {bound:.4g}; dropped"
    scaled = update.astype(np.float64) * (bound / norm)
    return scaled, CLIPPED, f"update norm {norm:.4g} is above {what} {bound:.4g}; scaled to it"


@dataclass(frozen=True)
class Bounded:
    """One reply's weight and update after :func:`bound_reply`, and what the bounds changed."""

    update: np.ndarray | None  # float64, None when none was given or the norm bound dropped it
    weight: float
    events: tuple[str, ...] = ()  # among EVENTS
    reasons: tuple[str, ...] = ()  # one line per event, for the log
    moved: bool = False  # the update is not the one given (clipped, scaled or dropped)

    @property
    def dropped(self) -> bool:
        return NORM_REJECTED in self.events


def bound_reply(
    update: np.ndarray | None, claimed: int, bounds: BoundsConfig, dp: Mechanism, reclip: bool = True
) -> Bounded:
    """The bounds one reply is held to, wherever they can be applied: by the server to each plain
    reply, by a client to its own update under secure aggregation (the server sees only the sum).

    In order: the weight is ``claimed`` capped at ``max-examples`` (:func:`cap_examples`), or 1
    under DP; under DP, with ``reclip``, the update is clipped to ``dp-clip`` again (the server
    cannot know that a client did; a client clipped before adding its share of the noise, which a
    second clip would scale away, so it passes ``reclip=False``); then it is kept within
    ``update-norm-bound`` (:func:`bound_update`), measured after the clip so that it cannot undo it.

    ``update``: the decoded upload minus the round-start values; None when no bound needs it (no
    DP clip, no norm bound): then only the weight is bounded.
    """
    weight, capped = cap_examples(claimed, bounds.max_examples)
    events, reasons = ((CAPPED,), (capped,)) if capped else ((), ())
    moved = False
    if (dp.on and reclip or bounds.update_norm_bound > 0) and update is None:
        raise ValueError("bound_reply needs the update when the DP clip or update-norm-bound is on")
    if dp.on:  # every client weighs 1: a weight it states would have to be bounded too
        weight, events, reasons = 1.0, (), ()
        if reclip:
            update, norm = dp.clip_update(update)
            moved = True
            if norm > dp.clip * (1 + 1e-3):  # beyond what an honest client's coding adds
                events, reasons = (CLIPPED,), (f"update norm {norm:.4g} is above dp-clip {dp.clip:g}; scaled to it",)
    if bounds.update_norm_bound > 0:
        bounded, event, reason = bound_update(update, bounds.update_norm_bound, bounds.update_norm_action)
        if event:
            events, reasons = events + (event,), reasons + (reason,)
            update, moved = bounded, True
    return Bounded(update, weight, events, reasons, moved)


def lower_median(norms: list[float]) -> float:
    """The lower median of ``norms`` (the smaller middle value of an even count): with two
    replies, one cannot raise it by sending a huge update."""
    ordered = sorted(norms)
    return ordered[(len(ordered) - 1) // 2]


def check_mean_update(
    mean_update: np.ndarray, bound: float, numel: int | None = None, value_range: float = 0.0
) -> str:
    """Why a secure round's unmasked mean update cannot be merged ("" when it can).

    Under secure aggregation no single reply can be checked, but the mean can. It must be a
    vector of ``numel`` values (a node that sends a vector of another shape breaks the sum,
    which numpy would broadcast); every coordinate must lie within ``value_range``, the
    protocol's clipping range, which every honest client's coordinates keep (a vector whose
    masks did not cancel, because a node sent a wrong-length, one-element or zero vector,
    unmasks to values spread over the whole modulus); it must be finite; and a mean of
    updates each within ``bound`` (the update-norm bound, or the DP clip) has a norm within
    ``bound`` too, so a larger one means some client sent more than the bound allows
    (0: no bound).
    """
    mean_update = np.asarray(mean_update)
    if numel is not None and mean_update.shape != (numel,):
        return f"the unmasked mean update has shape {mean_update.shape}, expected ({numel},): a node sent a malformed vector"
    if not np.isfinite(mean_update).all():
        return "the unmasked mean update is not finite"
    if value_range > 0 and mean_update.size:
        peak = float(np.abs(mean_update).max())
        if peak > value_range * (1 + 1e-3):  # the tolerance covers the protocol's quantisation
            return (
                f"the unmasked mean update has a coordinate of magnitude {peak:.4g}, outside the protocol's clipping "
                f"range {value_range:g}: the masks did not cancel (a node sent a malformed vector)"
            )
    norm = update_norm(mean_update)
    if bound > 0 and norm > bound * (1 + 1e-3):  # the tolerance covers the protocol's quantisation
        return f"the unmasked mean update's norm {norm:.4g} is above the bound {bound:g} every client's update keeps"
    return ""
