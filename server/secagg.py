"""The fedpref ServerApp with secure aggregation: Flower's SecAgg+ under the same round.

The round is the one of :mod:`fedpref.server.strategy` (Poisson sampling at rate ``q``,
``sum/(q·N)`` plus Gaussian noise of std ``z·C/(q·N)``, the ledger charged before release,
checkpoints and ``history.json``), run by Flower's ``SecAggPlusWorkflow`` on the legacy API
(``LegacyContext`` + ``DefaultWorkflow(fit_workflow=...)``), which is where SecAgg+ lives in
Flower 1.42. The server learns the *sum* of the masked vectors of the devices that reached
the masking stage, never one device's delta. What changes, and why:

* **Sampling.** SecAgg+ asks the strategy's ``configure_fit`` whom to train; ours Poisson-
  samples every connected node with probability ``q`` (:func:`poisson_sample`), with the
  round's DP generator (:meth:`FedPrefStrategy.round_rng`: the OS CSPRNG in deployment).
  Flower only shuffles the sampled nodes into its neighbour graph.
* **Weights.** SecAgg+ computes ``Σ wᵢxᵢ / Σ wᵢ``; every device sends ``w = 1``
  (``max_weight = 1``), so the unmasked result times the number of summed devices ``m`` is
  the plain sum of the clipped deltas; it goes through the same release path as the plain
  server (:func:`fedpref.server.release.release`: noise, ledger, weights), so ``ε_user`` is
  unchanged.
* **Quantization.** ``clipping_range = C``: an honestly clipped delta is never altered; the
  sum is exact up to ``m·2C/quantization_range`` per coordinate (stochastic rounding).
* **Validation.** Per device the server still checks what is plain in the reply: the
  attestation (protocol, round, frozen-weights identity, policy version, safety digest) and
  ``w = 1``. A failing reply is dropped *before* its masked vector is summed (SecAgg+ then
  treats the node as a dropout and removes its pairwise masks). Shapes, finiteness and ``‖δ‖ ≤ C`` of one delta
  cannot be checked: the device checks them itself (:func:`fedpref.client.secagg.check_own_delta`).
  The server checks the unmasked sum instead: the right shapes and finite (else the round is
  not released, nor charged), and ``‖Σδ‖ ≤ m·C``, else the sum is projected onto that ball and
  released as usual (halting would publish a bit of the honest sum outside the noise). Consequence: a *malicious* device can poison
  the aggregate (each coordinate bounded by ``C`` by Flower's quantizer) without being
  identified; the honest users' ``ε_user`` does not depend on it (their own contribution is
  still bounded by ``C``, on their own devices).
* **Halted rounds.** SecAgg+ needs at least 2 sampled nodes (here ``secagg.min_cohort``,
  default 3) and enough survivors at each stage (``reconstruction_threshold``). An attempt
  that cannot run releases nothing and charges nothing; the global weights stay. It is
  recorded in ``history.json`` (``halted``: the reason) but is not a released round. With
  ``q = 1`` the same round number is attempted again, at most ``secagg.max_attempts`` times in
  a row, then the run stops with that reason (``stopped_reason``), so ``rounds = N`` means N
  released rounds, or a plain reason why fewer. With ``q < 1`` a halted round is *not* retried
  (a retry would re-draw the sample until it is large enough, and released rounds would
  include each user with a probability above the ``q`` the ledger charges): it keeps its
  number and ``status`` reports it among the rounds halted. Flower's legacy round counter counts *attempts*
  (:class:`AttemptsWorkflow`); the fedpref round number is the strategy's. Strictly, a halt
  depends on who was sampled: its probability (:func:`halt_probability`) is logged and should
  stay well below ``δ``; the deployment refuses settings where it is large
  (:func:`check_cohort_settings`), and ``q = 1`` with ``min_available_clients ≥ min_cohort``
  makes it 0.

Flower 1.42 caveat: SecAgg+'s masks come from ``np.random.RandomState`` seeded with the
32-bit XOR-fold of each secret (``pseudo_rand_gen``; flwrlabs/flower#7522, open), so the
masking is not cryptographically strong against a server that brute-forces a mask seed.
This module uses Flower's SecAgg+ as is (no new protocol); see the issue note.
"""

