"""The fedpref ServerApp: the same code in simulation and in deployment.

It builds the shared part of the model (to know the shared keys, shapes and the backbone
identity), then runs :class:`FedPrefStrategy` round by round. After each round the new
global shared weights are checkpointed in PEFT format and the round record is appended to
``history.json``, which ``fedpref-sim`` and the operator's ``status`` read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedpref.common.atomic import write_text_atomic
from fedpref.common.errors import ConfigError, FedPrefError
from fedpref.common.polling import duty_wait
from fedpref.common.tomlconfig import build, read_toml
from fedpref.model.backbone import load_backbone
from fedpref.model.basis import model_identity
from fedpref.model.config import ModelConfig
from fedpref.model.io import load_adapter_weights, save_adapter
from fedpref.model.preference import build_model, get_arrays, set_arrays
from fedpref.protocol.messages import arrays_to_record, weights_digest
from fedpref.protocol.partition import SHARED_ADAPTER, Group
from fedpref.protocol.runconfig import AppRun, Method, from_run_config
from fedpref.server.config import FederationConfig, LocalConfig, PersonalizeConfig, check_personalize_model
from fedpref.server.privacy import AccountantKind, PrivacyLedger, UserLevelBudget
from fedpref.server.personalize import load_record as load_personalize_record
from fedpref.server.personalize import personalize_devices
from fedpref.server.progress import RoundBar
from fedpref.server.release import fresh_generators, seeded_generators
from fedpref.server.strategy import FedPrefStrategy, RoundRecord, released_rounds, sampling_order

log = logging.getLogger("fedpref.server")

# Flower's HttpGrid (the deployed ServerApp's grid) asks the SuperLink for replies every 3 s;
# each SecAgg+ round waits on four stages, so that alone added ~6 s to a round. Here: every 0.5 s.
REPLY_POLL_S = 0.5
# The Simulation Engine's InMemoryGrid asks every 0.1 s, a call into the process's own state:
# every round ended with half of that on average, with the ClientApp actors idle. Here: 19 times
# the last pull's own cost (a pull scans the replies still awaited: 2.7 ms at 1,000), so at
# most 5 % of a core, between 0.02 s (the round's last replies) and the grid's 0.1 s.
SIM_REPLY_POLL_S = 0.02
SIM_REPLY_POLL_MAX_S = 0.1
SIM_REPLY_POLL_DUTY = 0.05


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    model: ModelConfig
    federation: FederationConfig
    local: LocalConfig
    personalize: PersonalizeConfig = PersonalizeConfig()


def load_server_settings(config_file: str) -> ServerSettings:
    """[model], [federation], [local] and [personalize] of a TOML file; other tables belong to other tools."""
    data = read_toml(config_file) if config_file else {}
    where = config_file or "<defaults>"
    return ServerSettings(
        model=build(ModelConfig, data.get("model"), where=f"{where} [model]"),
        federation=build(FederationConfig, data.get("federation"), where=f"{where} [federation]"),
        local=build(LocalConfig, data.get("local"), where=f"{where} [local]"),
        personalize=build(PersonalizeConfig, data.get("personalize"), where=f"{where} [personalize]"),
    )


class Checkpoints:
    """Round checkpoints of the global shared adapter, in PEFT format, plus a history file."""

    def __init__(self, root: Path, model) -> None:  # noqa: ANN001
        self.root = root
        self.model = model

    def save(self, rec: RoundRecord, arrays: dict[str, np.ndarray], history: list[RoundRecord]) -> Path | None:
        """A released round: its checkpoint, then the history. A halted attempt: the history only
        (the weights did not change, and its round number is attempted again)."""
        path = None
        if not rec.halted:
            set_arrays(self.model, Group.SHARED, arrays)
            path = self.root / "checkpoints" / f"round-{rec.server_round:04d}"
            save_adapter(self.model, SHARED_ADAPTER, path, metadata={"round": str(rec.server_round)})
            write_text_atomic(self.root / "checkpoints" / "LATEST", path.name + "\n")
        write_text_atomic(self.root / "history.json", json.dumps([dataclasses.asdict(h) for h in history], indent=1))
        return path


@dataclasses.dataclass(frozen=True)
class ServerPolicy:
    """The policy in force: what the strategy sends and what it expects attested."""

    version: int
    digest: str
    envelope: bytes
    summary: dict
    roots: tuple[bytes, ...] = ()  # the trust-root chain that ends at root.json, oldest first (keys.root_chain)

    def as_tuple(self) -> tuple[int, str, bytes | None]:
        return self.version, self.digest, self.envelope


def load_server_policy(envelope_path: Path, root_path: Path, *, backbone_sha256: str, now: datetime | None = None) -> ServerPolicy:
    """Verify the envelope the operator gave against the trust root, as a device will.

    The server refuses to start (a :class:`PolicyError`) rather than distribute a policy its
    own devices would reject. The expected attestation digest is that of the module the
    envelope carries, computed exactly as a device computes it.
    """
    from fedpref.safety_policy import load_root, verify_envelope
    from fedpref.safety_policy.classifier import SafetyModule
    from fedpref.server.keys import root_chain

    now = now or datetime.now(timezone.utc)
    try:
        envelope = envelope_path.read_bytes()
        root_bytes = root_path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{e.filename}: {e.strerror}; check the run config's policy and root paths") from None
    root = load_root(root_bytes, now=now)
    policy = verify_envelope(envelope, root, last_version=0, now=now, backbone_sha256=backbone_sha256)
    digest = SafetyModule.from_policy(policy).digest()
    chain = root_chain(root_path, root_bytes)  # never a root-v<N>.json newer than root.json; no gaps
    return ServerPolicy(version=policy.version, digest=digest, envelope=envelope, summary=policy.manifest_summary(),
                        roots=chain)


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where a restarted server picks up: the next round, the weights, the history so far."""

    next_round: int
    arrays: dict[str, np.ndarray]
    history: list[RoundRecord]


