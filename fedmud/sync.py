"""Compressed downlink: what a client lacks, as a chain of aggregated updates or the full model.

Every party can rebuild the global model of round 0 from the run seed, and the
global model of round r is round r-1's plus the merge of round r's aggregated
upload (a *link*: round, seed, the coded upload). A client that holds round b
therefore needs only the links after b. The server keeps the recent links
(:class:`ChainStore`) and, per client, the round it holds (:class:`SyncRecords`),
and sends the chain when it is cheaper than the full model.

A link is coded with the run's ``downlink-codec``. A lossy code (int8, int4, ...)
carries the residual against the round-start values every party can compute, and
the server merges the link *as decoded*, exactly as the clients will: the global
model is the chain of decoded links, so clients that keep state stay bitwise equal
to the server. What the code lost is not dropped: the server keeps it (error
feedback) and adds it to the next link.

With every downlink goes :func:`state_digest` of the global model the client must
end up with. Links are applied on the CPU with elementwise operations only (see
``exact`` in :mod:`fedmud.decomposition`), so a client's result is bitwise the
server's; a client whose digest differs reports it and gets the full model next.

Stateless clients and the anchor
--------------------------------
A client that keeps nothing (``client-state=none``) holds round 0 at every download, and the chain
from round 0 grows by one link a round: with the default int4 links of the paper's CNN it costs
more than the float32 model after ~237 rounds, and cross-device runs last thousands. So the server
also keeps an :class:`Anchor` (DoCoFL, Dorfman et al. 2023): the global model of an anchor round
``a`` coded at ``anchor-codec`` (default int4; 1-D tensors at int8) as its change since round 0,
which every party builds from the seed, so the code spends its levels on what training moved; the
packed codes are deflated (int4 codes of a Gaussian-like change carry ~3.1 bits of their 4). A
stateless client downloads the anchor and the links since ``a`` (kind ``ANCHOR``) and holds

    Ŵ_r = W_0 + decode(code(W_a - W_0)) + links a+1..r = W_r + e_a,

the exact model plus the anchor's error ``e_a``, the same for every client. The server keeps the
exact W_r (design (i) of issue 27): the anchor is never merged into it, so ``client-state=keep``
runs are untouched. It applies the same anchor and links to a second model, whose
:func:`state_digest` goes with every anchor downlink, so stateless clients are still checked
bitwise. An upload trained from Ŵ is a change from Ŵ: residual uplink codes carry that change,
which the server adds to W; a ``float32`` upload carries values, which the server moves by
``W - Ŵ`` before it merges them (:meth:`fedmud.rounds.ServerModel.screen`).

When to refresh: after a merge, the server codes a new anchor if the download a stateless client
would get next, anchor plus chain since it, costs more than :data:`STATELESS_BUDGET` of the
full downlink. Refreshing costs no client anything, no download exceeds the budget (until the
chain from round 0 reaches it, that chain is sent: W_0 is the zero-byte anchor), and K follows
from the measured sizes: for the CNN a deflated int4 anchor message is ~0.10 of the full one and
an int4 link 0.0046, so the anchor is refreshed every ~5 merged rounds (int2: 0.065, every ~14).
A code whose anchor alone exceeds the budget (int8, float16) is refreshed every round; the server
warns.

Why int4, measured (scripts/stateless_study.py, docs/bench/stateless: MNIST-5k IID, 1 client a
round of 100, 500 rounds, 3 seeds, mean accuracy over the last 100 rounds): ``keep`` 0.975; int2
anchors 0.927, worse than their bytes suggest: a client's update partly repairs ``e_a``, which W
does not have, so W is pushed off by it every round. Snapping W to the anchor's model at each
refresh (design (ii): every party holds Ŵ; a study-only variant) recovers part of it, 0.959 (seed
0), but rounds progress away at every refresh. An int4 anchor refreshed every round, not deflated
(0.127 of the full model), reached 0.975: the error's size is what matters; deflated, int4 fits
1/8 and reaches 0.976, every download ≤ 0.1249 of the full model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

FULL, CHAIN, ANCHOR = "full", "chain", "anchor"
STATELESS_BUDGET = 1 / 8  # a stateless client's download is at most this share of the full model


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and bytes of ``state`` (CPU copies), in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Link:
    """The aggregated upload merged in ``round`` (drawn from ``seed``), as the link codec's parts.

    ``parts`` is ``{"payload": float32 values}`` for ``downlink-codec=float32``, else the
    lossy code's arrays (residual against the round-start values).
    """

    round: int
    seed: int
    parts: Mapping[str, np.ndarray]
    basis: np.ndarray | None = None  # HRP directions fixed by this round's merge (init=hrp), else None

    @property
    def payload(self) -> np.ndarray:
        """The float32 values of a ``float32`` link."""
        return self.parts["payload"]

    @property
    def nbytes(self) -> int:
        """Its payload: the coded arrays and the HRP directions it may carry (no framing)."""
        return sum(array.nbytes for array in self.parts.values()) + (0 if self.basis is None else self.basis.nbytes)


@dataclass(frozen=True)
class Anchor:
    """The global model of round ``round`` as its coded change since round 0 (the anchor codec's
    packed parts); a stateless client decodes it onto round 0 and applies the links after ``round``."""

    round: int
    parts: Mapping[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.parts.values())


@dataclass
class ChainStore:
    """Aggregated uploads of recent rounds, oldest first; rounds without a merge have no link."""

    links: list[Link] = field(default_factory=list)
    oldest_kept: int = 0  # every link of a round > oldest_kept is held

    def add(self, link: Link) -> None:
        if self.links and link.round <= self.links[-1].round:
            raise ValueError(f"link for round {link.round} after round {self.links[-1].round}")
        self.links.append(link)

    def since(self, base_round: int) -> list[Link] | None:
        """Links of the rounds after ``base_round``, or None if some were pruned."""
        if base_round < self.oldest_kept:
            return None
        return [link for link in self.links if link.round > base_round]

    def prune(self, keep: int) -> None:
        """Keep at most the ``keep`` newest links (older chains would cost more than the full model)."""
        if len(self.links) > keep:
            dropped = self.links[: len(self.links) - keep]
            self.links = self.links[len(self.links) - keep :]
            self.oldest_kept = dropped[-1].round


@dataclass
class SyncRecords:
    """Per client: the round of the global model it holds, None when unknown."""

    held: dict[str, int | None] = field(default_factory=dict)

    def get(self, client: str, new_client_round: int | None) -> int | None:
        """A client never seen holds what every party can build: ``new_client_round`` (0), if allowed."""
        return self.held.get(client, new_client_round)

    def synced(self, client: str, round_held: int) -> None:
        self.held[client] = round_held

    def unknown(self, client: str) -> None:
        self.held[client] = None


@dataclass(frozen=True)
class Downlink:
    """All a client needs for one round: how to reach the global model, and the round it trains in.

    ``FULL`` carries the model (``full_state``), ``CHAIN`` the links after ``base_round``,
    ``ANCHOR`` the anchor of ``base_round`` (``anchor``) and the links after it;
    either way the client must end up at ``target_round`` with the model whose
    :func:`state_digest` is ``digest``, and trains round ``server_round`` from factors drawn
    from ``round_seed``. The server plans it (:func:`plan_downlink`: kind and links) and
    completes it for the round (:meth:`for_round`); the transport only writes it to a
    message and reads it back.
    """

    kind: str
    target_round: int  # the global round the client holds after applying it
    base_round: int | None = None
    links: tuple[Link, ...] = ()
    server_round: int = 0  # the round the client trains in
    round_seed: int = 0  # its seed: the frozen factors, the client's data order
    digest: str = ""  # state_digest of the model the client must reach
    anchor: Anchor | None = None  # ANCHOR only
    # the global model (FULL only); not compared: tensors have no single truth value
    full_state: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def for_round(
        self, server_round: int, round_seed: int, digest: str, full_state: Mapping[str, torch.Tensor] | None = None
    ) -> Downlink:
        """This plan as sent in ``server_round``; ``full_state`` is kept for a ``FULL`` downlink only."""
        if self.kind == FULL and full_state is None:
            raise ValueError("a full downlink needs the global state")
        return replace(
            self,
            server_round=server_round,
            round_seed=round_seed,
            digest=digest,
            full_state=full_state if self.kind == FULL else None,
        )

    @property
    def nbytes(self) -> int:
        """Its payload as sent (:meth:`for_round`): the full model's tensors, or the anchor and the
        links; no framing. A ``FULL`` plan not yet completed has no model to count."""
        if self.kind == FULL:
            if self.full_state is None:
                raise ValueError("a full downlink's size needs its state: count the downlink for_round returns")
            return state_nbytes(self.full_state)
        return sum(link.nbytes for link in self.links) + (0 if self.anchor is None else self.anchor.nbytes)


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """A model state's tensors in bytes, as a full downlink carries them (no framing)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def chain_bytes(links: Sequence[Link], link_bytes: int) -> int:
    """What a chain costs on the wire: ``link_bytes`` per link (a coded link and its framing),
    plus the HRP directions a link may carry."""
    return sum(link_bytes + (0 if link.basis is None else link.basis.nbytes) for link in links)


