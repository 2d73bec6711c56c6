"""The user-level privacy ledger and budget of the server, on Opacus' accountants.

Ledger format: JSONL, one :class:`LedgerEntry` per line, each line ending in ``\\n``.
A charge is appended and fsync'ed *before* the round's aggregate is released, so a last
line without its ``\\n`` means a crash during the append: that round was never released.
Such a tail is reported as :class:`DataError` (file:line), never silently dropped;
``PrivacyLedger.drop_truncated_tail()`` removes it once the operator has checked it.

The accounting itself (:func:`epsilon`, :func:`noise_multiplier`, :class:`AccountantKind`)
is in :mod:`fedpref.common.accounting`, shared with the devices; it is re-exported here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedpref.common.accounting import (  # noqa: F401  (re-exported)
    PRV_EPS_ERROR,
    AccountantKind,
    History,
    SampleLevelAccountant,
    _check,
    _check_delta,
    _check_step,
    _merged,
    _real,
    epsilon,
    epsilon_of_history,
    noise_multiplier,
)
from fedpref.common.atomic import fsync_dir
from fedpref.common.errors import BudgetExceededError, ConfigError, DataError

@dataclass(frozen=True)
class LedgerEntry:
    round: int  # server round id
    sample_rate: float  # Poisson client sampling probability q
    noise_multiplier: float  # z: server noise std / clip_norm
    clip_norm: float  # C, L2 bound on each client delta
    participants: int  # clients whose updates were aggregated
    epsilon: float  # user-level epsilon after this round
    delta: float
    accountant: str  # AccountantKind value
    timestamp: float  # seconds since the epoch, from the injected clock


_FIELDS = {f.name: f.type for f in fields(LedgerEntry)}


def _entry_from_json(obj: object, where: str) -> LedgerEntry:
    if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
        raise DataError(f"{where}: a ledger line must be an object with exactly the keys "
                        f"{sorted(_FIELDS)}; restore the ledger from a backup")
    for name, typ in _FIELDS.items():
        v = obj[name]
        ok = (isinstance(v, int) and not isinstance(v, bool) if typ == "int"
              else isinstance(v, str) if typ == "str" else _real(v))
        if not ok:
            raise DataError(f"{where}: field {name}={v!r} is not a valid {typ}; "
                            "restore the ledger from a backup")
    if obj["accountant"] not in {k.value for k in AccountantKind}:
        raise DataError(f"{where}: accountant={obj['accountant']!r} is not rdp or prv")
    return LedgerEntry(**{k: float(v) if _FIELDS[k] == "float" else v for k, v in obj.items()})


class PrivacyLedger:
    """Append-only JSONL ledger of user-level charges, one line per round (single writer)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _lines(self) -> list[bytes]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        if lines[-1]:
            raise DataError(
                f"{self.path}:{len(lines)}: truncated last line (a crash during append?); the "
                "round it charged was never released: check it, then call drop_truncated_tail()")
        return lines[:-1]

    def entries(self) -> list[LedgerEntry]:
        out = []
        for i, raw in enumerate(self._lines(), start=1):
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{self.path}:{i}: not valid JSON ({e}); "
                                "restore the ledger from a backup") from e
            out.append(_entry_from_json(obj, f"{self.path}:{i}"))
        return out

    def drop_truncated_tail(self) -> bytes:
        """Remove an incomplete last line (no trailing newline); return the bytes removed."""
        data = self.path.read_bytes() if self.path.exists() else b""
        keep = data[: data.rfind(b"\n") + 1]
        if len(keep) != len(data):
            os.truncate(self.path, len(keep))
        return data[len(keep):]

    def append(self, entry: LedgerEntry) -> None:
        try:
            line = json.dumps(asdict(entry), sort_keys=True, allow_nan=False) + "\n"
        except ValueError as e:
            raise ConfigError(f"ledger entry {entry!r} has a non-finite number ({e})") from e
        _entry_from_json(json.loads(line), "new ledger entry")
        self._lines()  # refuse to append after a truncated tail
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            buf = memoryview(line.encode())
            while buf:
                buf = buf[os.write(fd, buf):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent, strict=True)

    def history(self) -> History:
        """The ledger as an Opacus history: one step per round, equal rounds merged."""
        history: History = []
        for e in self.entries():
            history = _merged(history, e.noise_multiplier, e.sample_rate, 1)
        return history

    def epsilon_after(self, *, sample_rate: float, noise_multiplier: float, delta: float,
                      accountant: AccountantKind = AccountantKind.RDP,
                      prv_eps_error: float = PRV_EPS_ERROR) -> float:
        """Epsilon the ledger would reach after one more round at (q, z)."""
        _check_step(sample_rate, noise_multiplier)
        history = _merged(self.history(), float(noise_multiplier), float(sample_rate), 1)
        return epsilon_of_history(history=history, delta=delta, accountant=accountant,
                                  prv_eps_error=prv_eps_error)

    def spent(self) -> float:
        """Epsilon recorded by the last charge (what was reported at release); 0.0 if none."""
        entries = self.entries()
        return entries[-1].epsilon if entries else 0.0


