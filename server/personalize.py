"""The final personalization of a personalized run: after the last round, the released model
goes to every connected device, and each fits its private adapter on it.

Why a step of its own: in the rounds, a device trains its private adapter only when sampled
(about ``q · rounds`` epochs in a whole run), inside one per-sample clip it shares with the
shared gradients. Measured at 1,000 users (RESULTS.md): a private head fitted afterwards on
the final model ("finetuned") beat the rounds' heads by 0.047.

What it costs and reveals:

* **ε_user: nothing.** Only the already released (and charged) global weights go out; a device
  sends back its attestation (and, where asked *and* its own terms allow, the same bounded
  metrics as a round), never an array: :class:`~fedpref.protocol.messages.PersonalizeReply`
  refuses a reply that carries one.
* **ε_sample: the device's own.** The device charges the fit to its accountant before training
  and declines it past its own budget or below its own σ floor, as for a round
  (:func:`fedpref.client.device.personalize`).
* With secure aggregation on, no metrics are asked for: the rounds' metrics reach the server
  only as cohort sums there, and a personalize reply is one device's.
* A device answers a second fit on the same weights with :data:`ALREADY_PERSONALIZED_CODE`,
  at no cost: what bounds what a server can make it spend is its own ε_sample budget.

The step is recorded in ``personalize.json`` beside ``history.json``: the model's round and
sha256, the nodes it was offered to and those that answered, and how many fitted (now or
earlier), declined, were rejected or stayed silent. A server started again on the same model
(``fedpref-server start --rounds 0`` does just that) offers it to every
connected node that has not answered for it yet: a device that joined after the step, or one
whose answer was lost. A device that had fitted answers "already personalized", at no cost.
Node ids are the devices' registered identities in deployment; Flower's Simulation Engine draws
new ones per run, so a simulation run again on its workdir offers the model to every node again
(and each answers "already personalized").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Message

from fedpref.common.atomic import write_text_atomic
from fedpref.common.errors import DataError
from fedpref.protocol.messages import ALREADY_PERSONALIZED_CODE, PERSONALIZE_MESSAGE_TYPE, PersonalizeReply, train_request, weights_digest
from fedpref.server.config import PersonalizeConfig
from fedpref.server.strategy import (FedPrefStrategy, in_rank_order, make_round_config, released_rounds, short_reason,
                                     unweighted_means)
from fedpref.server.validation import Expected, RejectedUpdate, validate_attestation

log = logging.getLogger("fedpref.server")

RECORD_FILE = "personalize.json"
RESTART_GRACE_S = 60.0  # `start --rounds 0` with every connected device answered: how long to wait for one more


@dataclass
class PersonalizeRecord:
    """What the final personalization did; ``fedpref-server status`` and the simulation read it."""

    model_round: int  # the released round whose weights were sent
    model_sha256: str
    epochs: int
    population: int  # node ids the weights were offered to (a device keeps its id in deployment)
    fitted: int = 0  # replies that validated: the device fitted and kept its private adapter
    fitted_earlier: int = 0  # devices that had fitted on these weights already (a re-send after a restart)
    declined: list[dict[str, str]] = field(default_factory=list)  # error replies (budget, σ floor, a repeat, …)
    rejected: list[dict[str, str]] = field(default_factory=list)  # replies that failed validation
    missing: int = 0  # offered, and no reply before the timeout
    policy_sent: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # unweighted means of the latest send that had any
    seconds: float = 0.0
    offered: list[str] = field(default_factory=list)  # node ids the model was sent to (population = how many)
    answered: list[str] = field(default_factory=list)  # node ids that replied, whatever the reply


_FIELDS = {"model_round": int, "model_sha256": str, "epochs": int, "population": int, "fitted": int,
           "fitted_earlier": int, "declined": list, "rejected": list, "missing": int, "policy_sent": int,
           "metrics": dict, "seconds": (int, float), "offered": list, "answered": list}


def load_record(server_dir: Path) -> PersonalizeRecord | None:
    """``personalize.json``, checked field by field (a DataError naming the file, never a traceback)."""
    path = server_dir / RECORD_FILE
    fix = "delete it to personalize again"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({' '.join(str(e).split())[:80]}); {fix}") from None
    if isinstance(data, dict) and set(data) == set(_FIELDS) - {"offered", "answered"}:
        log.warning("fedpref: %s predates per-device records; the next step starts a new one", path)
        return None  # the devices that fitted answer "already personalized", at no cost
    if not isinstance(data, dict) or set(data) != set(_FIELDS):
        raise DataError(f"{path}: not a personalization record (fields {sorted(data) if isinstance(data, dict) else type(data).__name__}); {fix}")
    for k, t in _FIELDS.items():
        v = data[k]
        if isinstance(v, bool) or not isinstance(v, t) or (k in ("declined", "rejected") and not all(
                isinstance(r, dict) and all(isinstance(x, str) for x in r.values()) for r in v)) or (
                k in ("offered", "answered") and not all(isinstance(x, str) and x.isdigit() for x in v)):
            raise DataError(f"{path}: field {k!r} = {str(v)[:40]!r} has the wrong type; {fix}")
    return PersonalizeRecord(**data)


Send = Callable[[Iterable[Message], float], list[Message]]  # messages, timeout → replies


def personalize_devices(strategy: FedPrefStrategy, cfg: PersonalizeConfig, arrays: dict[str, np.ndarray], *,
                        server_dir: Path, node_ids: Callable[[], list[int]], send: Send, secure: bool = False,
                        restarted: bool = False, clock: Callable[[], float] = time.time) -> PersonalizeRecord | None:
    """Send the released ``arrays`` to every connected node for its private fit; record what came back.

    Nothing happens (``None``) unless ``cfg.epochs > 0``, a round was released and a node is
    connected. For weights already recorded (and offered to one of the nodes connected now),
    only the nodes without a final answer (fitted, now or earlier) are offered them, and the
    record grows; otherwise a new record starts (new weights, or a simulation run again: new
    node ids). The caller decides that the run is a personalized one. ``secure``: the run
    aggregates securely, so no per-device metrics are asked for. ``restarted``: this server run
    released no round (``start --rounds 0``), so it first waits for its devices to reconnect.
    """
    released = released_rounds(strategy.history)
    if cfg.epochs == 0 or not released:
        return None
    model_round = released[-1].server_round
    sha = weights_digest(arrays)
    try:
        done = load_record(server_dir)
    except DataError as e:  # a damaged record: start a new one (devices that fitted answer at no cost)
        log.error("fedpref: %s", e)
        done = None
    t0 = clock()
    if restarted:  # a server just started (`start --rounds 0`): its devices reconnect first, as for a round
        try:
            strategy.wait_for_nodes(node_ids)
        except DataError:  # fewer than min_available_clients by the round timeout: offer it to those there are
            pass
    connected = {str(n): n for n in node_ids()}
    same = done is not None and done.model_sha256 == sha and bool(set(connected) & set(done.offered))
    rec = done if same and done is not None else PersonalizeRecord(
        model_round=model_round, model_sha256=sha, epochs=cfg.epochs, population=0)
    nodes = pending(rec, connected)
    if not nodes and same and restarted:  # a device that joined may still be connecting: give it a moment
        deadline = clock() + min(RESTART_GRACE_S, strategy.fed.round_timeout_s)
        while not nodes and clock() < deadline:
            time.sleep(1.0)
            nodes = pending(rec, {str(n): n for n in node_ids()})
    if not nodes:
        if same:
            log.warning("fedpref: round %d's model was already offered to every connected device (%d fitted); "
                        "not sent again", model_round, rec.fitted + rec.fitted_earlier)
            return rec
        log.warning("fedpref: no device is connected; round %d's model was not offered for personalization "
                    "(`fedpref-server start --rounds 0` offers it again)", model_round)
        return None
    again = {str(n) for n in nodes}  # a device that declined or was rejected before is asked again
    rec.declined = [d for d in rec.declined if d["node"] not in again]
    rec.rejected = [r for r in rec.rejected if r["node"] not in again]
    rec.answered = [a for a in rec.answered if a not in again]
    rec.epochs = cfg.epochs
    version, digest, envelope = strategy.policy()
    rc = make_round_config(strategy.fed, cfg.local(strategy.local), server_round=model_round, train_shared=False,
                           train_private=True, policy_version=version)
    if secure:
        rc = dataclasses.replace(rc, report_metrics=False)
    plain = train_request(arrays, rc, None)
    with_policy = train_request(arrays, rc, envelope, strategy.policy_roots) if envelope is not None else plain
    messages = []
    for n in nodes:
        give = envelope is not None and strategy.node_policy.get(n, 0) < version
        rec.policy_sent += give
        messages.append(Message(content=with_policy if give else plain, message_type=PERSONALIZE_MESSAGE_TYPE,
                                dst_node_id=n))
    rec.offered = sorted(set(rec.offered) | {str(n) for n in nodes}, key=int)
    rec.population = len(rec.offered)
    log.warning("fedpref: personalizing: round %d's model to %d devices (%d DP-SGD epochs of their private adapters)",
                model_round, len(nodes), cfg.epochs)
    # taken in the order offered, not the order they arrived in: a seeded simulation's metric means repeat
    replies = in_rank_order(send(messages, strategy.fed.round_timeout_s), {n: i for i, n in enumerate(nodes)})
    exp = Expected(shapes={k: v.shape for k, v in arrays.items()}, dtype="float32", clip_norm=strategy.fed.clip_norm,
                   server_round=model_round, frozen_identity=strategy.frozen_identity, policy_version=version,
                   safety_digest=digest)
    metrics = tally(rec, replies, exp, offered=again)
    rec.missing = len(set(rec.offered) - set(rec.answered))
    rec.metrics = unweighted_means(metrics) or rec.metrics
    rec.seconds += clock() - t0
    write_text_atomic(server_dir / RECORD_FILE, json.dumps(dataclasses.asdict(rec), indent=1))
    log.warning("fedpref: personalized: %d of %d devices fitted (%d earlier), %d declined, %d rejected, "
                "%d did not answer", rec.fitted + rec.fitted_earlier, rec.population, rec.fitted_earlier,
                len(rec.declined), len(rec.rejected), rec.missing)
    return rec


def pending(rec: PersonalizeRecord, connected: dict[str, int]) -> list[int]:
    """The connected nodes without a final answer for ``rec``'s weights: not offered yet, silent,
    declined or rejected (a device that fitted, now or earlier, is done), in ``connected``'s order."""
    open_ = {d["node"] for d in rec.declined} | {r["node"] for r in rec.rejected}
    final = set(rec.answered) - open_
    return [n for k, n in connected.items() if k not in final]  # in ``connected``'s (the sampling) order


