"""The deployment, end to end, with real processes on loopback.

``fedpref-server`` (SuperLink with TLS, SuperNode authentication and a SQLite database, behind
nginx that exposes only the Fleet API) and three ``fedpref-agent`` devices, each with its own
home, its own persona data and its own Flower SuperNode. Two rounds of the same ServerApp and
ClientApp as the simulation; then a new policy version; then a tampered envelope; then the
bad inputs an operator or a user will try. Every process the test starts is stopped.

nginx comes from the distribution (`.ci/run` installs it). Without it the test is skipped,
unless FEDPREF_REQUIRE_NGINX=1 (set by `.ci/run`), where its absence is a failure.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
if NGINX is None:
    if os.environ.get("FEDPREF_REQUIRE_NGINX") == "1":
        raise RuntimeError("nginx is required for the deployment test (apt-get install nginx-light)")
    pytest.skip("nginx is not installed (apt-get install nginx-light); .ci/run installs it", allow_module_level=True)

ENV = dict(os.environ, FEDPREF_KEY_PASSPHRASE="deployment-test", PYTHONUNBUFFERED="1")
ROUND_TIMEOUT = 420.0


def cli(tool: str, *args: object, check: int | None = 0, timeout: float = 180) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)
    if check is not None:
        assert out.returncode == check, f"{tool} {' '.join(map(str, args))} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def one_line_error(out: subprocess.CompletedProcess, code: int) -> str:
    """The documented exit code, one line on stderr, no traceback."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_status(home: Path) -> dict:
    return json.loads(cli("fedpref-server", "status", "--home", home, "--json").stdout)


def wait_for(pred, what: str, procs: list[subprocess.Popen], timeout: float = ROUND_TIMEOUT):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"device agents exited while waiting for {what}: {dead}"
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def run_finished(home: Path, rounds: int):  # noqa: ANN201
    st = server_status(home)
    return st if st["rounds_completed"] >= rounds and (st["run"]["status"] or "").startswith("finished") else None


def edit_toml(path: Path, replacements: dict[str, str]) -> None:
    text = path.read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)


def lora_bytes(safetensors_bytes: bytes) -> list[bytes]:
    """64-byte windows of every tensor's raw data in a safetensors file."""
    n = int.from_bytes(safetensors_bytes[:8], "little")
    header = json.loads(safetensors_bytes[8 : 8 + n])
    data = safetensors_bytes[8 + n :]
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        if b - a >= 64 and any(data[a : a + 64]):
            out.append(data[a : a + 64])
    return out


def files_under(root: Path):  # noqa: ANN201
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                yield p, p.read_bytes()
            except OSError:
                pass


def write_feedback(path: Path, pairs) -> Path:  # noqa: ANN001
    """A device's own preference pairs, as `fedpref-agent feedback import` reads them."""
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    return path