def resume_point(server_dir: Path, model, initial: dict[str, np.ndarray], ledger: PrivacyLedger,  # noqa: ANN001
                 *, halted_keep_numbers: bool = False) -> Resume:
    """Read back what a previous (possibly killed) server left in ``server_dir``.

    The ledger decides the next round: a round is charged *before* its weights are
    released, so a crash between the two leaves a charged round without a checkpoint. That
    round is not re-run under the same number (it stays charged: over-counting, never
    under-counting); training continues from the latest checkpoint.

    A halted attempt (secure aggregation) releases nothing. With ``q = 1`` its round number is
    attempted again, after a restart too; with ``q < 1`` (``halted_keep_numbers``) a halted round
    is never retried, it keeps its number, so a restart continues after it as the run would have.
    """
    charged = [e.round for e in ledger.entries()]
    latest = server_dir / "checkpoints" / "LATEST"
    hist_path = server_dir / "history.json"
    if not charged and not latest.exists() and not (halted_keep_numbers and hist_path.exists()):
        return Resume(1, initial, [])
    arrays, name = initial, "the initial weights"
    if latest.exists():
        name = latest.read_text().strip()
        load_adapter_weights(model, SHARED_ADAPTER, server_dir / "checkpoints" / name)
        arrays = get_arrays(model, Group.SHARED)
    history = [RoundRecord(**h) for h in json.loads(hist_path.read_text())] if hist_path.exists() else []
    # halted attempts are in the history but release nothing: at q = 1 their round number is attempted again
    used = history if halted_keep_numbers else released_rounds(history)
    next_round = max([*charged, *(h.server_round for h in used), 0]) + 1
    log.warning("fedpref: resuming at round %d from %s (ledger: %d charged rounds)", next_round, name, len(charged))
    return Resume(next_round, arrays, history)


@dataclasses.dataclass
class Federation:
    """What a server run holds: the strategy (with its ledger and checkpoints) and where it resumes."""

    frozen_identity: str  # what devices must attest: backbone sha256 (+ attribute basis)
    policy: ServerPolicy | None
    strategy: FedPrefStrategy
    initial: dict[str, np.ndarray]
    resume: Resume
    bar: RoundBar
    released: dict[str, np.ndarray]  # the latest released global shared weights (updated every round)


EnvelopeTransform = Callable[[bytes], bytes]  # attack experiments only (simulations/attacks.py)


