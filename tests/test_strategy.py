"""The server strategy's aggregation: validation, DP-FedAvg noise, ledger before release."""


import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict

from fedpref.protocol.messages import PROTOCOL_VERSION, Attestation, TrainMetrics, train_reply
from fedpref.server.config import FederationConfig, LocalConfig
from fedpref.server.privacy import AccountantKind, PrivacyLedger, UserLevelBudget
from fedpref.server.release import dp_generator, seeded_generators
from fedpref.server.strategy import FedPrefStrategy, poisson_sample

SHA = "ab" * 32


def _strategy(tmp_path, *, n_coords=4, z=1e-3, q=0.5, population=10, on_round=None):
    fed = FederationConfig(rounds=3, client_sample_rate=q, clip_norm=1.0, server_noise_multiplier=z)
    budget = UserLevelBudget(max_epsilon=float("inf"), delta=1e-5, accountant=AccountantKind.RDP,
                             ledger=PrivacyLedger(tmp_path / "ledger.jsonl"))
    s = FedPrefStrategy(fed=fed, local=LocalConfig(), shapes={"w.lora_A.shared.weight": (n_coords,)},
                        frozen_identity=SHA, budget=budget, generators=seeded_generators(0), on_round=on_round)
    s._global = {"w.lora_A.shared.weight": np.zeros(n_coords, np.float32)}
    s._population = population
    return s


def _reply_to(node, delta, *, rnd=1, sha=SHA, epsilon=None):
    ins = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    m = TrainMetrics(train_loss=0.5, train_accuracy=0.5, epsilon_sample=float(node) if epsilon is None else epsilon, delta_norm=0.1, steps=1, seconds=0.1)
    att = Attestation(protocol_version=PROTOCOL_VERSION, server_round=rnd, frozen_identity=sha, policy_version=0, safety_digest="")
    return Message(content=train_reply({"w.lora_A.shared.weight": np.asarray(delta, np.float32)}, m, att), reply_to=ins)


def _noise(std: float, n: int, rnd: int = 1) -> np.ndarray:
    """The noise the seeded (simulation) strategy adds in round ``rnd``: its generator's first draw."""
    return dp_generator((0, 7919, rnd)).normal(0.0, std, size=n)


def test_mean_over_expected_cohort_plus_the_rounds_noise(tmp_path, flower_task):
    s = _strategy(tmp_path, q=0.5, population=4)  # E[m] = 2, noise std z·C/E[m] = 5e-4
    replies = [_reply_to(1, [0.5, 0, 0, 0]), _reply_to(2, [0, 0.5, 0, 0])]
    arrays, metrics = s.aggregate_train(1, replies)
    w = arrays["w.lora_A.shared.weight"].numpy()
    np.testing.assert_allclose(w, np.array([0.25, 0.25, 0, 0]) + _noise(5e-4, 4), atol=1e-6)
    rec = s.history[-1]
    assert rec.accepted == 2 and rec.rejected == [] and rec.epsilon_sample_max == 2.0


def test_noise_std_is_z_c_over_expected_cohort(tmp_path, flower_task):
    s = _strategy(tmp_path, n_coords=20000, z=2.0, q=0.25, population=40)  # std = 2·1/10
    arrays, _ = s.aggregate_train(1, [])
    w = arrays["w.lora_A.shared.weight"].numpy()
    assert s.history[-1].noise_std == pytest.approx(0.2)
    assert np.std(w) == pytest.approx(0.2, rel=0.03)
    assert abs(np.mean(w)) < 0.01


def test_bad_replies_are_rejected_with_reasons_and_the_rest_aggregated(tmp_path, flower_task):
    s = _strategy(tmp_path, q=1.0, population=3)
    replies = [
        _reply_to(1, [0.3, 0, 0, 0]),
        _reply_to(2, [5.0, 0, 0, 0]),  # over the clip norm
        _reply_to(3, [0.1, 0, 0, 0], sha="00" * 32),  # other backbone
    ]
    declined = Message(Error(code=4100, reason="device budget"), reply_to=Message(content=RecordDict(), dst_node_id=4, message_type="train"))
    arrays, _ = s.aggregate_train(1, replies + [declined])
    rec = s.history[-1]
    assert rec.accepted == 1
    reasons = " ".join(r["reason"] for r in rec.rejected)
    assert "exceeds clip norm" in reasons and "backbone sha256" in reasons
    assert rec.declined == [{"node": "4", "reason": "device budget"}]
    np.testing.assert_allclose(arrays["w.lora_A.shared.weight"].numpy()[0], 0.1 + _noise(1e-3 / 3, 4)[0], atol=1e-6)