def plan_downlink(
    held_round: int | None, target_round: int, chain: ChainStore, link_bytes: int, full_bytes: int
) -> Downlink:
    """The cheaper of the chain since ``held_round`` and the full model; full when the state is unknown."""
    if held_round is None:
        return Downlink(FULL, target_round)
    links = chain.since(held_round)
    if held_round > target_round or links is None or chain_bytes(links, link_bytes) >= full_bytes:
        return Downlink(FULL, target_round)
    return Downlink(CHAIN, target_round, held_round, tuple(links))


def plan_stateless(
    anchor: Anchor | None, target_round: int, chain: ChainStore, sizes: StatelessSizes
) -> Downlink:
    """What a client holding nothing needs: the cheapest of the chain from round 0, the anchor and
    the chain since it, and the full model (priced as whole messages, :class:`StatelessSizes`)."""
    plans = []
    links = chain.since(0)
    if links is not None:
        plans.append(Downlink(CHAIN, target_round, 0, tuple(links)))
    links = None if anchor is None or anchor.round > target_round else chain.since(anchor.round)
    if links is not None:
        plans.append(Downlink(ANCHOR, target_round, anchor.round, tuple(links), anchor=anchor))
    plans.append(Downlink(FULL, target_round))
    return min(plans, key=sizes.price)  # the first of equal costs: full only when strictly cheaper


@dataclass(frozen=True)
class StatelessSizes:
    """Bytes of a stateless client's downlinks as sent: ``full`` (the full model's message),
    ``link`` (one more link), ``anchor_framing`` (an anchor message without links, beyond the
    anchor's own bytes, which vary: :attr:`Anchor.nbytes`), ``message`` (a chain message without
    links: its config and digest)."""

    full: int = 0
    link: int = 0
    anchor_framing: int = 0
    message: int = 0

    def price(self, downlink: Downlink) -> int:
        """Bytes of ``downlink`` as sent: the full model's message, or the chain or the anchor
        message with its links."""
        if downlink.kind == FULL:
            return self.full
        own = self.anchor_framing + downlink.anchor.nbytes if downlink.kind == ANCHOR else self.message
        return own + chain_bytes(downlink.links, self.link)

    def cost(self, anchor: Anchor | None, chain: ChainStore) -> int | None:
        """Bytes of the anchor (none: round 0) and the chain since it; None when links since it were pruned."""
        links = chain.since(0 if anchor is None else anchor.round)
        if links is None:
            return None
        own = self.message if anchor is None else self.anchor_framing + anchor.nbytes
        return own + chain_bytes(links, self.link)
