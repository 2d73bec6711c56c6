"""Running a fedpref server on Flower's Deployment Engine: ``start``, ``stop``, ``status``, ``nodes``.

What ``fedpref-server start --home DIR`` runs, all of it recorded in ``DIR/run/processes.json``
so that ``stop`` stops exactly that, and what it started in turn, and nothing else:

- **flower-superlink** on loopback only (``[server] superlink``, default device port + 1),
  with TLS (the home's certificate), SuperNode authentication, a persistent SQLite database
  (``state/superlink.db``: registered nodes survive restarts) and runtime dependency
  installation off. Flower 1.42 serves its Control, Fleet and Runtime APIs on this one port,
  and the open-source Control API has no login: whoever reaches it can submit a run, and so
  ship code to every device. Hence loopback.
- **nginx** on the device-facing address (``[server] address``): it terminates TLS with the
  same certificate and proxies only ``/v1/fleet/`` (the Fleet API SuperNodes use) to the
  SuperLink, re-encrypted and verified against the home's CA. Every other path, the Control
  API's ``/v1/control/`` included, is answered 404 by nginx itself.

``start`` then submits the fedpref Flower App (the same ServerApp/ClientApp as the
simulation, from a generated app folder ``DIR/app``) with ``flwr run`` to the loopback
Control API. The ServerApp keeps its ledger, checkpoints and history in ``DIR/state/server``
across runs: a new ``start`` continues the round count and the privacy ledger.

**One server per home.** ``start`` takes an exclusive ``flock`` on ``DIR/run/processes.json.lock``
before it checks whether the home runs, and the SuperLink inherits it: the lock is held from the
check until the SuperLink ends (the foreground ``start``, which supervises the run, holds it too),
and the kernel drops it on any exit, SIGKILL included. A second ``start`` meanwhile is refused in
one line (exit 33) and touches nothing.

**The whole tree.** The SuperLink starts Flower's SuperExec in a session of its own, and the
SuperExec the ``flwr-serverapp`` of each run. A ServerApp watches its SuperExec's pid only, which
a zombie keeps (an init that does not reap orphans), and the SuperLink, waiting for the
ServerApp's connections to close, does not stop until it does. So ``stop`` walks the recorded
processes' trees first and stops those detached descendants before the recorded process groups
(:func:`_terminate`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fedpref.common.atomic import write_bytes_atomic, write_text_atomic
from fedpref.common.errors import (
    AlreadyRunningError,
    ConfigError,
    DataError,
    FedPrefError,
    HomeError,
    NotRunningError,
)
from fedpref.common.netaddr import parse_address
from fedpref.common.processes import (
    Descendant,
    UnknownProcessError,
    descendants,
    flower_env,
    hold_exclusive_lock,
    process_started,
    same_process,
    signal_group,
    signal_process,
    upgrade_legacy_start,
)

CONNECTION = "fedpref"  # the SuperLink connection name in DIR/flwr/config.toml


@dataclass(frozen=True)
class ServerHome:
    root: Path
    address: str  # device-facing HOST:PORT (nginx)
    superlink: str  # loopback HOST:PORT of the SuperLink
    ca: Path
    certificate: Path
    private_key: Path
    trust_root: Path

    @classmethod
    def load(cls, root: Path) -> ServerHome:
        root = Path(root).expanduser().absolute()
        path = root / "config.toml"
        if not root.is_dir():
            raise HomeError(f"--home {root} does not exist; run `fedpref-server init --home {root}` first")
        if not path.is_file():
            raise HomeError(f"{root} is not a fedpref server home (no config.toml); run "
                            f"`fedpref-server init --home {root}` or fix --home")
        try:
            server = tomllib.loads(path.read_text())["server"]
        except tomllib.TOMLDecodeError as e:
            raise DataError(f"{path}: not valid TOML ({e}); fix the file") from None
        except KeyError:
            raise DataError(f"{path}: no [server] table; re-create the home with `fedpref-server init`") from None
        host, port = parse_address(str(server.get("address", "")))
        link = str(server.get("superlink", f"127.0.0.1:{port + 1}"))
        link_host, _ = parse_address(link)
        if link_host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(f"{path}: [server] superlink = {link!r} must be a loopback address: Flower's Control "
                              "API has no login and must not be reachable from devices")
        return cls(root=root, address=f"{host}:{port}", superlink=link,
                   ca=root / str(server.get("ca", "tls/ca.pem")),
                   certificate=root / str(server.get("certificate", "tls/server.pem")),
                   private_key=root / str(server.get("private_key", "tls/server.key")),
                   trust_root=root / str(server.get("trust_root", "keys/root.json")))

    # -- layout -------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def server_dir(self) -> Path:  # AppRun(workdir=state).server_dir
        return self.state / "server"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def processes_file(self) -> Path:
        return self.run_dir / "processes.json"

    @property
    def lock_file(self) -> Path:  # held from `start`'s check until its SuperLink ends (hold_server_lock)
        return self.run_dir / "processes.json.lock"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def app_dir(self) -> Path:
        return self.root / "app"

    @property
    def policy_file(self) -> Path:
        return self.state / "policy.json"

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)


# --- processes -------------------------------------------------------------------------------


def _alive(proc: dict) -> bool:
    """The recorded process still runs: its pid and start time (a recycled pid started later)."""
    return same_process(int(proc["pid"]), proc["started"])


def recorded(home: ServerHome) -> dict:
    """``run/processes.json``: what ``start`` started, each process with its pid and start time."""
    try:
        rec = json.loads(home.processes_file.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise DataError(f"{home.processes_file}: not valid JSON ({e}); check for stray fedpref processes, "
                        "then delete the file") from None
    procs = rec.get("processes", []) if isinstance(rec, dict) else None
    if not isinstance(procs, list) or not all(isinstance(p, dict) for p in procs):
        raise DataError(f"{home.processes_file}: not a record of processes; check for stray fedpref processes, "
                        "then delete the file")
    if undated := [p for p in procs if "started" not in p]:
        pids = ", ".join(f"{p.get('name')} (pid {p.get('pid')})" for p in undated)
        raise DataError(f"{home.processes_file}: no start time for {pids} (written by an older fedpref); stop "
                        "those processes by hand, then delete the file")
    for p in procs:
        pid, started = p.get("pid"), p["started"]
        if not (type(pid) is int and pid > 0 and (started is None or type(started) in (int, float))):
            raise DataError(f"{home.processes_file}: {p.get('name')}: pid {pid!r}, start {started!r} are not a "
                            "process id and a start time; check for stray fedpref processes, then delete the file")
        if started is not None:
            try:  # a wall-clock start of an older fedpref: in today's clock-step-proof form, if it still matches
                p["started"] = upgrade_legacy_start(pid, float(started))
            except UnknownProcessError as e:
                raise DataError(f"{home.processes_file}: {p.get('name')}: {e}, then delete the file") from None
    return rec


def running(home: ServerHome) -> list[dict]:
    return [p for p in recorded(home).get("processes", []) if _alive(p)]


def _spawn(name: str, cmd: list[str], log: Path, env: dict[str, str], *, lock: BinaryIO | None = None) -> dict:
    """Start ``cmd`` in a session of its own; ``lock`` (the home's server lock) is inherited, so
    that the process holds it for its lifetime."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab", buffering=0) as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, pass_fds=(lock.fileno(),) if lock else ())
    return {"name": name, "pid": proc.pid, "started": process_started(proc.pid), "cmd": cmd, "log": str(log)}


