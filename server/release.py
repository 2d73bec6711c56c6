"""The one release path of a round: Gaussian noise, then the ledger charge, then the weights.

Both servers (the plain :class:`~fedpref.server.strategy.FedPrefStrategy` and the SecAgg+
:class:`~fedpref.server.secagg.SecureFedPrefStrategy`) hand the sum of the accepted clipped
deltas to :func:`release`; nothing else in the code base adds user-level noise or charges
the ledger.

Randomness. Every draw that protects privacy on the server (Poisson client sampling and the
Gaussian noise) comes from :func:`dp_generator`: a ChaCha20 stream (``randomgen``) keyed with
256 bits from the operating system's CSPRNG (:mod:`secrets`), a fresh key per round. Nothing
derives it from a run id, a node id, a round number or a config. Only a simulation that
asks for reproducible numbers (``[runtime] deterministic_noise``) passes a ``seed``; the
deployment CLIs refuse that mode.

Limits, stated plainly: the Gaussian is sampled in floating point (numpy's ziggurat on the
ChaCha20 stream), so Mironov's floating-point attack on textbook DP samplers (CCS 2012)
applies in principle: the set of reachable doubles around a given sum leaks a little about
it. What mitigates it here: the noisy mean is added to the previous weights and rounded to
float32 before release, which discards the low-order bits the attack reads; a discrete
Gaussian with exact sampling would remove it and is not implemented.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from randomgen import ChaCha

from fedpref.protocol.messages import l2_norm
from fedpref.server.config import FederationConfig
from fedpref.server.privacy import UserLevelBudget


def dp_generator(seed: Sequence[int] | None = None) -> np.random.Generator:
    """A generator for DP draws: ChaCha20 keyed from the OS CSPRNG, or, in a simulation that
    asks for it, from ``seed`` (never in deployment)."""
    if seed is None:
        return np.random.Generator(ChaCha(key=secrets.randbits(256), rounds=20))
    return np.random.Generator(ChaCha(seed=np.random.SeedSequence([int(s) for s in seed]), rounds=20))


RoundGenerators = Callable[[int], np.random.Generator]  # server round -> the round's DP generator


def fresh_generators() -> RoundGenerators:
    """Deployment: a new CSPRNG-keyed generator for every round."""
    return lambda _round: dp_generator()


def seeded_generators(seed: int) -> RoundGenerators:
    """Simulation with ``deterministic_noise`` only: the same numbers for the same config."""
    return lambda rnd: dp_generator((seed, 7919, rnd))


def noisy_mean(total: dict[str, np.ndarray], *, expected_cohort: float, clip_norm: float,
               noise_multiplier: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``total / E[m]`` plus Gaussian noise of std ``z·C/E[m]`` on every coordinate (float64)."""
    std = noise_multiplier * clip_norm / expected_cohort
    return {k: np.asarray(v, dtype=np.float64) / expected_cohort + rng.normal(0.0, std, size=np.shape(v))
            for k, v in total.items()}


@dataclass(frozen=True)
class Release:
    arrays: dict[str, np.ndarray]  # the new global shared weights (float32)
    noise_std: float  # z·C/E[m]
    update_norm: float  # ‖noisy mean‖₂
    epsilon_user: float  # after this round, as charged


def release(
    total: dict[str, np.ndarray],
    *,
    global_arrays: dict[str, np.ndarray],
    fed: FederationConfig,
    population: int,
    participants: int,
    server_round: int,
    budget: UserLevelBudget,
    rng: np.random.Generator,
    now: float,
) -> Release:
    """Noise the sum of the accepted clipped deltas, charge the ledger, then build the weights.

    The denominator is the *expected* cohort ``E[m] = q·N``, fixed before anyone replies, so
    one user's influence on the mean is at most ``C/E[m]`` whoever else took part. The ledger
    line is written (and fsynced) before the new weights exist anywhere outside this
    function; an over-budget round raises :class:`BudgetExceededError` and releases nothing.
    """
    expected_cohort = max(fed.client_sample_rate * population, 1e-12)
    noisy = noisy_mean(total, expected_cohort=expected_cohort, clip_norm=fed.clip_norm,
                       noise_multiplier=fed.server_noise_multiplier, rng=rng)
    entry = budget.charge(round=server_round, sample_rate=fed.client_sample_rate,
                          noise_multiplier=fed.server_noise_multiplier, clip_norm=fed.clip_norm,
                          participants=participants, now=now)
    lr = fed.server_learning_rate
    new = {k: (np.asarray(global_arrays[k], dtype=np.float64) + lr * noisy[k]).astype(np.float32) for k in total}
    return Release(arrays=new, noise_std=fed.server_noise_multiplier * fed.clip_norm / expected_cohort,
                   update_norm=l2_norm(noisy), epsilon_user=entry.epsilon)


__all__ = ["Release", "RoundGenerators", "dp_generator", "fresh_generators", "noisy_mean", "release",
           "seeded_generators"]
