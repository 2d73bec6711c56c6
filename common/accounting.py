"""Privacy accounting on Opacus' accountants: epsilon, calibration, device history.

No accounting math lives here: every epsilon comes from an Opacus accountant
(``RDPAccountant`` or ``PRVAccountant``) fed a history of ``(noise_multiplier, sample_rate,
steps)``, and calibration is Opacus' ``get_noise_multiplier``. This module adds input
checks and the persisted per-device history for the sample-level guarantee (see the
README, "Privacy, stated plainly"). Both the server (user-level ledger, ``fedpref.server.privacy``)
and the devices use it, so it lives in ``protocol``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedpref.common.atomic import write_bytes_atomic
from fedpref.common.errors import ConfigError, DataError, IntegrityError

if TYPE_CHECKING:  # opacus imports torch (seconds): load it only when accounting runs
    from opacus.accountants import RDPAccountant
    from opacus.accountants.accountant import IAccountant

PRV_EPS_ERROR = 0.01  # PRV's allowed error on epsilon; its result is an upper bound
History = list[tuple[float, float, int]]  # Opacus' (noise_multiplier, sample_rate, steps)


class AccountantKind(str, Enum):
    RDP = "rdp"
    PRV = "prv"


def _check(name: str, value: object, ok: bool, rule: str, fix: str) -> None:
    if isinstance(value, bool) or not ok:
        raise ConfigError(f"{name}={value!r} is invalid: it must be {rule}; {fix}")


def _real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_step(sample_rate: float, noise_multiplier: float, steps: int = 1) -> None:
    _check("sample_rate", sample_rate, _real(sample_rate) and 0 < sample_rate <= 1,
           "in (0, 1]", "pass the Poisson sampling probability per step, e.g. 0.01")
    _check("noise_multiplier", noise_multiplier,
           _real(noise_multiplier) and MIN_NOISE_MULTIPLIER <= noise_multiplier <= MAX_NOISE_MULTIPLIER,
           f"in [{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}]",
           "pass the Gaussian noise std divided by the clip norm, e.g. 1.0")
    _check("steps", steps, isinstance(steps, int) and steps >= 0,
           "an integer >= 0", "pass the number of noised steps (rounds)")


# The accountants' domain: below 1e-3 the noise protects nothing (epsilon in the millions) and
# Opacus divides by z**2 (1e-300 is a ZeroDivisionError); above 1e6 its RDP orders overflow.
MIN_NOISE_MULTIPLIER = 1e-3
MAX_NOISE_MULTIPLIER = 1e6
# The PRV accountant discretises the privacy loss on a grid whose size grows with steps and
# shrinks with noise; beyond this many points it needs gigabytes (and minutes): refuse instead.
MAX_PRV_GRID = 20_000_000
# Calibrating noise for a larger epsilon protects nothing, and Opacus' bisection may never
# reach 1e300 (it loops): refuse it.
MAX_TARGET_EPSILON = 100.0


def _check_prv_grid(history: list[tuple[float, float, int]], delta: float, eps_error: float) -> None:
    """Refuse (ConfigError) a PRV computation whose grid would exceed :data:`MAX_PRV_GRID`;
    the size is Opacus' own (``PRVAccountant._get_domain``), computed cheaply with RDP."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    prvs = [PoissonSubsampledGaussianPRV(q, z) for z, q, _ in history]
    with warnings.catch_warnings():  # RDP's "optimal order is the smallest alpha": only a size estimate here
        warnings.simplefilter("ignore")
        size = PRVAccountant()._get_domain(prvs=prvs, num_self_compositions=[t for *_, t in history],
                                           eps_error=eps_error, delta_error=delta / 1000).size
    if size > MAX_PRV_GRID:
        z, q, steps = min(z for z, _, _ in history), max(q for _, q, _ in history), sum(t for *_, t in history)
        raise ConfigError(
            f"the PRV accountant would need a grid of {size:.3g} points (limit {MAX_PRV_GRID:.3g}) for "
            f"steps={steps}, noise_multiplier={z:g}, sample_rate={q:g}; use the RDP accountant, "
            "or fewer steps or more noise")


def _check_delta(delta: float) -> None:
    _check("delta", delta, _real(delta) and 0 < delta < 1, "in (0, 1)",
           "use a delta well below 1/(number of users or examples), e.g. 1e-5")


