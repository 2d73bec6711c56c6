"""Secure aggregation (issue 5 §3): Flower SecAgg+ under the fedpref round, on the Simulation Engine.

One real run: 5 users (tiny BERT backbone), q = 1, 2 rounds, every user its own virtual node.
Round 1: node of partition 1 drops out at SecAgg+'s masking stage (after it shared its keys,
so its pairwise masks must be reconstructed from its neighbours' shares). Round 2: partition 3
drops out at the unmask stage (after its masked vector was summed). Instrumentation:

* on each device, a mod *inside* ``secaggplus_mod`` writes the plaintext reply (the clipped
  delta) to disk: the ground truth no server ever sees;
* on the server (same process as the test), ``SecureFedPrefStrategy.admit`` and
  ``aggregate_fit`` are wrapped to record what arrives on the wire and what the aggregation
  receives.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fedpref.protocol.secagg import (
    SECURE_METRICS,
    decode_metric_sums,
    encode_metrics,
    fit_config,
    parse_fit,
    sum_error_bound,
)

USERS = 5
ROUNDS = 2
CLIP = 0.5
NOISE = 0.05
QUANT = 1 << 22
DROP = {1: ("collect_masked_vectors", 1), 2: ("unmask", 3)}  # round -> (stage, partition id)

CONFIG = """
[model]
backbone = "{backbone}"
max_length = 32

[model.adapter]
rank = 2
personal_dims = 2

[federation]
rounds = {rounds}
client_sample_rate = 1.0
clip_norm = {clip}
server_noise_multiplier = {noise}
min_available_clients = {users}
round_timeout_s = 300

[local]
epochs = 1
batch_size = 8
dp_noise_multiplier = 0.5