class UserLevelBudget:
    """Stops training before a round would take user-level epsilon past ``max_epsilon``.

    State is the ledger alone: constructing it again on the same ledger resumes.
    Every charge counts, a re-run of a round included (conservative).
    """

    def __init__(self, *, max_epsilon: float, delta: float, accountant: AccountantKind,
                 ledger: PrivacyLedger, prv_eps_error: float = PRV_EPS_ERROR) -> None:
        _check("max_epsilon", max_epsilon, (_real(max_epsilon) or max_epsilon == math.inf) and max_epsilon > 0,
               "a number > 0 (inf = no budget, epsilon is still recorded)", "set the operator's user-level budget, e.g. 8")
        _check_delta(delta)
        self.max_epsilon, self.delta = float(max_epsilon), float(delta)
        self.accountant, self.ledger = AccountantKind(accountant), ledger
        self.prv_eps_error = prv_eps_error
        for e in ledger.entries():
            if e.delta != self.delta or e.accountant != self.accountant.value:
                raise ConfigError(
                    f"ledger {ledger.path} round {e.round} used delta={e.delta}, "
                    f"accountant={e.accountant}, but this budget has delta={self.delta}, "
                    f"accountant={self.accountant.value}; use the ledger's, or a new ledger")

    def spent(self) -> float:
        return epsilon_of_history(history=self.ledger.history(), delta=self.delta,
                                  accountant=self.accountant, prv_eps_error=self.prv_eps_error)

    def would_exceed(self, *, sample_rate: float, noise_multiplier: float) -> tuple[bool, float]:
        """(whether the next round would exceed max_epsilon, the epsilon it would reach)."""
        eps = self.ledger.epsilon_after(
            sample_rate=sample_rate, noise_multiplier=noise_multiplier, delta=self.delta,
            accountant=self.accountant, prv_eps_error=self.prv_eps_error)
        return eps > self.max_epsilon, eps

    def charge(self, *, round: int, sample_rate: float, noise_multiplier: float,
               clip_norm: float, participants: int, now: float) -> LedgerEntry:
        """Write the round's ledger line (call BEFORE releasing the aggregate)."""
        _check("round", round, isinstance(round, int) and round >= 0, "an integer >= 0",
               "pass the server round id")
        _check("clip_norm", clip_norm, _real(clip_norm) and clip_norm > 0, "a finite number > 0",
               "pass the L2 clip norm C of the client deltas")
        _check("participants", participants, isinstance(participants, int) and participants >= 0,
               "an integer >= 0", "pass the number of aggregated client updates")
        _check("now", now, _real(now), "a finite timestamp", "pass time.time()")
        exceeds, eps = self.would_exceed(sample_rate=sample_rate,
                                         noise_multiplier=noise_multiplier)
        if exceeds:
            raise BudgetExceededError(
                f"round {round} would bring user-level epsilon to {eps:.4f} > max_epsilon="
                f"{self.max_epsilon} (delta={self.delta}, {self.accountant.value}); stop "
                "training here, or raise noise_multiplier / lower sample_rate / raise the budget")
        entry = LedgerEntry(round=round, sample_rate=float(sample_rate),
                            noise_multiplier=float(noise_multiplier), clip_norm=float(clip_norm),
                            participants=participants, epsilon=eps, delta=self.delta,
                            accountant=self.accountant.value, timestamp=float(now))
        self.ledger.append(entry)
        return entry
