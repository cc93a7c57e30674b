"""Weight-space updates <-> factor space: SVD, nearest Kronecker products, projections.

Two users:

- high-rank preheating (:func:`hrp_directions`): the merged update of the preheat
  rounds is factorised — a truncated SVD for ``mat``, the nearest Kronecker
  product of every block for ``kron`` (Van Loan's rearrangement, then a rank-1
  SVD) — and its leading factors become the frozen anchors' directions;
- error feedback (:func:`project_to_trained`): a weight-space error ``E`` is
  written, in the least-squares sense, in the current round's trainable factors.
  For ``aad`` the reachable set ``{F1·X + Y·F2}`` is a linear subspace and its
  projection has a closed form, ``P1 E + E P2 - P1 E P2``.

Rearrangement: a block of :class:`BlockKroneckerUpdate` is flattened as
``out[i, p, j, q] = L[i, j] · R[p, q]``; with rows ``(i, j)`` and columns ``(p, q)``
it becomes the rank-1 matrix ``vec(L) vec(R)ᵀ``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .decomposition import BlockKroneckerUpdate, LowRankUpdate, UpdateParameterisation


def rearrange(update: BlockKroneckerUpdate, weight: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as ``(K, a², b²)`` rearranged blocks (zero padded)."""
    a, b, k = update.a, update.b, update.blocks
    flat = torch.zeros(k * (a * b) ** 2, dtype=torch.float32, device=weight.device)
    flat[: update.numel] = weight.reshape(-1).float()
    return flat.reshape(k, a, b, a, b).permute(0, 1, 3, 2, 4).reshape(k, a * a, b * b)


def as_matrix(update: LowRankUpdate, weight: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor in the (m, n) view :class:`LowRankUpdate` builds ΔW in."""
    return weight.reshape(update.m, update.n).float()


@torch.no_grad()
def hrp_directions(update: UpdateParameterisation, delta: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """Anchor name -> direction from the leading factors of ``delta`` (the preheat update).

    Magnitudes: every block (kron) or column/row (mat) gets norm ``scale`` — the
    norm a seed-drawn anchor has in expectation — so the learning rate tuned for
    random anchors carries over; only directions come from the preheat.
    """
    lefts = {t.anchor for t in update.terms if t.anchor == t.left}
    rights = {t.anchor for t in update.terms if t.anchor == t.right}
    out = {}
    if isinstance(update, BlockKroneckerUpdate):
        u, _, vh = torch.linalg.svd(rearrange(update, delta), full_matrices=False)
        left = u[:, :, 0].reshape(update.blocks, update.a, update.a) * scale
        right = vh[:, 0, :].reshape(update.blocks, update.b, update.b) * scale
    elif isinstance(update, LowRankUpdate):
        u, _, vh = torch.linalg.svd(as_matrix(update, delta), full_matrices=False)
        r = update.rank
        left = u[:, :r].contiguous() * scale
        right = vh[:r, :].contiguous() * scale
    else:
        raise TypeError(f"no HRP directions for {type(update).__name__}")
    out.update({name: left.clone() for name in lefts})
    out.update({name: right.clone() for name in rights})
    return out


def _lstsq_left(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """argmin_X ||f X - m|| for f (m×r)."""
    return torch.linalg.lstsq(f.double(), m.double()).solution.float()


@torch.no_grad()
def project_to_trained(
    update: UpdateParameterisation, anchors: Mapping[str, torch.Tensor], error: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Trained-factor values whose (linear) ΔW is the least-squares fit of ``error``.

    Defined for ``aad`` and ``fab``, where ΔW is linear in the trained factors.
    """
    if update.pattern not in ("aad", "fab"):
        raise ValueError(f"pattern {update.pattern!r} is not linear in its trained factors")
    if isinstance(update, BlockKroneckerUpdate):
        m = rearrange(update, error)  # (K, a², b²)
        k = update.blocks
        if update.pattern == "fab":
            f = anchors["F"].reshape(k, -1)
            x = torch.einsum("ka,kab->kb", f, m) / (f * f).sum(1, keepdim=True).clamp_min(1e-30)
            return {"B": x.reshape(k, update.b, update.b)}
        f1, f2 = anchors["F1"].reshape(k, -1), anchors["F2"].reshape(k, -1)
        x = torch.einsum("ka,kab->kb", f1, m) / (f1 * f1).sum(1, keepdim=True).clamp_min(1e-30)
        rest = m - f1[:, :, None] * x[:, None, :]
        y = torch.einsum("kab,kb->ka", rest, f2) / (f2 * f2).sum(1, keepdim=True).clamp_min(1e-30)
        return {"T1": x.reshape(k, update.b, update.b), "T2": y.reshape(k, update.a, update.a)}
    if isinstance(update, LowRankUpdate):
        m = as_matrix(update, error)
        if update.pattern == "fab":
            return {"B": _lstsq_left(anchors["F"], m)}
        t1 = _lstsq_left(anchors["F1"], m)  # (r, n)
        rest = m - anchors["F1"] @ t1
        t2 = _lstsq_left(anchors["F2"].T, rest.T).T  # (m, r)
        return {"T1": t1, "T2": t2.contiguous()}
    raise TypeError(f"cannot project onto {type(update).__name__}")


def linear_delta(
    update: UpdateParameterisation, anchors: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """ΔW of ``trained`` values with the given anchors (linear patterns)."""
    return update.delta_weight({**anchors, **trained})
