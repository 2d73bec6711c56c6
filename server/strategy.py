"""The fedpref strategy: partial aggregation of shared deltas with user-level DP.

Per round, on Flower's Message API:

1. Poisson-sample each connected node with probability ``q`` (what the accountant assumes).
2. Send the global *shared* weights and the round config (never anything private).
3. Validate every reply (:mod:`fedpref.server.validation`); log and drop bad ones.
4. Sum the accepted clipped deltas; :func:`fedpref.server.release.release` divides by the
   *expected* cohort ``E[m] = q·N``, adds Gaussian noise with std ``z·C/E[m]``, charges the
   privacy ledger, and only then builds the new global weights, which are checkpointed.

Every DP draw (sampling, noise) comes from the round's generator (``generators(round)``):
fresh from the OS CSPRNG in deployment, seeded only in a simulation that asks for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpref.common.errors import DataError
from fedpref.protocol.messages import (
    K_SHARED,
    PROTOCOL_VERSION,
    RoundConfig,
    TrainReply,
    arrays_to_record,
    record_to_arrays,
    train_request,
)
from fedpref.server.config import FederationConfig, LocalConfig
from fedpref.server.privacy import UserLevelBudget
from fedpref.server.release import RoundGenerators, release
from fedpref.server.validation import Expected, RejectedUpdate, validate_reply

log = logging.getLogger("fedpref.server")
T = TypeVar("T")


@dataclass
class RoundRecord:
    """What happened in one round; the operator's status and the report read these."""

    server_round: int
    population: int  # connected nodes N
    sampled: int
    replied: int
    accepted: int
    rejected: list[dict[str, str]] = field(default_factory=list)  # node id + reason
    declined: list[dict[str, str]] = field(default_factory=list)  # error replies (e.g. device budget)
    epsilon_user: float = 0.0
    noise_std: float = 0.0
    update_norm: float = 0.0
    bytes_down_per_client: int = 0
    bytes_up_per_client: int = 0
    policy_version: int = 0  # the safety policy in force this round (0 = none)
    policy_sent: int = 0  # nodes the envelope was sent to this round
    metrics: dict[str, float] = field(default_factory=dict)  # unweighted means of the devices' bounded metrics (when sent)
    epsilon_sample_max: float = 0.0
    seconds: float = 0.0
    # why this attempt was halted (secure aggregation: too few sampled or surviving devices, a
    # rejected sum): nothing released, nothing charged, and the round is attempted again under
    # the same number. "" = the round was released (and charged).
    halted: str = ""


def released_rounds(history: list[RoundRecord] | list[dict]) -> list:
    """The records of released rounds: halted attempts are in the history, but never count as rounds."""
    return [h for h in history if not (h.get("halted") if isinstance(h, dict) else h.halted)]