[secagg]
reconstruction_fraction = 0.67
quantization_range = {quant}
"""


def _client_mods(record_dir: str, drop: dict[int, tuple[str, int]]):
    """(outer, inner) mods, defined here so Ray pickles them by value into its actors."""

    def drop_out(msg, context, call_next):  # outer: before SecAgg+, a node that dies mid-protocol
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
        rnd, pid = int(msg.metadata.group_id), int(context.node_config["partition-id"])
        if drop.get(rnd) == (stage, pid):
            raise RuntimeError(f"simulated dropout of partition {pid} at {stage} in round {rnd}")
        return call_next(msg, context)

    def record_plaintext(msg, context, call_next):  # inner: what the device hands SecAgg+ to mask
        import os as _os

        import numpy as _np
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common.recorddict_compat import recorddict_to_fitres

        out = call_next(msg, context)
        if out.has_content():
            arrays = parameters_to_ndarrays(recorddict_to_fitres(out.content, keep_input=True).parameters)
            pid = int(context.node_config["partition-id"])
            _np.savez(_os.path.join(record_dir, f"r{int(msg.metadata.group_id)}-p{pid}.npz"), *arrays)
        return out

    return drop_out, record_plaintext


@pytest.fixture(scope="module")
def secagg_run(tiny_encoder_dir, tmp_path_factory):
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedpref.client.data import write_jsonl
    from fedpref.client.secagg import make_secagg_client_app
    from fedpref.server import secagg as server_secagg
    from fedpref.server.secagg import make_secagg_server_app
    from fedpref.client.app import SimulatedDevices
    from fedpref.simulations.config import load_sim_config
    from fedpref.simulations.engine import device_terms, start_ray
    from fedpref.simulations.persona import PersonaConfig, generate

    out = tmp_path_factory.mktemp("secagg")
    data = out / "pairs.jsonl"
    write_jsonl(generate(PersonaConfig(users=USERS, pairs_per_user=12, seed=5)).pairs, data)
    cfg = out / "secagg.toml"
    cfg.write_text(CONFIG.format(backbone=tiny_encoder_dir, rounds=ROUNDS, clip=CLIP, noise=NOISE,
                                 users=USERS, quant=QUANT))
    record_dir = out / "plaintext"
    record_dir.mkdir()
    settings = {"config": str(cfg), "data": str(data), "workdir": str(out / "work"),
                "method": "personalized", "cache": "", "seed": 0}

    seen: dict[str, list] = {"wire": [], "aggregate": [], "global": {}}
    Strategy = server_secagg.SecureFedPrefStrategy
    orig_admit, orig_aggregate, orig_configure = Strategy.admit, Strategy.aggregate_fit, Strategy.configure_fit

    def admit(self, stage, replies):
        replies = list(replies)
        for msg in replies:
            if stage == "collect_masked_vectors" and not msg.has_error():
                seen["wire"].append(msg.content)
        return orig_admit(self, stage, replies)

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import parameters_to_ndarrays

        seen["global"][server_round] = parameters_to_ndarrays(parameters)
        return orig_configure(self, server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        received = [parameters_to_ndarrays(res.parameters) for _, res in results]
        new, metrics = orig_aggregate(self, server_round, results, failures)
        seen["aggregate"].append({"round": server_round, "received": received, "m": len(results),
                                  "released": parameters_to_ndarrays(new) if new is not None else None})
        return new, metrics

    outer, inner = _client_mods(str(record_dir), DROP)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    init_args = {"include_dashboard": False, "num_cpus": 2}
    start_ray(init_args)  # retried: one failed Ray start must not fail the module
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Strategy, "admit", admit)
        mp.setattr(Strategy, "aggregate_fit", aggregate_fit)
        mp.setattr(Strategy, "configure_fit", configure_fit)
        _run_simulation(
            num_supernodes=USERS,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=make_secagg_client_app(settings, devices=SimulatedDevices(terms=device_terms(load_sim_config(cfg))),
                                              outer_mods=[outer], inner_mods=[inner]),
            server_app=make_secagg_server_app(settings),
            backend_name="ray",
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": init_args},
            verbose_logging=False,
        )
    plain = {}
    for f in record_dir.glob("*.npz"):
        rnd, pid = f.stem[1:].split("-p")
        with np.load(f) as z:
            plain[(int(rnd), int(pid))] = [z[f"arr_{i}"] for i in range(len(z.files))]
    server = out / "work" / "server"
    history = json.loads((server / "history.json").read_text())
    ledger = [json.loads(x) for x in (server / "ledger.jsonl").read_text().splitlines()]
    return {"seen": seen, "plain": plain, "history": history, "ledger": ledger, "server": server}


def _shared(arrays):
    return arrays[:-1]  # the last array is the masked metric vector


@pytest.mark.slow  # reads the module's SecAgg+ federation on Ray (secagg_run)
def test_the_round_completes_with_a_dropout_at_each_stage(secagg_run):
    hist = secagg_run["history"]
    assert [r["server_round"] for r in hist] == [1, 2]
    # round 1: the masking-stage dropout is out of the sum; round 2: the unmask dropout is in it
    assert [r["accepted"] for r in hist] == [USERS - 1, USERS]
    assert [len(a) for a in [[k for k in secagg_run["plain"] if k[0] == r] for r in (1, 2)]] == [USERS - 1, USERS]
    for rnd, (stage, _pid) in DROP.items():
        declined = hist[rnd - 1]["declined"]
        assert len(declined) == 1 and declined[0]["reason"].startswith(f"[{stage}]"), declined
        assert not hist[rnd - 1]["rejected"]
    assert [e["round"] for e in secagg_run["ledger"]] == [1, 2]  # charged, then released
    assert [e["participants"] for e in secagg_run["ledger"]] == [USERS - 1, USERS]
    assert (secagg_run["server"] / "checkpoints" / "round-0002").is_dir()


@pytest.mark.slow  # reads the module's SecAgg+ federation on Ray (secagg_run)
def test_the_server_never_holds_one_devices_delta(secagg_run):
    plain, seen = secagg_run["plain"], secagg_run["seen"]
    assert len(seen["wire"]) == 2 * USERS - 1  # stage-2 replies: 4 in round 1, 5 in round 2
    for content in seen["wire"]:
        # on the wire: the plaintext parameters were cleared by secaggplus_mod; only the masked ints travel
        assert all(len(rec) == 0 for rec in content.array_records.values())
        assert content.config_records["secaggplus_configs"]["masked_params"]
    assert len(seen["aggregate"]) == ROUNDS
    for agg in seen["aggregate"]:
        deltas = [v for (r, _), v in plain.items() if r == agg["round"]]
        for received in agg["received"]:
            for delta in deltas:
                for got, d in zip(_shared(received), _shared(delta)):
                    assert got.shape == d.shape
                assert not all(np.allclose(got, d, atol=1e-4) for got, d in zip(_shared(received), _shared(delta)))


@pytest.mark.slow  # reads the module's SecAgg+ federation on Ray (secagg_run)
def test_the_unmasked_sum_is_the_plain_sum_of_clipped_deltas(secagg_run):
    plain, seen = secagg_run["plain"], secagg_run["seen"]
    for agg in seen["aggregate"]:
        m = agg["m"]
        deltas = [v for (r, _), v in plain.items() if r == agg["round"]]
        assert len(deltas) == m
        for d in deltas:  # every device clipped before masking
            assert np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in _shared(d))) <= CLIP * (1 + 1e-6)
        bound = sum_error_bound(cohort=m, clip_norm=CLIP, quantization_range=QUANT) + 1e-9
        unmasked = [np.asarray(a, dtype=np.float64) * m for a in agg["received"][0]]
        plain_sum = [np.sum([np.asarray(d[i], dtype=np.float64) for d in deltas], axis=0) for i in range(len(unmasked))]
        worst = max(float(np.max(np.abs(u - p))) for u, p in zip(unmasked, plain_sum))
        assert worst <= bound, (worst, bound)
        assert worst > 0 or m == 0  # it did go through quantization
        assert max(float(np.max(np.abs(p))) for p in _shared(plain_sum)) > 100 * bound  # a non-trivial sum


@pytest.mark.slow  # reads the module's SecAgg+ federation on Ray (secagg_run)
def test_dp_noise_is_added_to_the_unmasked_sum(secagg_run):
    seen = secagg_run["seen"]
    hist = {r["server_round"]: r for r in secagg_run["history"]}
    expected_std = NOISE * CLIP / (1.0 * USERS)  # z·C/(q·N)
    for agg in seen["aggregate"]:
        rnd, m = agg["round"], agg["m"]
        assert hist[rnd]["noise_std"] == pytest.approx(expected_std)
        total = [np.asarray(a, dtype=np.float64) * m for a in _shared(agg["received"][0])]
        glob = seen["global"][rnd]
        noise = np.concatenate([
            ((np.asarray(new, np.float64) - np.asarray(g, np.float64)) - t / USERS).ravel()  # server lr = 1
            for new, g, t in zip(agg["released"], glob, total)
        ])
        assert noise.size > 200
        assert abs(float(noise.mean())) < 4 * expected_std / np.sqrt(noise.size)
        assert float(noise.std()) == pytest.approx(expected_std, rel=0.25)


@pytest.mark.slow  # reads the module's SecAgg+ federation on Ray (secagg_run)
def test_training_metrics_arrive_only_as_cohort_means(secagg_run):
    for r in secagg_run["history"]:
        met = r["metrics"]
        assert set(met) == {b.name for b in SECURE_METRICS}
        assert 0.0 <= met["train_accuracy"] <= 1.0 and 0.0 <= met["clipped"] <= 1.0
        assert met["steps"] >= 1 and met["train_loss"] > 0
        assert r["epsilon_sample_max"] > 0  # plain: the device's sample-level ε, for the reported maximum
        assert r["bytes_up_per_client"] > 0


# -- the contract over FitIns/FitRes, without Flower's engine ------------------------------------
def test_metric_encoding_round_trips_through_a_sum():
    rng = np.random.default_rng(0)
    values = [{b.name: float(rng.uniform(b.lo, b.hi)) for b in SECURE_METRICS} for _ in range(7)]
    total = np.sum([encode_metrics(v, 0.3) for v in values], axis=0)
    assert np.all(np.abs(np.array([encode_metrics(v, 0.3) for v in values])) <= 0.3 + 1e-12)
    means = decode_metric_sums(total, 7, 0.3)
    for b in SECURE_METRICS:
        assert means[b.name] == pytest.approx(np.mean([v[b.name] for v in values]), rel=1e-9, abs=1e-9)
    # out-of-range values saturate instead of escaping Flower's per-coordinate clip
    assert decode_metric_sums(encode_metrics({"train_loss": 1e9}, 1.0), 1, 1.0)["train_loss"] == pytest.approx(20.0)


def test_round_config_travels_as_a_legacy_fit_config():
    from fedpref.protocol.messages import PROTOCOL_VERSION, RoundConfig

    cfg = RoundConfig(server_round=3, protocol_version=PROTOCOL_VERSION, local_epochs=1, batch_size=8,
                      learning_rate=0.1, head_learning_rate=0.5, projection_learning_rate=0.05, clip_norm=1.0,
                      dp_noise_multiplier=1.0, dp_max_grad_norm=1.0, delta=1e-5, max_epsilon_sample=float("inf"),
                      train_shared=True, train_private=False, policy_version=2)
    arrays = [np.ones((2, 3), np.float32), np.zeros(4, np.float32)]
    req, keys = parse_fit(arrays, fit_config(cfg, ["a.weight", "b.bias"], b"envelope"))
    assert req.config == cfg and keys == ["a.weight", "b.bias"] and req.envelope == b"envelope"
    assert np.array_equal(req.shared["a.weight"], arrays[0])


# -- the strategy's own decisions, without Flower's engine ---------------------------------------
N_NODES = 5
SHAPES = {"w": (3,), "b": (2,)}


def _strategy(tmp_path, *, q=1.0, max_epsilon=float("inf")):
    from flwr.server import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy

    from fedpref.server.config import FederationConfig, LocalConfig
    from fedpref.server.privacy import AccountantKind, PrivacyLedger, UserLevelBudget
    from fedpref.server.secagg import SecAggConfig, SecureFedPrefStrategy
    from fedpref.server.release import seeded_generators
    from fedpref.server.strategy import FedPrefStrategy

    fed = FederationConfig(rounds=3, client_sample_rate=q, min_available_clients=N_NODES, clip_norm=1.0,
                           server_noise_multiplier=1.0, max_epsilon_user=max_epsilon, round_timeout_s=5.0)
    budget = UserLevelBudget(max_epsilon=max_epsilon, delta=1e-5, accountant=AccountantKind.RDP,
                             ledger=PrivacyLedger(tmp_path / "ledger.jsonl"))
    core = FedPrefStrategy(fed=fed, local=LocalConfig(), shapes=SHAPES, frozen_identity="b" * 64, budget=budget,
                           generators=seeded_generators(0), clock=lambda: 0.0)
    initial = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    strategy = SecureFedPrefStrategy(core, secagg=SecAggConfig(min_cohort=3), initial=initial)
    manager = SimpleClientManager()
    for i in range(1, N_NODES + 1):
        manager.register(GridClientProxy(node_id=i, grid=None, run_id=1))  # type: ignore[arg-type]
    return strategy, manager, strategy.initialize_parameters(manager)


def _results(mean: list[np.ndarray], m: int):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    params = ndarrays_to_parameters(mean)  # what SecAgg+ hands aggregate_fit: one mean for all
    return [(None, FitRes(Status(Code.OK, ""), params, 1, {})) for _ in range(m)]


def test_a_cohort_below_min_cohort_is_neither_released_nor_charged(tmp_path):
    strategy, manager, params = _strategy(tmp_path, q=0.01)
    assert strategy.configure_fit(1, params, manager) == []  # Poisson at q = 0.01 picks < 3 of 5
    (rec,) = strategy.core.history
    assert rec.accepted == 0 and "needs ≥ 3" in rec.rejected[0]["reason"]
    assert not (tmp_path / "ledger.jsonl").exists()


def test_the_budget_stops_before_sampling(tmp_path):
    strategy, manager, params = _strategy(tmp_path, max_epsilon=0.01)
    assert strategy.configure_fit(1, params, manager) == []
    assert "max_epsilon_user" in strategy.core.stopped_reason and not strategy.core.history


def test_an_unclipped_sum_is_projected_onto_m_c_and_released_and_a_clipped_one_is_untouched(tmp_path):
    """Halting on an over-long sum would publish a bit of the honest devices' sum outside the
    noise; the sum is projected onto the radius m·C instead (1-Lipschitz) and released."""
    from fedpref.server import secagg as server_secagg

    strategy, manager, params = _strategy(tmp_path)
    released = []
    real_release = server_secagg.release
    server_secagg.release = lambda total, **kw: released.append(total) or real_release(total, **kw)
    try:
        assert len(strategy.configure_fit(1, params, manager)) == N_NODES
        metrics = encode_metrics({}, 1.0)
        bad = [np.array([10.0, 0, 0]), np.zeros(2), metrics]  # mean 10 ⇒ ‖sum‖ = 50 > m·C = 5
        new, out = strategy.aggregate_fit(1, _results(bad, N_NODES), [])
        assert new is not None and out["accepted"] == N_NODES
        assert "projected" in strategy.core.history[-1].rejected[0]["reason"]
        norm = float(np.sqrt(sum(np.sum(np.square(v)) for v in released[0].values())))
        assert norm == pytest.approx(N_NODES * 1.0, rel=1e-3)  # onto m·C (+ the quantization slack)

        assert len(strategy.configure_fit(2, params, manager)) == N_NODES
        good = [np.array([0.2, 0, 0]), np.zeros(2), metrics]  # ‖sum‖ = 1 ≤ 5
        new, out = strategy.aggregate_fit(2, _results(good, N_NODES), [])
        assert new is not None and out["accepted"] == N_NODES and not strategy.core.history[-1].rejected
        np.testing.assert_allclose(released[1][next(iter(released[1]))], [1.0, 0, 0], rtol=1e-9)
    finally:
        server_secagg.release = real_release
    assert len((tmp_path / "ledger.jsonl").read_text().splitlines()) == 2  # charged once per release


def test_a_reply_with_a_bad_attestation_is_dropped_before_its_masked_vector_is_summed(tmp_path, flower_task):
    from dataclasses import asdict

    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedpref.protocol.messages import PROTOCOL_VERSION, Attestation
    from fedpref.protocol.secagg import ATTESTATION_PREFIX

    strategy, manager, params = _strategy(tmp_path)
    strategy.configure_fit(1, params, manager)

    def reply(node: int, backbone: str) -> Message:
        att = Attestation(protocol_version=PROTOCOL_VERSION, server_round=1, frozen_identity=backbone,
                          policy_version=0, safety_digest="")
        content = RecordDict({
            "fitres.metrics": ConfigRecord({ATTESTATION_PREFIX + k: v for k, v in asdict(att).items()}),
            "fitres.num_examples": MetricRecord({"num_examples": 1}),
            "secaggplus_configs": ConfigRecord({"masked_params": [b"\x00" * 8]}),
        })
        return Message(content, reply_to=Message(content=RecordDict(), dst_node_id=node, message_type="train"))

    kept = strategy.admit("collect_masked_vectors", [reply(1, "b" * 64), reply(2, "c" * 64)])
    assert [m.metadata.src_node_id for m in kept] == [1]
    rec = strategy._round.rec
    assert rec.replied == 2 and rec.rejected[0]["node"] == "2" and "backbone" in rec.rejected[0]["reason"]


def test_the_release_is_global_plus_sum_over_qn_plus_noise(tmp_path):
    strategy, manager, params = _strategy(tmp_path)
    strategy.configure_fit(1, params, manager)
    m = N_NODES - 1  # one dropout: the sum has 4 deltas, the denominator stays q·N = 5
    mean = [np.array([0.1, -0.2, 0.05]), np.array([0.3, 0.0]), encode_metrics({}, 1.0)]
    strategy.core.rng = np.random.default_rng(42)
    new, _ = strategy.aggregate_fit(1, _results(mean, m), [])
    from flwr.common import parameters_to_ndarrays

    rng, std = np.random.default_rng(42), 1.0 * 1.0 / (1.0 * N_NODES)  # z·C/(q·N)
    for got, mu, shape in zip(parameters_to_ndarrays(new), mean, SHAPES.values()):
        want = np.zeros(shape) + (mu * m / N_NODES + rng.normal(0.0, std, size=shape))
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert strategy.core.history[-1].noise_std == pytest.approx(std)


# -- halted attempts: retried under the same round number, never counted, never charged -------------
def _ledger_rounds(tmp_path) -> list[int]:
    from fedpref.server.privacy import PrivacyLedger

    path = tmp_path / "ledger.jsonl"
    return [e.round for e in PrivacyLedger(path).entries()] if path.exists() else []


def test_a_halted_attempt_is_retried_under_the_same_round_number_and_charges_nothing(tmp_path):
    strategy, manager, params = _strategy(tmp_path)
    mean = [np.array([0.1, 0.0, 0.0]), np.zeros(2), encode_metrics({}, 1.0)]
    assert len(strategy.configure_fit(1, params, manager)) == N_NODES  # Flower's attempt 1 = round 1
    assert strategy.aggregate_fit(1, [], []) == (None, {})  # nothing reached the aggregate: halted
    halted = strategy.core.history[-1]
    assert halted.server_round == 1 and halted.halted and halted.accepted == 0
    assert strategy.released == 0 and strategy.next_round == 1 and _ledger_rounds(tmp_path) == []
    assert strategy.more_attempts()

    assert len(strategy.configure_fit(2, params, manager)) == N_NODES  # Flower's attempt 2: round 1 again
    assert strategy._round.rec.server_round == 1
    new, _ = strategy.aggregate_fit(2, _results(mean, N_NODES), [])
    assert new is not None and not strategy.core.history[-1].halted
    assert strategy.released == 1 and strategy.next_round == 2 and _ledger_rounds(tmp_path) == [1]
    assert [(h.server_round, bool(h.halted)) for h in strategy.core.history] == [(1, True), (1, False)]


def test_max_attempts_halted_in_a_row_stop_the_run_with_the_reason(tmp_path):
    strategy, manager, params = _strategy(tmp_path)  # q = 1: a halted round is retried
    for attempt in (1, 2, 3):
        assert strategy.more_attempts()
        assert len(strategy.configure_fit(attempt, params, manager)) == N_NODES
        assert strategy.aggregate_fit(attempt, [], []) == (None, {})  # nothing reached the aggregate
    assert not strategy.more_attempts()
    reason = strategy.core.stopped_reason
    assert "stopped at round 1" in reason and "3 attempts in a row halted" in reason
    assert [h.server_round for h in strategy.core.history] == [1, 1, 1] and _ledger_rounds(tmp_path) == []
    assert strategy.released == 0


def test_with_client_sampling_a_halted_round_is_not_resampled(tmp_path):
    """Re-drawing the Poisson sample until it is large enough would include each user in the
    released rounds with a probability above the q the ledger charges: with q < 1 a halted
    round keeps its number, charges nothing and is not retried."""
    strategy, manager, params = _strategy(tmp_path, q=0.01)
    strategy.rounds = 3
    for attempt in (1, 2, 3):
        assert strategy.more_attempts()
        assert strategy.configure_fit(attempt, params, manager) == []  # < 3 sampled: halted
    assert not strategy.more_attempts() and strategy.core.stopped_reason is None
    assert [h.server_round for h in strategy.core.history] == [1, 2, 3]
    assert all(h.halted for h in strategy.core.history) and _ledger_rounds(tmp_path) == []
    assert strategy.released == 0 and strategy.skipped == 3


def test_the_workflow_makes_attempts_until_the_asked_rounds_are_released(tmp_path):
    """Flower's round counter counts attempts; `rounds` counts released rounds."""
    from types import SimpleNamespace

    from flwr.app import Context, RecordDict
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    from fedpref.server.secagg import AttemptsWorkflow

    strategy, _, _ = _strategy(tmp_path)
    strategy.rounds = 2
    mean = [np.array([0.1, 0.0, 0.0]), np.zeros(2), encode_metrics({}, 1.0)]
    outcome = iter([0, N_NODES, 0, N_NODES])  # masked vectors that reach the aggregate, per attempt
    seen = []

    def fit(grid, context):  # stands for SecAgg+'s stages
        attempt = context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]
        params = arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        assert context.strategy.configure_fit(attempt, params, context.client_manager)
        seen.append((attempt, context.strategy._round.rec.server_round))
        if m := next(outcome):
            context.strategy.aggregate_fit(attempt, _results(mean, m), [])
        # else the stage gives up: the workflow ends the attempt as halted

    grid = SimpleNamespace(get_node_ids=lambda: list(range(1, N_NODES + 1)), run=SimpleNamespace(run_id=1))
    ctx = LegacyContext(context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                        config=ServerConfig(num_rounds=2), strategy=strategy)
    AttemptsWorkflow(fit_workflow=fit)(grid, ctx)  # type: ignore[arg-type]
    assert seen == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert [bool(h.halted) for h in strategy.core.history] == [True, False, True, False]
    assert _ledger_rounds(tmp_path) == [1, 2]  # charged exactly once per released round
    assert strategy.released == 2 and strategy.core.stopped_reason is None


