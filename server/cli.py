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
from collections.abc import Sequence
from typing import Annotated, NoReturn

import typer

from fedpref.common.errors import ConfigError
from fedpref.common.exit_codes import EXIT_CODE_HELP, ExitCode, exit_on_error, run_cli
from fedpref.server import privacy
from fedpref.server.policy_cli import basis_app, keys_app, policy_app
from fedpref.server.privacy import AccountantKind

app = typer.Typer(
    rich_markup_mode=None,  # plain help: "[federation] rounds" must not vanish as rich markup
    name="fedpref-server",
    help="Run the fedpref server: policies, nodes, rounds and the privacy budget.",
    no_args_is_help=True,
    add_completion=False,
)
privacy_app = typer.Typer(
    rich_markup_mode=None,  # plain help: "[federation] rounds" must not vanish as rich markup
    help="Privacy accounting with Opacus' RDP or PRV accountant.",
    no_args_is_help=True,
)
app.add_typer(privacy_app, name="privacy")
app.add_typer(keys_app, name="keys")  # signing keys and the trust root (server/policy_cli.py)
app.add_typer(policy_app, name="policy")  # build, sign, verify, show safety policies
app.add_typer(basis_app, name="basis")  # the public attribute basis of the personal head

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

    from fedpref.common.atomic import write_text_atomic
    from fedpref.common.errors import ConfigError
    from fedpref.common.tomlconfig import dump_tables
    from fedpref.server import deploy
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
        body = dump_tables(deploy.initial_config(host, port))
        write_text_atomic(config, "# fedpref server home, written by `fedpref-server init`.\n"
                          "# [model], [federation], [local] and [secagg]: see server/config.py, model/config.py\n"
                          "# and server/secagg.py.\n\n" + body)
    typer.echo(f"wrote {config}")
    typer.echo(f"TLS: give {tls.ca_cert} to devices; the server certificate is for {host} (and localhost)")


# --- deployment: nodes, start, status, stop (server/deploy.py) ------------------------------

nodes_app = typer.Typer(rich_markup_mode=None, help="Decide which devices may connect (Flower SuperNode authentication).",
                        no_args_is_help=True)
app.add_typer(nodes_app, name="nodes")
ServerHomeOpt = Annotated[Path, typer.Option("--home", metavar="DIR", envvar="FEDPREF_HOME", show_envvar=True,
                                             help="The server's home (fedpref-server init).")]


def _server_home(home: Path):  # noqa: ANN202  (a deploy.ServerHome)
    """``deploy.ServerHome.load``, after checking config.toml reads as UTF-8 TOML with a [server] table
    (one line naming the file, not a traceback)."""
    from fedpref.common.errors import DataError
    from fedpref.common.tomlconfig import read_toml
    from fedpref.server import deploy

    config = Path(home).expanduser() / "config.toml"
    if config.is_file():
        try:
            data = read_toml(config)
        except ConfigError as e:
            raise DataError(f"{e}; or re-create the home with `fedpref-server init`") from None
        if not isinstance(data.get("server"), dict):
            raise DataError(f"{config}: no [server] table; re-create the home with `fedpref-server init`")
    return deploy.ServerHome.load(home)


_MAX_PUBLIC_KEY = 16 * 1024


def _check_public_key(path: Path) -> None:
    """Refuse, before anything runs, a file that is not a device's OpenSSH ECDSA public key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    from fedpref.common.errors import DataError

    fix = "give the device's identity/node.pub"
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_PUBLIC_KEY + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e}); {fix}") from None
    if b"PRIVATE KEY" in data:
        raise DataError(f"{path}: is a PRIVATE key; never copy it off the device. Delete this copy and {fix}")
    if len(data) > _MAX_PUBLIC_KEY:
        raise DataError(f"{path}: is over {_MAX_PUBLIC_KEY} bytes, not an OpenSSH public key; {fix}")
    try:
        load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        reason = " ".join(str(e).split())[:80]
        raise DataError(f"{path}: not an OpenSSH public key ({reason}); {fix}") from None


@nodes_app.command("add")
def nodes_add(
    public_key: Annotated[Path, typer.Argument(metavar="PUBLIC_KEY_FILE", help="The device's identity/node.pub.")],
    home: ServerHomeOpt,
    as_json: AsJson = False,
) -> None:
    """Register a device's public key with the running SuperLink."""
    from fedpref.server import deploy

    with exit_on_error():
        _check_public_key(public_key)
        out = deploy.nodes_add(_server_home(home), public_key)
    _emit(as_json, out, f"registered node {out['node_id']} ({public_key})")


@nodes_app.command("list")
def nodes_list(home: ServerHomeOpt, as_json: AsJson = False) -> None:
    """List registered devices and whether they are online."""
    from fedpref.server import deploy

    with exit_on_error():
        nodes = deploy.nodes_list(_server_home(home))
    if as_json:
        typer.echo(json.dumps(nodes))
        return
    for n in nodes:
        typer.echo(f"{n.get('node-id'):>20}  {n.get('status'):<12} online since {n.get('online-at')}")
    typer.echo(f"{len(nodes)} nodes")


@nodes_app.command("remove")
def nodes_remove(
    node_id: Annotated[str, typer.Argument(metavar="ID", help="The node id `nodes add` or `nodes list` printed.")],
    home: ServerHomeOpt,
) -> None:
    """Unregister a device: it can no longer connect."""
    from fedpref.server import deploy

    with exit_on_error():
        deploy.nodes_remove(_server_home(home), node_id)
    typer.echo(f"unregistered node {node_id}")