class FedPrefStrategy(FedAvg):
    """FedAvg's message plumbing with Poisson sampling, validation and DP-FedAvg noise."""

    def __init__(
        self,
        *,
        fed: FederationConfig,
        local: LocalConfig,
        shapes: dict[str, tuple[int, ...]],
        frozen_identity: str,
        budget: UserLevelBudget,
        train_shared: bool = True,
        train_private: bool = True,
        generators: RoundGenerators,
        clock: Callable[[], float] = time.time,
        on_round: Callable[[RoundRecord, dict[str, np.ndarray]], None] | None = None,
        policy: Callable[[], tuple[int, str, bytes | None]] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fed.client_sample_rate, fraction_evaluate=0.0,
            min_train_nodes=0, min_available_nodes=fed.min_available_clients,
        )
        self.fed, self.local = fed, local
        self.shapes = shapes
        self.frozen_identity = frozen_identity
        self.budget = budget
        self.train_shared, self.train_private = train_shared, train_private
        self.generators = generators
        self.rng: np.random.Generator | None = None  # the current round's, from generators(round)
        self.clock = clock
        self.on_round = on_round
        self.policy = policy or (lambda: (0, "", None))
        self.history: list[RoundRecord] = []
        self._global: dict[str, np.ndarray] = {}
        self._population = 0
        self._sampled = 0
        self._rank: dict[int, int] = {}  # this round's node ids in sampling order: the order replies are summed in
        self._bytes_down = 0
        self._policy_sent = 0
        self._t0 = 0.0
        self.stopped_reason: str | None = None
        # policy version each node last attested (or refused with); unknown nodes get the envelope
        self.node_policy: dict[int, int] = {}
        self.policy_roots: tuple[bytes, ...] = ()  # the trust-root chain sent with the envelope

    def summary(self) -> None:
        log.info(
            "fedpref strategy: q=%.3f C=%.3g z=%.3g rounds=%d δ=%g", self.fed.client_sample_rate,
            self.fed.clip_norm, self.fed.server_noise_multiplier, self.fed.rounds, self.fed.delta,
        )

    # -- round config -------------------------------------------------------------------
    def round_config(self, server_round: int) -> RoundConfig:
        version, _, _ = self.policy()
        return make_round_config(self.fed, self.local, server_round=server_round, train_shared=self.train_shared,
                                 train_private=self.train_private, policy_version=version)

    def budget_allows(self, server_round: int) -> bool:
        """Whether round ``server_round`` fits the ε_user budget; if not, records why it stops.

        ``aggregate_train``'s ledger charge refuses an over-budget round too, so skipping
        this check can never release such a round.
        """
        exceeds, eps = self.budget.would_exceed(
            sample_rate=self.fed.client_sample_rate, noise_multiplier=self.fed.server_noise_multiplier
        )
        if exceeds:
            self.stopped_reason = (
                f"stopped before round {server_round}: it would bring ε_user to {eps:.3f} > "
                f"max_epsilon_user {self.fed.max_epsilon_user} (δ={self.fed.delta})"
            )
            log.warning(self.stopped_reason)
        return not exceeds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._t0 = self.clock()
        self._global = record_to_arrays(arrays)
        node_ids = self.wait_for_nodes(lambda: sampling_order(grid, grid.get_node_ids()))
        self._population = len(node_ids)
        picked = poisson_sample(node_ids, self.fed.client_sample_rate, self.round_rng(server_round))
        self._sampled = len(picked)
        self._rank = {n: i for i, n in enumerate(node_ids)}
        version, _, envelope = self.policy()
        cfg = self.round_config(server_round)
        plain = train_request(self._global, cfg, None)
        with_policy = train_request(self._global, cfg, envelope, self.policy_roots) if envelope is not None else plain
        messages, sizes, sent = [], [], 0
        for n in picked:
            # the envelope goes only to nodes not known to hold this version (distribution)
            send = envelope is not None and self.node_policy.get(n, 0) < version
            sent += send
            messages.append(Message(content=with_policy if send else plain, message_type=MessageType.TRAIN, dst_node_id=n))
            sizes.append(plain.array_records[K_SHARED].count_bytes() + (len(envelope) if send and envelope else 0))
        self._bytes_down = int(np.mean(sizes)) if sizes else 0
        self._policy_sent = sent
        log.info("round %d: sampled %d of %d nodes (Poisson q=%.3f); policy v%d sent to %d",
                 server_round, len(picked), len(node_ids), self.fed.client_sample_rate, version, self._policy_sent)
        return messages

    def round_rng(self, server_round: int) -> np.random.Generator:
        """A new DP generator for the round (sampling and noise draw from it)."""
        self.rng = self.generators(server_round)
        return self.rng

    def wait_for_nodes(self, connected: Callable[[], list[T]]) -> list[T]:
        """``connected()`` once at least ``min_available_clients`` are there (polled every second,
        up to ``round_timeout_s``); the plain and the SecAgg+ server both wait through this."""
        deadline = self.clock() + self.fed.round_timeout_s
        while True:
            nodes = connected()
            if len(nodes) >= self.fed.min_available_clients:
                return nodes
            if self.clock() > deadline:
                raise DataError(f"only {len(nodes)} nodes connected, need {self.fed.min_available_clients}")
            time.sleep(1.0)

    # -- aggregation ----------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        version, digest, _ = self.policy()
        exp = Expected(
            shapes=self.shapes, dtype="float32", clip_norm=self.fed.clip_norm, server_round=server_round,
            frozen_identity=self.frozen_identity, policy_version=version, safety_digest=digest,
        )
        rec = RoundRecord(server_round=server_round, population=self._population, sampled=self._sampled, replied=0, accepted=0)
        total = {k: np.zeros(s, dtype=np.float64) for k, s in self.shapes.items()}
        metrics: list[dict[str, float]] = []
        up_bytes: list[int] = []
        # summed in sampling order, not in the order the replies arrived: float sums then repeat exactly
        for msg in in_rank_order(replies, self._rank):
            node = str(msg.metadata.src_node_id)
            if msg.has_error():
                rec.declined.append({"node": node, "reason": short_reason(msg.error.reason)})
                log.warning("round %d: node %s declined: %s", server_round, node, msg.error.reason)
                continue
            rec.replied += 1
            try:
                reply = TrainReply.from_content(msg.content)
                delta = validate_reply(reply, exp)
                m = reply.metrics.as_dict() if reply.metrics is not None else {}
            except Exception as e:  # noqa: BLE001 - whatever one reply does, it is that reply's rejection
                reason = str(e) if isinstance(e, (RejectedUpdate, DataError)) else f"malformed reply ({type(e).__name__}: {e})"
                rec.rejected.append({"node": node, "reason": short_reason(reason)})
                log.warning("round %d: rejected update from node %s: %s", server_round, node, reason)
                continue
            # only an accepted reply changes server state
            self.node_policy[msg.metadata.src_node_id] = reply.attestation.policy_version
            for k, v in delta.items():
                total[k] += v
            rec.accepted += 1
            up_bytes.append(reply.delta.count_bytes())
            if m:
                metrics.append(m)

        rng = self.rng if self.rng is not None else self.round_rng(server_round)
        self.rng = None  # a round's generator serves that round only
        out = release(total, global_arrays=self._global, fed=self.fed, population=self._population,
                      participants=rec.accepted, server_round=server_round, budget=self.budget,
                      rng=rng, now=self.clock())
        rec.epsilon_user = out.epsilon_user
        rec.noise_std = out.noise_std
        rec.update_norm = out.update_norm
        rec.bytes_down_per_client = self._bytes_down
        rec.policy_version, rec.policy_sent = version, self._policy_sent
        rec.bytes_up_per_client = int(np.mean(up_bytes)) if up_bytes else 0
        rec.metrics = unweighted_means(metrics)
        rec.epsilon_sample_max = max((m.get("epsilon_sample", 0.0) for m in metrics), default=0.0)
        rec.seconds = self.clock() - self._t0
        self.history.append(rec)
        if self.on_round is not None:
            self.on_round(rec, out.arrays)
        summary = MetricRecord({"epsilon_user": rec.epsilon_user, "accepted": rec.accepted, "rejected": len(rec.rejected)})
        return arrays_to_record(out.arrays), summary