def enroll(d, home: Path, data: Path) -> str:  # noqa: ANN001
    """A new device: `fedpref-agent init` against the server, its data imported, registered with
    `fedpref-server nodes add`. Returns its node id."""
    srv = d.srv
    cli("fedpref-agent", "init", "--home", home, "--server", f"127.0.0.1:{d.port}", "--ca", srv / "tls" / "ca.pem",
        "--root", srv / "keys" / "root.json", "--backbone", deployment_backbone(srv))
    cli("fedpref-agent", "feedback", "import", "--home", home, data)
    return json.loads(cli("fedpref-server", "nodes", "add", home / "identity" / "node.pub", "--home", srv,
                          "--json").stdout)["node_id"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_minilm_dir):  # noqa: ANN001, ANN201
    from fedpref.simulations.persona import PersonaConfig, generate, safety_corpus

    base = tmp_path_factory.mktemp("deploy")
    srv = base / "server"
    port, link = free_port(), free_port()
    cli("fedpref-server", "init", "--home", srv, "--address", f"127.0.0.1:{port}")
    # what init writes for three devices and secure aggregation (set here too, whatever init wrote)
    text = (srv / "config.toml").read_text()
    for key, value in (("client_sample_rate", "1.0"), ("min_available_clients", "3")):
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
    (srv / "config.toml").write_text(text)
    edit_toml(srv / "config.toml", {
        f'superlink = "127.0.0.1:{port + 1}"': f'superlink = "127.0.0.1:{link}"',
        'backbone = ""': f'backbone = "{tiny_minilm_dir}"',
        "rounds = 10": "rounds = 2", "max_epsilon_user = 10.0": "max_epsilon_user = 100.0",
        "round_timeout_s = 3600.0": "round_timeout_s = 180.0",
        "batch_size = 16": "batch_size = 8", "max_epsilon_sample = 10.0": "max_epsilon_sample = 100.0",
        # [personalize]: one epoch, so the devices' own ε_sample budget (10, their default terms) admits the
        # first final fit and round 3, and declines the second fit (24 pairs: 3 DP-SGD steps an epoch)
        "epochs = 5": "epochs = 1",
    })
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in safety_corpus(PersonaConfig(), n_per_class=30)))
    cli("fedpref-server", "policy", "build", "--data", corpus, "--backbone", tiny_minilm_dir, "--out", base / "bundle")
    expires = f"{datetime.now(timezone.utc).year + 1}-06-01"
    for v in (1, 2):
        cli("fedpref-server", "policy", "sign", base / "bundle", "--home", srv, "--version", v,
            "--expires", expires, "--out", base / f"policy-v{v}.dsse.json")

    data = generate(PersonaConfig(users=3, pairs_per_user=24, seed=3))
    by_user: dict[str, list] = {}
    for p in data.pairs:
        by_user.setdefault(p.user_id, []).append(p)
    agents = []
    for i, (user, pairs) in enumerate(sorted(by_user.items())):
        agents.append((base / f"device{i}", write_feedback(base / f"{user}.jsonl", pairs)))

    procs: list[subprocess.Popen] = []
    ns = type("Deployment", (), {})()
    ns.base, ns.srv, ns.port, ns.link, ns.agents, ns.procs = base, srv, port, link, agents, procs
    try:
        yield ns
    finally:
        cli("fedpref-server", "stop", "--home", srv, check=None)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        left = [pid for pid in os.listdir("/proc") if pid.isdigit() and str(base) in _cmdline(pid)]
        assert not left, f"processes left running: {[_cmdline(p) for p in left]}"


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow  # SuperLink, nginx and agents as real processes
def test_deployment_end_to_end(deployment) -> None:  # noqa: ANN001, PLR0915
    d = deployment
    srv = d.srv

    # --- the server starts with policy v1; a second start on the running home is refused ----
    out = cli("fedpref-server", "start", "--home", srv, "--policy", d.base / "policy-v1.dsse.json",
              "--rounds", 2, "--detach")
    assert "only the Fleet API" in out.stdout
    again = cli("fedpref-server", "start", "--home", srv, "--detach", check=None)
    assert "already running" in one_line_error(again, 33)

    # --- three devices: init, their own data, registered with `nodes add`, started --------------
    node_ids = [enroll(d, home, data) for home, data in d.agents]
    listed = json.loads(cli("fedpref-server", "nodes", "list", "--home", srv, "--json").stdout)
    assert {n["node-id"] for n in listed} == set(node_ids)
    for home, _ in d.agents:
        log = open(home.parent / f"{home.name}.out", "wb")  # noqa: SIM115
        d.procs.append(subprocess.Popen([str(BIN / "fedpref-agent"), "start", "--home", str(home)], env=ENV,
                                        stdout=log, stderr=subprocess.STDOUT))

    # --- two rounds over TLS ----------------------------------------------------------------
    st = wait_for(lambda: run_finished(srv, 2), "2 rounds", d.procs)
    assert st["rounds_completed"] == 2 and st["last_round"]["accepted"] == 3, st
    assert st["last_round"]["sampled"] == 3 and st["last_round"]["responded"] == 3
    assert st["epsilon_user"] > 0 and len(st["ledger"]) == 2
    assert st["policy"]["version"] == 1 and isinstance(st["last_round"]["rejected"], list)
    from safetensors.numpy import load_file

    ck = srv / "state" / "server" / "checkpoints"
    w1, w2 = (load_file(ck / f"round-000{r}" / "adapter_model.safetensors") for r in (1, 2))
    assert set(w1) == set(w2) and any((w1[k] != w2[k]).any() for k in w1), "the shared checkpoint did not change"

    # --- each private adapter exists only in its device's home, sealed ---------------------------
    from fedpref.client.store import DeviceStore

    server_files = list(files_under(srv))
    assert any(p.name == "superlink.db" for p, _ in server_files) and any(p.suffix == ".log" for p, _ in server_files)
    for home, _ in d.agents:
        with DeviceStore.open(home / "store") as store:
            blob = store.unseal("private_adapter")
        assert blob is not None
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]  # PEFT format
            weights = tar.extractfile("adapter_model.safetensors").read()  # type: ignore[union-attr]
        windows = lora_bytes(weights)
        assert windows
        for path, content in [*server_files, *files_under(home)]:
            assert not any(w in content for w in windows), f"private adapter bytes found in {path}"
        status = json.loads(cli("fedpref-agent", "status", "--home", home, "--json").stdout)
        assert status["pairs"] == 24 and status["policy_version"] == 1 and status["epsilon_sample"] > 0
        assert status["adapter_version"].startswith("round 2")
        personalized = json.loads((srv / "state" / "server" / "personalize.json").read_text())
        assert status["personalized_on"] == personalized["model_sha256"]
    # --- the final personalization: every device fitted its adapter on round 2's model -------------
    pers = st["personalize"]
    assert pers["model_round"] == 2 and pers["fitted"] == 3 and not pers["declined"] and not pers["rejected"], pers

    # --- a device that joins later (a new user): `start --rounds 0` offers it round 2's model, and only it --
    from fedpref.simulations.persona import PersonaConfig, generate

    late = d.base / "late"
    late_node = enroll(d, late, write_feedback(d.base / "late.jsonl",
                                               generate(PersonaConfig(users=1, pairs_per_user=24, seed=4)).pairs))
    charged = server_status(srv)["ledger"]
    spent = {h: json.loads(cli("fedpref-agent", "status", "--home", h, "--json").stdout)["epsilon_sample"]
             for h, _ in d.agents}
    cli("fedpref-server", "stop", "--home", srv)
    cli("fedpref-server", "start", "--home", srv, "--rounds", 0, "--detach")  # the policy in force stays
    joined = subprocess.Popen([str(BIN / "fedpref-agent"), "start", "--home", str(late)], env=ENV,
                              stdout=open(d.base / "late.out", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    d.procs.append(joined)

    def offered_to_all():  # noqa: ANN202
        st = server_status(srv)
        pers = st.get("personalize") or {}
        return st if pers.get("population") == 4 and pers.get("fitted", 0) + pers.get("fitted_earlier", 0) == 4 else None

    st = wait_for(offered_to_all, "the late device's final personalization", d.procs)
    pers = st["personalize"]
    assert pers["model_round"] == 2 and pers["fitted"] == 4 and not pers["declined"] and not pers["rejected"], pers
    assert st["rounds_completed"] == 2 and st["ledger"] == charged  # no round: nothing released, nothing charged
    sha = json.loads((srv / "state" / "server" / "personalize.json").read_text())["model_sha256"]
    late_status = json.loads(cli("fedpref-agent", "status", "--home", late, "--json").stdout)
    assert late_status["personalized_on"] == sha and 0 < late_status["epsilon_sample"] <= 10
    assert late_status["policy_version"] == 1  # it verified the policy in force before it fitted anything
    for home, _ in d.agents:  # the three that had fitted were not asked again: nothing more charged
        again = json.loads(cli("fedpref-agent", "status", "--home", home, "--json").stdout)
        assert again["personalized_on"] == sha and again["epsilon_sample"] == spent[home]
    joined.send_signal(signal.SIGTERM)
    assert joined.wait(timeout=30) == 0
    d.procs.remove(joined)
    cli("fedpref-server", "nodes", "remove", late_node, "--home", srv)  # the rest of the test has three devices

    # --- device authentication: a fourth, unregistered device is refused ----------------------------
    intruder = d.base / "intruder"
    cli("fedpref-agent", "init", "--home", intruder, "--server", f"127.0.0.1:{d.port}", "--ca", srv / "tls" / "ca.pem",
        "--root", srv / "keys" / "root.json")
    refused = cli("fedpref-agent", "start", "--home", intruder, check=None, timeout=120)
    assert "not registered" in one_line_error(refused, 35)

    # --- the Control API is not reachable on the device-facing address ------------------------------
    ctx = ssl.create_default_context(cafile=str(srv / "tls" / "ca.pem"))

    def control(port: int) -> int:
        req = urllib.request.Request(f"https://127.0.0.1:{port}/v1/control/list-runs", data=b"{}",
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert control(d.port) == 404  # nginx: only /v1/fleet/ is proxied
    assert control(d.link) != 404  # the same request on loopback reaches the SuperLink's Control API

    # --- a bounded ranking on a device ----------------------------------------------------------
    home0 = d.agents[0][0]
    rows = [json.loads(line) for line in (d.base / "corpus.jsonl").read_text().splitlines()]
    safe = [r["text"] for r in rows if r["category"] == "safe"][:3]
    unsafe = next(r["text"] for r in rows if r["category"] == "violence")
    ranked = json.loads(cli("fedpref-agent", "rank", "--home", home0, "--prompt", "What should I do?",
                            *safe, unsafe, "--json").stdout)
    assert ranked["policy_version"] == 1 and len(ranked["ranked"]) == 4
    allowed = [r["allowed"] for r in ranked["ranked"]]
    assert allowed == sorted(allowed, reverse=True) and any(allowed), ranked  # every flagged one below every safe one
    bounded = next(r for r in ranked["ranked"] if r["candidate"] == unsafe)
    assert not bounded["allowed"] and "violence" in bounded["unsafe_categories"]

    # --- a device crashes (SIGKILL: agent, SuperNode and its session) and is started again at once:
    # it ends its killed session on the server itself and rejoins (Flower alone refuses it ~60 s) ---
    home1 = d.agents[1][0]
    agent_pid, _, node_pid, _ = (home1 / "run" / "agent.pid").read_text().split()
    crashed = next(p for p in d.procs if p.pid == int(agent_pid))
    os.killpg(int(node_pid), signal.SIGKILL)
    crashed.kill()
    crashed.wait()
    d.procs.remove(crashed)
    mark = (home1 / "logs" / "supernode.log").stat().st_size
    restarted = time.monotonic()
    d.procs.append(subprocess.Popen([str(BIN / "fedpref-agent"), "start", "--home", str(home1)], env=ENV,
                                    stdout=open(home1.parent / f"{home1.name}.out", "ab"),  # noqa: SIM115
                                    stderr=subprocess.STDOUT))

    def rejoined() -> bool:
        with open(home1 / "logs" / "supernode.log", "rb") as f:
            f.seek(mark)
            return b"SuperNode ID:" in f.read()

    wait_for(rejoined, "the crashed device to rejoin", d.procs, timeout=60)
    assert time.monotonic() - restarted < 45
    assert f"Deactivated node_id={node_ids[1]}" in (srv / "logs" / "superlink.log").read_text()

    # --- policy v2: signed, started; the devices move to it ---------------------------------------
    cli("fedpref-server", "stop", "--home", srv)
    cli("fedpref-server", "start", "--home", srv, "--policy", d.base / "policy-v2.dsse.json", "--rounds", 1, "--detach")
    st = wait_for(lambda: run_finished(srv, 3), "round 3 under policy v2", d.procs)
    assert st["policy"]["version"] == 2 and st["last_round"]["policy_version"] == 2 and st["last_round"]["accepted"] == 3
    for home, _ in d.agents:
        assert json.loads(cli("fedpref-agent", "status", "--home", home, "--json").stdout)["policy_version"] == 2
    # each device declines the second final fit on its own budget: the server learns the rule, no number
    pers = st["personalize"]
    assert pers["model_round"] == 3 and pers["fitted"] == 0 and len(pers["declined"]) == 3, pers
    assert all(r["reason"] == "device budget: this round would exceed the device's ε_sample budget"
               for r in pers["declined"]), pers

    # --- a tampered envelope: the devices refuse it and keep v2 -------------------------------------
    cli("fedpref-server", "stop", "--home", srv)
    bad = d.base / "policy-v2-tampered.dsse.json"
    from fedpref.simulations.attacks import tampered_envelope

    bad.write_bytes(tampered_envelope((d.base / "policy-v2.dsse.json").read_bytes()))
    refused = cli("fedpref-server", "start", "--home", srv, "--policy", bad, "--detach", check=None)
    one_line_error(refused, 10)  # the server itself verifies first and starts nothing
    assert not server_status(srv)["running"]
    # a compromised distribution path: the server sends a corrupted envelope (attack experiment)
    subprocess.run([sys.executable, "-c", "from fedpref.server import deploy; deploy.start(deploy.ServerHome.load("
                    f"{str(srv)!r}), rounds=1, policy=None, serverapp='fedpref.simulations.attacks:tampering_server_app')"],
                   check=True, env=ENV, capture_output=True, timeout=120)
    st = wait_for(lambda: run_finished(srv, 3), "round 4 with a tampered envelope", d.procs)
    last = st["last_round"]
    assert last["round"] == 4 and last["accepted"] == 0 and last["halted"], st
    assert len(st["ledger"]) == 3, st  # nothing trained, nothing released or charged
    refusals = [r for r in last["declined"] if "safety policy refused" in r["reason"]]
    assert len(refusals) == 3, last
    # a halted attempt is no round: round 4 was attempted [secagg] max_attempts (3) times, then the run stopped
    assert st["rounds_completed"] == 3 and st["rounds_halted"] == 3, st
    assert [h["round"] for h in st["halted"]] == [4, 4, 4]
    assert st["rounds_report"].startswith("0 of 1 rounds released (rounds 4..4); 3 attempts halted"), st["rounds_report"]
    assert "3 attempts in a row halted" in st["stopped_reason"], st
    for home, _ in d.agents:
        assert json.loads(cli("fedpref-agent", "status", "--home", home, "--json").stdout)["policy_version"] == 2

    # --- status reports rounds, rejections and epsilon ---------------------------------------------
    st = server_status(srv)
    assert st["rounds_completed"] == 3 and st["epsilon_user"] == st["ledger"][-1]["epsilon"] > 0
    human = cli("fedpref-server", "status", "--home", srv).stdout
    assert "rounds completed 3" in human and "declined node" in human and "attempts in a row halted" in human
    # the tampered run released nothing: round 3's model went again to the devices that had declined it,
    # with the tampered envelope, which they refused
    assert "personalized     round 3's model: 0 of 3 devices fitted, 3 declined, 0 rejected, 0 no answer" in human
    assert all("safety policy refused" in r["reason"] for r in st["personalize"]["declined"]), st["personalize"]

    # --- the local gRPC API of a device, served by `fedpref-agent serve` ----------------------------
    from fedpref.client.api import connect

    sock = d.base / "api" / "agent.sock"
    serve = subprocess.Popen([str(BIN / "fedpref-agent"), "serve", "--home", str(home0), "--socket", str(sock)],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    d.procs.append(serve)
    wait_for(sock.exists, "the agent API socket", d.procs, timeout=60)
    api = connect(sock)
    assert api.status()["pairs"] == 24 and api.status()["policy_version"] == 2
    assert api.add_feedback("p", "a kind answer", "a rude answer") == (25, 25)
    api_ranked, version = api.rank("What should I do?", [*safe, unsafe])
    assert version == 2 and api_ranked[-1]["candidate"] == unsafe and not api_ranked[-1]["allowed"]
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=30) == 0
    d.procs.remove(serve)

    # --- clean exit ------------------------------------------------------------------------------
    stopped = cli("fedpref-server", "stop", "--home", srv).stdout
    assert "superlink" in stopped and "nginx" in stopped
    assert "nothing to stop" in cli("fedpref-server", "stop", "--home", srv).stdout

    # --- a foreground server stopped by SIGTERM (a service manager) takes its processes with it ----
    fg = subprocess.Popen([str(BIN / "fedpref-server"), "start", "--home", str(srv), "--rounds", "1"],
                          env={**ENV, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    d.procs.append(fg)
    first = fg.stdout.readline()  # printed once the processes run; the progress loop follows
    assert first.startswith("server started"), first
    assert server_status(srv)["running"]
    fg.send_signal(signal.SIGTERM)
    out, _ = fg.communicate(timeout=60)
    d.procs.remove(fg)
    assert fg.returncode == 130 and "server stopped" in out, out
    assert not server_status(srv)["running"]
    with pytest.raises(OSError):  # nginx is gone: the device address refuses connections
        socket.create_connection(("127.0.0.1", d.port), timeout=5).close()
    for p in d.procs:
        p.send_signal(signal.SIGTERM)
    for p in d.procs:
        assert p.wait(timeout=30) == 0

    # --- forget: the data, the adapter and the accountant go; --all takes the identity too ---------
    home2 = d.agents[2][0]
    out = cli("fedpref-agent", "forget", "--home", home2).stdout
    assert "deleted 24 pairs, the private adapter, the accountant state" in out
    st2 = json.loads(cli("fedpref-agent", "status", "--home", home2, "--json").stdout)
    assert st2["pairs"] == 0 and st2["epsilon_sample"] == 0 and st2["adapter_version"] == ""
    assert not list((home2 / "store" / "vault").iterdir())
    cli("fedpref-agent", "forget", "--home", home2, "--all")
    assert not home2.exists()


def deployment_backbone(srv: Path) -> str:
    import tomllib

    return tomllib.loads((srv / "config.toml").read_text())["model"]["backbone"]


@pytest.mark.slow  # the deployment CLIs as real processes
def test_bad_input_gives_one_line_and_exit_code(tmp_path, policy_kit) -> None:  # noqa: ANN001
    """A wrong CA, an unreachable server, a missing home, a malformed feedback file."""
    from datetime import datetime, timezone

    from fedpref.server.tls import write_tls

    missing = tmp_path / "nowhere"
    assert "does not exist" in one_line_error(cli("fedpref-agent", "status", "--home", missing, check=None), 30)
    assert "does not exist" in one_line_error(cli("fedpref-server", "status", "--home", missing, check=None), 30)
    assert "not a fedpref" in one_line_error(cli("fedpref-server", "start", "--home", tmp_path, check=None), 30)

    # a TLS server on loopback with its own CA, and a device given another CA
    real = write_tls(tmp_path / "real", "127.0.0.1", now=datetime.now(timezone.utc))
    other = write_tls(tmp_path / "other", "127.0.0.1", now=datetime.now(timezone.utc))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    port = lsock.getsockname()[1]
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(real.server_cert, real.server_key)

    import threading

    def accept() -> None:
        for _ in range(2):
            try:
                conn, _ = lsock.accept()
                with sctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    dev = tmp_path / "device"
    cli("fedpref-agent", "init", "--home", dev, "--server", f"127.0.0.1:{port}", "--ca", other.ca_cert,
        "--root", policy_kit.root_path)
    assert "does not verify" in one_line_error(cli("fedpref-agent", "start", "--home", dev, check=None), 32)
    lsock.close()

    closed = free_port()
    dev2 = tmp_path / "device2"
    cli("fedpref-agent", "init", "--home", dev2, "--server", f"127.0.0.1:{closed}", "--ca", real.ca_cert,
        "--root", policy_kit.root_path)
    assert "unreachable" in one_line_error(cli("fedpref-agent", "start", "--home", dev2, check=None), 31)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": ""}\n')
    line = one_line_error(cli("fedpref-agent", "feedback", "import", "--home", dev2, bad, check=None), 4)
    assert f"{bad}:2" in line
    assert json.loads(cli("fedpref-agent", "status", "--home", dev2, "--json").stdout)["pairs"] == 0  # all or nothing

    # init refuses a non-empty home and a CA that is not a certificate
    again = cli("fedpref-agent", "init", "--home", dev2, "--server", "127.0.0.1:1", "--ca", real.ca_cert,
                "--root", policy_kit.root_path, check=None)
    assert "not empty" in one_line_error(again, 3)
    notca = cli("fedpref-agent", "init", "--home", tmp_path / "d3", "--server", "127.0.0.1:1", "--ca", bad,
                "--root", policy_kit.root_path, check=None)
    assert "not a PEM certificate" in one_line_error(notca, 4)
    assert not (tmp_path / "d3").exists()