from __future__ import annotations

import logging
import math
import time
import timeit
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SAKey
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_init_params_workflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid, ServerApp

from fedpref.common.errors import ConfigError, DataError
from fedpref.common.tomlconfig import build, check_fields, ranged, read_toml
from fedpref.protocol.messages import l2_norm
from fedpref.protocol.runconfig import AppRun
from fedpref.protocol.secagg import (
    SECURE_AGGREGATION_KEY,
    attestation_of,
    check_ranges,
    decode_metric_sums,
    fit_config,
    plain_epsilon_sample,
    split_sum,
    sum_error_bound,
)
from fedpref.server.app import (
    EnvelopeTransform,
    ServerSettings,
    make_server_app,
    personalize_after_rounds,
    prepare_federation,
    send_and_receive,
    write_summary,
)
from fedpref.server.release import release
from fedpref.server.strategy import FedPrefStrategy, RoundRecord, poisson_sample, sampling_order, short_reason
from fedpref.server.validation import Expected, RejectedUpdate, validate_attestation

log = logging.getLogger("fedpref.server")

AGGREGATE = "secagg"  # the "node" of a RoundRecord entry about the whole round, not one device
ATTEMPT_STRIDE = 1_000_003  # > MAX_ROUNDS: the DP generator key of a retry, round + halted_in_a_row·stride


@dataclass(frozen=True)
class SecAggConfig:
    """``[secagg]``: Flower SecAgg+ parameters. Fractions are of the round's sampled nodes."""

    # each node secret-shares with this fraction of the sampled nodes (1 = all); at least
    # 0.01, which also bounds the search of cohort_without_majority (~50k sizes)
    share_fraction: float = ranged(1.0, ge=0.01, le=1, note="(a share per 100 sampled devices at least)")
    # shares needed to rebuild a key, of those made; keep > 0.5 (a server that claims a node both
    # dropped and alive must not collect enough shares of both its secrets)
    reconstruction_fraction: float = ranged(0.67, gt=0, le=1)
    quantization_range: int = ranged(1 << 22, ge=2, lt=1 << 32)  # integers per coordinate in [-C, C]; error ≤ m·2C/this
    # masks are mod this (a power of 2 ≤ 2**32); m·quantization_range must stay below
    modulus_range: int = ranged(1 << 32, ge=4, le=1 << 32)
    # fewer sampled nodes: the round is halted
    min_cohort: int = ranged(3, ge=2, le=1_000_000, note="(SecAgg+ needs ≥ 2 nodes)")
    # halted attempts of one round in a row before the run stops (with q = 1 a halted attempt is retried)
    max_attempts: int = ranged(3, ge=1, le=1000)

    def __post_init__(self) -> None:
        check_fields(self, "secagg")
        m = self.modulus_range
        if m & (m - 1) or m > 1 << 32 or m <= self.quantization_range:
            raise ConfigError(
                f"secagg.modulus_range = {m}; use a power of 2 above quantization_range and ≤ 2**32 (4294967296)")
        bad = self.cohort_without_majority()
        if bad is not None:
            raise ConfigError(
                f"secagg.reconstruction_fraction = {self.reconstruction_fraction:g}: with {bad[0]} sampled devices "
                f"Flower's threshold is {bad[2]} of {bad[1]} shares, not a strict majority, and every device refuses "
                "such a round (a server could rebuild both secrets of one device); use reconstruction_fraction "
                ">= 0.67 (or raise min_cohort)")

    def cohort_without_majority(self) -> tuple[int, int, int] | None:
        """The smallest cohort of at least ``min_cohort`` sampled devices whose reconstruction threshold,
        as Flower's SecAgg+ workflow computes it, is not a strict majority of the shares (the
        devices' :func:`~fedpref.client.secagg.secagg_guard` refuses those rounds), as
        (devices, shares, threshold); ``None`` when every cohort size is fine."""
        r = self.reconstruction_fraction
        if r <= 0.5 + 1e-3:  # too close to one half: small cohorts fail, and the search below would be long
            n = max(self.min_cohort, 2)
            return n, flower_shares(self.share_fraction, n), flower_threshold(r, flower_shares(self.share_fraction, n))
        # round(r·s) > s/2 holds for every s > 1/(2r − 1) + 1: only smaller share counts need a look
        last = math.ceil((1 / (2 * r - 1) + 2) / self.share_fraction) + 2
        for n in range(max(self.min_cohort, 2), last + 1):
            shares = flower_shares(self.share_fraction, n)
            t = flower_threshold(r, shares)
            if not 2 * t > shares:
                return n, shares, t
        return None