def test_ledger_is_written_before_release(tmp_path, flower_task):
    seen = []

    def on_round(rec, arrays):
        seen.append(PrivacyLedger(tmp_path / "ledger.jsonl").entries())

    s = _strategy(tmp_path, z=1.0, on_round=on_round)
    s.aggregate_train(1, [])
    assert len(seen[0]) == 1 and seen[0][0].round == 1 and seen[0][0].epsilon > 0
    assert seen[0][0].epsilon == s.history[-1].epsilon_user


def test_poisson_sampling_rate():
    rng = np.random.default_rng(1)
    counts = [len(poisson_sample(list(range(100)), 0.3, rng)) for _ in range(200)]
    assert np.mean(counts) == pytest.approx(30, rel=0.05)
    assert np.std(counts) > 2  # the cohort size varies: Poisson, not a fixed fraction


def test_budget_stops_before_the_round_that_would_exceed(tmp_path):
    from fedpref.common.accounting import epsilon

    fed = FederationConfig(rounds=5, client_sample_rate=0.5, server_noise_multiplier=1.0)
    cap = (epsilon(sample_rate=0.5, noise_multiplier=1.0, steps=2, delta=1e-5)
           + epsilon(sample_rate=0.5, noise_multiplier=1.0, steps=3, delta=1e-5)) / 2
    budget = UserLevelBudget(max_epsilon=cap, delta=1e-5, accountant=AccountantKind.RDP,
                             ledger=PrivacyLedger(tmp_path / "ledger.jsonl"))
    s = FedPrefStrategy(fed=fed, local=LocalConfig(), shapes={"w.lora_A.shared.weight": (2,)}, frozen_identity=SHA,
                        budget=budget, generators=seeded_generators(0))
    for rnd in (1, 2):
        assert s.budget_allows(rnd)
        budget.charge(round=rnd, sample_rate=0.5, noise_multiplier=1.0, clip_norm=1.0, participants=1, now=0.0)
    assert not s.budget_allows(3)
    assert "round 3" in s.stopped_reason and len(budget.ledger.entries()) == 2


def test_a_seeded_simulation_samples_the_same_users_whatever_ids_flower_draws():
    """Flower draws a new random id for every simulated node each run; the sampling order is the
    users' own (registration, i.e. partition) order on the in-memory grid, so the same seed
    samples the same users. Sorted ids, what the server used before, sample others."""
    from fedpref.server.release import dp_generator
    from fedpref.server.strategy import poisson_sample, sampling_order
    from test_dispatch import federation, superlink_identity

    with superlink_identity():
        runs = [federation(200, []) for _ in range(2)]
    picked, picked_sorted = [], []
    for _, mapping, grid in runs:
        ids = set(grid.get_node_ids())
        assert [mapping[n] for n in sampling_order(grid, ids)] == list(range(200))
        picked.append([mapping[n] for n in poisson_sample(sampling_order(grid, ids), 0.1, dp_generator((3, 7919, 1)))])
        picked_sorted.append([mapping[n] for n in poisson_sample(sorted(ids), 0.1, dp_generator((3, 7919, 1)))])
    assert picked[0] == picked[1] and 5 < len(picked[0]) < 40
    assert picked_sorted[0] != picked_sorted[1]  # the old order: other users (equal only by a vanishing chance)
    _, mapping, grid = runs[0]
    assert sampling_order(grid, [*mapping, 12345]) == sorted([*mapping, 12345])  # a node it never registered
    assert sampling_order(None, [5, 3, 9]) == [3, 5, 9]  # any other grid (deployment): sorted ids


def test_replies_are_taken_in_sampling_order_whatever_order_they_arrive_in(tmp_path):
    """Summed (and recorded) in the order configure_train sampled, on Flower's in-memory grid the
    users' registration order: two actors answer in a different order every run, and a seeded
    simulation must not depend on it."""
    from fedpref.protocol.messages import arrays_to_record
    from test_dispatch import federation, superlink_identity

    with superlink_identity():
        _, mapping, grid = federation(4, [])
        records = []
        for i, arrival in enumerate(([0, 1, 2, 3], [3, 2, 0, 1], [2, 0, 3, 1])):
            (tmp_path / str(i)).mkdir()
            s = _strategy(tmp_path / str(i), q=1.0, population=4)
            sent = [m.metadata.dst_node_id for m in s.configure_train(1, arrays_to_record(s._global), None, grid)]
            assert [mapping[n] for n in sent] == [0, 1, 2, 3]  # the users' order, not the random ids'
            by_user = {mapping[n]: n for n in sent}
            stranger = max(sent) + 1  # a node it never sampled: last
            replies = [_reply_to(n, [5.0, 0, 0, 0], epsilon=1.0) for n in [*(by_user[u] for u in arrival), stranger]]
            s.aggregate_train(1, replies[::-1] if i % 2 else replies)  # all over the clip: each rejected
            records.append([r["node"] for r in s.history[-1].rejected])
    assert records == [[*[str(n) for n in sent], str(stranger)]] * 3
