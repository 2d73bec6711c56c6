#!/usr/bin/env python3
"""Soak a loopback deployment with faults: SIGKILLed devices and servers, restarted.

What it runs, with the product's own command lines only (``fedpref-server``,
``fedpref-agent``, ``fedpref-sim generate``), all under one work folder:

* a server home (``fedpref-server init``), a signed safety policy, ``fedpref-server start
  --detach`` (SuperLink on loopback with TLS and node authentication, nginx in front);
* ``--agents`` devices, each with its own home, its own persona pairs (``fedpref-sim
  generate`` split by user, ``fedpref-agent feedback import``), registered with ``fedpref-server
  nodes add`` and running ``fedpref-agent start`` (a Flower SuperNode);
* while the rounds run, at seeded random times, a device or the server is killed with SIGKILL
  (its whole process tree: the agent, its SuperNode, SuperExec and ClientApps; the SuperLink, its
  SuperExec and ServerApp, and nginx), then restarted with the same command after a short pause.
  A restarted server resumes from its ledger and latest checkpoint (``fedpref-server start``
  continues the round count). With q < 1 a halted round keeps its number, so each start asks for
  enough round numbers to release the rounds still missing, and the soak stops the server
  (``fedpref-server stop``) once they are. A restarted device ends its killed session itself
  (``fedpref-agent start`` deactivates its earlier node session, signed with its key, and retries
  while the SuperLink still counts it online); should an agent still exit (35, 31), it is started
  again 5 s later, as a service manager would.

Settings (``fedpref-server init``'s config, edited): q = 0.3 and min_available_clients =
agents - 1, so a released round has about 4 devices (every device and round costs four Flower
ClientApp processes under SecAgg+); 8 pairs per device, batch 8 (one DP-SGD step a round); one
torch thread per ClientApp (OMP_NUM_THREADS=1: ten devices share the machine's cores);
round_timeout_s = 40 (a stage waits for a killed device until its restart ends the killed
session, at most that long); budgets high enough not to stop the soak.

Afterwards every store is checked (``fedpref-agent status`` exits 0, SQLite ``integrity_check``
on each device store and on the SuperLink's database, every sealed blob decrypts, the accountant
loads and its ε is the one ``status`` reports), every device's accountant against what the server
accepted (charged before training: Σ rounds charged ≥ Σ deltas accepted), and the server's privacy
ledger against the released rounds (each released round charged once, ε_user recomputed from the
ledger equals the recorded one). The last line is

    soak: rounds=R devices=D kills=K lost=N ledger=consistent|inconsistent

and the exit status is 0 only when the target rounds were released, nothing was lost and every
ledger agrees. Not part of ``make test``: run it with ``scripts/soak.sh`` (≤ --minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
CHECK_RESERVE_S = 100.0  # kept at the end of --minutes for stopping everything and the checks (70-80 s measured)


class Deadline(Exception):
    """The hard deadline (--minutes) was reached."""


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- process trees (psutil) --------------------------------------------------------------------


def _descendants(roots: set[int]) -> dict[int, psutil.Process]:
    """``roots`` and all their descendants that still run, by pid."""
    out: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            proc = psutil.Process(pid)
            out[pid] = proc
            out.update((c.pid, c) for c in proc.children(recursive=True))
        except psutil.Error:
            pass
    return out


def kill_tree(roots: set[int]) -> set[int]:
    """SIGKILL ``roots``, every descendant and every process group among them.

    The tree is frozen first (SIGSTOP, so nothing forks or reparents meanwhile), then each of
    its process groups and each process is sent SIGKILL: the Flower children that fedpref and
    Flower start in sessions of their own (SuperNode, the SuperLink's SuperExec) die too.
    psutil checks each process's identity (pid and start time) before it signals it.
    """
    me = os.getpid()
    mine = {os.getpgrp(), me}
    seen: dict[int, psutil.Process] = {}
    for _ in range(6):
        new = {pid: p for pid, p in _descendants(roots | set(seen)).items() if pid not in seen and pid != me}
        for p in new.values():
            try:
                p.suspend()
            except psutil.Error:
                pass
        seen.update(new)
        if not new:
            break
    groups = set()
    for p in seen.values():
        try:
            groups.add(os.getpgid(p.pid))
        except OSError:
            pass
    for g in groups - mine:
        try:
            os.killpg(g, signal.SIGKILL)
        except OSError:
            pass
    for p in seen.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    return set(seen)


def alive(pids: set[int]) -> bool:
    """Whether any of ``pids`` runs (a zombie does not)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            pass
    return False


def pids_mentioning(text: str) -> set[int]:
    """Processes whose command line names ``text`` (this soak's own work folder)."""
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and any(text in arg for arg in p.info["cmdline"] or ()):
            out.add(p.pid)
    return out


# --- the soak --------------------------------------------------------------------------------------


@dataclass
class Agent:
    index: int
    home: Path
    data: Path
    node_id: str = ""
    proc: subprocess.Popen | None = None
    restart_at: float | None = None
    killed_at: float = -1e9
    log_mark: int = 0  # size of its supernode.log at its last start
    kills: int = 0
    restarts: int = 0
    starts: int = 0
    exits: list[str] = field(default_factory=list)  # exits the soak did not cause

    @property
    def name(self) -> str:
        return f"device{self.index}"

    def online(self) -> bool:
        """Its agent runs and the server activated its SuperNode since its last start."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with open(self.home / "logs" / "supernode.log", "rb") as f:
                f.seek(self.log_mark)
                return b"SuperNode ID:" in f.read()
        except OSError:
            return False


@dataclass
class Server:
    home: Path
    up: bool = False
    started_at: float = 0.0
    restart_at: float | None = None
    kills: int = 0
    restarts: int = 0  # after a kill
    continuations: int = 0  # a run that ended before the target: started again for the rest
    start_failures: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.minutes * 60.0
        self.rng = random.Random(args.seed)
        self.work = Path(args.workdir).absolute() if args.workdir else Path(tempfile.mkdtemp(prefix="fedpref-soak-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.srv = Server(self.work / "server")
        self.agents: list[Agent] = []
        self.env = dict(os.environ, FEDPREF_KEY_PASSPHRASE="soak-" + str(args.seed), PYTHONUNBUFFERED="1")
        # ten devices share this machine's cores: each of their ClientApps trains on --device-threads
        # threads (torch would start one per core in each, and several train at once)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            self.env.setdefault(var, str(args.device_threads))
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env.pop("FEDPREF_HOME", None)
        self.env.pop("FEDPREF_AGENT_HOME", None)
        self.events: list[str] = []
        self.port = 0
        self.min_cohort = 3
        self.setup_s = 0.0
        self.loop_end = 0.0
        self.adopted = False

    # -- helpers ----------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def cli(self, tool: str, *args: object, timeout: float = 180.0, check: bool = True) -> subprocess.CompletedProcess:
        budget = min(timeout, self.left() - 5)
        if budget <= 0:
            raise Deadline(f"no time left for {tool} {' '.join(map(str, args[:2]))}")
        try:
            out = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, env=self.env,
                                 timeout=budget, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            if budget < timeout:
                raise Deadline(f"{tool} {' '.join(map(str, args[:2]))} ran into the deadline") from None
            raise RuntimeError(f"{tool} {' '.join(map(str, args))} timed out after {timeout:.0f} s") from None
        if check and out.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(map(str, args))} -> exit {out.returncode}: "
                               f"{(out.stderr or out.stdout).strip()[-600:]}")
        return out

    def event(self, msg: str) -> None:
        line = f"t={self.elapsed():6.1f}s {msg}"
        self.events.append(line)
        log(msg)

    @property
    def server_dir(self) -> Path:
        return self.srv.home / "state" / "server"

    def history(self) -> list[dict]:
        try:
            return json.loads((self.server_dir / "history.json").read_text())
        except (OSError, ValueError):
            return []

    def released(self) -> int:
        return sum(1 for h in self.history() if not h.get("halted"))

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        srv = self.srv.home
        self.port, link = free_port(), free_port()
        while link == self.port:
            link = free_port()
        log(f"work folder {self.work}")
        self.cli("fedpref-server", "init", "--home", srv, "--address", f"127.0.0.1:{self.port}")
        cfg = srv / "config.toml"
        text = cfg.read_text()
        settings = {
            ("server", "superlink"): f'"127.0.0.1:{link}"',
            ("federation", "rounds"): str(a.rounds),
            ("federation", "client_sample_rate"): repr(a.sample_rate),
            ("federation", "min_available_clients"): str(a.min_available),
            ("federation", "max_epsilon_user"): "1000.0",  # the soak is about faults, not the budget
            ("federation", "round_timeout_s"): repr(float(a.round_timeout)),
            ("local", "batch_size"): str(a.batch_size),
            ("local", "max_epsilon_sample"): "1000.0",
        }
        for (table, key), value in settings.items():
            text = set_toml(text, table, key, value)
        if a.backbone:
            text = set_toml(text, "model", "backbone", json.dumps(str(Path(a.backbone).absolute())))
        cfg.write_text(text)
        self.min_cohort = int(tomllib_load(cfg)["secagg"]["min_cohort"])

        persona, corpus = self.work / "persona.jsonl", self.work / "safety-corpus.jsonl"
        self.cli("fedpref-sim", "generate", "--users", a.agents, "--pairs-per-user", a.pairs, "--seed", a.seed,
                 "--out", persona, "--safety-corpus", corpus)
        # a small classifier is enough here: a few texts per category
        rows = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
        per: dict[str, int] = {}
        small = self.work / "safety-corpus-small.jsonl"
        with small.open("w") as f:
            for r in rows:
                if per.get(r["category"], 0) < a.corpus_per_class:
                    per[r["category"]] = per.get(r["category"], 0) + 1
                    f.write(json.dumps(r) + "\n")
        build = ["--backbone", Path(a.backbone).absolute()] if a.backbone else []
        self.cli("fedpref-server", "policy", "build", "--data", small, "--out", self.work / "bundle", *build,
                 timeout=300)
        expires = f"{datetime.now(timezone.utc).year + 1}-06-01"
        policy = self.work / "policy-v1.dsse.json"
        self.cli("fedpref-server", "policy", "sign", self.work / "bundle", "--home", srv, "--version", 1,
                 "--expires", expires, "--out", policy)
        log(f"policy v1 signed ({self.elapsed():.0f} s)")

        by_user: dict[str, list[dict]] = {}
        for line in persona.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                by_user.setdefault(row["user_id"], []).append(row)
        users = sorted(by_user)
        if len(users) < a.agents:
            raise RuntimeError(f"fedpref-sim generate made {len(users)} users, {a.agents} needed")
        backbone = ["--backbone", Path(a.backbone).absolute()] if a.backbone else []
        for i, user in enumerate(users[: a.agents]):
            data = self.work / "data" / f"{user}.jsonl"
            data.parent.mkdir(exist_ok=True)
            data.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"],
                                                "rejected": r["rejected"]}) + "\n" for r in by_user[user]))
            self.agents.append(Agent(i, self.work / "devices" / f"device{i}", data))

        def make_device(ag: Agent) -> None:
            self.cli("fedpref-agent", "init", "--home", ag.home, "--server", f"127.0.0.1:{self.port}",
                     "--ca", srv / "tls" / "ca.pem", "--root", srv / "keys" / "root.json",
                     "--max-epsilon-sample", "1000", *backbone)
            self.cli("fedpref-agent", "feedback", "import", "--home", ag.home, ag.data)

        parallel(make_device, self.agents)
        log(f"{len(self.agents)} device homes with {a.pairs} pairs each ({self.elapsed():.0f} s)")

        self.start_server(policy=policy)

        def register(ag: Agent) -> None:
            out = self.cli("fedpref-server", "nodes", "add", ag.home / "identity" / "node.pub", "--home", srv, "--json")
            ag.node_id = str(json.loads(out.stdout)["node_id"])

        parallel(register, self.agents)
        for ag in self.agents:
            self.start_agent(ag)
        self.setup_s = self.elapsed()
        log(f"deployment up: server + {len(self.agents)} devices ({self.setup_s:.0f} s)")

    def adopt(self) -> None:
        """The homes of an earlier soak in --workdir (for --check-only)."""
        if not (self.srv.home / "config.toml").exists():
            raise RuntimeError(f"--check-only: {self.srv.home} is not a soak's server home")
        homes = sorted((self.work / "devices").glob("device*/"), key=lambda p: int(p.name[6:]))
        data = sorted((self.work / "data").glob("*.jsonl"))
        self.agents = [Agent(int(h.name[6:]), h, d) for h, d in zip(homes, data)]
        self.min_cohort = int(tomllib_load(self.srv.home / "config.toml")["secagg"]["min_cohort"])
        self.adopted = True  # its kills are unknown here: charged-unreleased rounds are not held against them

    # -- server -------------------------------------------------------------------------------
    def rounds_to_ask(self) -> int:
        """Rounds for `start --rounds`: with q < 1 a halted round keeps its number (not retried), so
        ask for enough numbers to release the rounds still missing; the soak stops the server
        once the target is released."""
        need = max(1, self.args.rounds - self.released())
        p = release_probability(len(self.agents), self.args.sample_rate, self.min_cohort)
        return need if p >= 1.0 else math.ceil(need / max(p, 0.05)) + 3

    def start_server(self, *, policy: Path | None = None) -> bool:
        more = self.rounds_to_ask()
        args = ["start", "--home", self.srv.home, "--rounds", more, "--detach"]
        if policy is not None:
            args[3:3] = ["--policy", policy]
        started = time.time()
        out = self.cli("fedpref-server", *args, timeout=150, check=False)
        if out.returncode != 0:
            why = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
            self.srv.start_failures.append(f"exit {out.returncode}: {why[0]}")
            self.event(f"server start failed (exit {out.returncode}): {why[0]}")
            if policy is not None:
                raise RuntimeError(f"the first server start failed: {why[0]}")
            return False
        self.srv.up, self.srv.started_at, self.srv.restart_at = True, started, None
        first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
        m = re.search(r"run (\d+): rounds (\d+)\.\.(\d+)", first)
        self.srv.runs.append(m.group(0) if m else first)
        self.event(f"server started: {m.group(0) if m else first}")
        return True

    def server_pids(self) -> set[int]:
        try:
            rec = json.loads((self.srv.home / "run" / "processes.json").read_text())
        except (OSError, ValueError):
            return set()
        # only processes of this soak (their command lines name its work folder): never a recycled pid
        return {int(p["pid"]) for p in rec.get("processes", [])} & pids_mentioning(str(self.work))

    def server_alive(self) -> bool:
        return alive(self.server_pids())

    def kill_server(self) -> None:
        pids = kill_tree(self.server_pids())
        self.srv.up = False
        self.srv.kills += 1
        self.srv.restart_at = time.monotonic() + self.rng.uniform(*self.args.server_pause)
        self.event(f"KILL server (SIGKILL to {len(pids)} processes: SuperLink, SuperExec, ServerApp, nginx); "
                   f"released so far {self.released()}")

    def run_ended(self) -> bool:
        """The submitted run has ended: its ServerApp wrote summary.json after this start."""
        try:
            return (self.server_dir / "summary.json").stat().st_mtime >= self.srv.started_at
        except OSError:
            return False

    # -- agents -------------------------------------------------------------------------------
    def start_agent(self, ag: Agent) -> None:
        try:
            ag.log_mark = (ag.home / "logs" / "supernode.log").stat().st_size
        except OSError:
            ag.log_mark = 0
        out = open(self.work / "devices" / f"{ag.name}.out", "ab")  # noqa: SIM115
        ag.proc = subprocess.Popen([str(BIN / "fedpref-agent"), "start", "--home", str(ag.home)], env=self.env,
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        out.close()
        ag.starts += 1
        ag.restart_at = None

    def kill_agent(self, ag: Agent) -> None:
        assert ag.proc is not None
        pids = kill_tree({ag.proc.pid})
        ag.proc.wait()
        ag.proc = None
        ag.kills += 1
        ag.killed_at = time.monotonic()
        ag.restart_at = time.monotonic() + self.rng.uniform(*self.args.agent_pause)
        self.event(f"KILL {ag.name} (SIGKILL to {len(pids)} processes: agent, SuperNode, SuperExec, ClientApps)")

    def stop_all(self) -> None:
        """Stop everything this soak started: gracefully first, then by SIGKILL."""
        if (self.srv.home / "config.toml").exists():
            try:
                subprocess.run([str(BIN / "fedpref-server"), "stop", "--home", str(self.srv.home)], env=self.env,
                               capture_output=True, timeout=40)
            except (subprocess.TimeoutExpired, OSError):
                pass
        kill_tree(self.server_pids()) if self.server_alive() else None
        for ag in self.agents:
            if ag.proc is not None and ag.proc.poll() is None:
                ag.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 20
        for ag in self.agents:
            if ag.proc is not None:
                try:
                    ag.proc.wait(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:  # still ours (not reaped): its pid cannot be reused yet
                    kill_tree({ag.proc.pid})
                    ag.proc.wait()
        left = pids_mentioning(str(self.work))
        if left:
            kill_tree(left)
            log(f"killed {len(left)} leftover processes")

    # -- the soak loop ------------------------------------------------------------------------------
    def soak(self) -> None:
        a = self.args
        target = a.rounds
        next_kill = time.monotonic() + self.rng.uniform(*a.kill_interval)
        last_released, last_progress = self.released(), time.monotonic()
        round_times: list[float] = []
        stall_checked = 0.0
        while True:
            now = time.monotonic()
            if now > self.deadline - CHECK_RESERVE_S:
                self.event(f"deadline: stopping the soak with {self.released()} of {target} rounds released")
                return
            released = self.released()
            if released != last_released:
                h = [x for x in self.history() if not x.get("halted")][-1:]
                extra = (f" (round {h[0]['server_round']}: {h[0]['accepted']} of {h[0]['sampled']} sampled accepted, "
                         f"{h[0]['seconds']:.0f} s)") if h else ""
                log(f"released rounds: {released}{extra}")
                if released > last_released:
                    round_times.append((now - last_progress) / (released - last_released))
                last_released, last_progress = released, now
            if released >= target:
                self.event(f"target reached: {released} rounds released")
                return
            # devices: notice exits the soak did not cause, restart the killed ones
            for ag in self.agents:
                if ag.proc is not None and ag.proc.poll() is not None:
                    rc = ag.proc.returncode
                    ag.proc = None
                    # as a service manager would: again after a pause. 35: the server refused to activate
                    # the node (fedpref-agent start retries a killed session itself for ~75 s first);
                    # 31: the server is unreachable (killed, restarting)
                    pause = 5
                    ag.exits.append(f"exit {rc}")
                    ag.restart_at = now + pause
                    why = {35: "refused by the server", 31: "server unreachable"}
                    self.event(f"{ag.name} exited (exit {rc}: {why.get(rc, 'unexpected')}): again in {pause} s")
                if ag.proc is None and ag.restart_at is not None and now >= ag.restart_at:
                    if self.srv.up:
                        self.start_agent(ag)
                        ag.restarts += 1
                        self.event(f"restarted {ag.name}")
                    else:
                        ag.restart_at = now + 3
            # the server: restart after a kill; notice a run that ended (or died) short of the target
            if not self.srv.up:
                if self.srv.restart_at is not None and now >= self.srv.restart_at:
                    if self.start_server():
                        self.srv.restarts += 1
                    else:
                        self.srv.restart_at = now + 5
            elif not self.server_alive():
                self.srv.up, self.srv.restart_at = False, now + 5
                self.event("the server's processes died without a kill: restart in 5 s")
                self.srv.start_failures.append("processes died without a kill")
            else:
                ended = self.run_ended()
                if not ended and now - last_progress > 120 and now - stall_checked > 60:
                    stall_checked = now  # no summary.json: did the run fail? (Flower's run status)
                    out = self.cli("fedpref-server", "status", "--home", self.srv.home, "--json", check=False, timeout=60)
                    state = json.loads(out.stdout)["run"]["status"] or "" if out.returncode == 0 else ""
                    self.event(f"no round for {now - last_progress:.0f} s; Flower's run status: {state or '?'}")
                    ended = state.startswith("finished")
                if ended:
                    self.event(f"the run ended with {released} of {target} rounds released: starting it again for the rest")
                    self.cli("fedpref-server", "stop", "--home", self.srv.home, timeout=60, check=False)
                    self.srv.up = False
                    if self.start_server():
                        self.srv.continuations += 1
                    else:
                        self.srv.restart_at = now + 5
            # faults, while there is time for them: the rounds still missing at the pace so far
            pace = sorted(round_times)[len(round_times) // 2] if round_times else 40.0
            room = self.deadline - CHECK_RESERVE_S - now - (target - released) * pace * 1.2
            agent_kills = sum(ag.kills for ag in self.agents)
            owed = self.srv.kills < a.server_kills or agent_kills < a.agent_kills  # the faults every soak makes
            if a.kills and now >= next_kill and self.srv.up and released < target - 1 and (owed or room > a.kill_quiet):
                # down: not running, or not activated again since its restart
                down = [ag for ag in self.agents if not ag.online()]
                running = [ag for ag in self.agents if ag not in down]
                want_server = (self.srv.kills < a.server_kills
                               and released >= target * (self.srv.kills + 1) / (a.server_kills + 1))
                if want_server or (self.rng.random() < a.server_kill_p and not down and room > a.kill_quiet):
                    self.kill_server()
                elif len(down) < a.max_down and running and (agent_kills < a.agent_kills or room > a.kill_quiet):
                    victims = self.rng.sample(running, min(len(running), a.max_down - len(down),
                                                           2 if self.rng.random() < 0.25 else 1))
                    for ag in victims:
                        self.kill_agent(ag)
                next_kill = now + self.rng.uniform(*a.kill_interval)
            if now - last_progress > a.stall_s:
                self.event(f"no round released for {a.stall_s:.0f} s: giving up")
                return
            time.sleep(1.0)

    # -- checks -------------------------------------------------------------------------------------
    def checks(self) -> tuple[int, bool, list[str]]:
        """(lost, ledger consistent, report lines)."""
        from fedpref.client.agent_home import ACCOUNTANT_BLOB, PRIVATE_BLOB, AgentHome
        from fedpref.client.store import DeviceStore
        from fedpref.common.accounting import SampleLevelAccountant, epsilon_of_history
        from fedpref.server.privacy import PrivacyLedger

        lines: list[str] = []
        lost = 0
        consistent = True

        # --- the server: status, ledger, history, SuperLink database, checkpoint -----------------
        st_out = self.cli("fedpref-server", "status", "--home", self.srv.home, "--json", check=False, timeout=90)
        human = self.cli("fedpref-server", "status", "--home", self.srv.home, check=False, timeout=90)
        if st_out.returncode != 0 or human.returncode != 0:
            lines.append(f"LOST server status: exit {st_out.returncode}/{human.returncode}: {st_out.stderr.strip()[-300:]}")
            lost += 1
            st = {}
        else:
            st = json.loads(st_out.stdout)
            lines.append("fedpref-server status:")
            lines += ["  " + ln for ln in human.stdout.strip().splitlines()]
        history = self.history()
        released = [h for h in history if not h.get("halted")]
        halted = [h for h in history if h.get("halted")]
        rel_rounds = [int(h["server_round"]) for h in released]
        try:
            entries = PrivacyLedger(self.server_dir / "ledger.jsonl").entries()
        except Exception as e:  # noqa: BLE001 - a ledger that does not load is the finding
            lines.append(f"LOST server ledger does not load: {e}")
            return lost + 1, False, lines
        led_rounds = [e.round for e in entries]
        if len(set(rel_rounds)) != len(rel_rounds):
            consistent = False
            lines.append(f"INCONSISTENT: a round number released twice in history.json: {rel_rounds}")
        if len(set(led_rounds)) != len(led_rounds) or led_rounds != sorted(led_rounds):
            consistent = False
            lines.append(f"INCONSISTENT: ledger rounds not strictly increasing: {led_rounds}")
        missing = sorted(set(rel_rounds) - set(led_rounds))
        if missing:  # released without a charge: privacy spent and not counted
            lost += len(missing)
            consistent = False
            lines.append(f"LOST released rounds missing from the ledger: {missing}")
        extra = sorted(set(led_rounds) - set(rel_rounds))
        if extra:  # charged, never released: a kill between the charge and the checkpoint (over-counted, by design)
            lines.append(f"note: ledger rounds charged but not released (a kill between the charge and the "
                         f"checkpoint; over-counting by design): {extra}")
            if not self.adopted and len(extra) > self.srv.kills + self.srv.continuations + 1:  # a kill or stop then
                consistent = False
                lines.append(f"INCONSISTENT: {len(extra)} charged-unreleased rounds, more than the server was killed or stopped")
        fed = tomllib_load(self.srv.home / "config.toml")["federation"]
        eps_ok = True
        hist: list[tuple[float, float, int]] = []
        for e in entries:
            last = hist[-1] if hist else None
            hist = ([*hist[:-1], (e.noise_multiplier, e.sample_rate, last[2] + 1)]
                    if last and last[:2] == (e.noise_multiplier, e.sample_rate) else [*hist, (e.noise_multiplier, e.sample_rate, 1)])
            eps = epsilon_of_history(history=hist, delta=fed["delta"])
            if not math.isclose(eps, e.epsilon, rel_tol=1e-9, abs_tol=1e-12):
                eps_ok = False
                lines.append(f"INCONSISTENT: ledger round {e.round} records ε_user {e.epsilon!r}, recomputed {eps!r}")
        by_round = {e.round: e for e in entries}
        for h in released:
            e = by_round.get(int(h["server_round"]))
            if e is not None and not math.isclose(h["epsilon_user"], e.epsilon, rel_tol=1e-9, abs_tol=1e-12):
                eps_ok = False
                lines.append(f"INCONSISTENT: round {h['server_round']}: history ε_user {h['epsilon_user']!r} != "
                             f"ledger {e.epsilon!r}")
        if st and entries and not math.isclose(st["epsilon_user"], entries[-1].epsilon, rel_tol=1e-12):
            eps_ok = False
            lines.append(f"INCONSISTENT: status ε_user {st['epsilon_user']} != ledger {entries[-1].epsilon}")
        if st and (st["rounds_completed"] != len(released) or len(st["ledger"]) != len(entries)):
            consistent = False
            lines.append(f"INCONSISTENT: status says {st['rounds_completed']} released / {len(st['ledger'])} "
                         f"ledger entries; history {len(released)}, ledger {len(entries)}")
        consistent &= eps_ok
        lines.append(f"server ledger: {len(entries)} entries for {len(released)} released rounds "
                     f"({len(halted)} halted attempts); ε_user {entries[-1].epsilon if entries else 0.0:.4f} "
                     f"{'recomputed equal' if eps_ok else 'DISAGREES'}")
        db_ok = sqlite_ok(self.srv.home / "state" / "superlink.db")
        if db_ok != "ok":
            lost += 1
            lines.append(f"LOST SuperLink database: {db_ok}")
        latest = self.server_dir / "checkpoints" / "LATEST"
        try:
            from safetensors.numpy import load_file

            ck = self.server_dir / "checkpoints" / latest.read_text().strip()
            load_file(ck / "adapter_model.safetensors")
            if released and ck.name != f"round-{max(rel_rounds):04d}":
                lines.append(f"INCONSISTENT: LATEST is {ck.name}, the last released round is {max(rel_rounds)}")
                consistent = False
        except Exception as e:  # noqa: BLE001
            if released:
                lost += 1
                lines.append(f"LOST the latest checkpoint does not load: {e}")

        # --- the devices: stores, accountants ---------------------------------------------------
        local = tomllib_load(self.srv.home / "config.toml")["local"]
        charged_total = 0
        dev_lines = []
        def agent_status(ag: Agent) -> subprocess.CompletedProcess | None:
            """`fedpref-agent status --json` (its accountant loads; ε_sample); None: no time left for it."""
            if self.left() < 25:
                return None
            try:
                return self.cli("fedpref-agent", "status", "--home", ag.home, "--json", check=False,
                                timeout=min(90.0, self.left() - 20))
            except Deadline:
                return None

        outs = parallel(agent_status, self.agents)
        skipped = sum(out is None for out in outs)
        for ag, out in zip(self.agents, outs):
            problems = []
            status = json.loads(out.stdout) if out is not None and out.returncode == 0 else None
            if out is not None and status is None:
                problems.append(f"fedpref-agent status exit {out.returncode}: {out.stderr.strip()[-200:]}")
            db = sqlite_ok(ag.home / "store" / "feedback.sqlite3")
            if db != "ok":
                problems.append(f"store database: {db}")
            charged = 0
            try:
                home = AgentHome.load(ag.home)
                with DeviceStore.open(ag.home / "store") as store:
                    n = store.count()
                    for blob in sorted((ag.home / "store" / "vault").glob("*.enc")):
                        store.unseal(blob.stem)  # AES-GCM: a torn or corrupt blob fails to decrypt
                    raw = store.unseal(ACCOUNTANT_BLOB)
                    has_adapter = store.unseal(PRIVATE_BLOB) is not None
                acct = SampleLevelAccountant.from_bytes(raw, ag.home / "accountant") if raw is not None else None
                meta = home.adapter_metadata()
                per_round = local["epochs"] * max(1, math.ceil(n / local["batch_size"]))
                q = 1.0 / max(1, math.ceil(n / local["batch_size"]))
                steps = sum(t for _, _, t in acct.history) if acct else 0
                charged, rem = divmod(steps, per_round)
                if acct and any((z, qq) != (local["dp_noise_multiplier"], q) for z, qq, _ in acct.history):
                    problems.append(f"accountant history {acct.history} is not at σ={local['dp_noise_multiplier']}, q={q}")
                if rem:
                    problems.append(f"accountant holds {steps} steps, not a multiple of {per_round} per round")
                if (has_adapter or meta.get("round")) and charged < 1:
                    problems.append("a trained adapter but no charge in the accountant")
                if n != a_pairs(ag.data):
                    problems.append(f"{n} pairs in the store, {a_pairs(ag.data)} imported")
                if status is not None:
                    eps = acct.epsilon(home.terms.delta) if acct and acct.history else 0.0
                    if not math.isclose(eps, status["epsilon_sample"], rel_tol=1e-9, abs_tol=1e-12):
                        problems.append(f"status ε_sample {status['epsilon_sample']} != recomputed {eps}")
                charged_total += charged
                dev_lines.append(f"  {ag.name}: node {ag.node_id[:10]}…, killed {ag.kills}×, restarted {ag.restarts}×, "
                                 f"{charged} rounds charged ({steps} DP-SGD steps, ε_sample "
                                 f"{status['epsilon_sample'] if status else float('nan'):.3f}), adapter "
                                 f"{'round ' + str(meta['round']) if meta.get('round') else 'none'}"
                                 + (f", unplanned exits: {', '.join(ag.exits)}" if ag.exits else ""))
            except Exception as e:  # noqa: BLE001 - an unreadable store or accountant is the finding
                problems.append(f"{type(e).__name__}: {e}")
            if problems:
                lost += 1
                dev_lines.append(f"  LOST {ag.name}: " + "; ".join(problems))
        accepted_total = sum(int(h["accepted"]) for h in released)
        # every accepted delta was trained after its device charged its accountant (charged before training)
        agree = charged_total >= accepted_total
        if not agree:
            consistent = False
        if skipped:
            lines.append(f"note: `fedpref-agent status` not run on {skipped} homes (the deadline); their stores, "
                         "blobs and accountants were checked here")
        lines.append(f"devices: {len(self.agents)} stores checked; rounds charged on devices {charged_total} "
                     f"{'≥' if agree else '<'} deltas the server accepted {accepted_total}"
                     f"{'' if agree else ' (INCONSISTENT: a delta accepted without a charge)'}")
        lines += dev_lines
        return lost, consistent, lines


def release_probability(population: int, q: float, min_cohort: int) -> float:
    """P(a Poisson sample of ``population`` at rate ``q`` has at least ``min_cohort`` nodes)."""
    return sum(math.comb(population, k) * q**k * (1 - q) ** (population - k)
               for k in range(min_cohort, population + 1))


def parallel(fn, items: list, workers: int = 2) -> list:  # noqa: ANN001
    """``fn`` over ``items``, two at a time (the machine has two cores); the first error is raised."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def a_pairs(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def tomllib_load(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


def sqlite_ok(path: Path) -> str:
    """SQLite's integrity_check of ``path``, read-only: "ok" or what is wrong."""
    if not path.exists():
        return "missing"
    try:
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        return f"does not open: {e}"
    return "ok" if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:3])


