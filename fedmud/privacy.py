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
  client), and gives ε at ``dp-delta`` after every round. ``dp-epsilon`` asks for the
  σ that reaches that ε after ``num-server-rounds`` rounds instead of stating σ.

This module is plain numpy and ``dp-accounting``; it never imports Flower.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .bounds import update_norm
from .config import DP_MODES, ConfigError, PrivacyConfig, RunConfig
from .seeds import sample_clients

OFF, SERVER, CLIENT = DP_MODES
NOISE_WIDTH = 8.0  # client noise beyond this many standard deviations is clipped by SecAgg+'s range


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


def epsilon(noise_multiplier: float, rate: float, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` rounds of a Poisson-subsampled (``rate``) Gaussian
    mechanism with ``noise_multiplier`` (σ: noise std over the clip norm), add/remove one client."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    accountant = _accountant()
    accountant.compose(_round_event(noise_multiplier, rate, rounds))
    return float(accountant.get_epsilon(delta))


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
        """ε at ``delta`` after ``rounds`` rounds (every round sampled, merged or not, counts)."""
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
