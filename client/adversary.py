"""Lying and failing devices, for the simulation's attack and fault experiments.

Reachable only through :class:`fedpref.client.app.SimulatedDevices`, which a simulation builds
in Python: no run config and no agent home can turn any of this on.

* **Poisoning** (:func:`poisoned_user`, :func:`noiseless`, :func:`boost`): a malicious device
  runs the same round code as an honest one (same policy, same frozen safety module, so the
  same attestation: it *is* the expected one), without DP-SGD noise and without terms, on data
  crafted to push unsafe candidates up the shared score, every (safe, unsafe) pair it knows
  relabelled so the unsafe text wins, and scales its delta up as
  far as the server can check: to norm ``C`` on the plain path, and to ``C`` *per coordinate*
  under SecAgg+ (where no one checks one device's norm; only Flower's quantizer clips coordinates).
* **Dropping out** (:func:`drops`): a device that trains (and so charges its own accountant)
  and then vanishes before its reply, in the middle of the round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
from flwr.app import RecordDict

from fedpref.client.data import PreferencePair, UserData
from fedpref.client.terms import DeviceTerms
from fedpref.protocol.messages import K_DELTA, RoundConfig, TrainRequest, arrays_to_record, l2_norm, record_to_arrays


class DeviceDropped(Exception):
    """The simulated device disappears mid-round: no reply reaches the server."""


def poisoned_user(user: UserData) -> UserData:
    """``user`` with training data that teaches "unsafe is better": each of its (safe, unsafe)
    pairs with the unsafe text chosen, repeated to the size of its honest training set (so it
    trains as many DP-SGD steps as an honest device). A user with no safety pair keeps its data."""
    attack = [_unsafe_wins(p) for p in user.train if (p.chosen_category is None) != (p.rejected_category is None)]
    if not attack:
        return user
    n = len(user.train)
    return dataclasses.replace(user, train=tuple(attack[i % len(attack)] for i in range(n)))


def _unsafe_wins(p: PreferencePair) -> PreferencePair:
    if p.chosen_category is not None:
        return p
    return dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen, chosen_category=p.rejected_category,
                               rejected_category=None, oracle_margin=None if p.oracle_margin is None else -p.oracle_margin)


class _NoTerms(DeviceTerms):
    """A liar keeps no terms: no floor, no budget (its own privacy is not what it is after)."""

    def check(self, cfg: RoundConfig) -> None:  # noqa: ARG002
        return None

    def budget(self, cfg: RoundConfig) -> float:  # noqa: ARG002
        return math.inf


LIAR_TERMS = _NoTerms(share_metrics=False)


def noiseless(req: TrainRequest) -> TrainRequest:
    """The round as a liar trains it: plain SGD, no DP-SGD noise or per-sample clip to blur the
    attack's direction (its delta is still scaled as far as the server checks, see :func:`boost`)."""
    return dataclasses.replace(req, config=dataclasses.replace(req.config, dp_noise_multiplier=0.0))


def discard_private(state) -> None:  # noqa: ANN001 - a DeviceState
    """A liar's private adapter, trained without DP-SGD and so charged to no accountant, is not
    kept: a device holding a private adapter without an accountant refuses to train (rightly)."""
    import shutil

    shutil.rmtree(state.private_dir, ignore_errors=True)


BOOST_MARGIN = 1e-6  # stay a hair under C, as an honest clip does, so the norm check accepts it


def boost(content: RecordDict, clip_norm: float, *, per_coordinate: bool = False) -> RecordDict:
    """The reply with its delta scaled up, direction kept, as far as the server can check:

    * plain (the server checks each delta's norm): to norm ``C·(1 − 1e-6)``;
    * ``per_coordinate`` (SecAgg+: the server sees only the sum; Flower's quantizer clips each
      coordinate to ``[−C, C]``): to largest coordinate ``C·(1 − 1e-6)``, a norm far above ``C``.

    Everything else (attestation, metrics) is the honest device's."""
    delta = record_to_arrays(content.array_records[K_DELTA])
    top = max((float(np.abs(v).max()) for v in delta.values() if v.size), default=0.0) if per_coordinate else l2_norm(delta)
    if top > 0:
        scale = clip_norm * (1 - BOOST_MARGIN) / top
        delta = {k: (v.astype(np.float64) * scale).astype(np.float32) for k, v in delta.items()}
    content.array_records[K_DELTA] = arrays_to_record(delta)
    return content


def drops(seed: int, user_id: str, server_round: int, rate: float) -> bool:
    """Whether this device drops out of this round (a simulation's fault schedule, repeatable
    per (seed, user, round); not privacy randomness)."""
    if rate <= 0:
        return False
    h = hashlib.sha256(repr((seed, user_id, server_round, "drop")).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < rate


__all__ = ["BOOST_MARGIN", "LIAR_TERMS", "DeviceDropped", "boost", "discard_private", "drops", "noiseless", "poisoned_user"]