def prepare_federation(run: AppRun, settings: ServerSettings, *, clock=time.time, label: str = "",  # noqa: ANN001
                       envelope_transform: EnvelopeTransform | None = None) -> Federation:
    """Backbone, policy (verified), strategy, ledger, checkpoints and resume point of a run.

    Every DP draw of the run comes from a fresh OS-CSPRNG generator per round, unless a
    simulation asks for ``deterministic_noise`` (:mod:`fedpref.server.release`).
    """
    fed = settings.federation
    backbone = load_backbone(settings.model.backbone or None)
    policy = (
        load_server_policy(run.policy, run.root, backbone_sha256=backbone.sha256)  # type: ignore[arg-type]
        if run.policy is not None else None
    )
    if policy is not None:
        log.warning("fedpref: safety policy v%d in force (digest %s…)", policy.version, policy.digest[:12])
        if envelope_transform is not None:  # attack experiment: what a man in the middle would deliver
            policy = dataclasses.replace(policy, envelope=envelope_transform(policy.envelope))
            log.warning("fedpref: ATTACK EXPERIMENT: sending an altered policy envelope")
    model = build_model(backbone, settings.model.adapter, adapters=(SHARED_ADAPTER,), seed=run.seed)
    identity = model_identity(backbone.sha256, settings.model.adapter)  # what devices must attest
    initial = get_arrays(model, Group.SHARED)
    run.server_dir.mkdir(parents=True, exist_ok=True)
    ledger = PrivacyLedger(run.server_dir / "ledger.jsonl")
    budget = UserLevelBudget(
        max_epsilon=fed.max_epsilon_user, delta=fed.delta, accountant=AccountantKind.RDP, ledger=ledger,
    )
    resume = resume_point(run.server_dir, model, initial, ledger, halted_keep_numbers=fed.client_sample_rate < 1.0)
    ckpt = Checkpoints(run.server_dir, model)
    strategy: FedPrefStrategy
    bar: RoundBar

    def on_round(rec: RoundRecord, arrays: dict[str, np.ndarray]) -> None:
        ckpt.save(rec, arrays, strategy.history)
        if rec.halted:
            return
        fed_run.released = arrays
        bar.update(advance=1, eps_user=f"{rec.epsilon_user:.2f}", ok=rec.accepted, rej=len(rec.rejected))

    strategy = FedPrefStrategy(
        fed=fed, local=settings.local, shapes={k: v.shape for k, v in initial.items()},
        frozen_identity=identity, budget=budget,
        train_shared=True,
        train_private=run.method is Method.PERSONALIZED and settings.personalize.rounds_train_private,
        generators=seeded_generators(run.seed) if run.deterministic_noise else fresh_generators(),
        clock=clock, on_round=on_round,
        policy=policy.as_tuple if policy is not None else None,
    )
    strategy.history.extend(resume.history)
    if policy is not None:
        strategy.policy_roots = policy.roots
    bar = RoundBar(f"{run.method.value} rounds{label}", total=fed.rounds, done=min(resume.next_round - 1, fed.rounds))
    fed_run = Federation(identity, policy, strategy, initial, resume, bar, released=resume.arrays)
    return fed_run


def personalize_after_rounds(grid: Grid, run: AppRun, settings: ServerSettings, f: Federation) -> None:
    """The final personalization (:mod:`fedpref.server.personalize`) of a personalized run, on the plain
    and the SecAgg+ path alike."""
    if run.method is not Method.PERSONALIZED:
        return
    try:
        personalize_devices(
            f.strategy, settings.personalize, f.released, server_dir=run.server_dir, secure=run.secure_aggregation,
            restarted=f.released is f.resume.arrays,  # this run released no round (`start --rounds 0`)
            node_ids=lambda: sampling_order(grid, grid.get_node_ids()),  # the users' order in a simulation
            send=lambda messages, timeout: send_and_receive(grid, messages, timeout=timeout),
        )
    except (FedPrefError, OSError) as e:  # the rounds are released and charged: the run still ends in order
        log.error("fedpref: the final personalization failed: %s", e)


