"""``fedpref-agent``: the device agent's command line.

The device keeps its preference pairs, its private adapter and its DP accountant under
``--home DIR`` (see :mod:`fedpref.client.agent_home`); ``start`` runs a Flower SuperNode
that trains on them in the server's rounds, ``rank`` and ``serve`` let apps on the device
use the personalized model within the installed safety policy. Errors are one line on
stderr with a documented exit code (``fedpref-server exit-codes``), never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from fedpref.client.agent import Agent, forget_home, init_home
from fedpref.client.agent_home import AgentHome
from fedpref.client.supervisor import SuperNode
from fedpref.client.terms import DeviceTerms
from fedpref.common.exit_codes import exit_on_error, run_cli

app = typer.Typer(rich_markup_mode=None, name="fedpref-agent", no_args_is_help=True, add_completion=False,
                  help="The fedpref device agent: your preferences, your private adapter, your device.")
feedback_app = typer.Typer(rich_markup_mode=None, help="Store preference pairs on this device.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")

Home = Annotated[Path, typer.Option("--home", metavar="DIR", envvar="FEDPREF_AGENT_HOME",
                                    help="The agent's home folder.", show_envvar=True)]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _emit(as_json: bool, record: object, human: str) -> None:
    typer.echo(json.dumps(record) if as_json else human)


# --- init ----------------------------------------------------------------------------------


@app.command("init")
def init(
    home: Home,
    server: Annotated[str, typer.Option("--server", metavar="HOST:PORT", help="The server's device-facing address.")],
    ca: Annotated[Path, typer.Option("--ca", metavar="CA.pem", help="The operator's CA certificate (tls/ca.pem).")],
    root: Annotated[Path, typer.Option("--root", metavar="ROOT.json", help="The operator's trust root (keys/root.json).")],
    backbone: Annotated[str, typer.Option("--backbone", metavar="PATH",
                                          help="Backbone folder; the default is the packaged MiniLM.")] = "",
    passphrase: Annotated[bool, typer.Option("--passphrase", help="Derive the store key from FEDPREF_STORE_PASSPHRASE "
                                             "(scrypt) instead of writing a key file.")] = False,
    basis: Annotated[Path | None, typer.Option("--basis", metavar="BASIS.safetensors", help=(
        "The operator's attribute basis (`fedpref-server basis build`), when the server's "
        "[model.adapter] names one; copied into DIR.")) ] = None,
    min_noise_multiplier: Annotated[float, typer.Option(
        "--min-noise-multiplier", metavar="SIGMA", help="This device's floor: the least DP-SGD noise multiplier it "
        "trains with, whatever the server asks (> 0).")] = DeviceTerms.min_noise_multiplier,
    max_grad_norm: Annotated[float, typer.Option(
        "--max-grad-norm", metavar="CLIP", help="This device's ceiling on the DP-SGD per-sample clip.")] = DeviceTerms.max_grad_norm,
    max_epsilon_sample: Annotated[float, typer.Option(
        "--max-epsilon-sample", metavar="EPS", help="This device's own ε_sample budget over all rounds, at --delta.")
    ] = DeviceTerms.max_epsilon_sample,
    delta: Annotated[float, typer.Option("--delta", metavar="DELTA", help="The δ of this device's ε_sample.")] = DeviceTerms.delta,
    share_metrics: Annotated[bool, typer.Option(
        "--share-metrics", help="Report training metrics (loss, accuracy, ε_sample, time) to the server in clear "
        "when it asks; off by default.")] = False,
) -> None:
    """Create the device identity, the encrypted store and the pinned trust root in DIR.

    The device's own terms (--min-noise-multiplier, --max-grad-norm, --max-epsilon-sample,
    --delta, --share-metrics) go to agent.toml [terms]: a round asking for less privacy is declined.
    """
    with exit_on_error():
        home = init_home(home, server=server, ca=ca, root=root, backbone=backbone, passphrase=passphrase,
                         basis=basis, terms={"min_noise_multiplier": min_noise_multiplier,
                                             "max_grad_norm": max_grad_norm,
                                             "max_epsilon_sample": max_epsilon_sample, "delta": delta,
                                             "share_metrics": share_metrics})
    typer.echo(f"initialised {home}")
    typer.echo(f"public key: {home / 'identity' / 'node.pub'}  (the operator registers it: "
               "fedpref-server nodes add FILE --home SERVER_HOME)")


# --- feedback ------------------------------------------------------------------------------


@feedback_app.command("add")
def feedback_add(
    home: Home,
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt.")],
    chosen: Annotated[str, typer.Option("--chosen", help="The response you preferred.")],
    rejected: Annotated[str, typer.Option("--rejected", help="The response you did not.")],
) -> None:
    """Store one preference pair."""
    with exit_on_error():
        pid, total = Agent(AgentHome.load(home)).add_feedback(prompt, chosen, rejected, source="cli")
    typer.echo(f"added pair {pid} ({total} on this device)")


@feedback_app.command("import")
def feedback_import(
    home: Home,
    file: Annotated[Path, typer.Argument(metavar="FILE.jsonl", help="One {prompt, chosen, rejected} object per line.")],
) -> None:
    """Import preference pairs from a JSONL file (all or nothing)."""
    with exit_on_error():
        n, total = Agent(AgentHome.load(home)).import_feedback(file)
    typer.echo(f"imported {n} pairs from {file} ({total} on this device)")


@feedback_app.command("list")
def feedback_list(home: Home, as_json: AsJson = False) -> None:
    """List the stored preference pairs."""
    with exit_on_error():
        pairs = Agent(AgentHome.load(home)).pairs()
    if as_json:
        typer.echo(json.dumps([{"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                "source": p.source, "created_at": p.created_at} for p in pairs]))
        return
    for p in pairs:
        typer.echo(f"{p.id:>5}  {p.prompt[:50]!r}: {p.chosen[:40]!r} > {p.rejected[:40]!r}")
    typer.echo(f"{len(pairs)} pairs")


# --- rank, status, forget ------------------------------------------------------------------


@app.command("rank")
def rank(
    home: Home,
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt the candidates answer.")],
    candidates: Annotated[list[str], typer.Argument(metavar="CANDIDATE...", help="Candidate responses.")],
    as_json: AsJson = False,
) -> None:
    """Rank candidates for you, within the installed safety policy (unsafe ones last)."""
    with exit_on_error():
        ranked, version = Agent(AgentHome.load(home)).rank(prompt, list(candidates))
    if as_json:
        typer.echo(json.dumps({"policy_version": version, "ranked": ranked}))
        return
    for i, r in enumerate(ranked, 1):
        flag = "" if r["allowed"] else f"  [bounded: {', '.join(r['unsafe_categories'])}]"
        typer.echo(f"{i}. {r['personal_score']:+.3f}  {r['candidate']}{flag}")
    typer.echo(f"(safety policy v{version})")


@app.command("status")
def status(home: Home, as_json: AsJson = False) -> None:
    """Pairs stored, adapter version, installed policy version and ε_sample so far."""
    with exit_on_error():
        st = Agent(AgentHome.load(home)).status()
    _emit(as_json, st, "\n".join([
        f"home            {st['home']}", f"server          {st['server']}",
        f"running         {'yes' if st['running'] else 'no'}", f"pairs           {st['pairs']}",
        f"adapter         {st['adapter_version'] or 'none yet'}"
        + (f", personalized on model {st['personalized_on'][:12]}…" if st["personalized_on"] else ""),
        f"safety policy   v{st['policy_version']}",
        f"epsilon_sample  {st['epsilon_sample']:.4g} (delta {st['delta']:g}; "
        f"budget {st['terms']['max_epsilon_sample']})",
        f"terms           σ ≥ {st['terms']['min_noise_multiplier']}, per-sample clip ≤ {st['terms']['max_grad_norm']}, "
        f"metrics {'shared' if st['terms']['share_metrics'] else 'not shared'}",
    ]))


FORGET_HELP = (
    "Delete the preference data, the private adapter and the accountant state, physically.\n\n"
    "The pairs' database pages are zeroed and the database rebuilt (SQLite secure_delete, VACUUM, "
    "WAL truncated), and the sealed adapter and accountant are overwritten with zeros before they "
    "are removed. With --all the store key is destroyed too (overwritten, then removed), so that no "
    "copy of the store, a backup or blocks the file system kept, decrypts any more. Copies an SSD or "
    "a copy-on-write file system keeps of overwritten blocks are beyond a program's reach; only --all "
    "(destroying the key) covers them."
)


@app.command("forget", help=FORGET_HELP)
def forget_cmd(
    home: Home,
    everything: Annotated[bool, typer.Option("--all", help=(
        "Also destroy the store key (overwritten, then removed; for a passphrase store its salt) "
        "and the device key, then delete the whole home."))] = False,
) -> None:
    """Delete the preference data, the private adapter and the accountant state (see FORGET_HELP)."""
    with exit_on_error():
        h = AgentHome.load(home)
        out = forget_home(h, everything=everything)
    typer.echo(f"deleted {out['pairs_deleted']} pairs"
               f"{', the private adapter' if out['adapter_deleted'] else ''}"
               f"{', the accountant state' if out['accountant_deleted'] else ''}"
               f"{'; destroyed the store key and the identity, and deleted ' + str(h.root) if everything else ''}")


# --- serve: the local gRPC API ---------------------------------------------------------------


@app.command("serve")
def serve(
    home: Home,
    socket_path: Annotated[Path | None, typer.Option("--socket", metavar="PATH", help="Unix socket to listen on.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Loopback port to listen on (0: any free one).")] = None,
) -> None:
    """Serve the local gRPC API (AddFeedback, Rank, Status, Forget) to apps on this device."""
    from fedpref.client.api import run_forever
    from fedpref.client.api import serve as serve_api

    with exit_on_error():
        h = AgentHome.load(home)
        if socket_path is None and port is None:
            socket_path = h.root / "run" / "agent.sock"
        server, address = serve_api(Agent(h), socket=socket_path, port=port)
    typer.echo(f"fedpref agent API listening on {address}", err=True)
    sys.stderr.flush()
    run_forever(server)


# --- start: the Flower SuperNode ---------------------------------------------------------------


@app.command("start")
def start(
    home: Home,
    max_wait: Annotated[float | None, typer.Option(
        "--max-wait", help="Give up after this many seconds without the server (default: keep trying).")] = None,
) -> None:
    """Run a Flower SuperNode for this device: TLS to the server, authenticated with the device key.

    Flower's telemetry and update check are off: nothing phones home, no device id is written.
    """
    with exit_on_error():
        node = SuperNode.start(AgentHome.load(home), max_wait=max_wait)
    h = node.home
    typer.echo(f"SuperNode started (pid {node.pid}) for {h.server}; log: {h.log_file}")
    with exit_on_error():
        node.supervise()
    typer.echo("SuperNode stopped")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point; a usage error is one line and exit code 2."""
    run_cli(app, argv, "fedpref-agent")


if __name__ == "__main__":
    main(sys.argv[1:])
