"""One round's work on each side, independent of the transport.

The Flower apps call these; so do tests and scripts that need a round without a
network. Server: :class:`ServerModel` keeps the global model, the chain of
aggregated updates and what each client holds. Client: :class:`ClientModel`
applies the downlink to the global model it holds, checks the digest, regenerates
the frozen factors from the seed, trains and encodes its upload.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .aggregate import WeightedMean
from .bounds import Screened, bound_reply, bound_update, lower_median, update_norm
from .codec import SCHEMES, Codec, Parts, PayloadError, topk_count
from .feedback import ErrorFeedback
from .config import ConfigError, RunConfig
from .mud import DecomposedModel, decompose
from .pretrained import load_init_weights
from .privacy import mechanism, sample_round
from .seeds import derive_seed, numpy_rng
from .layout import UploadLayout
from .sync import (
    ANCHOR,
    FULL,
    STATELESS_BUDGET,
    Anchor,
    ChainStore,
    Downlink,
    Link,
    SyncRecords,
    plan_downlink,
    StatelessSizes,
    plan_stateless,
    state_digest,
    state_nbytes,
)
from .task import Task, resolve_task
from .training import evaluate, train_local

ModelFactory = Callable[[], nn.Module]


def run_model_factory(run: RunConfig) -> ModelFactory:
    """The factory the run config names (built-in or ``package.module:factory``), bound to its data."""
    from .models import model_factory

    return model_factory(run.model, run.data)


def build_decomposed(
    run: RunConfig, device: torch.device | str = "cpu", model_fn: ModelFactory | None = None
) -> DecomposedModel:
    """The run's model, decomposed; every party builds the same round-0 weights from ``run.seed``.

    ``model_fn`` builds the undecomposed model (default: the one the run config names);
    it is called under ``torch.manual_seed(run.seed)``, so its initial weights are a
    function of the seed on every party; ``init-weights`` then replaces them with a
    pretrained state_dict (:mod:`fedmud.pretrained`). LoRA adapters are drawn after, from
    the same generator.
    """
    given = model_fn is not None
    model_fn = model_fn or run_model_factory(run)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(run.seed)
    try:  # the model's initial weights (and fedlmt's factors) are drawn from the global generator
        model = model_fn()
        if not isinstance(model, nn.Module):
            what = f"model_fn={getattr(model_fn, '__qualname__', model_fn)!r}" if given else f"model={run.model!r}"
            raise ConfigError(
                f"{what} is not allowed: the factory returned a {type(model).__name__}, expected a torch.nn.Module"
            )
        if run.init_weights:  # fine-tuning: the pretrained weights are round 0 on every party
            load_init_weights(model, run.init_weights)
        return decompose(model, run.decomposition).to(device)
    finally:
        torch.random.set_rng_state(generator_state)

def build_codec(run: RunConfig, model: DecomposedModel) -> Codec:
    """The uplink codec the run config names (``topk``'s k from the dense bytes it may use), with the
    vectors the plan sends at int8 (``vector-uplink``).

    Under secure aggregation no code travels: the client hands its update to the masks, as values
    or as codes on the round's shared grid (:func:`fedmud.secagg.code_grid`), so the codec is float32.
    """
    layout = model.upload_layout()
    scheme = "float32" if run.privacy.secure_aggregation else run.uplink.codec
    k = topk_count(layout.numel, model.dense_reference_numel, run.uplink.topk_ratio) if SCHEMES[scheme].sparse else 0
    return Codec(layout, scheme, k, model.plan.int8_names())


def build_link_codec(run: RunConfig, model: DecomposedModel) -> Codec:
    """How each downlink chain link is coded (``downlink-codec``); the same layout as an upload.

    With ``downlink=full`` no link is ever sent, so merges stay exact (float32).
    """
    return Codec(model.upload_layout(), "float32" if run.downlink == "full" else run.downlink_codec)


def round_start(model: DecomposedModel, codec: Codec, seed: int, values: bool = True) -> np.ndarray | None:
    """Reset ``model``'s factors to those drawn from ``seed`` and return the upload's round-start values
    (the global model with those factors, laid out as ``codec`` lays out an upload; None unless ``values``).

    The one definition of what every party measures a round from: residual codes (uplink and chain
    links), the norm bounds, DP's clip and the update handed to secure aggregation.
    """
    model.reset(seed)
    return codec.layout.flatten(model.uploaded_state()) if values else None


def link_reference(model: DecomposedModel, codec: Codec, seed: int) -> np.ndarray | None:
    """The round-start values a lossy link is the residual against (None for float32); resets ``model``."""
    return round_start(model, codec, seed, values=codec.residual)


def apply_link(model: DecomposedModel, codec: Codec, link: Link) -> None:
    """Merge one round's aggregated upload as decoded: the same bitwise on server and clients (CPU).

    Raises :class:`~fedmud.codec.PayloadError` if the link's parts are not the codec's.
    """
    values = codec.decode(link.parts, link_reference(model, codec, link.seed))
    model.load_uploaded_state(codec.layout.unflatten(values))
    model.merge()
    if link.basis is not None:
        model.load_hrp_state(model.hrp_layout().unflatten(link.basis))  # the HRP directions ride on the link


def build_anchor_codec(run: RunConfig, model: DecomposedModel) -> Codec | None:
    """How the anchor of a stateless run is coded (``anchor-codec``; None when there is none): every
    floating tensor of the global model, weight matrices at the anchor codec, 1-D tensors (biases,
    norms, running statistics) at int8 (the codec's statistics split; see :mod:`fedmud.sync`)."""
    if run.client_state != "none" or run.anchor_codec == "none" or run.downlink == "full":
        return None
    floats = {n: t for n, t in model.global_state().items() if t.is_floating_point()}
    one_d = frozenset(n for n, t in floats.items() if t.dim() <= 1)
    return Codec(UploadLayout(tuple((n, tuple(t.shape)) for n, t in floats.items()), one_d), run.anchor_codec)


DEFLATED = "deflated"  # an anchor's one part: the codec's packed parts, deflated


def code_anchor(codec: Codec, round_: int, state: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]) -> Anchor:
    """The anchor of round ``round_``: ``state``'s change since round 0 (``initial``) in ``codec``,
    its packed bytes deflated (zlib, level 9): int4 codes of a change spread like a Gaussian carry
    ~3.3 bits of information in their 4, so a deflated int4 anchor fits 1/8 of the float32 model
    with room for links; inflating is exact, so every party decodes the same values."""
    reference = codec.layout.flatten(initial)
    (packed,) = codec.pack(codec.encode(codec.layout.flatten(state) - reference)).values()
    return Anchor(round_, {DEFLATED: np.frombuffer(zlib.compress(np.ascontiguousarray(packed).tobytes(), 9), np.uint8)})


def apply_anchor(model: DecomposedModel, codec: Codec, anchor: Anchor, initial: Mapping[str, torch.Tensor]) -> None:
    """Load round 0 plus the anchor's decoded change into ``model`` (the same bitwise on every party:
    one float32 addition a value). Raises :class:`~fedmud.codec.PayloadError` for parts that are not
    the codec's."""
    (name, (dtype, size)), = codec.wire_parts.items()
    if set(anchor.parts) != {DEFLATED}:
        raise PayloadError(f"an anchor holds {sorted(anchor.parts)}, expected [{DEFLATED!r}]")
    try:
        raw = zlib.decompressobj().decompress(np.ascontiguousarray(anchor.parts[DEFLATED]).tobytes(), size * dtype.itemsize + 1)
    except zlib.error as err:
        raise PayloadError(f"the anchor does not inflate: {err}") from None
    if len(raw) != size * dtype.itemsize:
        raise PayloadError(f"the anchor inflates to {len(raw)} bytes, expected {size * dtype.itemsize}")
    values = codec.decode({name: np.frombuffer(raw, dtype).copy()}, codec.layout.flatten(initial))
    model.load_global_state({**initial, **codec.layout.unflatten(values)})


class PerLayout:
    """What ``build(model)`` returns, built once and again whenever ``model``'s upload layout
    changes (``layout_version``: HRP LoRA's switch to the final rank), so codecs match the model."""

    def __init__(self, model: DecomposedModel, build: Callable[[DecomposedModel], object]) -> None:
        self.model, self.build = model, build
        self._version, self._value = -1, None

    def get(self):
        if self._version != self.model.layout_version:
            self._value, self._version = self.build(self.model), self.model.layout_version
        return self._value


def _link_codecs(run: RunConfig, model: DecomposedModel) -> tuple[Codec, ErrorFeedback | None]:
    """The link codec and, for a lossy one, what it lost, added to the next link."""
    codec = build_link_codec(run, model)
    return codec, ErrorFeedback(model, codec) if codec.residual else None


def _uplink_codecs(run: RunConfig, model: DecomposedModel) -> tuple[Codec, ErrorFeedback | None]:
    """The uplink codec and, with ``error-feedback=true``, what it lost, added to the next upload."""
    codec = build_codec(run, model)
    return codec, ErrorFeedback(model, codec) if run.uplink.error_feedback else None


class ServerModel:
    """The global model on the server, the chain of recent merges and every client's sync record."""

    def __init__(self, run: RunConfig, model_fn: ModelFactory | None = None, task: Task | None = None) -> None:
        self.run = run
        self.task = task or resolve_task(run.task)
        self.model = build_decomposed(run, model_fn=model_fn)
        self.initial_state = {n: t.clone() for n, t in self.model.global_state().items()}
        self._uplink = PerLayout(self.model, lambda m: build_codec(run, m))
        # client-state=none: the anchor, and the model its clients hold (round 0, the anchor, the links since)
        self.anchor_codec = build_anchor_codec(run, self.model)
        self.anchor: Anchor | None = None
        self.stateless = build_decomposed(run, model_fn=model_fn) if self.anchor_codec is not None else None
        self._offset: tuple[tuple, np.ndarray] | None = None
        # the link codec and its carried error: a new layout (HRP LoRA's switch) starts afresh
        self._link = PerLayout(self.model, lambda m: _link_codecs(run, m))
        self.round = 0  # the global round the model is at
        self.chain = ChainStore()
        self.records = SyncRecords()
        self.digest = state_digest(self.global_state())
        self.stateless_digest = self.digest
        self.link_bytes = 0  # downlink bytes per link and of the full model, measured by the app
        self.full_bytes = 0
        self.anchor_framing = 0  # and, with an anchor, of an anchor message beyond its anchor and a chain message without links
        self.message_bytes = 0
        self._reference: tuple[tuple, np.ndarray] | None = None
        self.dp = mechanism(run)  # client-level DP (off unless the config turns it on)
        # the update norms of the valid replies of the last NORM_WINDOW rounds that had any: the
        # median norm bound's reference (see :class:`RoundTally`)
        self.recent_norms: list[list[float]] = []
        self.refused = ""  # why the last merge was refused ("" when it was not)

    @property
    def codec(self) -> Codec:
        """The uplink codec."""
        return self._uplink.get()

    @property
    def link_codec(self) -> Codec:
        """How chain links are coded."""
        return self._link.get()[0]

    @property
    def link_feedback(self) -> ErrorFeedback | None:
        """What the lossy link code lost, added to the next link; None for float32 links."""
        return self._link.get()[1]

    def global_state(self) -> dict[str, torch.Tensor]:
        return self.model.global_state()

    def load(self, round_: int, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_global_state(state)
        self.round = round_
        self.digest = state_digest(self.global_state())

    def plan(self, client: str) -> Downlink:
        """What ``client`` needs to hold the current global model.

        A client that keeps no state (``client-state=none``) holds round 0 each time:
        every party builds it from the seed; it gets the chain from there, or the anchor and the
        chain since it (:func:`fedmud.sync.plan_stateless`).
        """
        if self.run.downlink == "full":
            return Downlink(FULL, self.round)
        if self.anchor_codec is not None:
            return plan_stateless(self.anchor, self.round, self.chain, self.stateless_sizes)
        held = 0 if self.run.client_state == "none" else self.records.get(client, new_client_round=0)
        return plan_downlink(held, self.round, self.chain, self.link_bytes, self.full_bytes)

    @property
    def stateless_sizes(self) -> StatelessSizes:
        return StatelessSizes(self.full_bytes, self.link_bytes, self.anchor_framing, self.message_bytes)

    def downlink(self, plan: Downlink, server_round: int) -> Downlink:
        """``plan`` (:meth:`plan`) completed for ``server_round``: the round's seed, the digest of the
        global model and, for a full downlink, the model itself. What the strategy sends and
        :func:`simulate_in_process` hands its clients."""
        from .seeds import round_seed  # a module name: ``round_seed`` is a parameter of most methods here

        full_state = self.global_state() if plan.kind == FULL else None
        digest = self.stateless_digest if plan.kind == ANCHOR else self.digest
        return plan.for_round(server_round, round_seed(self.run.seed, server_round), digest, full_state)

    def _advance_stateless(self, link: Link) -> None:
        """After ``link`` was merged: refresh the anchor if a stateless download would now exceed the
        budget (:mod:`fedmud.sync`), else apply the link to the stateless clients' model too."""
        if self.anchor_codec is None or not self.full_bytes:
            return
        cost = self.stateless_sizes.cost(self.anchor, self.chain)
        if cost is None or cost > STATELESS_BUDGET * self.full_bytes:
            self.anchor = code_anchor(self.anchor_codec, link.round, self.global_state(), self.initial_state)
            apply_anchor(self.stateless, self.anchor_codec, self.anchor, self.initial_state)
        elif self.anchor is not None:
            apply_link(self.stateless, self.link_codec, link)
        self._stateless_digest()

    def _stateless_digest(self) -> None:
        self.stateless_digest = self.digest if self.anchor is None else state_digest(self.stateless.global_state())

    def stateless_offset(self, round_seed: int) -> np.ndarray:
        """``Ŵ - W`` in the upload's layout at the round's start: what a ``float32`` upload trained from
        the stateless clients' model is moved by before it is merged into W (kept per model state)."""
        key = (round_seed, self.digest, self.stateless_digest)
        if self._offset is None or self._offset[0] != key:
            values = round_start(self.stateless, self.codec, round_seed)
            self.stateless.clear()
            self._offset = (key, values - self.reference(round_seed))
        return self._offset[1]

    def code_link(self, server_round: int, round_seed: int, mean: np.ndarray) -> Link:
        """The round's link: the aggregated upload ``mean`` in the link code.

        A lossy code sends the residual against the round-start values plus what
        earlier links lost (kept as a weight update for decomposed layers and
        projected onto this round's factors, see :mod:`fedmud.feedback`); what this
        link loses is kept for the next.
        """
        if self.link_feedback is None:
            return Link(server_round, round_seed, {"payload": mean})
        reference = link_reference(self.model, self.link_codec, round_seed)
        target = self.link_feedback.compensate(mean - reference)
        parts = self.link_codec.encode(target)
        self.link_feedback.update(target, self.link_codec.decode_vector(parts))
        self.model.clear()
        return Link(server_round, round_seed, self.link_codec.pack(parts))  # as it travels (one array)

    def reference(self, round_seed: int) -> np.ndarray:
        """The round-start values of the upload (global model, factors drawn from ``round_seed``).

        Both sides know them: lossy codecs encode residuals against them, and the norm
        bound measures every update from them. Kept for the model state it was drawn in.
        """
        key = (round_seed, self.digest, self.model.layout_version)
        if self._reference is None or self._reference[0] != key:
            values = round_start(self.model, self.codec, round_seed)
            self.model.clear()
            self._reference = (key, values)
        return self._reference[1]

    @property
    def median_bound_on(self) -> bool:
        """Whether replies are bounded by a multiple of their peers' median norm (``median-norm-bound``)."""
        return self.run.bounds.median_norm_bound > 0 and not self.dp.on

    def median_bound(self, norms: list[float] | None = None) -> float:
        """The median norm bound: the multiple times the lower median of ``norms`` (by default the
        recent rounds' update norms, pooled); 0 when off or there are no norms yet."""
        pooled = [norm for recent in self.recent_norms for norm in recent] if norms is None else norms
        if not self.median_bound_on or not pooled:
            return 0.0
        return self.run.bounds.median_norm_bound * lower_median(pooled)

    def screen(self, round_seed: int, parts: Parts, examples: int) -> Screened:
        """Decode one validated upload and apply the bounds (:func:`fedmud.bounds.bound_reply`:
        ``max-examples``, DP's clip and weight, ``update-norm-bound``).

        The update is the decoded upload minus :meth:`reference`: for lossy codecs that is
        the residual as sent; for float32 the reference is rebuilt only when a bound is on.
        With the median bound on, the update's norm is measured for :class:`RoundTally`.
        """
        bounds = self.run.bounds
        needs_reference = self.codec.residual or bounds.update_norm_bound > 0 or self.dp.on or self.median_bound_on
        reference = self.reference(round_seed) if needs_reference else None
        values = self.codec.decode(parts, reference)
        if self.anchor is not None and not self.codec.residual:  # trained from Ŵ: its values, moved onto W
            values = values - self.stateless_offset(round_seed)
        update = None  # what the bounds measure, when one is on
        if self.dp.on:  # clipped as the client clipped it: the decoded upload's change
            update = values.astype(np.float64) - reference
        elif bounds.update_norm_bound > 0:
            update = self.codec.decode_vector(parts) if self.codec.residual else values.astype(np.float64) - reference
        bounded = bound_reply(update, examples, bounds, self.dp)
        if bounded.moved:
            values = None if bounded.dropped else (reference + bounded.update).astype(np.float32)
        norm = update_norm(values.astype(np.float64) - reference) if self.median_bound_on and values is not None else 0.0
        return Screened(values, bounded.weight, bounded.events, bounded.reasons, norm)

    def bound_by_median(self, round_seed: int, screened: Screened, bound: float) -> Screened:
        """``screened`` with its update kept within ``bound`` (:meth:`median_bound`), clipped or
        dropped as ``update-norm-action`` says."""
        if screened.dropped or bound <= 0 or screened.norm <= bound:
            return screened
        reference = self.reference(round_seed)
        update = screened.values.astype(np.float64) - reference
        what = f"median-norm-bound ({self.run.bounds.median_norm_bound:g} x the median update norm)"
        bounded, event, reason = bound_update(update, bound, self.run.bounds.update_norm_action, what)
        values = None if bounded is None else (reference + bounded).astype(np.float32)
        return Screened(values, screened.weight, screened.events + (event,), screened.reasons + (reason,), screened.norm)

    def apply_round(
        self, server_round: int, round_seed: int, uploads: Iterable[tuple[Parts, int | float]], population: int = 0
    ) -> int:
        """Screen validated uploads (parts, num-examples) with :meth:`screen`, tally them
        (:class:`RoundTally`: the median norm bound) and merge their mean if at least
        ``min-replies`` are kept, else skip the round (``population``: the nodes the round
        sampled from, for DP's release). Returns how many were merged."""
        tally = RoundTally(self, round_seed)
        for index, (parts, examples) in enumerate(uploads):
            tally.add(index, self.screen(round_seed, parts, examples))
        tally.close()
        return self.merge_mean(server_round, round_seed, tally.mean_to_merge(), population)

    def merge_round(
        self, server_round: int, round_seed: int, uploads: Iterable[tuple[np.ndarray, float]], population: int = 0
    ) -> int:
        """Merge the weighted mean of decoded uploads (values, weight) into W; returns how many merged.

        With no upload the round is skipped: the model stays, and no link is recorded.
        With ``init=hrp`` the first merge from round ``hrp_rounds`` on fixes the HRP
        directions; they ride on that round's link.
        """
        mean = WeightedMean()
        for values, weight in uploads:
            mean.add(values, weight)
        return self.merge_mean(server_round, round_seed, mean, population)

    def merge_mean(self, server_round: int, round_seed: int, mean: WeightedMean, population: int = 0) -> int:
        """:meth:`merge_round` for uploads already added to ``mean`` (the strategy adds each reply
        as it arrives and keeps none); returns how many were merged.

        Under DP the model moves by the noisy sum of the (clipped, weight-1) updates over
        ``fraction-train · population`` (:meth:`fedmud.privacy.Mechanism.release`).
        """
        values = None
        if mean.count and self.dp.on:
            reference = self.reference(round_seed).astype(np.float64)
            released = self.dp.release(mean.total() - mean.count * reference, population)
            values = (reference + released).astype(np.float32)
        elif mean.count:
            values = mean.result()
        return self.merge_values(server_round, round_seed, values, mean.count)

    def merge_secure(
        self, server_round: int, round_seed: int, mean_update: np.ndarray | None, count: int, population: int = 0
    ) -> int:
        """Merge what secure aggregation gives: the weighted mean of ``count`` clients' updates
        (under DP, weight 1 each: their sum over ``count``), never one client's; returns ``count``."""
        values = None
        if count:
            reference = self.reference(round_seed).astype(np.float64)
            update = np.asarray(mean_update, dtype=np.float64)
            if self.dp.on:
                update = self.dp.release(update * count, population)
            values = (reference + update).astype(np.float32)
        return self.merge_values(server_round, round_seed, values, count)

    def merge_values(self, server_round: int, round_seed: int, values: np.ndarray | None, count: int) -> int:
        """Merge the round's aggregated upload ``values`` (None: no reply, the round is skipped).

        A merge that would leave the global model non-finite, or whose link does not code
        (values beyond what the link code can carry), is refused: the model, the link
        code's carried error and the chain stay as they were, :attr:`refused` says why, and
        the round is skipped. Whatever the bounds, no round makes the model non-finite.
        """
        self.refused = ""
        if values is not None:
            link = self._guarded_link(server_round, round_seed, values)
            values = None if link is None else values
        if values is not None:
            d = self.run.decomposition
            if d.init == "hrp" and server_round >= d.hrp_rounds and not self.model.hrp_ready:
                self.model.set_hrp_directions(self.initial_state)
                basis = self.model.hrp_layout().flatten(self.model.hrp_state())
                link = Link(link.round, link.seed, link.parts, basis)
            self.chain.add(link)
            if self.link_bytes:  # a chain longer than this costs more than the full model
                self.chain.prune(keep=max(1, self.full_bytes // self.link_bytes))
        self.round = server_round
        self.digest = state_digest(self.global_state())
        if values is not None:
            self._advance_stateless(link)
        return count if values is not None else 0

    def _guarded_link(self, server_round: int, round_seed: int, values: np.ndarray) -> Link | None:
        """Code ``values`` as the round's link and merge it, or refuse (None, :attr:`refused` set)
        and put everything back."""
        if not np.isfinite(values).all():
            self.refused = "the aggregated upload is not finite"
            return None
        weights = {n: t.clone() for n, t in self.global_state().items()}
        carried = None if self.link_feedback is None else self.link_feedback.state()
        try:
            link = self.code_link(server_round, round_seed, values)
            apply_link(self.model, self.link_codec, link)
        except PayloadError as err:
            self.refused = f"the aggregated upload cannot be coded as a link: {err}"
        else:
            bad = [n for n, t in self.global_state().items() if t.is_floating_point() and not torch.isfinite(t).all()]
            if not bad:
                return link
            self.refused = f"merging it would make the model non-finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
        self.model.clear()
        self.model.load_global_state(weights)
        if self.link_feedback is not None:
            self.link_feedback.load_state(carried)
        return None

    def state_dict(self) -> dict:
        """Everything a resumed server needs to continue bitwise (see :mod:`fedmud.checkpoint`)."""
        return {
            "round": self.round,
            "global_state": self.global_state(),
            "chain": [(link.round, link.seed, dict(link.parts), link.basis) for link in self.chain.links],
            "chain_oldest_kept": self.chain.oldest_kept,
            "records": dict(self.records.held),
            "link_feedback": None if self.link_feedback is None else self.link_feedback.state(),
            "recent_norms": [list(norms) for norms in self.recent_norms],
            "anchor": None if self.anchor is None else (
                self.anchor.round, {k: torch.from_numpy(np.array(v, copy=True)) for k, v in self.anchor.parts.items()}
            ),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.load(state["round"], state["global_state"])
        self.chain = ChainStore([Link(*link) for link in state["chain"]], state["chain_oldest_kept"])
        self.records.held = dict(state["records"])
        if self.link_feedback is not None:
            self.link_feedback.load_state(state.get("link_feedback"))
        self.recent_norms = [list(norms) for norms in state.get("recent_norms", [])]
        anchor = state.get("anchor")
        self.anchor = None if anchor is None else Anchor(anchor[0], {k: v.numpy() for k, v in anchor[1].items()})
        if self.anchor is not None:  # the stateless clients' model: round 0, the anchor, the links since
            apply_anchor(self.stateless, self.anchor_codec, self.anchor, self.initial_state)
            for link in self.chain.since(self.anchor.round) or ():
                apply_link(self.stateless, self.link_codec, link)
        self._stateless_digest()

    def evaluate(self, loader: DataLoader) -> tuple[float, float]:
        """(mean loss, mean metric) of the global model on ``loader`` (CPU)."""
        return evaluate(self.model, loader, torch.device("cpu"), self.task)


NORM_WINDOW = 3  # rounds whose update norms the median norm bound pools


class RoundTally:
    """A round's screened replies, bounded by their peers' median norm and added to the mean.

    With ``median-norm-bound`` on, every valid update's norm is at most that multiple of
    the lower median of the update norms of the last :data:`NORM_WINDOW` rounds that had
    valid replies (their norms pooled: one client is at most one value a round in the pool).
    Once such a round exists each reply is bounded and added as it comes, and none is held;
    in a round without one (the first, or after a checkpoint made before any merge) the
    replies' decoded values are held until the round's own median is known. ``close``
    bounds what was held, adds this round's norms to the window and returns every
    outcome, keyed as given to ``add``.
    """

    def __init__(self, server: ServerModel, round_seed: int) -> None:
        self.server, self.round_seed = server, round_seed
        self.mean = WeightedMean()
        self.bound = server.median_bound()
        self._hold = server.median_bound_on and self.bound == 0
        self._norms: list[float] = []
        self._held: list[tuple[object, Screened]] = []
        self.outcomes: list[tuple[object, Screened]] = []

    def add(self, key: object, screened: Screened) -> None:
        if not screened.dropped and self.server.median_bound_on:
            self._norms.append(screened.norm)
            if self._hold:
                self._held.append((key, screened))
                return
        self._admit(key, screened)

    def _admit(self, key: object, screened: Screened) -> None:
        screened = self.server.bound_by_median(self.round_seed, screened, self.bound)
        if not screened.dropped:
            self.mean.add(screened.values, screened.weight)
        self.outcomes.append((key, screened))

    def close(self) -> list[tuple[object, Screened]]:
        if self._held:
            self.bound = self.server.median_bound(self._norms)  # the round's own median
            held, self._held = self._held, []
            for key, screened in held:
                self._admit(key, screened)
        if self._norms:
            self.server.recent_norms = (self.server.recent_norms + [self._norms])[-NORM_WINDOW:]
        return self.outcomes

    @property
    def enough(self) -> bool:
        """Whether the round has the ``min-replies`` valid replies it needs to be merged."""
        return self.mean.count >= self.server.run.min_replies

    def mean_to_merge(self) -> WeightedMean:
        """The mean, or an empty one (the round is skipped) without :attr:`enough` replies in it."""
        return self.mean if self.enough else WeightedMean()


def data_seed(round_seed: int, partition_id: int) -> int:
    """The seed of a client's data order in a round (and of CIFAR's crops and flips): the round's
    seed plus the partition, so each client and round draws its own and a rerun draws them again."""
    return round_seed + partition_id


class SyncError(RuntimeError):
    """The client cannot reach the global model the server expects; it needs the full model."""


class ClientModel:
    """A client's models: the global one it holds (CPU, exact merges) and one to train on ``device``."""

    def __init__(
        self, run: RunConfig, device: torch.device, model_fn: ModelFactory | None = None, task: Task | None = None
    ) -> None:
        self.run = run
        self.device = device
        self.task = task or resolve_task(run.task)
        model_fn = model_fn or run_model_factory(run)
        self.global_model = build_decomposed(run, model_fn=model_fn)
        self.initial_state = {n: t.clone() for n, t in self.global_model.global_state().items()}
        self.model = build_decomposed(run, device, model_fn)
        self._uplink = PerLayout(self.model, lambda m: _uplink_codecs(run, m))
        self._link = PerLayout(self.global_model, lambda m: build_link_codec(run, m))
        self.anchor_codec = build_anchor_codec(run, self.global_model)
        self.dp = mechanism(run)

    @property
    def codec(self) -> Codec:
        """The uplink codec (of the model trained)."""
        return self._uplink.get()[0]

    @property
    def link_codec(self) -> Codec:
        """How chain links are coded (applied to the held global model)."""
        return self._link.get()

    @property
    def feedback(self) -> ErrorFeedback | None:
        """The uplink's error feedback (``error-feedback=true``), else None."""
        return self._uplink.get()[1]

    def sync(self, held: tuple[int, Mapping[str, torch.Tensor]] | None, downlink: Downlink) -> dict[str, torch.Tensor]:
        """Apply ``downlink`` to the held model (round, state), or to round 0 if none is held.

        An anchor downlink starts from round 0 whatever is held: the anchor's change is decoded
        onto it, then the links after the anchor's round are applied.

        Returns the new global state; raises :class:`SyncError` when a full downlink has no
        model or one that does not load, the chain does not start at the held round, an anchor
        or a link does not decode, or the result's digest is not ``downlink.digest``.
        """
        if downlink.kind == FULL:
            if downlink.full_state is None:
                raise SyncError("a full downlink without the model")
            try:  # a damaged full model is resynced like a damaged chain, not an error reply
                self.global_model.load_global_state(downlink.full_state)
            except (KeyError, ValueError, RuntimeError, TypeError) as err:
                raise SyncError(f"the full model does not load: {err}") from None
        else:
            if downlink.kind == ANCHOR:
                self._load_anchor(downlink)
            else:
                held_round, held_state = held if held is not None else (0, self.initial_state)
                if held_round != downlink.base_round:
                    raise SyncError(f"the chain starts at round {downlink.base_round}, this client holds round {held_round}")
                self.global_model.load_global_state(held_state)
            for link in downlink.links:
                try:
                    apply_link(self.global_model, self.link_codec, link)
                except PayloadError as err:
                    raise SyncError(f"link of round {link.round} does not decode: {err}") from None
        state = self.global_model.global_state()
        digest = state_digest(state)
        if digest != downlink.digest:
            raise SyncError(f"digest {digest} after the downlink, expected {downlink.digest}")
        return {n: t.clone() for n, t in state.items()}

    def _load_anchor(self, downlink: Downlink) -> None:
        if downlink.anchor is None:
            raise SyncError("an anchor downlink without the anchor")
        if self.anchor_codec is None:
            raise SyncError("an anchor downlink, but this run has none (client-state=keep or anchor-codec=none)")
        if downlink.anchor.round != downlink.base_round:
            raise SyncError(f"the anchor is of round {downlink.anchor.round}, the chain starts at round {downlink.base_round}")
        try:
            apply_anchor(self.global_model, self.anchor_codec, downlink.anchor, self.initial_state)
        except PayloadError as err:
            raise SyncError(f"the anchor of round {downlink.anchor.round} does not decode: {err}") from None

    def train_round(
        self,
        round_seed: int,
        loader: DataLoader,
        feedback: Mapping[str, torch.Tensor] | None = None,
        client_id: int = 0,
    ) -> tuple[Parts, float, dict[str, torch.Tensor] | None]:
        """Train from the synced global model with factors drawn from ``round_seed``.

        Returns (encoded upload, mean loss, error-feedback state to keep); ``feedback``
        is the state kept from this client's previous upload (None: start at zero).
        ``client_id`` (the partition id) seeds, with ``round_seed``, this client's stochastic rounding
        and the random draws of its local training (dropout): independent across clients, repeated
        by a rerun whatever the process did before.
        """
        self.model.load_global_state(self.global_model.global_state())
        reference = round_start(self.model, self.codec, round_seed, values=self.codec.residual or self.dp.on)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            # dropout and any other draw of local training: a function of (round, client), not of the
            # process's history, so Flower's nodes and simulate_in_process train alike and a rerun repeats
            torch.manual_seed(derive_seed(round_seed, "local-training", str(client_id)))
            loss = train_local(self.model, loader, self.run.train, self.device, self.task)
        values = self.codec.layout.flatten(self.model.uploaded_state())
        if self.dp.on:  # clipped, and with dp=client this client's share of the noise, before it is coded
            update = self.dp.privatise(values.astype(np.float64) - reference)
            values = (reference + update).astype(np.float32)
        rng = numpy_rng(round_seed, "rounding", str(client_id)) if self.run.uplink.stochastic_rounding else None
        if not self.codec.residual:
            return self.codec.encode(values), loss, None
        target = values - reference
        if self.feedback is None:
            return self.codec.encode(target, rng), loss, None
        self.feedback.load_state(feedback)
        target = self.feedback.compensate(target)
        parts = self.codec.encode(target, rng)
        self.feedback.update(target, self.codec.decode_vector(parts))
        return parts, loss, self.feedback.state()

    def upload_update(self, round_seed: int, parts: Parts) -> np.ndarray:
        """The update ``parts`` carries, as the server would decode it: the decoded upload minus the
        round-start values (float64). What a client hands secure aggregation, which sums updates."""
        self.model.load_global_state(self.global_model.global_state())
        reference = round_start(self.model, self.codec, round_seed)
        self.model.clear()
        values = self.codec.decode(self.codec.validate(parts), reference if self.codec.residual else None)
        return values.astype(np.float64) - reference


class Simulated(NamedTuple):
    """What :func:`simulate_in_process` returns."""

    server: ServerModel
    history: list[float]  # the held-out metric after rounds 0..R (NaN where not evaluated)
    uploaded: list[int]  # rounds 1..R: the payload bytes the round's clients uploaded, refused replies included
    downloaded: list[int]  # rounds 1..R: the bytes the round's clients downloaded, as ``downlink_nbytes`` prices them


def payload_sizes(server: ServerModel) -> tuple[int, int, int, int]:
    """(full model, one link, an anchor message beyond its anchor, a message's own bytes) in payload
    bytes, without Flower's framing (the last two are 0): what :func:`simulate_in_process` plans
    stateless downlinks by."""
    return state_nbytes(server.global_state()), server.link_codec.payload_nbytes, 0, 0


def simulate_in_process(
    run: RunConfig,
    rounds: int | None = None,
    model_fn: ModelFactory | None = None,
    on_round: Callable[[int, ServerModel], None] | None = None,
    rng: np.random.Generator | None = None,
    eval_every: int = 1,
    on_start: Callable[[ServerModel], None] | None = None,
    downlink_nbytes: Callable[[Downlink], int] = attrgetter("nbytes"),
) -> Simulated:
    """The federated loop the Flower apps drive, in one process.

    Chain sync with digests, seed-drawn factors, encoding, screening, exact aggregation
    and merges are the apps' own (:class:`ServerModel`, one :class:`ClientModel` serving
    every partition in turn); only the transport is left out, so studies run many
    configurations fast. Each partition keeps what its node keeps between rounds (the global
    model under ``client-state=keep``, its error feedback) and trains from the node's seeds
    (:func:`data_seed`, its stochastic rounding, its dropout), so a run ends bitwise as Flower's
    simulation of the same config does (``tests/test_round_core.py``) at the same number of torch
    threads: a simulated node gets one, and a transformer's sums in another order differ in the last
    bits, which rounds of training grow (``examples/hf-text`` with float32 uploads: 0.3929 at one thread on both paths, 0.413
    in process at two). A reply the strategy would reject
    (non-finite values, e.g. a client that diverged) is left out of the round the same way; a
    round with fewer than ``min-replies`` valid replies is skipped. Each round's clients are
    sampled as the strategy samples nodes (:func:`fedmud.privacy.sample_round`: every partition
    at ``fraction-train=1`` without DP; Poisson sampling from ``rng`` under DP). Returns a
    :class:`Simulated` (server, held-out metric after rounds 0..R, the bytes the round's clients
    uploaded and downloaded in rounds 1..R, each a sum over the clients that took part); with
    ``eval_every`` > 1 the metric is measured after every ``eval_every``-th round and the last (NaN
    between). An upload counts its coded arrays as they arrive; a downlink counts as
    ``downlink_nbytes`` prices it (default :attr:`Downlink.nbytes`, its payload; a study may add
    Flower's framing). The server plans downlinks by payload sizes (:func:`payload_sizes`; the Flower
    app measures them serialised, framing included). ``on_round(r, server)`` runs after each merge;
    ``on_start(server)`` before the first round, e.g. to set other message sizes.
    """
    from .data import client_loader, test_loader
    from .seeds import round_seed

    rounds = run.rounds if rounds is None else rounds
    server = ServerModel(run, model_fn)
    server.full_bytes, server.link_bytes, server.anchor_framing, server.message_bytes = payload_sizes(server)
    if on_start is not None:
        on_start(server)
    client = ClientModel(run, torch.device("cpu"), model_fn)
    held: dict[int, tuple[int, dict]] = {}  # partition -> the global model it keeps (client-state=keep)
    feedback: dict[int, dict | None] = {}  # partition -> what its codec has not sent yet (error-feedback)
    loader_test = test_loader(run.data)
    history = [server.evaluate(loader_test)[1]]
    uploaded, downloaded = [], []
    for r in range(1, rounds + 1):
        seed = round_seed(run.seed, r)
        uploads, rejected, target = [], [], server.round
        picked = sample_round(run, r, range(run.data.num_partitions), rng)
        uploaded.append(0)
        downloaded.append(0)
        for pid in picked:  # what client.app.run_client_round does with the node's state
            downlink = server.downlink(server.plan(str(pid)), r)
            downloaded[-1] += downlink_nbytes(downlink)
            state = client.sync(held.get(pid), downlink)
            if run.client_state == "keep":
                held[pid] = (downlink.target_round, state)
            loader = client_loader(run.data, pid, run.train.batch_size, seed=data_seed(downlink.round_seed, pid))
            parts, _, feedback[pid] = client.train_round(downlink.round_seed, loader, feedback.get(pid), client_id=pid)
            uploaded[-1] += sum(np.asarray(array).nbytes for array in parts.values())  # sent, whether kept or not
            try:
                uploads.append((server.codec.validate(parts), len(loader.dataset)))
            except PayloadError:  # as the strategy's reply check: refused, the round goes on
                rejected.append(pid)
        server.apply_round(r, seed, uploads, population=run.data.num_partitions)
        for pid in picked:  # as the strategy records them: a refused reply's node gets the full model next
            if pid in rejected:
                server.records.unknown(str(pid))
            else:
                server.records.synced(str(pid), target)
        evaluated = r % eval_every == 0 or r == rounds
        history.append(server.evaluate(loader_test)[1] if evaluated else float("nan"))
        if on_round is not None:
            on_round(r, server)
    return Simulated(server, history, uploaded, downloaded)
