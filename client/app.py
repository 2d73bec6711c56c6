"""The fedpref ClientApp: one user's device in a round.

In simulation each virtual node is one user of the JSONL (``partition-id`` → the
``partition-id``-th user id in sorted order) with its state under
``<workdir>/clients/<user_id>``. Nothing per user is kept in Flower's ``Context``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS

from fedpref.client import adversary
from fedpref.client.data import UserData, group_by_user, load_jsonl
from fedpref.client.terms import DeviceTerms
from fedpref.common.errors import AlreadyPersonalized, DataError, DeclinedRound, FedPrefError, PolicyRefused
from fedpref.protocol.messages import ALREADY_PERSONALIZED_CODE, PERSONALIZE_ACTION, TrainRequest
from fedpref.protocol.runconfig import AppRun, from_run_config

if TYPE_CHECKING:
    from fedpref.model.cache import TextCache
    from fedpref.model.config import ModelConfig

# torch, transformers and peft are imported only where a round trains: Flower starts a ClientApp
# process per message, and the SecAgg+ key-exchange and unmasking stages train nothing.
NODE_CONFIG_KEY = "fedpref-home"  # node config: the agent home of a real device (fedpref-agent start)

log = logging.getLogger("fedpref.client")
# Flower's logger has its own console handler (INFO and up). Opacus calls logging.basicConfig at
# import (opacus/utils/module_utils.py), which gives the root logger a handler of no level: every
# Flower record, DEBUG included (~3,000 SecAgg+ stage lines per demo), then printed a second time.
logging.getLogger("flwr").propagate = False

DECLINED_CODE = 4100  # Flower error code for a round the device declines on purpose
POLICY_REFUSED_CODE = 4101  # the safety policy sent (or required) did not verify: no training
DEVICE_ERROR_CODE = 4102  # anything else went wrong on the device (details only in its own log)
DEVICE_ERROR_REASON = "device error: the round failed on the device; its own log has the details"
DROPPED_CODE = 4103  # simulation only (fault experiments): the device vanished mid-round
DROPPED_REASON = "dropped out mid-round (simulated fault)"


@functools.lru_cache(maxsize=4)
def _trust_root(path: str) -> bytes | None:
    """The trust root this (simulated) device pins on first use; ``""`` = none configured."""
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise FedPrefError(f"trust root {path}: {e.strerror}; set run config root to the operator's root.json") from None


@functools.lru_cache(maxsize=2)
def _users(data: Path) -> dict[str, UserData]:  # simulation only
    return group_by_user(load_jsonl(data))


@functools.lru_cache(maxsize=2)
def _model_config(config_file: str, attribute_basis: str = "") -> ModelConfig:
    from fedpref.common.tomlconfig import build, read_toml
    from fedpref.model.config import ModelConfig

    data = read_toml(config_file) if config_file else {}
    cfg = build(ModelConfig, data.get("model"), where=f"{config_file or '<defaults>'} [model]")
    if attribute_basis:  # run config `attribute-basis` (the simulation's generated basis)
        cfg = cfg.with_attribute_basis(attribute_basis)
    return cfg


@functools.lru_cache(maxsize=2)
def _shared_cache(path: str) -> TextCache | None:
    from fedpref.model.cache import TextCache

    return TextCache.load(path) if path and Path(path).exists() else None


def _user_for(context: Context, users: dict[str, UserData]) -> UserData:
    pid = int(context.node_config["partition-id"])
    ids = sorted(users)
    if not 0 <= pid < len(ids):
        raise FedPrefError(f"partition-id {pid} but the data has {len(ids)} users; set num-supernodes = {len(ids)}")
    return users[ids[pid]]


@dataclass(frozen=True)
class SimulatedDevices:
    """How simulated devices behave: set in Python by the simulation (never by a run config,
    which a deployed server controls). Deployed devices ignore it: an agent home's own terms
    and the OS CSPRNG apply there."""

    terms: DeviceTerms = DeviceTerms()  # every simulated device's terms
    # attack experiment: these users' devices perturb their safety weights (and attest the expected digest)
    tamper_safety: frozenset[str] = frozenset()
    # attack experiment: these users' devices poison the shared model (:mod:`fedpref.client.adversary`)
    poison: frozenset[str] = frozenset()
    # fault experiment: each sampled device drops out after training, before its reply, with this
    # probability per round (a repeatable schedule from ``fault_seed``)
    drop_rate: float = 0.0
    fault_seed: int = 0


def make_client_app(defaults: dict | None = None, *, devices: SimulatedDevices = SimulatedDevices()) -> ClientApp:
    """A ClientApp whose run config is ``defaults`` overridden by Flower's run config.

    ``flwr run .`` passes everything through the run config (pyproject's
    ``[tool.flwr.app.config]``); ``fedpref-sim`` bakes its settings into ``defaults`` and
    its devices' terms (and attack experiments) into ``devices``.
    """
    base = dict(defaults or {})
    app = ClientApp()
    secure: list[ClientApp] = []  # the SecAgg+ ClientApp, built on first use

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if SECAGG_CONFIGS in msg.content.config_records:  # a SecAgg+ stage: the server chose secure aggregation
            if not secure:
                from fedpref.client.secagg import make_secagg_client_app  # it builds on this module

                secure.append(make_secagg_client_app(base, devices=devices))
            return secure[0](msg, context)
        return handle_train(msg, context, {**base, **dict(context.run_config)}, devices)

    @app.train(PERSONALIZE_ACTION)
    def personalize(msg: Message, context: Context) -> Message:
        return handle_personalize(msg, context, {**base, **dict(context.run_config)}, devices)

    return app


def lies(run: AppRun, context: Context, devices: SimulatedDevices) -> bool:
    """Whether this node is one of a simulation's poisoning devices (never a deployed device)."""
    if not devices.poison or NODE_CONFIG_KEY in context.node_config or run.data is None:
        return False
    return _user_for(context, _users(run.data)).user_id in devices.poison