def write_summary(run: AppRun, f: Federation, **extra: object) -> None:
    """``summary.json``: ``rounds_completed`` counts released (charged) rounds only; halted
    attempts (secure aggregation) are counted apart, with their reasons in ``history.json``;
    ``personalize``: the final personalization's record, if one was made for this model."""
    try:
        rec = load_personalize_record(run.server_dir)
    except FedPrefError:
        rec = None  # logged where it was read
    if rec is not None and rec.model_sha256 == weights_digest(f.released):
        extra = {"personalize": dataclasses.asdict(rec), **extra}
    p = f.policy
    history = f.strategy.history
    released = len(released_rounds(history))
    write_text_atomic(
        run.server_dir / "summary.json",
        json.dumps({"rounds_completed": released, "rounds_target": f.strategy.fed.rounds,
                    "halted_attempts": len(history) - released, "stopped_reason": f.strategy.stopped_reason,
                    "frozen_identity": f.frozen_identity, "method": run.method.value,
                    "policy": p.summary | {"safety_digest": p.digest} if p is not None else None, **extra},
                   indent=1),
    )


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None,
                     poll_s: float | None = None) -> list[Message]:
    """``grid.send_and_receive``: push ``messages``, then collect their replies until all are in
    or ``timeout`` s have passed (None: no limit), asking every ``poll_s`` s (default: every
    :data:`REPLY_POLL_S` on Flower's HttpGrid; on the Simulation Engine's InMemoryGrid, 19 times
    the last pull's cost, from :data:`SIM_REPLY_POLL_S` to :data:`SIM_REPLY_POLL_MAX_S`; the
    grid's own loop on any other grid)."""
    adaptive = False
    if poll_s is None:
        from flwr.superlink.grid import InMemoryGrid
        from flwr.superlink.grid.http_grid import HttpGrid

        if isinstance(grid, HttpGrid):
            poll_s = REPLY_POLL_S
        elif isinstance(grid, InMemoryGrid):
            poll_s, adaptive = SIM_REPLY_POLL_S, True
        else:
            return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        t0 = time.perf_counter()
        got = list(grid.pull_messages(waiting))
        pulled_s = time.perf_counter() - t0
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        left = math.inf if end is None else end - time.monotonic()
        if not waiting or left <= 0:
            break
        wait = duty_wait(pulled_s, low=poll_s, high=SIM_REPLY_POLL_MAX_S, duty=SIM_REPLY_POLL_DUTY) if adaptive else poll_s
        time.sleep(min(wait, left))
    return replies


def run_federation(grid: Grid, run: AppRun, settings: ServerSettings, *, clock=time.time,  # noqa: ANN001
                   envelope_transform: EnvelopeTransform | None = None) -> FedPrefStrategy:
    fed = settings.federation
    f = prepare_federation(run, settings, clock=clock, envelope_transform=envelope_transform)
    strategy = f.strategy
    arrays = arrays_to_record(f.resume.arrays)
    try:
        for rnd in range(f.resume.next_round, fed.rounds + 1):
            if not strategy.budget_allows(rnd):
                break
            messages = list(strategy.configure_train(rnd, arrays, None, grid))  # type: ignore[arg-type]
            replies = send_and_receive(grid, messages, timeout=fed.round_timeout_s) if messages else []
            new, _ = strategy.aggregate_train(rnd, replies)
            if new is not None:
                arrays = new
    finally:
        f.bar.close()
    personalize_after_rounds(grid, run, settings, f)
    write_summary(run, f)
    return strategy


def settings_for_run(run: AppRun, settings: ServerSettings) -> ServerSettings:
    """The config file's settings with the run config's overrides: the simulation's generated
    attribute basis, ``rounds`` (`fedpref-server start --rounds N`), and ``population`` (a
    simulation waits for every virtual device before it samples)."""
    if run.attribute_basis:  # the simulation's generated basis
        settings = dataclasses.replace(settings, model=settings.model.with_attribute_basis(run.attribute_basis))
    check_personalize_model(settings.personalize, settings.model.adapter, where=run.config_file or "<defaults>")
    fed = settings.federation
    if run.rounds:  # N more rounds on this workdir
        fed = dataclasses.replace(fed, rounds=run.rounds)
    if run.population > fed.min_available_clients:
        # Flower's Simulation Engine starts the ServerApp before it registers the nodes: without this a
        # first round could sample from part of the population (and a seeded run would not repeat)
        fed = dataclasses.replace(fed, min_available_clients=run.population)
    return dataclasses.replace(settings, federation=fed) if fed is not settings.federation else settings


def make_server_app(defaults: dict | None = None, *, envelope_transform: EnvelopeTransform | None = None) -> ServerApp:
    """A ServerApp whose run config is ``defaults`` overridden by Flower's run config.

    ``envelope_transform`` alters the policy envelope before it is sent: attack experiments
    only (:mod:`fedpref.simulations.attacks`), never reachable from a run config.
    """
    base = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = from_run_config({**base, **dict(context.run_config)}, run_id=context.run_id)
        log.warning("fedpref: checkpoints, ledger and history go to %s", run.server_dir)
        settings = settings_for_run(run, load_server_settings(run.config_file))
        if run.secure_aggregation:
            # imported here: server.secagg builds on this module
            from fedpref.server.secagg import load_secagg_config, run_secure_federation

            run_secure_federation(grid, context, run, settings, load_secagg_config(run.config_file),
                                  envelope_transform=envelope_transform)
        else:
            run_federation(grid, run, settings, envelope_transform=envelope_transform)

    return app


app = make_server_app()
