"""The fedpref ClientApp for secure-aggregation rounds (Flower SecAgg+, legacy API).

The device does exactly what :func:`fedpref.client.app.handle_train` does (verify the policy,
load the private adapter, DP-SGD, clip to ``C``, save, attest), through the same
:func:`fedpref.client.device.train_round`. Only the envelope differs: SecAgg+ needs Flower's
legacy ``ClientApp(client_fn=...)`` with ``secaggplus_mod``, so the request and reply travel
as ``FitIns``/``FitRes`` (:mod:`fedpref.protocol.secagg`), and ``secaggplus_mod`` masks the
returned parameters (the clipped shared delta, plus the bounded training metrics) before
they leave the device. The private adapter is never returned.

Under SecAgg the server cannot check one device's delta, so the device checks its own
output before it is masked: finite, exactly the requested shared keys and shapes, and
``‖delta‖₂ ≤ C``.

State: per user on disk (:class:`DeviceState` under ``<workdir>/clients/<user_id>``), as the
plain ClientApp. ``secaggplus_mod`` keeps its own per-round protocol state (key pairs,
shares) in Flower's ``Context.state``; that is Flower's, small, and reset at every setup.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import numpy as np

from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SAKey

from fedpref.client.adversary import DeviceDropped
from fedpref.client.app import SimulatedDevices, declined_reply, dropped_reply, failed_reply, lies, train_for_node
from fedpref.common.errors import DataError, DeclinedRound, FedPrefError
from fedpref.protocol.messages import NORM_TOLERANCE, TrainReply, TrainRequest, l2_norm, record_to_arrays
from fedpref.protocol.runconfig import from_run_config
from fedpref.protocol.secagg import fit_reply, parse_fit

log = logging.getLogger("fedpref.client")



def check_own_delta(delta: dict[str, np.ndarray], req: TrainRequest) -> None:
    """What the server can no longer check under SecAgg, checked by the device itself."""
    if set(delta) != set(req.shared):
        raise FedPrefError("refusing to send: the delta's keys differ from the shared partition")
    for k, v in delta.items():
        if v.shape != np.shape(req.shared[k]) or not np.all(np.isfinite(v)):
            raise FedPrefError(f"refusing to send: {k} has the wrong shape or non-finite values")
    norm = l2_norm(delta)
    if norm > req.config.clip_norm * (1 + NORM_TOLERANCE):
        raise FedPrefError(f"refusing to send: delta norm {norm:.6g} exceeds C = {req.config.clip_norm:.6g}")


class SecAggDevice(NumPyClient):
    """One user's device in a SecAgg+ round. Holds nothing between rounds."""

    def __init__(self, context: Context, run_config: dict, devices: SimulatedDevices) -> None:
        self._ctx = context
        self._run_config = run_config
        self._devices = devices

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        run = from_run_config(self._run_config, run_id=self._ctx.run_id)
        try:
            req, keys = parse_fit(parameters, config)
        except DataError as e:
            raise DeclinedRound(f"malformed round request: {e}") from None
        content = train_for_node(run, self._ctx, req, self._devices, secure=True)
        reply = TrainReply.from_content(content)
        delta = record_to_arrays(reply.delta)
        if not lies(run, self._ctx, self._devices):  # a simulated poisoner skips its own check, as a liar would
            check_own_delta(delta, req)
        return fit_reply(delta, keys, reply.metrics, reply.attestation, clip_norm=req.config.clip_norm)


def declines_as_errors(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Mod: a declined or policy-refused round becomes an error reply with its reason.

    Outside ``secaggplus_mod``: the device then drops out of the SecAgg round, and the
    server records the reason, as it does for the plain ClientApp's error replies.
    """
    try:
        return call_next(msg, context)
    except DeclinedRound as e:
        return declined_reply(msg, e)
    except DeviceDropped:  # a simulated fault: the device is gone between two SecAgg+ stages
        return dropped_reply(msg)
    except Exception:  # noqa: BLE001 - never the exception's text to the server
        return failed_reply(msg)


GUARD_STATE = "fedpref.secagg-guard"  # Context.state record: the nodes this device revealed shares for


def secagg_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Mod (just outside ``secaggplus_mod``): refuse SecAgg+ requests that would let the server
    unmask one device's delta, which Flower's mod would answer as asked.

    * At setup the reconstruction threshold must be a strict majority of the shares: a server
      then cannot tell one half of a node's neighbours it dropped and the other half it is
      alive and collect a threshold of *both* its secrets (its mask seed and its key).
    * At unmask a node may be named alive (its mask-seed share) or dropped (its key share),
      never both, across every unmask request of the round.
    Kept, like ``secaggplus_mod``'s own state, in Flower's per-round ``Context.state``.
    """
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if msg.metadata.message_type != MessageType.TRAIN or configs is None:
        return call_next(msg, context)
    stage = configs.get(SAKey.STAGE)
    records = context.state.config_records
    if stage == Stage.SETUP:
        shares, threshold = int(configs[SAKey.SHARE_NUMBER]), int(configs[SAKey.THRESHOLD])  # type: ignore[arg-type]
        if not 2 * threshold > shares:
            raise DeclinedRound("secure aggregation: the reconstruction threshold is not a majority of the shares; "
                                "refusing (a server could then rebuild both secrets of one device)")
        records[GUARD_STATE] = ConfigRecord({"active": [], "dead": []})
    elif stage == Stage.UNMASK:
        seen = records.get(GUARD_STATE, ConfigRecord({"active": [], "dead": []}))
        active = {*cast(list[int], configs[SAKey.ACTIVE_NODE_ID_LIST]), *cast(list[int], seen["active"])}
        dead = {*cast(list[int], configs[SAKey.DEAD_NODE_ID_LIST]), *cast(list[int], seen["dead"])}
        if active & dead:
            raise DeclinedRound("secure aggregation: the server asked for both secrets of the same device; "
                                "refusing to unmask")
        records[GUARD_STATE] = ConfigRecord({"active": sorted(active), "dead": sorted(dead)})
    return call_next(msg, context)


def make_secagg_client_app(
    defaults: dict | None = None, *, devices: SimulatedDevices = SimulatedDevices(),
    outer_mods: Sequence[Mod] = (), inner_mods: Sequence[Mod] = (),
) -> ClientApp:
    """A legacy ClientApp with ``secaggplus_mod``; run config = ``defaults`` + Flower's.

    ``outer_mods`` run before SecAgg+ (they see masked replies), ``inner_mods`` between SecAgg+
    and the device (they see the plaintext ``FitRes``): injection points for tests and
    instrumentation; production passes neither.
    """
    base = dict(defaults or {})

    def client_fn(context: Context):
        return SecAggDevice(context, {**base, **dict(context.run_config)}, devices).to_client()

    return ClientApp(client_fn=client_fn, mods=[*outer_mods, declines_as_errors, secagg_guard, secaggplus_mod, *inner_mods])


app = make_secagg_client_app()

__all__ = ["SecAggDevice", "app", "check_own_delta", "declines_as_errors", "make_secagg_client_app", "secagg_guard"]