def _new_accountant(kind: AccountantKind) -> IAccountant:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return PRVAccountant() if AccountantKind(kind) is AccountantKind.PRV else RDPAccountant()


def _merged(history: History, z: float, q: float, steps: int) -> History:
    """``history`` plus ``steps`` steps at (z, q), merged into an equal last entry as Opacus'
    ``step()`` does."""
    if history and history[-1][:2] == (z, q):
        return [*history[:-1], (z, q, history[-1][2] + steps)]
    return [*history, (z, q, steps)]


def epsilon_of_history(*, history: History, delta: float, accountant: AccountantKind =
                       AccountantKind.RDP, prv_eps_error: float = PRV_EPS_ERROR) -> float:
    """Epsilon of an Opacus history; 0.0 when it is empty. PRV returns its upper bound."""
    _check_delta(delta)
    for z, q, t in history:
        _check_step(q, z, t)
    key = tuple((float(z), float(q), int(t)) for z, q, t in history if t > 0)
    if not key:
        return 0.0
    return _cached_epsilon(key, float(delta), AccountantKind(accountant), float(prv_eps_error))


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(history: tuple[tuple[float, float, int], ...], delta: float,
                    accountant: AccountantKind, prv_eps_error: float) -> float:
    """Opacus' epsilon, memoised: devices with the same history share one computation."""
    history = list(history)
    acc = _new_accountant(accountant)
    acc.history = history
    if acc.mechanism() == "prv":
        _check_prv_grid(history, delta, prv_eps_error)
        with np.errstate(divide="ignore"):  # log(0) masked by np.where when q == 1
            eps = acc.get_epsilon(delta, eps_error=prv_eps_error)
    else:
        eps = acc.get_epsilon(delta)
    eps = float(eps)
    return eps if math.isfinite(eps) else math.inf


def epsilon(*, sample_rate: float, noise_multiplier: float, steps: int, delta: float,
            accountant: AccountantKind = AccountantKind.RDP,
            prv_eps_error: float = PRV_EPS_ERROR) -> float:
    """Epsilon after ``steps`` Poisson-sampled Gaussian steps; 0.0 for 0 steps."""
    _check_step(sample_rate, noise_multiplier, steps)
    return epsilon_of_history(history=[(noise_multiplier, sample_rate, steps)], delta=delta,
                              accountant=accountant, prv_eps_error=prv_eps_error)


def noise_multiplier(*, target_epsilon: float, sample_rate: float, steps: int, delta: float,
                     accountant: AccountantKind = AccountantKind.RDP,
                     epsilon_tolerance: float = 0.01,
                     prv_eps_error: float = PRV_EPS_ERROR) -> float:
    """Smallest noise multiplier (to Opacus' bisection) whose epsilon is <= target_epsilon.

    The result's epsilon lies in ``[target_epsilon - epsilon_tolerance, target_epsilon]``.
    """
    _check("target_epsilon", target_epsilon, _real(target_epsilon) and 0 < target_epsilon <= MAX_TARGET_EPSILON,
           f"in (0, {MAX_TARGET_EPSILON:g}]", "pass the epsilon budget to calibrate for, e.g. 8")
    _check("steps", steps, isinstance(steps, int) and steps >= 1, "an integer >= 1",
           "pass the number of noised steps (rounds) the budget must cover")
    _check_step(sample_rate, 1.0, steps)
    _check_delta(delta)
    from opacus.accountants.utils import get_noise_multiplier

    kind = AccountantKind(accountant)
    extra = {"eps_error": prv_eps_error} if kind is AccountantKind.PRV else {}
    if kind is AccountantKind.PRV:  # its bisection visits noise down to about half the answer: size the grid there
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z_rdp = noise_multiplier(target_epsilon=target_epsilon, sample_rate=sample_rate, steps=steps, delta=delta,
                                     accountant=AccountantKind.RDP, epsilon_tolerance=epsilon_tolerance)
        _check_prv_grid([(max(z_rdp / 3, MIN_NOISE_MULTIPLIER), float(sample_rate), steps)], delta, prv_eps_error)
    try:
        with np.errstate(divide="ignore"):
            z = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                     sample_rate=sample_rate, steps=steps, accountant=kind.value,
                                     epsilon_tolerance=epsilon_tolerance, **extra)
    except MemoryError:  # PRV's bisection tried a noise whose grid does not fit (see MAX_PRV_GRID)
        raise ConfigError(
            f"the PRV accountant ran out of memory calibrating for steps={steps}, sample_rate={sample_rate:g}; "
            "use the RDP accountant, or fewer steps") from None
    except ValueError as e:  # Opacus: "The privacy budget is too low."
        raise ConfigError(
            f"target_epsilon={target_epsilon!r} cannot be reached with noise_multiplier <= 1e6 "
            f"({e}); raise target_epsilon or lower steps/sample_rate") from e
    return float(z)