def make_round_config(
    fed: FederationConfig, local: LocalConfig, *, server_round: int, train_shared: bool, train_private: bool,
    policy_version: int,
) -> RoundConfig:
    """The round config the server sends, from its federation and local-training settings."""
    return RoundConfig(
        server_round=server_round, protocol_version=PROTOCOL_VERSION, local_epochs=local.epochs,
        batch_size=local.batch_size, learning_rate=local.learning_rate, head_learning_rate=local.head_learning_rate,
        projection_learning_rate=local.projection_learning_rate, clip_norm=fed.clip_norm,
        dp_noise_multiplier=local.dp_noise_multiplier, dp_max_grad_norm=local.dp_max_grad_norm,
        delta=fed.delta, max_epsilon_sample=local.max_epsilon_sample,
        train_shared=train_shared, train_private=train_private, policy_version=policy_version,
        report_metrics=fed.report_eval_metrics,
    )


def sampling_order(grid: Grid | None, node_ids: Iterable[int]) -> list[int]:
    """The order :func:`poisson_sample` walks ``node_ids`` in (the i-th draw decides the i-th node).

    Sorted ids, except on the Simulation Engine's in-memory grid: there Flower draws every node
    id at random when it registers the simulated users, so sorted ids put the users in a new
    order each run, and a seeded simulation with q < 1 sampled other users every run (same
    config, other numbers). There the order is the nodes' registration order, which is the
    users' (partition ids') order (flwr 1.42's ``vce_api._register_nodes`` and
    ``InMemoryLinkState.nodes``, a dict in insertion order). Any node it does not list, or any
    other grid: sorted ids. With CSPRNG draws (deployment) any fixed order samples the same way.
    """
    ids = set(node_ids)
    from flwr.superlink.grid import InMemoryGrid

    registered = getattr(getattr(grid, "state", None), "nodes", None) if isinstance(grid, InMemoryGrid) else None
    if isinstance(registered, dict):
        order = [n for n in list(registered) if n in ids]
        if len(order) == len(ids):
            return order
    return sorted(ids)


def in_rank_order(replies: Iterable[Message], rank: dict[int, int]) -> list[Message]:
    """``replies`` in the order their nodes were asked (``rank``: node id → position; any other
    node last, by id), not the order they arrived in, which two actors change every run."""
    return sorted(replies, key=lambda m: (rank.get(m.metadata.src_node_id, len(rank)), m.metadata.src_node_id))


def poisson_sample(node_ids: list[int], q: float, rng: np.random.Generator) -> list[int]:
    """Each node independently with probability ``q``: what the user-level accountant assumes."""
    keep = rng.random(len(node_ids)) < q
    return [n for n, k in zip(node_ids, keep) if k]


def unweighted_means(items: list[dict[str, float]]) -> dict[str, float]:
    """Unweighted means: no device's claim about its own data size weighs on what is reported."""
    keys = sorted(set().union(*items)) if items else []
    return {k: float(np.mean([m[k] for m in items if k in m])) for k in keys}


def short_reason(reason: str, limit: int = 300) -> str:
    """An error reason for the round record: one line of printable text (a device's text must not
    inject terminal escapes or fake lines into the operator's status); a long one keeps its end."""
    reason = "".join(ch if ch.isprintable() else "\ufffd" for ch in str(reason).strip())
    return reason if len(reason) <= limit else "…" + reason[-limit:]


__all__ = ["FedPrefStrategy", "RoundRecord", "K_SHARED", "in_rank_order", "make_round_config", "poisson_sample",
           "released_rounds", "sampling_order"]