def train_for_node(run: AppRun, context: Context, req: TrainRequest,
                   devices: SimulatedDevices = SimulatedDevices(), *, secure: bool = False):  # -> RecordDict
    """One round on this node's user (plain and SecAgg+ apps alike). Raises DeclinedRound.

    A SuperNode started by ``fedpref-agent start`` names its agent home in the node config
    (``fedpref-home``): the user is the device's own store, under the device's own terms.
    Otherwise (simulation) the node is the ``partition-id``-th user of the run's JSONL.
    """
    home = deployed_home(run, context)
    if home is not None:
        return train_on_device(home, req)
    t0 = time.perf_counter()
    try:
        return _train_simulated(run, context, req, devices, secure=secure)
    finally:  # the cost report's client compute (simulation only: a deployed device records nothing)
        record_device_seconds(run.workdir, time.perf_counter() - t0)


def deployed_home(run: AppRun, context: Context) -> Path | None:
    """The agent home of a real device (``None``: a simulated node, whose run names the data).
    A device declines a run that asks for seeded DP noise."""
    if NODE_CONFIG_KEY in context.node_config:
        if run.deterministic_noise:
            raise DeclinedRound("the run asks for seeded DP noise (deterministic-noise); a device only ever draws "
                                "its noise from the OS CSPRNG")
        return Path(str(context.node_config[NODE_CONFIG_KEY]))
    if run.data is None:
        raise FedPrefError("run config data is empty and this node has no fedpref-home; give the preference "
                           "JSONL (simulation) or start the node with `fedpref-agent start` (deployment)")
    return None


DEVICE_SECONDS_FILE = "device-seconds.txt"  # in a simulation's workdir (beside clients/, server/): one float per line


def record_device_seconds(workdir: Path, seconds: float) -> None:
    """Append one call's wall seconds inside the ClientApp (O_APPEND: one short line per call is
    written whole even with many actors appending)."""
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / DEVICE_SECONDS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{seconds:.6f}\n".encode())
    finally:
        os.close(fd)