class SampleLevelAccountant:
    """A device's DP-SGD history, persisted atomically as JSON at ``path``."""

    def __init__(self, path: str | os.PathLike[str], *, history: History | None = None) -> None:
        self.path = Path(path)
        self.history: History = []
        for z, q, t in history or []:
            self.record(noise_multiplier=z, sample_rate=q, steps=t)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SampleLevelAccountant:
        """Load the history at ``path``; a missing file is an empty history."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls(path)
        return cls.from_bytes(data, path)

    @classmethod
    def from_bytes(cls, data: bytes, path: str | os.PathLike[str]) -> SampleLevelAccountant:
        """The history serialised by :meth:`to_bytes`; ``path`` names it in errors (and saves)."""
        try:
            obj = json.loads(data)
            if obj["version"] != 1:
                raise ValueError(f"unsupported version {obj['version']!r}")
            return cls(path, history=[(z, q, t) for z, q, t in obj["history"]])
        except (ValueError, TypeError, KeyError, ConfigError) as e:
            raise DataError(f"{path}: not a valid accountant state ({e}); restore it from a "
                            "backup; never delete it, that would forget privacy spent") from e

    def to_bytes(self) -> bytes:
        return json.dumps({"version": 1, "history": self.history}).encode()

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        _check_step(sample_rate, noise_multiplier, steps)
        if steps == 0:
            return
        self.history = _merged(self.history, float(noise_multiplier), float(sample_rate), steps)

    def epsilon(self, delta: float, *, accountant: AccountantKind = AccountantKind.RDP) -> float:
        return epsilon_of_history(history=self.history, delta=delta, accountant=accountant)

    def would_exceed(self, *, max_epsilon: float, delta: float, noise_multiplier: float,
                     sample_rate: float, steps: int,
                     accountant: AccountantKind = AccountantKind.RDP) -> tuple[bool, float]:
        """(whether training ``steps`` more would exceed max_epsilon, the epsilon after)."""
        _check("max_epsilon", max_epsilon, _real(max_epsilon) and max_epsilon > 0,
               "a finite number > 0", "set the device's sample-level budget, e.g. 8")
        after = SampleLevelAccountant(self.path, history=self.history)
        after.record(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        eps = after.epsilon(delta, accountant=accountant)
        return eps > max_epsilon, eps

    def save(self) -> None:
        """Write atomically: temp file in the same folder, fsync, os.replace, fsync folder."""
        write_bytes_atomic(self.path, self.to_bytes())

    def to_opacus(self) -> RDPAccountant:
        """A live Opacus accountant that continues this history (hand it to the trainer)."""
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.load_state_dict({"history": list(self.history), "mechanism": acc.mechanism()})
        return acc

    def from_opacus(self, acc: IAccountant) -> None:
        """Take back a trainer's accountant; its history must extend the recorded one."""
        self.extend_to(acc.state_dict()["history"])

    def extend_to(self, history: History) -> None:
        """Adopt a trainer's history; it must extend the recorded one (never forget ε)."""
        new = SampleLevelAccountant(self.path, history=history).history
        old = self.history
        n = len(old)
        extends = n == 0 or (len(new) >= n and new[: n - 1] == old[: n - 1]
                             and new[n - 1][:2] == old[-1][:2] and new[n - 1][2] >= old[-1][2])
        if not extends:
            raise IntegrityError(
                f"{self.path}: the Opacus accountant's history {new} does not extend the "
                f"recorded {old}; that would forget privacy spent. Build the trainer's "
                "accountant with to_opacus()")
        self.history = new