def set_toml(text: str, table: str, key: str, value: str) -> str:
    """Set ``key = value`` in ``[table]`` of a TOML text (the key must be there)."""
    start = text.index(f"[{table}]\n")
    end = text.find("\n[", start + 1)
    end = len(text) if end < 0 else end
    section, n = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", text[start:end], count=1)
    if n != 1:
        raise RuntimeError(f"[{table}] {key} not found in the config fedpref-server init wrote")
    return text[:start] + section + text[end:]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="soak.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=10, help="devices (default 10)")
    p.add_argument("--rounds", type=int, default=20, help="released rounds to reach (default 20)")
    p.add_argument("--minutes", type=float, default=15.0, help="hard deadline for everything (default 15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the kill schedule (default 0)")
    p.add_argument("--workdir", default="", help="work folder (default: a new temporary folder)")
    p.add_argument("--check-only", action="store_true", help="only check the stores and ledgers of --workdir")
    p.add_argument("--keep", action="store_true", help="keep the work folder (always kept on failure)")
    p.add_argument("--backbone", default="", help="backbone folder (default: the packaged MiniLM)")
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per device (default 8: one DP-SGD step a round)")
    p.add_argument("--device-threads", type=int, default=1,
                   help="torch threads of each device's ClientApps, unless OMP_NUM_THREADS is set (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="[local] batch_size (default 8)")
    p.add_argument("--sample-rate", type=float, default=0.3, help="[federation] client_sample_rate q (default 0.3)")
    p.add_argument("--min-available", type=int, default=0,
                   help="[federation] min_available_clients (default: agents - max_down)")
    p.add_argument("--round-timeout", type=float, default=40.0, help="[federation] round_timeout_s (default 40)")
    p.add_argument("--corpus-per-class", type=int, default=30, help="safety corpus texts per category (default 30)")
    p.add_argument("--no-kills", dest="kills", action="store_false", help="run without faults (calibration)")
    p.add_argument("--server-kills", type=int, default=2, help="server kills to make at least, after 1/3 and 2/3 of the rounds (default 2)")
    p.add_argument("--agent-kills", type=int, default=4,
                   help="device kills to make at least; more when time allows (default 4)")
    p.add_argument("--server-kill-p", type=float, default=0.15, help="chance a fault hits the server (default 0.15)")
    p.add_argument("--max-down", type=int, default=1,
                   help="devices down at once, at most (default 1; min_available_clients is agents - max_down)")
    p.add_argument("--kill-interval", type=float, nargs=2, default=(45.0, 90.0), metavar=("MIN", "MAX"),
                   help="seconds between faults, uniform (default 45 90)")
    p.add_argument("--agent-pause", type=float, nargs=2, default=(2.0, 12.0), metavar=("MIN", "MAX"),
                   help="seconds a killed device stays down (default 2 12)")
    p.add_argument("--server-pause", type=float, nargs=2, default=(1.0, 6.0), metavar=("MIN", "MAX"),
                   help="seconds a killed server stays down (default 1 6)")
    p.add_argument("--kill-quiet", type=float, default=60.0,
                   help="no faults unless this many seconds are spare beyond the rounds still missing (default 60)")
    p.add_argument("--stall-s", type=float, default=300.0, help="give up after this long without a round (default 300)")
    args = p.parse_args(argv)
    if args.check_only and not args.workdir:
        p.error("--check-only needs --workdir")
    if args.device_threads < 1:
        p.error("--device-threads must be at least 1")
    if args.min_available <= 0:
        args.min_available = max(3, args.agents - args.max_down)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    soak = Soak(args)

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    # the last resort: whatever hangs, the soak ends (everything stopped) by --minutes
    def _alarm(_signum: int, _frame: object) -> None:
        raise Deadline(f"hard deadline: {args.minutes:g} min")

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(args.minutes * 60 - 10)))
    lost, consistent, lines, failed, checked = 0, False, [], "", False
    try:
        try:
            if args.check_only:  # the checks alone, on the folder of an earlier soak
                soak.adopt()
            else:
                soak.setup()
                soak.soak()
                soak.loop_end = soak.elapsed()
        except (Deadline, KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - reported; everything is stopped
            failed = f"{type(e).__name__}: {e}"
            log(f"soak aborted: {failed}")
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nothing cuts the stop short
            signal.alarm(0)
            log("stopping every process the soak started")
            soak.stop_all()
            signal.signal(signal.SIGTERM, _terminate)
        # the checks, also after a failure, while there is time (the stores must be intact whatever happened)
        if soak.left() > 20 and soak.agents and not failed.startswith("KeyboardInterrupt"):
            signal.alarm(max(1, int(soak.left())))
            try:
                lost, consistent, lines = soak.checks()
                checked = True
            except (Deadline, KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - reported, never a traceback
                failed = (failed + "; " if failed else "") + f"checks: {type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
    rounds = soak.released()
    kills = soak.srv.kills + sum(ag.kills for ag in soak.agents)
    wall = soak.elapsed()
    print()
    print("=== soak summary ===")
    print(f"wall {wall / 60:.1f} min (deadline {args.minutes:g}); seed {args.seed}; work folder {soak.work}")
    print(f"settings: {args.agents} devices × {args.pairs} pairs, q={args.sample_rate}, "
          f"min_available_clients={args.min_available}, round_timeout_s={args.round_timeout:g}, SecAgg+ "
          f"(min_cohort {soak.min_cohort}), batch {args.batch_size}")
    print(f"server: runs {', '.join(soak.srv.runs) or '-'}; killed {soak.srv.kills}×, restarted {soak.srv.restarts}× "
          f"after kills, started again {soak.srv.continuations}× after a run ended short"
          + (f"; start failures: {'; '.join(soak.srv.start_failures)}" if soak.srv.start_failures else ""))
    exits: dict[str, int] = {}
    for ag in soak.agents:
        for e in ag.exits:
            exits[e] = exits.get(e, 0) + 1
    print(f"devices: killed {sum(ag.kills for ag in soak.agents)}× in all, `fedpref-agent start` run again "
          f"{sum(ag.restarts for ag in soak.agents)}×; agent exits the soak did not cause: "
          + (", ".join(f"{k} ×{v}" for k, v in sorted(exits.items())) or "none")
          + (" (35: the server refused to activate the node, even after the agent ended its killed session; "
             "31: server unreachable)" if exits else ""))
    faults = [e for e in soak.events if "KILL" in e or "server started" in e]
    if faults:
        print("faults and server starts: " + "; ".join(e.split(" (SIGKILL")[0] for e in faults))
    if rounds and soak.loop_end:
        print(f"pace: {(soak.loop_end - soak.setup_s) / rounds:.0f} s per released round, faults included "
              f"(setup {soak.setup_s:.0f} s, rounds {soak.loop_end - soak.setup_s:.0f} s, "
              f"stop and checks {wall - soak.loop_end:.0f} s)")
    for line in lines:
        print(line)
    if failed:
        print(f"FAILED: {failed}")
    if not checked:
        print("FAILED: the stores and ledgers were not checked")
    short = rounds < args.rounds and not args.check_only
    if short:
        print(f"FAILED: {rounds} of {args.rounds} rounds released within the deadline")
    ok = not failed and checked and not short and lost == 0 and consistent
    if ok and not args.keep:
        import shutil

        shutil.rmtree(soak.work, ignore_errors=True)
    elif not ok:
        print(f"work folder kept: {soak.work}")
    print(f"soak: rounds={rounds} devices={len(soak.agents)} kills={kills} lost={lost} "
          f"ledger={'consistent' if checked and consistent else 'inconsistent'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
