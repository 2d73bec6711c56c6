"""``fedpref-agent``: the device agent's command line.

The device keeps its preference pairs, its private adapter and its DP accountant under
``--home DIR`` (see :mod:`fedpref.client.agent_home`); ``start`` runs a Flower SuperNode
that trains on them in the server's rounds, ``rank`` and ``serve`` let apps on the device
use the personalized model within the installed safety policy. Errors are one line on
stderr with a documented exit code (``fedpref-server exit-codes``), never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from fedpref.client.agent_home import AGENT_FILE, BASIS_FILE, AgentHome, forget
from fedpref.client.app import NODE_CONFIG_KEY
from fedpref.client.terms import DeviceTerms
from fedpref.protocol.errors import (
    AlreadyRunningError,
    ConfigError,
    DataError,
    FedPrefError,
    NodeRejectedError,
    ServerUnreachableError,
    TlsVerificationError,
)
from fedpref.protocol.exit_codes import exit_on_error, run_cli
from fedpref.protocol.netaddr import cmdline, flower_env, parse_address

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


def _read_ca(path: Path) -> bytes:
    from cryptography import x509

    try:
        data = path.read_bytes()
        x509.load_pem_x509_certificates(data)
    except OSError as e:
        raise ConfigError(f"--ca {path}: {e.strerror}; give the operator's tls/ca.pem") from None
    except ValueError:
        raise DataError(f"--ca {path}: not a PEM certificate; give the operator's tls/ca.pem") from None
    return data


def _identity() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())  # Flower SuperNode auth: ECDSA on a NIST curve, OpenSSH
    private = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption())
    public = key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
    return private, public + b" fedpref-agent\n"


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
    from fedpref.client.store import PASSPHRASE_ENV, DeviceStore
    from fedpref.model.config import ModelConfig
    from fedpref.protocol.atomic import write_bytes_atomic, write_text_atomic
    from fedpref.protocol.tomlconfig import dump_tables, to_plain
    from fedpref.safety_policy.store import PolicyStore

    with exit_on_error():
        home = home.expanduser().absolute()
        host, port = parse_address(server)
        if home.exists() and (not home.is_dir() or any(home.iterdir())):
            raise ConfigError(f"--home {home} exists and is not empty; refusing to re-initialise it (use a new folder)")
        ca_bytes = _read_ca(ca)
        try:
            root_bytes = root.read_bytes()
        except OSError as e:
            raise ConfigError(f"--root {root}: {e.strerror}; give the operator's keys/root.json") from None
        model = ModelConfig(backbone=backbone)
        terms = DeviceTerms(min_noise_multiplier=min_noise_multiplier, max_grad_norm=max_grad_norm,
                            max_epsilon_sample=max_epsilon_sample, delta=delta, share_metrics=share_metrics)
        if basis is not None:
            from fedpref.model.basis import load_basis

            weight, _, _ = load_basis(basis)  # a bad file fails here, before anything is written
            model = model.with_attribute_basis(str(home / BASIS_FILE), personal_dims=int(weight.shape[0]))
        secret = os.environ.get(PASSPHRASE_ENV) if passphrase else None
        if passphrase and not secret:
            raise ConfigError(f"--passphrase needs the passphrase in {PASSPHRASE_ENV}")
        home.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=home.parent, prefix=f".{home.name}.", suffix=".init"))
        try:  # build everything aside, then one rename: a failed init leaves nothing behind
            PolicyStore(tmp / "state" / "policy").init_root(root_bytes)
            private, public = _identity()
            write_bytes_atomic(tmp / "identity" / "node.key", private, mode=0o600)
            write_bytes_atomic(tmp / "identity" / "node.pub", public)
            write_bytes_atomic(tmp / "ca.pem", ca_bytes)
            if basis is not None:
                write_bytes_atomic(tmp / BASIS_FILE, basis.read_bytes())
            DeviceStore.create(tmp / "store", passphrase=secret).close()
            write_text_atomic(tmp / AGENT_FILE, "# fedpref device agent, written by `fedpref-agent init`.\n"
                              "# [model] must match the server's [model].\n\n" + dump_tables({
                                  "agent": {"server": f"{host}:{port}", "ca": "ca.pem"},
                                  "model": to_plain(model),
                                  "terms": to_plain(terms),
                              }))
            os.chmod(tmp, 0o700)
            if home.exists():
                home.rmdir()  # empty: checked above
            os.replace(tmp, home)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
        h = AgentHome.load(home)
        with h.open_store() as store:
            pid = store.add_pair(prompt, chosen, rejected)
            total = store.count()
    typer.echo(f"added pair {pid} ({total} on this device)")


@feedback_app.command("import")
def feedback_import(
    home: Home,
    file: Annotated[Path, typer.Argument(metavar="FILE.jsonl", help="One {prompt, chosen, rejected} object per line.")],
) -> None:
    """Import preference pairs from a JSONL file (all or nothing)."""
    with exit_on_error():
        h = AgentHome.load(home)
        with h.open_store() as store:
            n = store.import_jsonl(file)
            total = store.count()
    typer.echo(f"imported {n} pairs from {file} ({total} on this device)")


@feedback_app.command("list")
def feedback_list(home: Home, as_json: AsJson = False) -> None:
    """List the stored preference pairs."""
    with exit_on_error():
        h = AgentHome.load(home)
        with h.open_store() as store:
            pairs = store.pairs()
    if as_json:
        typer.echo(json.dumps([{"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                "source": p.source, "created_at": p.created_at} for p in pairs]))
        return
    for p in pairs:
        typer.echo(f"{p.id:>5}  {p.prompt[:50]!r}: {p.chosen[:40]!r} > {p.rejected[:40]!r}")
    typer.echo(f"{len(pairs)} pairs")


# --- the agent's operations (CLI and gRPC API share them) --------------------------------------


class Agent:
    """The operations of :class:`fedpref.client.api.AgentBackend` on one home."""

    def __init__(self, home: AgentHome) -> None:
        self.home = home

    def add_feedback(self, prompt: str, chosen: str, rejected: str) -> tuple[int, int]:
        with self.home.open_store() as store:
            return store.add_pair(prompt, chosen, rejected, source="api"), store.count()

    def rank(self, prompt: str, candidates: list[str]) -> tuple[list[dict], int]:
        from fedpref.client.device import adapters_for, get_runtime, set_safety_module
        from fedpref.model.io import adapter_exists, load_adapter_weights
        from fedpref.protocol.partition import SHARED_ADAPTER
        from fedpref.safety_policy.classifier import SafetyModule
        from fedpref.safety_policy.ranking import BoundedRanker

        h = self.home
        now = datetime.now(timezone.utc)
        if not adapter_exists(h.shared_dir):
            raise ConfigError(f"{h.root} has no model yet: the device has not taken part in a round; "
                              f"run `fedpref-agent start --home {h.root}` and wait for a round")
        rt = get_runtime(h.model, adapters_for(train_shared=True, train_private=True))
        policy_store = h.policy_store()
        root = policy_store.trusted_root(now=now)
        policy = policy_store.current(root, now, backbone_sha256=rt.backbone.sha256) if root is not None else None
        if policy is None:
            raise ConfigError("no safety policy is installed on this device yet; ranking is offered only within "
                              "the signed bound (it arrives with the first round)")
        with h.open_store() as store:
            load_adapter_weights(rt.model, SHARED_ADAPTER, h.shared_dir)
            h.state(store).load_private(rt)
        set_safety_module(rt, SafetyModule.from_policy(policy), policy.envelope_sha256)
        ranked = BoundedRanker.from_policy(rt.model, rt.backbone, policy, max_length=h.model.max_length).rank(
            prompt, candidates)
        return [{"candidate": r.candidate, "personal_score": float(r.personal_score),
                 "unsafe_categories": list(r.unsafe_categories), "allowed": bool(r.allowed), "reason": r.reason}
                for r in ranked], policy.version

    def status(self) -> dict:
        from fedpref.protocol.tomlconfig import to_plain

        h = self.home
        with h.open_store() as store:
            pairs = store.count()
            acct = h.state(store).accountant()
        meta = h.adapter_version()
        delta = h.terms.delta  # the device accounts at its own δ
        eps = acct.epsilon(delta) if acct.history else 0.0
        version = f"round {meta['round']} ({meta.get('updated_at', '?')})" if "round" in meta else ""
        return {"home": str(h.root), "pairs": pairs, "adapter_version": version,
                "policy_version": h.policy_store().version,
                "epsilon_sample": eps, "delta": delta, "server": h.server, "terms": to_plain(h.terms),
                "node_public_key": h.public_key_file.read_text().strip() if h.public_key_file.exists() else "",
                "running": _running_pid(h) is not None}

    def forget(self, *, destroy_key: bool = False) -> dict:
        with self.home.open_store() as store:
            return forget(self.home, store, destroy_key=destroy_key)


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
        f"adapter         {st['adapter_version'] or 'none yet'}", f"safety policy   v{st['policy_version']}",
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
    from fedpref.client.store import shred

    with exit_on_error():
        h = AgentHome.load(home)
        if _running_pid(h) is not None:
            raise AlreadyRunningError(f"the agent of {h.root} is running; stop it before forgetting")
        out = Agent(h).forget(destroy_key=everything)
        if everything:
            shred(h.key_file)  # the device's identity: nobody can act as this device again
            shutil.rmtree(h.root)
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


def _running_pid(h: AgentHome) -> int | None:
    try:
        pid = int(h.pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    cmd = cmdline(pid)
    if cmd is None:
        return pid
    return pid if any("fedpref-agent" in a or "agent_cli" in a for a in cmd) else None


def preflight(address: str, ca: Path, *, timeout: float = 10.0) -> None:
    """Reach the server and verify its certificate against the pinned CA (one-line errors)."""

    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ServerUnreachableError(f"server {address} is unreachable ({e.strerror or e}); check the address "
                                     "and that the operator has started the server") from None
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as e:
        raise TlsVerificationError(f"server {address}: its certificate does not verify against {ca} "
                                   f"({e.verify_message}); get the operator's tls/ca.pem") from None
    except (ssl.SSLError, OSError) as e:
        raise ServerUnreachableError(f"server {address}: TLS handshake failed ({e}); is it a fedpref server?") from None
    finally:
        sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@app.command("start")
def start(
    home: Home,
    max_wait: Annotated[float | None, typer.Option(
        "--max-wait", help="Give up after this many seconds without the server (default: keep trying).")] = None,
) -> None:
    """Run a Flower SuperNode for this device: TLS to the server, authenticated with the device key.

    Flower's telemetry and update check are off: nothing phones home, no device id is written.
    """
    from fedpref.protocol.atomic import write_text_atomic

    with exit_on_error():
        h = AgentHome.load(home)
        if (pid := _running_pid(h)) is not None:
            raise AlreadyRunningError(f"the agent of {h.root} is already running (pid {pid})")
        preflight(h.server, h.ca)
        exe = shutil.which("flower-supernode", path=os.path.dirname(sys.executable)) or shutil.which("flower-supernode")
        if exe is None:
            raise ConfigError("flower-supernode not found; install fedpref (it depends on flwr) in this environment")
        cmd = [exe, "--root-certificates", str(h.ca), "--superlink", h.server,
               "--auth-supernode-private-key", str(h.key_file),
               "--node-config", f'{NODE_CONFIG_KEY}="{h.root}"', "--port", str(_free_port())]
        if max_wait is not None:
            cmd += ["--max-wait-time", str(max_wait)]
        h.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = flower_env(h.flwr_home)
        write_text_atomic(h.pid_file, f"{os.getpid()}\n")
        log = open(h.log_file, "ab", buffering=0)
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    typer.echo(f"SuperNode started (pid {child.pid}) for {h.server}; log: {h.log_file}")

    def _stop(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        rc = _wait(child)
    finally:
        h.pid_file.unlink(missing_ok=True)
        log.close()
    if rc in (0, -signal.SIGTERM, -signal.SIGINT):
        typer.echo("SuperNode stopped")
        return
    tail = h.log_file.read_text(errors="replace")[-4000:]
    with exit_on_error():
        if "Failed to activate SuperNode" in tail:
            raise NodeRejectedError(f"the server refused this device: its key is not registered; give "
                                    f"{h.public_key_file} to the operator (fedpref-server nodes add)")
        raise FedPrefError(f"the SuperNode exited with code {rc}; see {h.log_file}")


def _wait(child: subprocess.Popen) -> int:
    rc = child.wait()  # a SIGTERM/SIGINT runs _stop, then the wait resumes (PEP 475)
    # The SuperNode's SuperExec and ClientApps (its session) watch it and stop themselves with
    # one SIGINT once it is gone; a SIGTERM from here at that moment is a second signal in the
    # middle of their graceful exit, which Python turns into a KeyboardInterrupt traceback in
    # supernode.log. Give them that time; then stop whatever is left.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(child.pid, 0)
        except OSError:
            return rc
        time.sleep(0.2)
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except OSError:
        pass
    return rc


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point; a usage error is one line and exit code 2."""
    run_cli(app, argv, "fedpref-agent")


if __name__ == "__main__":
    main(sys.argv[1:])
