"""``fedpref-server``: the operator's command line.

Each command group is its own ``typer.Typer`` added to :data:`app` with ``add_typer``
(``privacy``, ``keys``, ``policy`` now; ``nodes``, ``init``, ``start`` ... later). Commands
wrap their work in :func:`exit_on_error`, so a :class:`FedPrefError` becomes one line on
stderr and a documented exit code (``fedpref-server exit-codes``); :func:`main` does the
same for command-line parsing errors.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
import warnings
from collections.abc import Sequence
from typing import Annotated, NoReturn

import click
import typer

from fedpref.server import privacy
from fedpref.server.exit_codes import EXIT_CODE_HELP, ExitCode, exit_on_error, fail
from fedpref.server.policy_cli import keys_app, policy_app
from fedpref.server.privacy import AccountantKind

app = typer.Typer(
    name="fedpref-server",
    help="Run the fedpref server: policies, nodes, rounds and the privacy budget.",
    no_args_is_help=True,
    add_completion=False,
)
privacy_app = typer.Typer(
    help="Privacy accounting with Opacus' RDP or PRV accountant.",
    no_args_is_help=True,
)
app.add_typer(privacy_app, name="privacy")
app.add_typer(keys_app, name="keys")  # signing keys and the trust root (server/policy_cli.py)
app.add_typer(policy_app, name="policy")  # build, sign, verify, show safety policies

SampleRate = Annotated[
    float, typer.Option(help="Poisson sampling probability q per step, in (0, 1].")
]
Steps = Annotated[int, typer.Option(help="Number of noised steps (rounds).")]
Delta = Annotated[float, typer.Option(help="Target delta, in (0, 1).")]
Accountant = Annotated[
    AccountantKind, typer.Option(case_sensitive=False, help="Opacus accountant to use.")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no Infinity: an infinite epsilon is null


def _emit(as_json: bool, record: dict[str, object], human: str) -> None:
    if as_json:
        out = {k: _num(v) if isinstance(v, float) else v for k, v in record.items()}
        typer.echo(json.dumps(out, allow_nan=False))
    else:
        typer.echo(human)


@privacy_app.command("epsilon")
def privacy_epsilon(
    sample_rate: SampleRate,
    noise_multiplier: Annotated[float, typer.Option(help="Noise std / clip norm, > 0.")],
    steps: Steps,
    delta: Delta,
    accountant: Accountant = AccountantKind.RDP,
    as_json: AsJson = False,
) -> None:
    """Print the epsilon reached after STEPS Poisson-sampled Gaussian steps."""
    with exit_on_error():
        eps = privacy.epsilon(sample_rate=sample_rate, noise_multiplier=noise_multiplier,
                              steps=steps, delta=delta, accountant=accountant)
    record: dict[str, object] = {
        "sample_rate": sample_rate, "noise_multiplier": noise_multiplier, "steps": steps,
        "delta": delta, "accountant": accountant.value, "epsilon": eps,
    }
    if accountant is AccountantKind.PRV:
        record["eps_error"] = privacy.PRV_EPS_ERROR
    bound = f" (upper bound, error <= {privacy.PRV_EPS_ERROR})" if "eps_error" in record else ""
    _emit(as_json, record, f"epsilon = {eps:.6g}{bound} at delta = {delta:g} "
          f"[{accountant.value}: q={sample_rate:g}, z={noise_multiplier:g}, steps={steps}]")


@privacy_app.command("noise")
def privacy_noise(
    sample_rate: SampleRate,
    target_epsilon: Annotated[float, typer.Option(help="Epsilon budget to calibrate for, > 0.")],
    steps: Steps,
    delta: Delta,
    accountant: Accountant = AccountantKind.RDP,
    as_json: AsJson = False,
) -> None:
    """Print the smallest noise multiplier that keeps epsilon <= TARGET_EPSILON."""
    with exit_on_error():
        z = privacy.noise_multiplier(target_epsilon=target_epsilon, sample_rate=sample_rate,
                                     steps=steps, delta=delta, accountant=accountant)
    record: dict[str, object] = {
        "sample_rate": sample_rate, "target_epsilon": target_epsilon, "steps": steps,
        "delta": delta, "accountant": accountant.value, "noise_multiplier": z,
    }
    _emit(as_json, record, f"noise_multiplier = {z:.6g} keeps epsilon <= {target_epsilon:g} "
          f"at delta = {delta:g} [{accountant.value}: q={sample_rate:g}, steps={steps}]")


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return "inf" if v == "inf" else json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v).__name__)


def _toml_tables(tables: dict[str, dict]) -> str:
    out = []
    for name, table in tables.items():
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        out.append(f"[{name}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        out.append("")
        sub = {f"{name}.{k}": v for k, v in table.items() if isinstance(v, dict)}
        if sub:
            out.append(_toml_tables(sub))
    return "\n".join(out)


@app.command("init")
def init(
    home: Annotated[Path, typer.Option("--home", metavar="DIR", help="The server's home: config, TLS, keys, state.")],
    address: Annotated[str, typer.Option(
        "--address", metavar="HOST:PORT", help="The device-facing address the certificate is issued for.")] = "127.0.0.1:9092",
    signers: Annotated[int, typer.Option("--signers", help="Policy signing keys to create (n), unless keys exist.")] = 1,
    threshold: Annotated[int | None, typer.Option("--threshold", help="Signatures a policy needs (k).")] = None,
) -> None:
    """Write DIR/config.toml, a TLS CA and server certificate, and policy signing keys (unless they exist)."""
    from datetime import datetime, timezone

    from fedpref.model.config import ModelConfig
    from fedpref.protocol.atomic import write_text_atomic
    from fedpref.protocol.errors import ConfigError
    from fedpref.protocol.tomlconfig import to_plain
    from fedpref.server.config import FederationConfig, LocalConfig
    from fedpref.server.policy_cli import keys_init
    from fedpref.server.tls import parse_address, write_tls

    with exit_on_error():
        host, port = parse_address(address)
        config = home / "config.toml"
        if config.exists():
            raise ConfigError(f"{config} already exists; refusing to re-initialise this home (use another --home)")
        tls = write_tls(home / "tls", host, now=datetime.now(timezone.utc))
        if (home / "keys" / "root.json").exists():
            typer.echo(f"kept the existing policy signing keys and trust root in {home / 'keys'}")
        else:
            keys_init(home=home, signers=signers, threshold=threshold, expires_days=365)
        fed = to_plain(FederationConfig()) | {"max_epsilon_user": 10.0, "report_eval_metrics": False}
        local = to_plain(LocalConfig()) | {"max_epsilon_sample": 10.0}
        body = _toml_tables({
            "server": {"address": f"{host}:{port}", "ca": "tls/ca.pem", "certificate": "tls/server.pem",
                       "private_key": "tls/server.key", "trust_root": "keys/root.json", "state": "state"},
            "model": to_plain(ModelConfig()), "federation": fed, "local": local,
        })
        write_text_atomic(config, "# fedpref server home, written by `fedpref-server init`.\n"
                          "# [model], [federation] and [local]: see server/config.py and model/config.py.\n\n" + body)
    typer.echo(f"wrote {config}")
    typer.echo(f"TLS: give {tls.ca_cert} to devices; the server certificate is for {host} (and localhost)")


@app.command("exit-codes")
def exit_codes() -> None:
    """List every exit code with its meaning."""
    for code in ExitCode:
        typer.echo(f"{int(code):>3}  {code.name:<17} {EXIT_CODE_HELP[code]}")


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object,
                      **__: object) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: run :data:`app`; a usage error is one line and exit code 2."""
    warnings.formatwarning = _one_line_warning
    try:
        rv = app(args=argv, prog_name="fedpref-server", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # help was rendered when it was raised
        if message := e.format_message().strip():
            typer.echo(message, err=True)
        raise SystemExit(int(ExitCode.USAGE)) from None
    except click.UsageError as e:
        fail(ExitCode.USAGE, e.format_message())
    except click.Abort:
        fail(ExitCode.INTERRUPTED, "interrupted")
    raise SystemExit(rv if isinstance(rv, int) else int(ExitCode.SUCCESS))


if __name__ == "__main__":
    main(sys.argv[1:])
