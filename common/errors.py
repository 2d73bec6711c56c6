"""One exception root for fedpref, split by who is at fault.

- :class:`DataError`: bad input from a peer or a file (a malformed JSONL line, a tampered
  update). The message names the file and line, or the field, and how to fix it.
- :class:`ConfigError`: the caller asked for something that cannot work (a bad config
  value, a missing backbone folder). The message names the field, the value and the fix.
- :class:`IntegrityError`: a check that guards correctness or privacy failed at run time
  (frozen weights changed, LoRA weights did not). Never caught to carry on silently.
"""

from __future__ import annotations


class FedPrefError(Exception):
    """Root of every error fedpref raises on purpose."""


class DataError(FedPrefError):
    """Bad data from a file or a peer."""


class ConfigError(FedPrefError):
    """A configuration or call that cannot work; the message says how to fix it."""


class IntegrityError(FedPrefError):
    """A run-time invariant (frozen weights, privacy budget, partition) was violated."""


class BudgetExceededError(FedPrefError):
    """Training would exceed a configured privacy budget."""


class DeclinedRound(FedPrefError):
    """A device will not train this round (budget, policy); the reason goes to the server."""


class AlreadyPersonalized(DeclinedRound):
    """A personalize message for the very weights this device already fitted its adapter on."""


class PolicyRefused(DeclinedRound):
    """A device refuses to train: the policy sent or installed does not verify (fail closed)."""


class HomeError(ConfigError):
    """A ``--home`` folder is missing, not initialised, or initialised for something else."""


class ServerUnreachableError(FedPrefError):
    """The server's address did not answer (DNS, refused connection, timeout)."""


class TlsVerificationError(FedPrefError):
    """The server's certificate does not verify against the CA the device was given."""


class AlreadyRunningError(FedPrefError):
    """A second ``start`` on a home whose processes are still running."""


class NotRunningError(FedPrefError):
    """A command that needs the running server (or agent) found it stopped."""


class NodeRejectedError(FedPrefError):
    """The SuperLink refused this device: its public key is not registered."""


class SimulationRuntimeError(FedPrefError):
    """The Simulation Engine's runtime (Ray) could not start or join its cluster."""
