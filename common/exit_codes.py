"""Exit codes of the three command-line tools (``fedpref-server``, ``fedpref-agent`` and
``fedpref-sim``), each with help text (after Flower's ``exit_code.py``); ``fedpref-server
exit-codes`` lists them.

Ranges, so that new codes have room:

- 0: success; 1: an unexpected error (a bug; Python's own code for an uncaught exception)
- 2-9: the command line, config or data given to the command
- 10-19: safety policies and signing keys
- 20-29: privacy budgets
- 30-39: homes, processes, the network and nodes (deployment)
- 130: interrupted (128 + SIGINT)

Never renumber a code: scripts depend on them. Retire one by commenting it out.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import IntEnum
from typing import Any, NoReturn

from fedpref.common.errors import (
    AlreadyRunningError,
    BudgetExceededError,
    ConfigError,
    DataError,
    FedPrefError,
    HomeError,
    IntegrityError,
    NodeRejectedError,
    NotRunningError,
    ServerUnreachableError,
    SimulationRuntimeError,
    TlsVerificationError,
)


class ExitCode(IntEnum):
    SUCCESS = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG = 3
    DATA = 4
    INTEGRITY = 5
    POLICY_REJECTED = 10
    KEY_FILE = 11
    WRONG_PASSPHRASE = 12
    POLICY_EXPIRED = 13
    ROOT_EXPIRED = 14
    BUDGET_EXCEEDED = 20
    NO_HOME = 30
    UNREACHABLE = 31
    TLS_VERIFICATION = 32
    ALREADY_RUNNING = 33
    NOT_RUNNING = 34
    NODE_REJECTED = 35
    SIMULATION_RUNTIME = 36
    INTERRUPTED = 130


EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.SUCCESS: "The command completed.",
    ExitCode.INTERNAL: (
        "An unexpected error, most likely a bug in fedpref. Rerun to see the traceback and "
        "report it with the command line you used."
    ),
    ExitCode.USAGE: (
        "The command line could not be parsed: an unknown command or option, a missing "
        "option, or a value of the wrong type. Run the command with --help."
    ),
    ExitCode.CONFIG: (
        "A value given on the command line or in the config file cannot work. The message "
        "names the field, the value and how to fix it."
    ),
    ExitCode.DATA: (
        "A file the command read is malformed or corrupt (for example a privacy ledger "
        "line). The message names the file and line; restore it from a backup."
    ),
    ExitCode.INTEGRITY: (
        "A check that guards correctness or privacy failed (for example an accountant "
        "history that would forget privacy already spent). Do not work around it."
    ),
    ExitCode.POLICY_REJECTED: (
        "The safety-policy bundle or envelope was rejected (bad signature, rollback, "
        "expired, wrong type or tampered file). The previous policy stays in force."
    ),
    ExitCode.KEY_FILE: (
        "A signing key or trust-root file is missing, unreadable or malformed. Check the "
        "path and the file's permissions."
    ),
    ExitCode.WRONG_PASSPHRASE: (
        "The passphrase does not decrypt the signing key. Check the passphrase source "
        "(the FEDPREF_KEY_PASSPHRASE environment variable, or the prompt)."
    ),
    ExitCode.POLICY_EXPIRED: (
        "The safety policy has expired: its expires_at is not after now (a stale policy or a "
        "freeze attack). Sign a new policy with a higher --version and a later --expires."
    ),
    ExitCode.ROOT_EXPIRED: (
        "The trust root has expired, so no policy signed under it is accepted. Run "
        "`fedpref-server keys rotate` to issue the next root and distribute it."
    ),
    ExitCode.BUDGET_EXCEEDED: (
        "The next round would exceed the configured privacy budget, so nothing was "
        "released. Stop training, or raise the noise, lower the sampling rate or, if "
        "policy allows, the budget."
    ),
    ExitCode.NO_HOME: (
        "The --home folder does not exist or was not initialised by this tool. Run "
        "`fedpref-server init --home DIR` or `fedpref-agent init --home DIR ...` first, or fix the path."
    ),
    ExitCode.UNREACHABLE: (
        "The server address did not answer (unknown host, connection refused or timed out). "
        "Check the HOST:PORT, that the server is started, and the network in between."
    ),
    ExitCode.TLS_VERIFICATION: (
        "The server's TLS certificate does not verify against the CA file given (a wrong CA, "
        "or a certificate for another host). Get the operator's tls/ca.pem and pass it with --ca."
    ),
    ExitCode.ALREADY_RUNNING: (
        "This home's server (or agent) is already running. Use `status` to see it, or `stop` "
        "before starting it again."
    ),
    ExitCode.NOT_RUNNING: (
        "The command needs the running server, and this home's server is stopped. Run "
        "`fedpref-server start --home DIR --detach` first."
    ),
    ExitCode.NODE_REJECTED: (
        "The server refused this device: its public key is not registered. Give the device's "
        "identity/node.pub to the operator, who runs `fedpref-server nodes add`. (A device the "
        "server accepted before and that crashed ends its earlier session itself and retries for "
        "75 s before this code.)"
    ),
    ExitCode.SIMULATION_RUNTIME: (
        "The Simulation Engine's Ray runtime did not start (or could not join --ray-address) "
        "after several attempts. The message has Ray's reason; check free memory and /tmp, "
        "`ray status` for a cluster, and the logs under /tmp/ray/session_latest/logs."
    ),
    ExitCode.INTERRUPTED: "Interrupted by the user (Ctrl-C).",
}

# Each error class maps to a code; an error takes the code of the first mapped class in its
# MRO, so a subclass can be more specific than its base. Layers above protocol add their own
# classes with register_exit_codes (safety_policy/errors.py does), so that this module imports
# nothing above protocol.
_EXCEPTION_CODES: dict[type[FedPrefError], ExitCode] = {
    BudgetExceededError: ExitCode.BUDGET_EXCEEDED,
    HomeError: ExitCode.NO_HOME,
    ServerUnreachableError: ExitCode.UNREACHABLE,
    TlsVerificationError: ExitCode.TLS_VERIFICATION,
    AlreadyRunningError: ExitCode.ALREADY_RUNNING,
    NotRunningError: ExitCode.NOT_RUNNING,
    NodeRejectedError: ExitCode.NODE_REJECTED,
    SimulationRuntimeError: ExitCode.SIMULATION_RUNTIME,
    IntegrityError: ExitCode.INTEGRITY,
    ConfigError: ExitCode.CONFIG,
    DataError: ExitCode.DATA,
}


def register_exit_codes(codes: dict[type[FedPrefError], ExitCode]) -> None:
    """Map more error classes to exit codes (called by the modules that define them)."""
    _EXCEPTION_CODES.update(codes)


def exit_code_for(error: FedPrefError) -> ExitCode:
    """The exit code for a fedpref error (INTERNAL for an unmapped subclass)."""
    for cls in type(error).__mro__:
        if cls in _EXCEPTION_CODES:
            return _EXCEPTION_CODES[cls]
    return ExitCode.INTERNAL


def fail(code: ExitCode, message: str) -> NoReturn:
    """Print one line ``error: message`` to stderr and exit with ``code``; no traceback."""
    one_line = " ".join(str(message).split())
    print(f"error: {one_line}", file=sys.stderr)
    raise SystemExit(int(code))


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Turn a FedPrefError raised inside the block into :func:`fail` with its exit code."""
    try:
        yield
    except FedPrefError as e:
        fail(exit_code_for(e), str(e))


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def run_cli(app: Any, argv: Sequence[str] | None, prog_name: str) -> NoReturn:  # noqa: ANN401  (a typer.Typer)
    """Run a Typer app as a console entry point: errors and usage errors are one line with
    their documented exit code (2 for the command line), warnings one line each."""
    import click

    warnings.formatwarning = _one_line_warning
    try:
        rv = app(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # help was rendered when it was raised
        if message := e.format_message().strip():
            print(message, file=sys.stderr)
        raise SystemExit(int(ExitCode.USAGE)) from None
    except click.UsageError as e:
        fail(ExitCode.USAGE, e.format_message())
    except click.Abort:
        fail(ExitCode.INTERRUPTED, "interrupted")
    raise SystemExit(rv if isinstance(rv, int) else int(ExitCode.SUCCESS))