@app.command("start")
def start(
    home: ServerHomeOpt,
    rounds: Annotated[int | None, typer.Option("--rounds", help="Rounds to run now (default: [federation] rounds); 0: no "
                                               "round, only offer the released model for the final personalization "
                                               "to devices that have not answered for it.")] = None,
    policy: Annotated[Path | None, typer.Option("--policy", metavar="ENVELOPE",
                                                help="A signed policy envelope to put in force (default: the one in force).")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Return once the run is submitted; the server keeps running.")] = False,
) -> None:
    """Start the SuperLink (loopback, TLS, node auth) behind nginx, and submit the fedpref run."""
    from fedpref.server import deploy

    with exit_on_error():
        h = _server_home(home)
        started = deploy.start(h, rounds=rounds, policy=policy)
    typer.echo(f"server started: devices connect to {h.address} (TLS; only the Fleet API is exposed); "
               f"run {started.run_id}: " + (f"rounds {started.first_round}..{started.last_round}"
                                             if started.last_round >= started.first_round
                                             else "no new round, the final personalization only") + ", "
               f"safety policy v{started.policy_version}")
    if detach:
        typer.echo(f"follow it with `fedpref-server status --home {h.root}`; stop it with `fedpref-server stop --home {h.root}`")
        return
    code = _follow(h, started)
    raise typer.Exit(code)


def _follow(h, started) -> int:  # noqa: ANN001
    """Show round progress until the run ends, then stop the server.

    Ctrl-C and SIGTERM (a service manager, ``kill``) stop the server too: a foreground server
    never outlives its command.
    """
    import signal
    import time

    from fedpref.server import deploy
    from fedpref.server.progress import RoundBar

    def _terminated(_signum, _frame):  # noqa: ANN001
        raise KeyboardInterrupt

    total = started.last_round - started.first_round + 1
    bar = RoundBar("rounds", total=total)
    state = "running"
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        while True:
            st = deploy.status(h)
            done = max(0, min(total, st["rounds_completed"] - (started.first_round - 1)))
            note = {"eps_user": f"{st['epsilon_user']:.2f}"} if st["ledger"] else {}
            bar.update(done=done, **note)
            state = st["run"]["status"] or "unknown"  # status asked Flower already
            if state.startswith("finished") or not st["running"]:
                break
            time.sleep(2)
    except KeyboardInterrupt:
        state = "interrupted"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
        bar.close()
        deploy.stop(h)
        signal.signal(signal.SIGTERM, previous)
    typer.echo(f"run {started.run_id}: {state}; server stopped")
    return 0 if state == "finished:completed" else int(ExitCode.INTERRUPTED if state == "interrupted" else ExitCode.INTERNAL)


@app.command("status")
def status(home: ServerHomeOpt, as_json: AsJson = False) -> None:
    """Rounds, the last round's participants and rejections, ε_user, the policy, the checkpoint."""
    from fedpref.server import deploy

    with exit_on_error():
        st = deploy.status(_server_home(home))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in st.items()}, allow_nan=False))
        return
    last = st["last_round"]
    pol = st["policy"]
    lines = [
        f"server           {'running' if st['running'] else 'stopped'} ({st['device_address']})",
        f"run              {st['run']['id'] or '-'} {st['run']['status'] or ''}",
        f"rounds completed {st['rounds_completed']}",
        f"rounds           {st['rounds_report']}",
        f"epsilon_user     {st['epsilon_user']:.4g} (delta {st['delta']}, budget {st['max_epsilon_user']})",
        f"safety policy    {'v%d (%s…)' % (pol['version'], pol['digest'][:12]) if pol else 'none'}",
        f"checkpoint       {st['latest_checkpoint'] or '-'}",
    ]
    if st["stopped_reason"]:
        lines.append(f"stopped early    {st['stopped_reason']}")
    if last:
        lines.append(f"last round {last['round']}: sampled {last['sampled']} of {last['population']}, "
                     f"responded {last['responded']}, accepted {last['accepted']}")
        lines += [f"  rejected node {r['node']}: {r['reason']}" for r in last["rejected"]]
        lines += [f"  declined node {r['node']}: {r['reason']}" for r in last["declined"]]
    if pers := st["personalize"]:
        earlier = f" ({pers['fitted_earlier']} earlier)" if pers["fitted_earlier"] else ""
        lines.append(f"personalized     round {pers['model_round']}'s model: {pers['fitted'] + pers['fitted_earlier']} of "
                     f"{pers['population']} devices fitted{earlier}, {pers['declined_count']} declined, "
                     f"{pers['rejected_count']} rejected, "
                     f"{pers['missing']} no answer")
        lines += [f"  declined node {r['node']}: {r['reason']}" for r in pers["declined"]]
        lines += [f"  rejected node {r['node']}: {r['reason']}" for r in pers["rejected"]]
    typer.echo("\n".join(lines))


@app.command("stop")
def stop(home: ServerHomeOpt) -> None:
    """Stop the SuperLink, nginx and the run that `start` started (nothing else)."""
    from fedpref.server import deploy

    with exit_on_error():
        stopped = deploy.stop(_server_home(home))
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else "not running; nothing to stop")


@app.command("exit-codes")
def exit_codes() -> None:
    """List every exit code with its meaning."""
    for code in ExitCode:
        typer.echo(f"{int(code):>3}  {code.name:<18} {EXIT_CODE_HELP[code]}")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: run :data:`app`; a usage error is one line and exit code 2."""
    run_cli(app, argv, "fedpref-server")


if __name__ == "__main__":
    main(sys.argv[1:])
