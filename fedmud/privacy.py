"""Client-level differential privacy in factor space, and its accounting.

What is protected is one client's whole contribution to a round: its update, the
decoded upload minus the round-start values both sides know (for ``aad`` and ``fab``
the trained factors' change, whose mean *is* the mean ΔW).

- **Clipping.** Each update is scaled so that its L2 norm is at most ``dp-clip`` (C),
  on the client, before it leaves; the server clips again where it sees updates
  (without secure aggregation), so a client that skipped it gains nothing.
- **Weights.** Every client weighs 1: a weight the client states would be part of
  what must be bounded.
- **Sampling.** Each node takes part in a round with probability ``fraction-train``
  (q), independently (Poisson sampling), which is what the accountant assumes.
- **Noise.** Gaussian, N(0, σ²C²) on the *sum* of the clipped updates, added by the
  server (``dp=server``) or split over the clients (``dp=client``: each adds
  N(0, σ²C²/m) with m = ``min-replies``, so a round merged from m or more replies
  carries at least the noise accounted for, and the server, which only sees the sum
  under secure aggregation, never sees an update with less). Noise is drawn from the
  operating system's entropy, never from the run's seeds, which the server knows.
- **Release.** The model moves by (sum + noise) / (q · N), N the nodes available: a
  fixed denominator (DP-FedAvg's), so the released mean reveals nothing through the
  number of replies.
- **Accounting.** ``dp-accounting``'s Rényi-DP accountant (the one Opacus and TF
  Privacy use) composes one Poisson-subsampled Gaussian per round (add/remove one
  client). Each results row of a training round records the (σ, q) it ran at, and ε
  after it is the composition of every row's event (:func:`accounted_epsilon`), so a
  run resumed any number of times, under other settings, states the ε of what ran.
  ``dp-epsilon`` asks for the σ that reaches that ε after ``num-server-rounds`` rounds
  instead of stating σ; a resume that would take the run past it is refused
  (:func:`check_resume`).
- **Utility.** The noise on the released mean must be small against the clipped
  updates: :meth:`Mechanism.noise_warning` says at start when it is larger than the
  privacy study saw any model learn through (:data:`CARRYABLE_NOISE`).

This module is plain numpy and ``dp-accounting``; it never imports Flower.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from .bounds import update_norm
from .config import DP_MODES, ConfigError, PrivacyConfig, RunConfig, run_config_key
from .results import RoundResult
from .seeds import sample_clients

OFF, SERVER, CLIENT = DP_MODES
NOISE_WIDTH = 8.0  # client noise beyond this many standard deviations is clipped by SecAgg+'s range
# the summary's keys of a DP run, named as RoundResult's fields: the (σ, q) a training round ran at, and ε after it
NOISE_MULTIPLIER, SAMPLING_RATE, EPSILON = "noise_multiplier", "sampling_rate", "epsilon"
# The largest noise the clipped updates can carry: the std per coordinate of the noise on the released
# mean, over C (σ/(qN) under dp=server). The privacy study (docs/privacy.md; MNIST-5k, the paper CNN, 20
# rounds, each method at its best clip; no DP: 0.94) measured, FedMUD (FedAvg) final accuracy against it:
# 0.0047 -> 0.86 (0.75); 0.0097 -> 0.39 (0.37); 0.023 -> 0.21 (0.17); 0.097 -> 0.10 (0.09: chance).
# Above 0.01 neither method learned much.
CARRYABLE_NOISE = 0.01
WITHIN = 1 + 1e-9  # ε of the same rounds composed in other groupings differs by float rounding only


def _dp_accounting():
    # dp-accounting warns through absl for each fractional Rényi order whose series does not
    # converge; that order is left out of the minimum, which the other orders still bound
    logging.getLogger("absl").setLevel(logging.ERROR)
    import dp_accounting

    return dp_accounting


def _round_event(noise_multiplier: float, rate: float, rounds: int):
    dp = _dp_accounting()
    one = dp.GaussianDpEvent(noise_multiplier)
    if rate < 1.0:
        one = dp.PoissonSampledDpEvent(rate, one)
    return dp.SelfComposedDpEvent(one, rounds)


class Rounds(NamedTuple):
    """``rounds`` consecutive rounds of one Poisson-subsampled Gaussian: σ and q = ``sampling_rate``."""

    noise_multiplier: float
    sampling_rate: float
    rounds: int


def composed_epsilon(events: Sequence[Rounds], delta: float) -> float:
    """ε at ``delta`` of ``events`` composed, add/remove one client (dp-accounting's RDP accountant)."""
    events = [e for e in events if e.rounds > 0]
    if not events:
        return 0.0
    if any(e.noise_multiplier <= 0 for e in events):
        return float("inf")
    accountant = _accountant()
    for e in events:
        accountant.compose(_round_event(*e))
    return float(accountant.get_epsilon(delta))


def epsilon(noise_multiplier: float, rate: float, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` rounds of a Poisson-subsampled (``rate``) Gaussian
    mechanism with ``noise_multiplier`` (σ: noise std over the clip norm), add/remove one client."""
    return composed_epsilon([Rounds(noise_multiplier, rate, rounds)], delta)


def round_events(history: Sequence[RoundResult]) -> list[Rounds]:
    """What the training rows of ``history`` (round ≥ 1; round 0 is the model before any) ran,
    identical consecutive rounds grouped. Every round counts, merged or skipped: it was sampled.

    Raises :class:`ConfigError` for a training row that does not say its (σ, q)."""
    events: list[Rounds] = []
    for row in history:
        if row.round < 1:
            continue
        if row.noise_multiplier is None or row.sampling_rate is None:
            raise ConfigError(
                f"round {row.round}'s results row does not record the {NOISE_MULTIPLIER} and {SAMPLING_RATE} it "
                "ran at (it was written before rows recorded them), so the ε of the run cannot be stated; start a new run"
            )
        sigma, rate = float(row.noise_multiplier), float(row.sampling_rate)
        if events and events[-1][:2] == (sigma, rate):
            events[-1] = events[-1]._replace(rounds=events[-1].rounds + 1)
        else:
            events.append(Rounds(sigma, rate, 1))
    return events


def accounted_epsilon(history: Sequence[RoundResult], delta: float) -> float:
    """ε at ``delta`` after the rows of ``history``: the composition of the rounds that ran, each at
    the (σ, q) its row records, whatever resumes and settings came between them."""
    return composed_epsilon(round_events(history), delta)


def _accountant():
    """A fresh ``dp-accounting`` RDP accountant with the library's default Rényi orders (the
    accountant Opacus and TF Privacy use, and the one Flower 1.39's own DP strategies wrap)."""
    return _dp_accounting().rdp.RdpAccountant()


@lru_cache(maxsize=32)
def calibrate(target_epsilon: float, rate: float, rounds: int, delta: float) -> float:
    """The smallest σ whose ε after ``rounds`` rounds at ``delta`` is at most ``target_epsilon``."""
    dp = _dp_accounting()
    try:
        sigma = dp.calibrate_dp_mechanism(
            _accountant,
            lambda s: _round_event(s, rate, rounds),
            target_epsilon,
            delta,
            dp.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    except Exception as err:  # dp-accounting says why (no σ reaches ε within its search)
        raise ConfigError(
            f"dp-epsilon={target_epsilon:g} is not reachable with dp-delta={delta:g} over {rounds} rounds at "
            f"fraction-train={rate:g} ({err}); choose a larger dp-epsilon or dp-delta"
        ) from None
    return float(sigma)


@dataclass(frozen=True)
class Mechanism:
    """The run's DP mechanism: clip norm, σ, where the noise goes, and the accounting."""

    mode: str
    clip: float
    noise_multiplier: float
    delta: float
    rate: float  # Poisson sampling rate (fraction-train)
    min_replies: int

    @property
    def on(self) -> bool:
        return self.mode != OFF

    @property
    def client_noise_std(self) -> float:
        """Each client's noise std (``dp=client``): σC/√m, so m replies sum to σC."""
        return self.noise_multiplier * self.clip / math.sqrt(self.min_replies) if self.mode == CLIENT else 0.0

    @property
    def server_noise_std(self) -> float:
        """The noise std the server adds to the sum (``dp=server``): σC."""
        return self.noise_multiplier * self.clip if self.mode == SERVER else 0.0

    def epsilon(self, rounds: int) -> float:
        """ε at ``delta`` after ``rounds`` rounds of this mechanism alone (every round sampled, merged
        or not, counts); a run's ε is :func:`accounted_epsilon` of its rows."""
        return epsilon(self.noise_multiplier, self.rate, rounds, self.delta)

    def clip_update(self, update: np.ndarray) -> tuple[np.ndarray, float]:
        """(update scaled to norm ≤ C, its norm before): float64."""
        update = np.asarray(update, dtype=np.float64)
        norm = update_norm(update)
        if norm > self.clip:
            update = update * (self.clip / norm)
        return update, norm

    def privatise(self, update: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """A client's update as it leaves: clipped, plus its share of the noise (``dp=client``)."""
        clipped, _ = self.clip_update(update)
        if self.client_noise_std > 0:
            clipped = clipped + _secret_rng(rng).normal(0.0, self.client_noise_std, clipped.shape)
        return clipped

    def release(self, update_sum: np.ndarray, population: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """The mean update the model moves by: (sum + server noise) / (rate · population)."""
        noisy = np.asarray(update_sum, dtype=np.float64)
        if self.server_noise_std > 0:
            noisy = noisy + _secret_rng(rng).normal(0.0, self.server_noise_std, noisy.shape)
        return noisy / (self.rate * max(population, 1))

    def value_range(self) -> float:
        """Largest magnitude a coordinate of a privatised update takes, but for noise beyond
        :data:`NOISE_WIDTH` standard deviations (secure aggregation's clipping range)."""
        return self.clip + NOISE_WIDTH * self.client_noise_std

    def describe(self) -> str:
        where = "the server" if self.mode == SERVER else f"each client (std σC/√{self.min_replies})"
        return (
            f"client-level DP: clip {self.clip:g}, noise multiplier σ={self.noise_multiplier:.4g} added by {where}, "
            f"Poisson sampling rate {self.rate:g}, δ={self.delta:g}"
        )

    def round_record(self) -> dict[str, float]:
        """What a training round's results row records of it: the (σ, q) the round ran at, by
        :class:`~fedmud.results.RoundResult` field."""
        return {NOISE_MULTIPLIER: self.noise_multiplier, SAMPLING_RATE: self.rate}

    def report(self, history: Sequence[RoundResult]) -> dict:
        """The summary's figures after the rows of ``history``: ε (their composition), δ, this
        run's σ, C and q, and ``accounted``: each stretch of rounds at one (σ, q) that ran."""
        events = round_events(history)
        return {
            EPSILON: composed_epsilon(events, self.delta),
            "delta": self.delta,
            NOISE_MULTIPLIER: self.noise_multiplier,
            "clip": self.clip,
            SAMPLING_RATE: self.rate,
            "accounted": [e._asdict() for e in events],
        }

    def mean_noise(self, population: int) -> float:
        """Std per coordinate of the noise on the released mean, over C, with ``population`` nodes.

        σ/(qN) under ``dp=server``. Under ``dp=client`` each of the ~qN replies adds σC/√m
        (m = ``min-replies``), so the sum carries σC·√(qN/m) when qN > m: σ/√(qN·m).
        """
        replies = self.rate * population
        if replies <= 0:
            return float("inf")
        extra = math.sqrt(max(replies / self.min_replies, 1.0)) if self.mode == CLIENT else 1.0
        return self.noise_multiplier * extra / replies

    def noise_warning(self, population: int) -> str | None:
        """Why the noise is more than the clipped updates can carry with ``population`` nodes
        (:data:`CARRYABLE_NOISE`), and the population at which it would not be; None if it is not."""
        noise = self.mean_noise(population)
        if not self.on or noise <= CARRYABLE_NOISE:
            return None
        replies = self.rate * population
        nodes, min_replies = self.population_needed()
        split = advice = ""
        if self.mode == CLIENT:
            advice = f", min-replies={min_replies}: about 2% of rounds have fewer and are skipped"
            if replies > self.min_replies:
                split = (
                    f"; under dp=client each reply adds σC/√{self.min_replies} (min-replies={self.min_replies}), so the sum "
                    f"of ~{replies:.3g} carries {math.sqrt(replies / self.min_replies):.3g}× the noise accounted for"
                )
        return (
            f"dp: the noise is more than the clipped updates can carry: the released mean update's noise has std "
            f"{noise:.3g}·dp-clip per coordinate (σ = {self.noise_multiplier:.4g} over ~{replies:.3g} replies a round: "
            f"num-partitions={population} at fraction-train={self.rate:g}{split}). In the privacy study "
            f"(docs/privacy.md) no model learned much above {CARRYABLE_NOISE:g}·dp-clip, and this one may diverge. "
            f"At this σ and fraction-train it needs about {nodes} nodes (~{self.rate * nodes:.0f} replies a round"
            f"{advice}), or a larger dp-epsilon"
        )

    def population_needed(self) -> tuple[int, int]:
        """(nodes, min-replies) at which this σ and q give noise the clipped updates can carry.

        Under ``dp=client``, min-replies two standard deviations below the expected replies
        (Poisson sampling: about 2% of rounds fall short and are skipped), whose extra noise
        the population must also carry."""
        nodes = math.ceil(self.noise_multiplier / (self.rate * CARRYABLE_NOISE))
        if self.mode != CLIENT:
            return nodes, self.min_replies
        while True:
            expected = self.rate * nodes
            min_replies = max(1, math.floor(expected - 2 * math.sqrt(expected * (1 - self.rate))))
            if replace(self, min_replies=min_replies).mean_noise(nodes) <= CARRYABLE_NOISE:
                return nodes, min_replies
            nodes += max(1, nodes // 100)


def _secret_rng(rng: np.random.Generator | None) -> np.random.Generator:
    # fresh OS entropy: noise the server could regenerate from a seed would protect nothing
    return rng if rng is not None else np.random.default_rng()


def mechanism(run: RunConfig) -> Mechanism:
    """The run's mechanism; σ calibrated from ``dp-epsilon`` when that is what the config gives."""
    p: PrivacyConfig = run.privacy
    sigma = p.dp_noise_multiplier
    if p.dp != OFF and p.dp_epsilon > 0:
        sigma = calibrate(p.dp_epsilon, run.fraction_train, run.rounds, p.dp_delta)
    return Mechanism(p.dp, p.dp_clip, sigma, p.dp_delta, run.fraction_train, run.min_replies)


def check_resume(run: RunConfig, history: Sequence[RoundResult]) -> None:
    """Refuse a resumed DP run (``history``: the checkpoint's rows) whose ε could not be stated, or
    that would take a ``dp-epsilon`` run past its ε.

    σ and q are the configuration's, on every side: under ``dp=client`` the clients add the
    noise, from their own copy of the configuration; they cannot read the server's checkpoint,
    and a σ the server sent them could be lowered by the server the noise guards against. The
    rows record the (σ, q) each round ran at, so ε is always their composition
    (:func:`accounted_epsilon`): a run given ``dp-noise-multiplier`` may resume with any
    ``num-server-rounds`` or ``fraction-train``, and its ε counts what ran. A run given
    ``dp-epsilon`` promised that ε after ``num-server-rounds``: resumed with the settings it
    started with, its σ is the same and it ends at that ε; a resume whose rounds so far and the
    rounds left, at this configuration's (σ, q), would compose to more is refused with the
    rounds that fit.
    """
    p = run.privacy
    ran = round_events(history) if p.dp != OFF else []
    if p.dp_epsilon <= 0 or not ran:
        return
    dp, done = mechanism(run), int(history[-1].round)
    total = composed_epsilon([*ran, Rounds(dp.noise_multiplier, dp.rate, run.rounds - done)], dp.delta)
    if total <= p.dp_epsilon * WITHIN:
        return
    last = ran[-1]
    fit = _rounds_that_fit(ran, last, p.dp_epsilon, dp.delta, done, run.rounds)
    rounds_key, rate_key = run_config_key(("rounds",)), run_config_key(("fraction_train",))
    ran_at = ", ".join(f"{e.rounds} at σ = {e.noise_multiplier:.4g}, q = {e.sampling_rate:g}" for e in ran)
    allowed = (
        f"{rounds_key} from {done} to {fit} with {rate_key}={last.sampling_rate:g}, what its rounds ran at"
        if fit > done
        else f"nothing more: ε = {p.dp_epsilon:g} is spent after round {done}"
    )
    raise ConfigError(
        f"{rounds_key}={run.rounds} {rate_key}={run.fraction_train:g} is not allowed when resuming this "
        f"dp-epsilon={p.dp_epsilon:g} run: its {done} rounds ran ({ran_at}: ε = {composed_epsilon(ran, dp.delta):.4g} "
        f"at δ = {dp.delta:g}), and rounds {done + 1}-{run.rounds} at this configuration's σ = {dp.noise_multiplier:.4g}, "
        f"q = {dp.rate:g} would bring ε to {total:.4g}. σ comes from the configuration on every side (under dp=client the "
        f"clients add the noise and cannot read the checkpoint), so a dp-epsilon run cannot spread what is left of its "
        f"ε over other rounds; allowed: {allowed}; or start a new run"
    )


def _rounds_that_fit(ran: list[Rounds], last: Rounds, target: float, delta: float, done: int, asked: int) -> int:
    """The most rounds the run may have (``done`` at least) with the rounds after ``done`` at
    ``last``'s (σ, q) and ε within ``target``: ε grows with the rounds, so a doubling, then a bisection."""
    fits = lambda rounds: composed_epsilon([*ran, last._replace(rounds=rounds - done)], delta) <= target * WITHIN  # noqa: E731
    low, high = done, max(asked, done + 1)  # low fits (or is all there is), high does not
    while fits(high) and high < 2**31:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def sample_round(run: RunConfig, server_round: int, node_ids: Sequence[int], rng: np.random.Generator | None = None) -> list[int]:
    """The clients of ``server_round`` (sorted).

    Without DP, ``max(int(n · fraction-train), min-train-nodes)`` of them drawn from the run
    seed (:func:`fedmud.seeds.sample_clients`: a resumed run picks the same). Under DP each
    node independently with probability ``fraction-train`` (Poisson sampling, what the
    accountant assumes), drawn from ``rng`` (default: the operating system's entropy, so
    that who took part cannot be recomputed from the run's seed).
    """
    ids = sorted(node_ids)
    if run.privacy.dp == OFF:
        return sample_clients(run.seed, server_round, ids, run.fraction_train, run.min_train_nodes)
    keep = _secret_rng(rng).random(len(ids)) < run.fraction_train
    return [i for i, k in zip(ids, keep) if k]