def tally(rec: PersonalizeRecord, replies: Iterable[Message], exp: Expected, *,
          offered: set[str] | None = None) -> list[dict[str, float]]:
    """Count each reply into ``rec`` (fitted / declined / rejected) and its node into
    ``rec.answered``; returns the metrics sent. A reply from a node not in ``offered`` (when
    given), or a second reply from one node, counts for nothing."""
    metrics: list[dict[str, float]] = []
    for msg in replies:
        node = str(msg.metadata.src_node_id)
        if (offered is not None and node not in offered) or node in rec.answered:
            log.warning("personalize: ignored a reply from node %s (not offered, or answered already)", node)
            continue
        rec.answered.append(node)
        if msg.has_error() and msg.error.code == ALREADY_PERSONALIZED_CODE:
            rec.fitted_earlier += 1
            continue
        if msg.has_error():
            rec.declined.append({"node": node, "reason": short_reason(msg.error.reason)})
            log.info("personalize: node %s declined: %s", node, short_reason(msg.error.reason))
            continue
        try:
            reply = PersonalizeReply.from_content(msg.content)
            validate_attestation(reply.attestation, exp)
        except Exception as e:  # noqa: BLE001 - whatever one reply does, it is that reply's rejection
            reason = str(e) if isinstance(e, (RejectedUpdate, DataError)) else f"malformed reply ({type(e).__name__})"
            rec.rejected.append({"node": node, "reason": short_reason(reason)})
            log.warning("personalize: rejected the reply of node %s: %s", node, short_reason(reason))
            continue
        rec.fitted += 1
        if reply.metrics is not None:
            metrics.append(reply.metrics.as_dict())
    return metrics


__all__ = ["PersonalizeRecord", "RECORD_FILE", "load_record", "pending", "personalize_devices", "tally"]