def test_resume_and_summary_count_released_rounds_only(tmp_path):
    """A restart retries a halted round's number; summary.json counts it apart."""
    import dataclasses
    import json

    from fedpref.server.app import resume_point
    from fedpref.server.privacy import AccountantKind, PrivacyLedger, UserLevelBudget
    from fedpref.server.strategy import RoundRecord, released_rounds

    history = [RoundRecord(server_round=1, population=5, sampled=5, replied=5, accepted=5),
               RoundRecord(server_round=2, population=5, sampled=2, replied=0, accepted=0, halted="2 node(s) sampled")]
    (tmp_path / "history.json").write_text(json.dumps([dataclasses.asdict(h) for h in history]))
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    UserLevelBudget(max_epsilon=float("inf"), delta=1e-5, accountant=AccountantKind.RDP, ledger=ledger).charge(
        round=1, sample_rate=1.0, noise_multiplier=1.0, clip_norm=1.0, participants=5, now=0.0)
    res = resume_point(tmp_path, None, {}, ledger)
    assert res.next_round == 2 and len(released_rounds(res.history)) == 1


def test_resume_after_halted_rounds_at_q_below_one_keeps_their_numbers(tmp_path):
    """With q < 1 a halted round is never retried: a restart (a killed server) continues after it,
    as the run would have, instead of attempting its number again (two records of one round)."""
    import dataclasses
    import json

    from fedpref.server.app import resume_point
    from fedpref.server.privacy import AccountantKind, PrivacyLedger, UserLevelBudget
    from fedpref.server.strategy import RoundRecord

    def halted(r: int) -> RoundRecord:
        return RoundRecord(server_round=r, population=10, sampled=2, replied=0, accepted=0, halted="2 node(s) sampled")

    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    (tmp_path / "history.json").write_text(json.dumps([dataclasses.asdict(halted(1))]))
    assert resume_point(tmp_path, None, {}, ledger, halted_keep_numbers=True).next_round == 2  # nothing released yet
    assert resume_point(tmp_path, None, {}, ledger).next_round == 1  # q = 1: the halted number is attempted again

    history = [RoundRecord(server_round=1, population=10, sampled=4, replied=4, accepted=4), halted(2), halted(3)]
    (tmp_path / "history.json").write_text(json.dumps([dataclasses.asdict(h) for h in history]))
    UserLevelBudget(max_epsilon=float("inf"), delta=1e-5, accountant=AccountantKind.RDP, ledger=ledger).charge(
        round=1, sample_rate=0.3, noise_multiplier=1.0, clip_norm=1.0, participants=4, now=0.0)
    res = resume_point(tmp_path, None, {}, ledger, halted_keep_numbers=True)
    assert res.next_round == 4 and len(res.history) == 3
    assert resume_point(tmp_path, None, {}, ledger).next_round == 2


def test_a_seeded_secure_round_samples_the_same_users_whatever_ids_flower_draws(tmp_path):
    """SecAgg+ walks the same order as the plain server (server.strategy.sampling_order): on the
    Simulation Engine's in-memory grid, the users' registration order, not Flower's random ids."""
    from flwr.server import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy

    from test_dispatch import federation, superlink_identity

    with superlink_identity():
        grids = [federation(40, [])[1:] for _ in range(2)]
    picked = []
    for i, (mapping, grid) in enumerate(grids):
        for q in (1.0, 0.3):
            (tmp_path / f"{i}-{q}").mkdir()
            strategy, _, params = _strategy(tmp_path / f"{i}-{q}", q=q)
            strategy.grid = grid
            manager = SimpleClientManager()
            for n in sorted(mapping):  # the manager's order is the random ids': it must not matter
                manager.register(GridClientProxy(node_id=n, grid=None, run_id=1))  # type: ignore[arg-type]
            users = [mapping[p.node_id] for p, _ in strategy.configure_fit(1, params, manager)]
            if q == 1.0:
                assert users == list(range(40))
            else:
                picked.append(users)
    assert picked[0] == picked[1] and 3 <= len(picked[0]) < 40