def _wait_port(address: str, proc: dict, *, timeout: float = 60.0) -> None:
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(proc):
            tail = _tail(Path(proc["log"]))
            raise ConfigError(f"{proc['name']} exited at start-up: {tail}; see {proc['log']}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise ConfigError(f"{proc['name']} did not listen on {address} within {timeout:.0f} s; see {proc['log']}")


def _tail(log: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if "rror" in ln or "emerg" in ln] or lines
    return " | ".join(errors[-n:])


def _port_free(address: str) -> bool:
    host, port = parse_address(listen_address(address))
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# How long detached descendants (Flower's SuperExec and ServerApps) get to end on SIGTERM before
# the recorded processes are signalled (a ServerApp force-exits 5 s into its graceful exit), s
CHILDREN_GRACE_S = 10.0
REAP_WAIT_S = 5.0  # after SIGKILL: until the kernel has taken the processes (and their locks) away


def _terminate(procs: list[dict], *, grace: float = 20.0, children_grace: float = CHILDREN_GRACE_S) -> list[str]:
    """Stop each recorded process and everything it started; returns the recorded names.

    The recorded processes run in sessions of their own, and their process groups are signalled
    (:func:`~fedpref.common.processes.signal_group`: not one whose pid was recycled). Flower's
    SuperLink starts its SuperExec in yet another session, and the SuperExec the ServerApps: no
    signal to the SuperLink's group reaches them, and a ServerApp that outlives its SuperExec can
    run on (it watches the SuperExec's pid, which a zombie keeps), while the SuperLink waits for
    the ServerApp's connections to close. So the trees are walked first (and again while waiting:
    a process must be seen before it is orphaned), and:

    1. the detached descendants (outside every recorded group) get SIGTERM: a ServerApp exits
       gracefully, reporting to the SuperLink, which still runs; up to ``children_grace`` s;
    2. the recorded groups get SIGTERM; up to ``grace`` s for them and every descendant seen;
    3. what is left gets SIGKILL: the recorded groups, the groups led by descendants and every
       other descendant, each only while its pid and boot-relative start still match what was
       seen (:func:`~fedpref.common.processes.signal_process`): a recycled pid is never signalled.
    """
    seen: dict[int, Descendant] = {}

    def look() -> None:
        for p in procs:
            for d in descendants(int(p["pid"]), p["started"]):
                seen.setdefault(d.pid, d)

    def alive(ds: list[Descendant]) -> list[Descendant]:
        return [d for d in ds if same_process(d.pid, d.started)]

    def wait(until: float, what: Callable[[], object]) -> None:  # until nothing is left of `what`
        while time.monotonic() < until and what():
            time.sleep(0.2)
            look()

    look()
    groups = {int(p["pid"]) for p in procs}
    for d in [d for d in seen.values() if d.pgid not in groups]:
        signal_process(d.pid, d.started, signal.SIGTERM)
    wait(time.monotonic() + children_grace,
         lambda: alive([d for d in seen.values() if d.pgid not in groups]))
    for p in procs:
        signal_group(int(p["pid"]), p["started"], signal.SIGTERM)
    wait(time.monotonic() + grace, lambda: any(_alive(p) for p in procs) or alive(list(seen.values())))
    look()
    left = alive(list(seen.values()))
    for p in procs:
        signal_group(int(p["pid"]), p["started"], signal.SIGKILL)  # leftovers of the group, if any
    for d in seen.values():  # a group a descendant led: what is left of it, even after its leader
        if d.leader:
            signal_group(d.pid, d.started, signal.SIGKILL)
    for d in left:
        signal_process(d.pid, d.started, signal.SIGKILL)
    deadline = time.monotonic() + REAP_WAIT_S
    while time.monotonic() < deadline and (any(_alive(p) for p in procs) or alive(left)):
        time.sleep(0.05)
    return [p["name"] for p in procs]


# --- generated files -------------------------------------------------------------------------


def listen_address(address: str) -> str:
    """Where nginx listens for ``address``: that IP, or every interface for a host name (the
    name is for the certificate and the devices; it need not resolve on the server itself)."""
    import ipaddress

    host, port = parse_address(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"0.0.0.0:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def nginx_conf(home: ServerHome, link: str) -> str:
    listen = listen_address(home.address)
    tmp = home.run_dir / "nginx"
    return f"""# written by `fedpref-server start`; regenerated at every start
worker_processes 1;
pid {home.run_dir / 'nginx.pid'};
error_log {home.logs / 'nginx-error.log'} warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
    access_log {home.logs / 'nginx-access.log'};
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server_tokens off;
    server {{
        listen {listen} ssl;
        ssl_certificate {home.certificate};
        ssl_certificate_key {home.private_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 512m;
        # Only the Fleet API: SuperNodes register, pull messages and push replies here.
        location /v1/fleet/ {{
            proxy_pass https://{link};
            proxy_ssl_trusted_certificate {home.ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        # The Control API (/v1/control/: submit runs, register nodes) and the Runtime API
        # stay on loopback: nothing else is served here.
        location / {{ return 404; }}
    }}
}}
"""


SERVERAPP = "fedpref.server.app:app"
SEEDED_KEYS = ("seed", "deterministic-noise", "deterministic_noise")  # simulation-only switches


def app_pyproject(serverapp: str = SERVERAPP) -> str:
    from importlib.metadata import version

    return f"""# The fedpref Flower App as the operator's server submits it (`fedpref-server start`).
# The components are the installed fedpref's, the same ServerApp and ClientApp as in simulation.
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedpref-deployment"
version = "{version('fedpref')}"
description = "fedpref: personalized preference learning within signed safety bounds"
dependencies = []  # devices and server run fedpref from their own environment

[tool.flwr.app]
publisher = "fedpref"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "fedpref.client.app:app"

[tool.flwr.app.config]
config = ""
data = ""
workdir = ""
method = "personalized"
cache = ""
seed = 0                     # not used in deployment: every DP draw comes from the OS CSPRNG
secure-aggregation = true
policy = ""
root = ""
deterministic-noise = false  # a simulation switch; `fedpref-server start` refuses it, devices decline it
rounds = 0
"""


def _toml_str(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else ("true" if v is True else "false" if v is False else repr(v))


def _write_flwr_config(home: ServerHome) -> None:
    write_text_atomic(home.flwr_home / "config.toml",
                      f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                      f'address = "{home.superlink}"\nroot-certificates = "{home.ca}"\n')


def flwr(home: ServerHome, *args: str, timeout: float = 120.0) -> dict:
    """Run the ``flwr`` CLI against this home's SuperLink; its JSON output, or a clear error."""
    exe = shutil.which("flwr", path=os.path.dirname(sys.executable)) or shutil.which("flwr")
    if exe is None:
        raise ConfigError("the flwr command is not installed in this environment; reinstall fedpref")
    _write_flwr_config(home)
    try:
        out = subprocess.run([exe, *args, "--format", "json"], capture_output=True, text=True, env=home.env(),
                             timeout=timeout, cwd=home.root)
    except subprocess.TimeoutExpired:
        raise NotRunningError(f"flwr {args[0]} timed out after {timeout:.0f} s; is the server running?") from None
    try:
        result = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        result = {"success": False, "error-message": (out.stderr or out.stdout).strip()[-500:]}
    if not result.get("success", False):
        msg = " ".join(str(result.get("error-message", out.stderr)).split())
        raise FedPrefError(f"flwr {' '.join(args[:2])} failed: {msg}")
    return result


# --- start / stop -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    run_id: int
    first_round: int
    last_round: int
    policy_version: int
    processes: list[dict]
    # the home's server lock (hold_server_lock), also held by the SuperLink: whoever supervises the
    # run keeps it (the foreground `start`); closing it, or exiting, leaves the SuperLink's hold
    lock: BinaryIO | None = field(default=None, repr=False, compare=False)


def _history(home: ServerHome) -> list[dict]:
    try:
        return json.loads((home.server_dir / "history.json").read_text())
    except FileNotFoundError:
        return []
    except ValueError as e:
        raise DataError(f"{home.server_dir / 'history.json'}: not valid JSON ({e}); restore it from a backup") from None


def _rounds_done(home: ServerHome, *, halted_keep_numbers: bool = False) -> int:
    """The last released round (charged, or checkpointed): halted attempts do not count, unless
    they keep their number (q < 1: a halted round is never retried; as ``app.resume_point``)."""
    from fedpref.server.privacy import PrivacyLedger
    from fedpref.server.strategy import released_rounds

    ledger = home.server_dir / "ledger.jsonl"
    charged = [e.round for e in PrivacyLedger(ledger).entries()] if ledger.exists() else []
    history = _history(home)
    used = history if halted_keep_numbers else released_rounds(history)
    return max([*charged, *(h["server_round"] for h in used), 0])


def _install_policy(home: ServerHome, envelope: Path, backbone_sha256: str) -> dict:
    """Verify the envelope as devices will, keep a copy in the home; the policy now in force."""
    from fedpref.server.app import load_server_policy

    policy = load_server_policy(envelope, home.trust_root, backbone_sha256=backbone_sha256)
    current = _policy_in_force(home)
    if current and policy.version < current["version"]:
        raise ConfigError(f"--policy {envelope} is v{policy.version}, older than v{current['version']} in force; "
                          "devices would refuse it (rollback): sign a higher --version")
    copy = home.state / "policies" / f"policy-v{policy.version}.dsse.json"
    write_bytes_atomic(copy, policy.envelope)
    record = {"version": policy.version, "digest": policy.digest, "envelope": str(copy),
              "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | {
                  k: v for k, v in policy.summary.items() if k in ("name", "expires_at", "issued_at")}
    write_text_atomic(home.policy_file, json.dumps(record, indent=1))
    return record


def _summary(home: ServerHome) -> dict:
    try:
        return json.loads((home.server_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _policy_in_force(home: ServerHome) -> dict | None:
    try:
        return json.loads(home.policy_file.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise DataError(f"{home.policy_file}: not valid JSON ({e}); start again with --policy ENVELOPE") from None


# What `fedpref-server init` writes for [federation] beyond the defaults: settings that work with
# secure aggregation (always on in deployment) from three devices up. q = 1 with
# min_available_clients >= [secagg] min_cohort means no round halts for want of sampled devices;
# z = 1.7 keeps the default 10 rounds within max_epsilon_user = 10 at q = 1 (RDP: ε ≈ 9.9 at δ = 1e-5).
INIT_FEDERATION = {"client_sample_rate": 1.0, "min_available_clients": 3, "server_noise_multiplier": 1.7,
                   "max_epsilon_user": 10.0, "report_eval_metrics": False}
INIT_LOCAL = {"max_epsilon_sample": 10.0}
# the final fit of the demo (RESULTS.md); the rounds train the private adapter too, as the default model's
# learnt style projection needs (with a public attribute basis, rounds_train_private = false measured better)
INIT_PERSONALIZE = {"epochs": 5, "head_learning_rate": 0.05, "rounds_train_private": True}


def initial_config(host: str, port: int) -> dict[str, dict]:
    """The tables of a new home's ``config.toml`` (``fedpref-server init``), checked as ``start`` will."""
    from fedpref.common.tomlconfig import build, to_plain
    from fedpref.model.config import ModelConfig
    from fedpref.server.config import FederationConfig, LocalConfig, PersonalizeConfig
    from fedpref.server.secagg import SecAggConfig

    fed = to_plain(FederationConfig()) | INIT_FEDERATION
    secagg = to_plain(SecAggConfig())
    check_secure_aggregation(build(FederationConfig, fed, where="init [federation]"), SecAggConfig(), where="init")
    return {
        "server": {"address": f"{host}:{port}", "superlink": f"127.0.0.1:{port + 1 if port < 65535 else port - 1}",
                   "ca": "tls/ca.pem", "certificate": "tls/server.pem",
                   "private_key": "tls/server.key", "trust_root": "keys/root.json", "state": "state"},
        "model": to_plain(ModelConfig()), "federation": fed, "local": to_plain(LocalConfig()) | INIT_LOCAL,
        "personalize": to_plain(build(PersonalizeConfig, INIT_PERSONALIZE, where="init [personalize]")),
        "secagg": secagg,
    }


def check_secure_aggregation(fed: Any, secagg: Any, *, where: str) -> float:
    """[federation] against [secagg] (:func:`fedpref.server.secagg.check_cohort_settings`): one-line
    ConfigError naming both keys and the fix; returns the per-round halt probability."""
    from fedpref.server.secagg import check_cohort_settings

    return check_cohort_settings(fed, secagg, where=where)


def refuse_seeded(config: dict, *, where: str) -> None:
    """A deployment never seeds its DP draws: refuse any setting that would (one line)."""
    runtime = config.get("runtime", {})
    for key in SEEDED_KEYS:
        for table, value in ((where, config.get(key)), (f"{where} [runtime]", runtime.get(key) if isinstance(runtime, dict) else None)):
            if value not in (None, False, 0, ""):
                raise ConfigError(f"{table}: {key} = {value!r}; seeded DP noise is a simulation switch "
                                  "(fedpref-sim), never deployed: remove it")


def start(home: ServerHome, *, rounds: int | None, policy: Path | None, extra_run_config: dict | None = None,
          serverapp: str = SERVERAPP) -> Started:
    """Start SuperLink and nginx, submit the run; returns at once (the processes keep running).

    ``serverapp`` is for attack experiments in tests only (e.g.
    ``fedpref.simulations.attacks:tampering_server_app``); the CLI never sets it.
    """
    from fedpref.common.tomlconfig import read_toml
    from fedpref.server.app import load_server_settings

    refuse_seeded(read_toml(home.config), where=str(home.config))
    refuse_seeded(extra_run_config or {}, where="run config")
    settings = load_server_settings(str(home.config))  # fail before starting anything
    from fedpref.server.config import check_personalize_model

    check_personalize_model(settings.personalize, settings.model.adapter, where=str(home.config))
    check_rounds(home, settings, rounds)
    from fedpref.server.secagg import load_secagg_config

    check_secure_aggregation(settings.federation, load_secagg_config(str(home.config)), where=str(home.config))
    for f in (home.ca, home.certificate, home.private_key, home.trust_root):
        if not f.is_file():
            raise HomeError(f"{f} is missing; the home is incomplete (re-create it with `fedpref-server init`)")

    lock = hold_server_lock(home)  # before the check: no second start can pass it until this server ends
    try:
        return _start_locked(home, lock, settings, rounds=rounds, policy=policy, extra_run_config=extra_run_config,
                             serverapp=serverapp)
    except BaseException:
        lock.close()  # what was started is stopped again; nothing holds the lock after this
        raise


def check_rounds(home: ServerHome, settings: Any, rounds: int | None) -> int:  # noqa: ANN401 (ServerSettings)
    """The rounds to run now (``--rounds``, default ``[federation] rounds``), or a one-line ConfigError.

    0 runs no round: the ServerApp only offers the released model for the final personalization
    to every connected device that has not answered for it (a device that joined since)."""
    more = rounds if rounds is not None else settings.federation.rounds
    if more < 0:
        raise ConfigError(f"--rounds {more}; give 0 (no new round: only the final personalization) or more")
    if more == 0:
        if settings.personalize.epochs == 0:
            raise ConfigError(f"--rounds 0 only offers the final personalization, and {home.config} [personalize] "
                              "epochs = 0; set epochs (e.g. 5), or give --rounds N >= 1")
        if not (home.server_dir / "checkpoints" / "LATEST").exists():
            raise ConfigError("--rounds 0 offers the released model for personalization, but no round has been "
                              "released on this home yet; give --rounds N >= 1")
    return more


def hold_server_lock(home: ServerHome) -> BinaryIO:
    """The home's server lock (:func:`~fedpref.common.processes.hold_exclusive_lock` on
    ``run/processes.json.lock``), or AlreadyRunningError in one line: another ``start`` is
    between its check and its SuperLink, or this home's SuperLink (or the foreground ``start``
    that supervises it) runs."""
    return hold_exclusive_lock(home.lock_file, busy=(
        f"{home.root} is already running, or another `fedpref-server start` is starting it (it holds "
        f"{home.lock_file}); see `fedpref-server status --home {home.root}`, stop it with "
        f"`fedpref-server stop --home {home.root}`"))


def _start_locked(home: ServerHome, lock: BinaryIO, settings: Any, *, rounds: int | None, policy: Path | None,  # noqa: ANN401
                  extra_run_config: dict | None, serverapp: str) -> Started:
    """:func:`start`, under the home's server lock: check that nothing runs, then start."""
    from fedpref.model.backbone import load_backbone

    if alive := running(home):  # a server of an older fedpref (no lock), or nginx outliving its SuperLink
        names = ", ".join(f"{p['name']} (pid {p['pid']})" for p in alive)
        raise AlreadyRunningError(f"{home.root} is already running: {names}; `fedpref-server stop --home {home.root}` first")
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if nginx is None:
        raise ConfigError("nginx is not installed; it is the TLS reverse proxy that exposes only the Fleet API "
                          "(Debian/Ubuntu: apt-get install nginx-light)")
    for addr in (home.address, home.superlink):
        if not _port_free(addr):
            raise AlreadyRunningError(f"{addr} is already in use by another program; free it or change [server] in {home.config}")
    if policy is not None:
        in_force: dict | None = _install_policy(home, policy, load_backbone(settings.model.backbone or None).sha256)
    else:
        in_force = _policy_in_force(home)
    done = _rounds_done(home, halted_keep_numbers=settings.federation.client_sample_rate < 1.0)
    more = check_rounds(home, settings, rounds)

    for d in (home.run_dir / "nginx", home.logs, home.state, home.flwr_home, home.app_dir):
        d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(home.run_dir / "nginx.conf", nginx_conf(home, home.superlink))
    write_text_atomic(home.app_dir / "pyproject.toml", app_pyproject(serverapp))
    link_host, link_port = parse_address(home.superlink)
    exe_dir = os.path.dirname(sys.executable)
    superlink = shutil.which("flower-superlink", path=exe_dir) or "flower-superlink"
    procs: list[dict] = []
    try:
        procs.append(_spawn("superlink", [
            superlink, "--ssl-ca-certfile", str(home.ca), "--ssl-certfile", str(home.certificate),
            "--ssl-keyfile", str(home.private_key), "--database", str(home.state / "superlink.db"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", link_host, "--port", str(link_port)], home.logs / "superlink.log", home.env(), lock=lock))
        _save_processes(home, procs)
        _wait_port(home.superlink, procs[0])
        procs.append(_spawn("nginx", [nginx, "-c", str(home.run_dir / "nginx.conf"), "-e",
                                      str(home.logs / "nginx-error.log")], home.logs / "nginx.log", home.env()))
        _save_processes(home, procs)
        _wait_port(listen_address(home.address).replace("0.0.0.0", "127.0.0.1"), procs[1])
        run_config = {
            "config": str(home.config), "workdir": str(home.state), "method": "personalized",
            "secure-aggregation": True, "rounds": done + more,
            "policy": in_force["envelope"] if in_force else "", "root": str(home.trust_root) if in_force else "",
        } | (extra_run_config or {})
        rc_file = home.run_dir / "run-config.toml"
        write_text_atomic(rc_file, "".join(f"{k} = {_toml_str(v)}\n" for k, v in run_config.items()))
        submitted = flwr(home, "run", str(home.app_dir), CONNECTION, "--run-config", str(rc_file))
        run_id = int(submitted["run-id"])
        _save_processes(home, procs, run_id=run_id, rounds=(done + 1, done + more))
    except BaseException:
        _terminate(procs, grace=5)
        home.processes_file.unlink(missing_ok=True)
        raise
    return Started(run_id, done + 1, done + more, in_force["version"] if in_force else 0, procs, lock)


def _save_processes(home: ServerHome, procs: list[dict], **extra: Any) -> None:
    write_text_atomic(home.processes_file, json.dumps(
        {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "processes": procs, **extra}, indent=1))


def stop(home: ServerHome) -> list[str]:
    """Stop what ``start`` recorded (and only that); returns the names stopped.

    The record is removed only under the home's server lock and only if it is still the one
    read here: once the SuperLink is gone its lock is free, and a new ``start`` may take the
    home (and write its own record) while this ``stop`` still waits on a lingering ServerApp;
    that record, and the server it describes, stay. A record whose processes outlived the
    signals stays too (``status`` shows them)."""
    raw = _read_record_bytes(home)
    rec = recorded(home)
    procs = rec.get("processes", [])
    alive = [p for p in procs if _alive(p)]
    stopped = _terminate(alive) if alive else []
    if procs:
        write_text_atomic(home.run_dir / "last-run.json", json.dumps(rec | {"stopped_at": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    if any(_alive(p) for p in procs):
        return stopped
    try:
        lock = hold_server_lock(home)
    except AlreadyRunningError:  # a new start owns the home now: its record is not ours to remove
        return stopped
    try:
        if raw is not None and _read_record_bytes(home) == raw:
            home.processes_file.unlink(missing_ok=True)
    finally:
        lock.close()
    return stopped


def _read_record_bytes(home: ServerHome) -> bytes | None:
    try:
        return home.processes_file.read_bytes()
    except FileNotFoundError:
        return None


def run_state(home: ServerHome, run_id: int) -> str:
    """Flower's status of the run (``running``, ``finished:completed`` ...)."""
    try:
        runs = flwr(home, "ls", CONNECTION, "--run-id", str(run_id), timeout=30).get("runs", [])
    except FedPrefError:
        return "unknown"
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


# --- status ---------------------------------------------------------------------------------


def rounds_report(history: list[dict], run_rounds: list[int] | tuple[int, int] | None, *,
                  stopped_reason: str | None = None, finished: bool = False) -> str:
    """One plain line: released rounds of the run against those asked for, and why fewer.

    e.g. ``3 of 5 rounds released (rounds 1..5); 2 attempts halted: round 4: 2 node(s) sampled, ...;
    stopped at round 4: 3 attempts in a row halted ...``.
    """
    first, last = (int(run_rounds[0]), int(run_rounds[1])) if run_rounds else (1, None)
    if last is not None and last < first:  # `start --rounds 0`
        return "no new round (the run only offered the released model for the final personalization)"
    mine = [h for h in history if h["server_round"] >= first and (last is None or h["server_round"] <= last)]
    released = sum(1 for h in mine if not h.get("halted"))
    halted = [h for h in mine if h.get("halted")]
    asked = f" of {last - first + 1}" if last is not None else ""
    line = f"{released}{asked} rounds released" + (f" (rounds {first}..{last})" if last is not None else "")
    if halted:
        reasons: dict[str, list[int]] = {}
        for h in halted:
            reasons.setdefault(str(h["halted"]), []).append(int(h["server_round"]))
        line += f"; {len(halted)} attempt{'s' * (len(halted) != 1)} halted (nothing released or charged): " + "; ".join(
            f"round {', '.join(map(str, sorted(set(r))))}: {why}" + (f" (×{len(r)})" if len(r) > 1 else "")
            for why, r in reasons.items())
    if stopped_reason:
        line += f"; {stopped_reason}"
    elif finished and last is not None and released < last - first + 1:
        line += "; the run ended before the rest"
    return line


def _personalize_report(home: ServerHome) -> dict | None:
    """The last final personalization (``personalize.json``): its model round, fitted/declined/rejected counts."""
    from fedpref.server.personalize import load_record

    rec = load_record(home.server_dir)
    if rec is None:
        return None
    return {"model_round": rec.model_round, "population": rec.population, "fitted": rec.fitted,
            "fitted_earlier": rec.fitted_earlier, "declined_count": len(rec.declined), "rejected_count": len(rec.rejected),
            "declined": rec.declined[-10:], "rejected": rec.rejected[-10:], "missing": rec.missing,
            "seconds": round(rec.seconds, 1)}


def status(home: ServerHome) -> dict:
    from fedpref.server.privacy import PrivacyLedger

    history = _history(home)
    ledger_path = home.server_dir / "ledger.jsonl"
    ledger = [asdict(e) for e in PrivacyLedger(ledger_path).entries()] if ledger_path.exists() else []
    rec = recorded(home)
    alive = running(home)
    latest = home.server_dir / "checkpoints" / "LATEST"
    last = history[-1] if history else None
    fed = {}
    try:
        fed = tomllib.loads(home.config.read_text()).get("federation", {})
    except (OSError, tomllib.TOMLDecodeError):
        pass
    released = [h for h in history if not h.get("halted")]
    halted = [h for h in history if h.get("halted")]
    summary = _summary(home)
    run_status = run_state(home, rec["run_id"]) if alive and rec.get("run_id") else None
    ended = not alive or (run_status or "").startswith("finished")  # summary.json is the run's only then
    if not rec:  # stopped: report on the run `stop` recorded last
        try:
            rec_rounds = json.loads((home.run_dir / "last-run.json").read_text()).get("rounds")
        except (OSError, ValueError):
            rec_rounds = None
    else:
        rec_rounds = rec.get("rounds")
    out: dict[str, Any] = {
        "home": str(home.root),
        "running": bool(alive),
        "processes": [{"name": p["name"], "pid": p["pid"]} for p in alive],
        "device_address": home.address,
        "run": {"id": rec.get("run_id"), "rounds": rec.get("rounds"), "status": run_status},
        # released rounds only: a halted attempt (secure aggregation) releases and charges nothing
        "rounds_completed": len(released),
        "rounds_halted": len(halted),
        "halted": [{"round": h["server_round"], "reason": h["halted"]} for h in halted[-10:]],
        "rounds_report": rounds_report(
            history, rec_rounds, stopped_reason=summary.get("stopped_reason") if ended else None, finished=ended),
        "last_round": None if last is None else {
            "round": last["server_round"], "population": last["population"], "sampled": last["sampled"],
            "responded": last["replied"], "accepted": last["accepted"], "rejected": last["rejected"],
            "declined": last["declined"], "policy_version": last.get("policy_version", 0),
            "halted": last.get("halted", "")},
        "epsilon_user": ledger[-1]["epsilon"] if ledger else 0.0,
        "delta": fed.get("delta"),
        "max_epsilon_user": fed.get("max_epsilon_user"),
        "ledger": ledger,
        "policy": _policy_in_force(home),
        "stopped_reason": summary.get("stopped_reason"),
        "personalize": _personalize_report(home),
        "latest_checkpoint": str(home.server_dir / "checkpoints" / latest.read_text().strip()) if latest.exists() else None,
    }
    return out


# --- nodes ----------------------------------------------------------------------------------


def _require_running(home: ServerHome) -> None:
    if not any(p["name"] == "superlink" for p in running(home)):
        raise NotRunningError(f"the server of {home.root} is not running; nodes are registered with the running "
                              f"SuperLink: `fedpref-server start --home {home.root} --detach` first")


def nodes_add(home: ServerHome, public_key: Path) -> dict:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        key = load_ssh_public_key(public_key.read_bytes())
    except OSError as e:
        raise ConfigError(f"{public_key}: {e.strerror}; give the device's identity/node.pub") from None
    except (ValueError, TypeError) as e:  # cryptography raises ValueError/UnsupportedAlgorithm(ValueError)
        raise DataError(f"{public_key}: not an OpenSSH public key ({e}); give the device's identity/node.pub") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DataError(f"{public_key}: not an ECDSA key; Flower SuperNode authentication uses ECDSA (NIST curves)")
    _require_running(home)
    out = flwr(home, "supernode", "register", str(public_key.absolute()), CONNECTION)
    return {"node_id": str(out["node-id"]), "public_key": str(public_key)}


def nodes_list(home: ServerHome) -> list[dict]:
    _require_running(home)
    return list(flwr(home, "supernode", "list", CONNECTION).get("nodes", []))


def nodes_remove(home: ServerHome, node_id: str) -> None:
    _require_running(home)
    flwr(home, "supernode", "unregister", node_id, CONNECTION)