def _train_simulated(run: AppRun, context: Context, req: TrainRequest, devices: SimulatedDevices, *, secure: bool):
    from fedpref.client.device import DeviceState, adapters_for, get_runtime, stable_seed, train_round, user_cache

    user = _user_for(context, _users(run.data))
    rt = get_runtime(_model_config(run.config_file, run.attribute_basis), adapters_for(
        train_shared=req.config.train_shared, train_private=req.config.train_private))
    state = DeviceState(run.clients_dir / user.user_id)
    cache = user_cache(rt, user, state, _shared_cache(run.cache))
    rnd = req.config.server_round
    seeded = run.deterministic_noise  # simulation only: the same config gives the same numbers
    malicious = lies(run, context, devices)
    if malicious:
        user, req = adversary.poisoned_user(user), adversary.noiseless(req)
    content = train_round(
        rt, user, state, req, cache=cache, terms=adversary.LIAR_TERMS if malicious else devices.terms,
        trust_root=_trust_root(str(run.root) if run.root else ""),
        tamper_safety=user.user_id in devices.tamper_safety,
        batch_seed=stable_seed(run.seed, user.user_id, rnd, "batches") if seeded else None,
        noise_seed=stable_seed(run.seed, user.user_id, rnd, "noise") if seeded else None,
    )
    if malicious:  # it trained without DP (so charged nothing): it keeps no private adapter either
        adversary.discard_private(state)
    if adversary.drops(devices.fault_seed, user.user_id, rnd, devices.drop_rate):
        raise adversary.DeviceDropped(f"{user.user_id} drops out of round {rnd} after training")
    return adversary.boost(content, req.config.clip_norm, per_coordinate=secure) if malicious else content


def train_on_device(home_dir: Path, req: TrainRequest):  # -> RecordDict
    """One round on a real device: its pairs, its sealed adapter and accountant, its pinned
    root, its own terms; every random draw from the OS CSPRNG."""
    from fedpref.client.device import adapters_for, train_round

    return on_device(home_dir, adapters_for(train_shared=req.config.train_shared, train_private=req.config.train_private),
                     lambda rt, user, state, cache, terms: train_round(rt, user, state, req, cache=cache, terms=terms,
                                                                       trust_root=None))


def on_device(home_dir: Path, adapters: tuple[str, ...], step):  # noqa: ANN001 -> RecordDict
    """``step(rt, user, state, cache, terms)`` on a real device's own store, under its own terms
    (the trust root was pinned by `fedpref-agent init`); then the adapter metadata's δ."""
    from fedpref.client.agent_home import AgentHome
    from fedpref.client.device import get_runtime, user_cache
    from fedpref.common.atomic import write_text_atomic

    home = AgentHome.load(home_dir)
    with home.open_store() as store:
        user = home.user(store)
        if not user.train:
            raise DeclinedRound("no preference pairs on this device yet (fedpref-agent feedback add/import)")
        rt = get_runtime(home.model, adapters)
        state = home.state(store)
        content = step(rt, user, state, user_cache(rt, user, state, None), home.terms)
        write_text_atomic(home.adapter_meta, json.dumps(home.adapter_metadata() | {"delta": home.terms.delta}), mode=0o600)
    return content


def personalize_for_node(run: AppRun, context: Context, req: TrainRequest,
                         devices: SimulatedDevices = SimulatedDevices()):  # -> RecordDict
    """The final personalization on this node's user (:func:`fedpref.client.device.personalize`):
    a real device's own store and terms, or (simulation) the ``partition-id``-th user."""
    home = deployed_home(run, context)
    if home is not None:
        return personalize_on_device(home, req)
    t0 = time.perf_counter()
    try:
        return _personalize_simulated(run, context, req, devices)
    finally:
        record_device_seconds(run.workdir, time.perf_counter() - t0)