def flower_shares(share_fraction: float, sampled: int) -> int:
    """Secret shares per device for ``sampled`` devices, as ``SecAggPlusWorkflow`` computes them (flwr 1.42)."""
    shares = round(share_fraction * sampled)
    if shares < sampled and shares & 1 == 0:
        shares += 1
    return sampled if shares <= 2 else shares


def flower_threshold(reconstruction_fraction: float, shares: int) -> int:
    """Shares needed to rebuild a secret, as ``SecAggPlusWorkflow`` computes it (flwr 1.42)."""
    return max(round(reconstruction_fraction * shares), 2)


def load_secagg_config(config_file: str) -> SecAggConfig:
    data = read_toml(config_file) if config_file else {}
    return build(SecAggConfig, data.get("secagg"), where=f"{config_file or '<defaults>'} [secagg]")


def halt_probability(*, population: int, sample_rate: float, min_cohort: int) -> float:
    """P(a Poisson sample of ``population`` at rate ``q`` has fewer than ``min_cohort`` nodes)."""
    return float(sum(math.comb(population, k) * sample_rate**k * (1 - sample_rate) ** (population - k)
                     for k in range(min(min_cohort, population + 1))))


MAX_HALT_PROBABILITY = 0.5  # above this, most rounds would halt (and be retried): refused in deployment


def _smallest(ok: Callable[[float], bool], lo: float, hi: float, *, integer: bool) -> float | None:
    """The smallest x in [lo, hi] with ok(x), ok being monotone; None if even hi fails."""
    if not ok(hi):
        return None
    for _ in range(60):
        if (hi - lo <= 1) if integer else (hi - lo <= 1e-4):
            break
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def check_cohort_settings(fed: Any, secagg: SecAggConfig, *, where: str) -> float:
    """Refuse ``[federation]`` settings under which secure-aggregation rounds would halt.

    Two rules, each a one-line :class:`ConfigError` naming both keys and the fix:

    * ``min_available_clients ≥ min_cohort``: the server starts a round once that many devices
      are connected; with fewer than ``min_cohort`` connected, every attempt halts.
    * ``halt_probability(min_available_clients, q, min_cohort) ≤ 0.5``: the chance that
      Poisson sampling at ``q`` picks fewer than ``min_cohort`` of the fewest devices a round
      can start with. Above it, most attempts halt and rounds run out of attempts.

    Returns that probability (0 with ``q = 1``).
    """
    n, q, k = fed.min_available_clients, fed.client_sample_rate, secagg.min_cohort
    if n < k:
        raise ConfigError(
            f"{where}: [federation] min_available_clients = {n} is below [secagg] min_cohort = {k}: secure "
            f"aggregation halts every round with fewer than {k} sampled devices; set min_available_clients >= {k}")
    p = halt_probability(population=n, sample_rate=q, min_cohort=k)
    if p > MAX_HALT_PROBABILITY:
        def ok_q(x: float) -> bool:
            return halt_probability(population=n, sample_rate=x, min_cohort=k) <= MAX_HALT_PROBABILITY

        def ok_n(x: float) -> bool:
            return halt_probability(population=int(x), sample_rate=q, min_cohort=k) <= MAX_HALT_PROBABILITY

        q_min = _smallest(ok_q, q, 1.0, integer=False)
        n_min = _smallest(ok_n, n, max(2 * n, 4 * k / q + 16), integer=True)
        fixes = [f"client_sample_rate >= {math.ceil(q_min * 100) / 100:g}" if q_min is not None else "",
                 f"min_available_clients >= {int(n_min)}" if n_min is not None else ""]
        raise ConfigError(
            f"{where}: [federation] client_sample_rate = {q:g} with min_available_clients = {n} samples fewer "
            f"than [secagg] min_cohort = {k} devices in {p:.0%} of rounds (each halted); set "
            f"{' or '.join(x for x in fixes if x)}")
    return p