def _personalize_simulated(run: AppRun, context: Context, req: TrainRequest, devices: SimulatedDevices):
    from fedpref.client.device import DeviceState, get_runtime, personalize, stable_seed, user_cache
    from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER

    if lies(run, context, devices):  # a poisoning device trained without DP and kept no private adapter
        raise DeclinedRound("simulated poisoning device: it keeps no private adapter")
    user = _user_for(context, _users(run.data))
    rt = get_runtime(_model_config(run.config_file, run.attribute_basis), (SHARED_ADAPTER, PRIVATE_ADAPTER))
    state = DeviceState(run.clients_dir / user.user_id)
    seeded = run.deterministic_noise
    rnd = req.config.server_round
    return personalize(
        rt, user, state, req, cache=user_cache(rt, user, state, _shared_cache(run.cache)), terms=devices.terms,
        trust_root=_trust_root(str(run.root) if run.root else ""), tamper_safety=user.user_id in devices.tamper_safety,
        batch_seed=stable_seed(run.seed, user.user_id, rnd, "personalize-batches") if seeded else None,
        noise_seed=stable_seed(run.seed, user.user_id, rnd, "personalize-noise") if seeded else None,
    )


def personalize_on_device(home_dir: Path, req: TrainRequest):  # -> RecordDict
    """The final personalization on a real device (:func:`on_device`)."""
    from fedpref.client.device import personalize
    from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER

    return on_device(home_dir, (SHARED_ADAPTER, PRIVATE_ADAPTER),
                     lambda rt, user, state, cache, terms: personalize(rt, user, state, req, cache=cache, terms=terms,
                                                                       trust_root=None))


def handle_personalize(msg: Message, context: Context, run_config: dict,
                       devices: SimulatedDevices = SimulatedDevices()) -> Message:
    """A personalize message, answered as a round is (:func:`answer`)."""
    return answer(msg, lambda: personalize_for_node(from_run_config(run_config, run_id=context.run_id), context,
                                                    parse_request(msg.content), devices))


def parse_request(content) -> TrainRequest:  # noqa: ANN001
    """The round request, or a declined round when the server sent something malformed or out
    of range (a NaN σ, an infinite clip, ...): the device never trains on it."""
    try:
        return TrainRequest.from_content(content)
    except DataError as e:
        raise DeclinedRound(f"malformed round request: {e}") from None


def handle_train(msg: Message, context: Context, run_config: dict,
                 devices: SimulatedDevices = SimulatedDevices()) -> Message:
    return answer(msg, lambda: train_for_node(from_run_config(run_config, run_id=context.run_id), context,
                                              parse_request(msg.content), devices))


def answer(msg: Message, step) -> Message:  # noqa: ANN001 - step: () -> RecordDict
    """``step()``'s content as the reply to ``msg``; a declined round, a simulated dropout or any
    other failure as the matching error reply (never the exception's own text)."""
    try:
        content = step()
    except DeclinedRound as e:
        return declined_reply(msg, e)
    except adversary.DeviceDropped:
        return dropped_reply(msg)
    except Exception:  # noqa: BLE001 - its text could carry paths or data: the device's log keeps it
        return failed_reply(msg)
    return Message(content=content, reply_to=msg)


def dropped_reply(msg: Message) -> Message:
    """A simulated device that vanished after training: Flower's simulation always answers a
    message, so the vanishing is an error reply the server counts with the other non-replies."""
    return Message(Error(code=DROPPED_CODE, reason=DROPPED_REASON), reply_to=msg)


def failed_reply(msg: Message) -> Message:
    """Any other failure: logged here in full, and a constant reason to the server (Flower would
    otherwise send the exception's text, which can name local paths or values)."""
    log.exception("round failed on this device")
    return Message(Error(code=DEVICE_ERROR_CODE, reason=DEVICE_ERROR_REASON), reply_to=msg)


def declined_reply(msg: Message, e: DeclinedRound) -> Message:
    """A round the device will not train, as a Flower error reply carrying the reason."""
    if isinstance(e, PolicyRefused):
        log.warning("refused to train: %s", e)
        return Message(Error(code=POLICY_REFUSED_CODE, reason=str(e)), reply_to=msg)
    if isinstance(e, AlreadyPersonalized):
        log.info("not personalizing again: %s", e)
        return Message(Error(code=ALREADY_PERSONALIZED_CODE, reason=str(e)), reply_to=msg)
    log.info("declined round: %s", e)
    return Message(Error(code=DECLINED_CODE, reason=str(e)), reply_to=msg)


app = make_client_app()