@dataclass
class _Round:
    """What the strategy tracks between ``configure_fit`` and ``aggregate_fit``."""

    rec: RoundRecord
    expected: Expected
    t0: float
    global_arrays: dict[str, np.ndarray]
    epsilon_sample: list[float]
    up_bytes: list[int]
    attempt: int = 0  # Flower's (legacy) round number: it counts attempts, halted ones included
    done: bool = False


class SecureFedPrefStrategy(Strategy):
    """The legacy Strategy SecAgg+ calls; the round's logic is :class:`FedPrefStrategy`'s.

    ``core`` supplies the round config, the budget check, the policy, the RNG, the clock, the
    history and the checkpoint callback; this class does the sampling over the legacy
    ClientManager, the plain-part validation of replies, and the release of the unmasked sum.
    """

    def __init__(self, core: FedPrefStrategy, *, secagg: SecAggConfig, initial: dict[str, np.ndarray],
                 round_offset: int = 0, rounds: int | None = None) -> None:
        self.core = core
        self.secagg = secagg
        self.grid: Grid | None = None  # the run's grid (AttemptsWorkflow sets it): the sampling order
        self.keys = list(core.shapes)
        self._initial = initial
        self._round: _Round | None = None
        # Flower's legacy workflow numbers its rounds 1, 2, ...: here each is an *attempt*. The
        # fedpref round number starts after the rounds already charged (a resumed run) and
        # advances only when a round is released; a halted attempt is retried under it.
        self.round_offset = round_offset
        self.next_round = round_offset + 1
        self.rounds = rounds  # released rounds this run asks for (None: as many as attempts are made)
        self.released = 0
        self.skipped = 0  # halted rounds not retried (q < 1): they use up their round number
        self.halted_in_a_row = 0
        self.last_halt = ""
        # Retry a halted round only without client sampling (q = 1). With q < 1 a retry would
        # re-draw the Poisson sample until it is large enough: released rounds would then include
        # each user with a probability above the q the ledger charges. So a halted round there
        # keeps its number, releases and charges nothing, and is not tried again.
        self.retry_halted = core.fed.client_sample_rate >= 1.0

    # -- attempts -------------------------------------------------------------------------
    def more_attempts(self) -> bool:
        """Whether the workflow should make another attempt; records why the run stops if not."""
        core = self.core
        if core.stopped_reason is not None or (self.rounds is not None and self.released + self.skipped >= self.rounds):
            return False
        if self.halted_in_a_row >= self.secagg.max_attempts:
            core.stopped_reason = (
                f"stopped at round {self.next_round}: {self.halted_in_a_row} attempts in a row halted "
                f"([secagg] max_attempts), the last: {self.last_halt}")
            log.warning("fedpref: %s", core.stopped_reason)
            return False
        return True

    def attempt_over(self, attempt: int) -> None:
        """After the workflow's attempt: one that neither released nor halted (a stage gave up
        without telling) is a halted attempt too."""
        rnd = self._round
        if rnd is not None and rnd.attempt == attempt and not rnd.done:
            self._halt("the attempt ended without an aggregate")

    # -- setup ----------------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([self._initial[k] for k in self.keys])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        core, fed = self.core, self.core.fed
        attempt, server_round = server_round, self.next_round
        if core.stopped_reason is not None or not core.budget_allows(server_round):
            return []  # SecAgg+ then halts the round: nothing is trained, released or charged
        t0 = core.clock()
        global_arrays = dict(zip(self.keys, parameters_to_ndarrays(parameters), strict=True))
        # (the legacy manager refreshes from the grid)
        proxies = self.core.wait_for_nodes(lambda: list(client_manager.all().values()))
        population = len(proxies)
        check_ranges(cohort=population, quantization_range=self.secagg.quantization_range,
                     modulus_range=self.secagg.modulus_range)
        by_id = {p.node_id: p for p in proxies}
        # a retry draws anew (a seeded simulation would otherwise repeat the halted sample)
        key = server_round + self.halted_in_a_row * ATTEMPT_STRIDE
        picked = poisson_sample(sampling_order(self.grid, by_id), fed.client_sample_rate, core.round_rng(key))
        version, digest, envelope = core.policy()
        exp = Expected(shapes=core.shapes, dtype="float32", clip_norm=fed.clip_norm, server_round=server_round,
                       frozen_identity=core.frozen_identity, policy_version=version, safety_digest=digest)
        rec = RoundRecord(server_round=server_round, population=population, sampled=len(picked), replied=0,
                          accepted=0, policy_version=version)
        self._round = _Round(rec=rec, expected=exp, t0=t0, global_arrays=global_arrays, epsilon_sample=[], up_bytes=[],
                             attempt=attempt)
        if len(picked) < self.secagg.min_cohort:
            self._halt(f"{len(picked)} node(s) sampled, secure aggregation needs ≥ {self.secagg.min_cohort}")
            return []
        cfg = core.round_config(server_round)
        plain_bytes = sum(a.nbytes for a in global_arrays.values())
        out, sizes = [], []
        for n in picked:
            send = envelope is not None and core.node_policy.get(n, 0) < version
            rec.policy_sent += send
            ins = FitIns(parameters, cast(dict[str, Scalar], fit_config(cfg, self.keys, envelope if send else None, core.policy_roots if send else ())))
            out.append((by_id[n], ins))
            sizes.append(plain_bytes + (len(envelope) if send and envelope else 0))
        rec.bytes_down_per_client = int(np.mean(sizes))
        log.info("round %d: sampled %d of %d nodes (Poisson q=%.3f) for secure aggregation; policy v%d sent to %d",
                 server_round, len(picked), population, fed.client_sample_rate, version, rec.policy_sent)
        return out

    # -- replies, stage by stage ----------------------------------------------------------
    def admit(self, stage: str, replies: Iterable[Message]) -> list[Message]:
        """Record each stage's replies; at the masking stage, drop replies whose plain part fails.

        A dropped reply is a dropout to SecAgg+: its masked vector is never summed and its
        pairwise masks are removed with the key shares of its neighbours.
        """
        rnd = self._round
        kept = []
        for msg in replies:
            node = str(msg.metadata.src_node_id)
            if rnd is None:
                kept.append(msg)
                continue
            if msg.has_error():
                reason = short_reason(msg.error.reason)
                rnd.rec.declined.append({"node": node, "reason": f"[{stage}] {reason}"})
                log.warning("round %d: node %s dropped out at %s: %s", rnd.rec.server_round, node, stage, reason)
                kept.append(msg)  # SecAgg+ counts it as a dropout
                continue
            if stage == "collect_masked_vectors":
                rnd.rec.replied += 1
                try:
                    size = self._check_plain(msg, rnd)
                except Exception as e:  # noqa: BLE001 - whatever one reply does, it is that reply's rejection
                    reason = str(e) if isinstance(e, (RejectedUpdate, DataError)) else f"malformed reply ({type(e).__name__}: {e})"
                    rnd.rec.rejected.append({"node": node, "reason": short_reason(reason)})
                    log.warning("round %d: rejected update from node %s: %s", rnd.rec.server_round, node, reason)
                    continue
                rnd.up_bytes.append(size)
            kept.append(msg)
        return kept

    def _check_plain(self, msg: Message, rnd: _Round) -> int:
        """Check what is plain in a masking-stage reply; returns the masked payload's size."""
        masked = msg.content.config_records[RECORD_KEY_CONFIGS][SAKey.MASKED_PARAMETERS]
        size = sum(len(b) for b in cast(list[bytes], masked))
        metrics = dict(msg.content.config_records["fitres.metrics"])
        weight = msg.content.metric_records["fitres.num_examples"]["num_examples"]
        att = attestation_of(metrics)
        validate_attestation(att, rnd.expected)
        if weight != 1:
            raise RejectedUpdate(f"SecAgg weight {weight} != 1: the unmasked mean could not be turned into the sum")
        eps = plain_epsilon_sample(metrics)  # only when the device reports metrics; checked in range
        # only an accepted reply changes server state
        self.core.node_policy[msg.metadata.src_node_id] = att.policy_version
        if eps is not None:
            rnd.epsilon_sample.append(eps)
        return size

    # -- release --------------------------------------------------------------------------
    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """``results`` all carry the same unmasked *mean*; nothing here is one device's."""
        rnd = self._round
        if rnd is None or rnd.attempt != server_round or rnd.done:  # server_round: Flower's attempt number
            return None, {}
        server_round = rnd.rec.server_round
        if not results:
            self._halt("no masked vector reached the aggregate")
            return None, {}
        core, fed = self.core, self.core.fed
        rec, m = rnd.rec, len(results)
        rec.accepted = m
        mean = parameters_to_ndarrays(results[0][1].parameters)
        try:
            total, metric_sum = split_sum([np.asarray(a, dtype=np.float64) * m for a in mean], self.keys)
            total = self._bounded_sum(total, m)
        except (DataError, RejectedUpdate) as e:
            self._halt(f"unmasked sum rejected, round not released: {e}")
            return None, {}
        rng = core.rng if core.rng is not None else core.round_rng(server_round)
        core.rng = None  # a round's generator serves that round only
        out = release(total, global_arrays=rnd.global_arrays, fed=fed, population=rec.population, participants=m,
                      server_round=server_round, budget=core.budget, rng=rng, now=core.clock())
        new = out.arrays
        rec.epsilon_user = out.epsilon_user
        rec.noise_std = out.noise_std
        rec.update_norm = out.update_norm
        rec.bytes_up_per_client = int(np.mean(rnd.up_bytes)) if rnd.up_bytes else 0
        rec.metrics = decode_metric_sums(metric_sum, m, fed.clip_norm) if fed.report_eval_metrics else {}
        rec.epsilon_sample_max = max(rnd.epsilon_sample, default=0.0)
        self._finish(rnd, new)
        return ndarrays_to_parameters([new[k] for k in self.keys]), {
            "epsilon_user": rec.epsilon_user, "accepted": m, "rejected": len(rec.rejected)}

    def _bounded_sum(self, total: dict[str, np.ndarray], m: int) -> dict[str, np.ndarray]:
        """The unmasked sum, checked (shapes, finite: a quantized sum is always both) and projected
        onto the ball of radius ``m·C`` (+ quantization slack) that honestly clipped deltas fill.

        A sum outside it means some device sent an unclipped delta. Halting the round instead
        would let that device turn a bit of the honest devices' sum (was it pushed over the
        radius?) into a public event outside the DP noise; the projection is 1-Lipschitz, so
        the release keeps its sensitivity and the noisy round goes out as usual.
        """
        for k, shape in self.core.shapes.items():
            if tuple(total[k].shape) != tuple(shape):
                raise RejectedUpdate(f"{k}: shape {tuple(total[k].shape)} != {tuple(shape)}")
            if not np.all(np.isfinite(total[k])):
                raise RejectedUpdate(f"{k}: non-finite values in the sum")
        c = self.core.fed.clip_norm
        dims = sum(int(np.prod(s)) for s in self.core.shapes.values())
        slack = math.sqrt(dims) * sum_error_bound(cohort=m, clip_norm=c, quantization_range=self.secagg.quantization_range)
        norm, radius = l2_norm(total), m * c * (1 + 1e-6) + slack
        if norm <= radius:
            return total
        rnd = self._round
        reason = f"‖sum‖ = {norm:.6g} > m·C = {m * c:.6g}: some device sent an unclipped delta; sum projected onto m·C"
        log.warning("round %s: %s", rnd.rec.server_round if rnd else "?", reason)
        if rnd is not None:
            rnd.rec.rejected.append({"node": AGGREGATE, "reason": reason})
        return {k: v * (radius / norm) for k, v in total.items()}

    # -- halted rounds ----------------------------------------------------------------------
    def halted(self, server_round: int, stage: str) -> None:
        """Called by the workflow when SecAgg+ stops a round it had started."""
        rnd = self._round
        if rnd is not None and rnd.attempt == server_round and not rnd.done:  # server_round: the attempt
            self._halt(f"secure aggregation halted at {stage}: too few nodes left for the reconstruction threshold")

    def _halt(self, reason: str) -> None:
        """The attempt releases nothing and charges nothing; with q = 1 the round is attempted again."""
        rnd = self._round
        assert rnd is not None
        log.warning("round %d: %s; nothing released, nothing charged" + ("; the round will be attempted again"
                    if self.retry_halted else "; not retried (q < 1)"),
                    rnd.rec.server_round, reason)
        rnd.rec.rejected.append({"node": AGGREGATE, "reason": reason})
        rnd.rec.accepted = 0
        rnd.rec.epsilon_user = self.core.budget.spent()
        rnd.rec.halted = reason
        self.halted_in_a_row += 1
        self.last_halt = reason
        self._finish(rnd, rnd.global_arrays)

    def _finish(self, rnd: _Round, arrays: dict[str, np.ndarray]) -> None:
        rnd.done = True
        rnd.rec.seconds = self.core.clock() - rnd.t0
        if not rnd.rec.halted:  # released (and charged): the next round gets the next number
            self.released += 1
            self.next_round += 1
            self.halted_in_a_row = 0
        elif not self.retry_halted:  # q < 1: the halted round is not re-sampled (see __init__)
            self.skipped += 1
            self.next_round += 1
            self.halted_in_a_row = 0
        self.core.history.append(rnd.rec)
        if self.core.on_round is not None:
            self.core.on_round(rnd.rec, arrays)

    # -- no federated evaluation ------------------------------------------------------------
    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _StageGrid:
    """The grid, with each stage's replies passed through ``admit`` (everything else as is)."""

    def __init__(self, grid: Grid, admit: Callable[[Iterable[Message]], list[Message]]) -> None:
        self._grid, self._admit = grid, admit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._admit(send_and_receive(self._grid, messages, timeout=timeout))


class FedPrefSecAggWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, its stages unchanged; replies go through the strategy's
    ``admit`` (plain-part validation before masked vectors are summed), and a halted round is
    reported to the strategy."""

    def __call__(self, grid: Grid, context: Context) -> None:
        if not isinstance(context, LegacyContext) or not isinstance(context.strategy, SecureFedPrefStrategy):
            raise TypeError("FedPrefSecAggWorkflow needs a LegacyContext with a SecureFedPrefStrategy")
        strategy = context.strategy
        state = WorkflowState()
        rnd = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        for stage, step in (("setup", self.setup_stage), ("share_keys", self.share_keys_stage),
                            ("collect_masked_vectors", self.collect_masked_vectors_stage),
                            ("unmask", self.unmask_stage)):
            gated = _StageGrid(grid, lambda replies, s=stage: strategy.admit(s, replies))
            if not step(cast(Grid, gated), context, state):
                strategy.halted(rnd, stage)
                return


class AttemptsWorkflow(DefaultWorkflow):
    """Flower's legacy ``DefaultWorkflow`` (client-manager thread, initial parameters, the fit
    workflow per round), with its fixed ``range(num_rounds)`` loop replaced: Flower's round
    number counts attempts, and attempts go on while the strategy asks for more
    (:meth:`SecureFedPrefStrategy.more_attempts`: rounds still to release, no budget stop, fewer
    than ``max_attempts`` halted attempts in a row). No federated or centralized evaluation:
    the strategy has none."""

    def __call__(self, grid: Grid, context: Context) -> None:
        if not isinstance(context, LegacyContext) or not isinstance(context.strategy, SecureFedPrefStrategy):
            raise TypeError("AttemptsWorkflow needs a LegacyContext with a SecureFedPrefStrategy")
        strategy = context.strategy
        strategy.grid = grid
        if strategy.rounds is None:  # as Flower's loop: the server config's rounds, released ones here
            strategy.rounds = context.config.num_rounds
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        try:
            c_done.wait()
            default_init_params_workflow(grid, context)
            cfg = ConfigRecord()
            cfg[WorkflowKey.START_TIME] = timeit.default_timer()
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            attempt = 0
            while strategy.more_attempts():
                attempt += 1
                cfg[WorkflowKey.CURRENT_ROUND] = attempt
                self.fit_workflow(grid, context)
                strategy.attempt_over(attempt)
        finally:
            f_stop.set()
            thread.join()


def make_workflow(fed_timeout_s: float, clip_norm: float, cfg: SecAggConfig) -> DefaultWorkflow:
    fit = FedPrefSecAggWorkflow(
        num_shares=cfg.share_fraction, reconstruction_threshold=cfg.reconstruction_fraction,
        max_weight=1.0, clipping_range=float(clip_norm), quantization_range=cfg.quantization_range,
        modulus_range=cfg.modulus_range, timeout=fed_timeout_s,
    )
    return AttemptsWorkflow(fit_workflow=fit)


def run_secure_federation(
    grid: Grid, context: Context, run: AppRun, settings: ServerSettings, secagg: SecAggConfig, *,
    clock: Callable[[], float] = time.time, envelope_transform: EnvelopeTransform | None = None,
) -> FedPrefStrategy:
    """:func:`fedpref.server.app.run_federation`, with SecAgg+; returns the same strategy/history."""
    fed = settings.federation
    f = prepare_federation(run, settings, clock=clock, label=" (secagg)", envelope_transform=envelope_transform)
    core, bar = f.strategy, f.bar
    done = f.resume.next_round - 1  # rounds charged by earlier runs on this workdir (a restart, a new policy)
    if done >= fed.rounds:
        bar.close()
        log.warning("fedpref: %s already holds %d of %d rounds", run.server_dir, done, fed.rounds)
        personalize_after_rounds(grid, run, settings, f)
        write_summary(run, f, secure_aggregation=True)
        return core
    strategy = SecureFedPrefStrategy(core, secagg=secagg, initial=f.resume.arrays, round_offset=done,
                                     rounds=fed.rounds - done)
    log.warning(
        "fedpref: secure aggregation (Flower SecAgg+) on: share_fraction=%.2f reconstruction=%.2f "
        "quantization 2C/%d; P(round halted for < %d sampled) ≈ %.2g per round at N=%d; "
        "a halted attempt is retried, at most %d in a row",
        secagg.share_fraction, secagg.reconstruction_fraction, secagg.quantization_range, secagg.min_cohort,
        halt_probability(population=fed.min_available_clients, sample_rate=fed.client_sample_rate,
                         min_cohort=secagg.min_cohort), fed.min_available_clients, secagg.max_attempts,
    )
    try:
        check_cohort_settings(fed, secagg, where=run.config_file or "<defaults>")
    except ConfigError as e:  # `fedpref-server start` refuses these; a simulation may explore them
        log.warning("fedpref: %s", e)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=fed.rounds - done), strategy=strategy)
    try:
        make_workflow(fed.round_timeout_s, fed.clip_norm, secagg)(grid, legacy)
    finally:
        bar.close()
    personalize_after_rounds(grid, run, settings, f)
    write_summary(run, f, secure_aggregation=True)
    return core


def make_secagg_server_app(defaults: dict | None = None) -> ServerApp:
    """The regular ServerApp (:func:`fedpref.server.app.make_server_app`) with
    ``secure-aggregation`` on in its defaults. Pair it with
    :func:`fedpref.client.secagg.make_secagg_client_app`.
    """
    return make_server_app({**(defaults or {}), SECURE_AGGREGATION_KEY: True})


app = make_secagg_server_app()

__all__ = [
    "AttemptsWorkflow", "FedPrefSecAggWorkflow", "SecAggConfig", "SecureFedPrefStrategy", "app",
    "check_cohort_settings", "halt_probability",
    "load_secagg_config", "make_secagg_server_app", "run_secure_federation",
]
