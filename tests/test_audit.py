"""Empirical privacy audits (simulations/audit.py, simulations/audit_bound.py): the one-run ε
lower bound, canaries at the sample and user level, community inference by the server
(individual updates and dropout differencing).

Real device code on MiniLM cut to 2 blocks, two communities with opposed preferences.
"""

import math
from dataclasses import replace

import numpy as np
import pytest

from fedpref.client.data import group_by_user
from fedpref.client.device import adapters_for, get_runtime
from fedpref.client.terms import DeviceTerms
from fedpref.client.trainer import LocalTrainConfig
from fedpref.common.accounting import epsilon as formal_epsilon
from fedpref.common.errors import ConfigError
from fedpref.model.cache import TextCache
from fedpref.model.config import ModelConfig
from fedpref.model.preference import AdapterSpec, get_arrays
from fedpref.protocol.messages import PROTOCOL_VERSION, RoundConfig
from fedpref.protocol.partition import Group
from fedpref.simulations.audit import (
    canary_membership_audit,
    canary_pairs,
    community_inference_audit,
    community_labels,
    cv_accuracy,
    replay_round,
    user_level_canary_audit,
)
from fedpref.simulations.audit_bound import epsilon_lower_bound, one_run_audit
from fedpref.simulations.config import AuditConfig
from fedpref.simulations.persona import CommunitySpec, PersonaConfig, generate

MAJORITY = CommunitySpec("majority", 0.67, (1.5,) * 8, -7.0)
MINORITY = CommunitySpec("minority", 0.33, (-1.5,) * 8, -7.0)  # opposed on every attribute
TERMS = DeviceTerms(min_noise_multiplier=0.1, max_grad_norm=1.0, max_epsilon_sample=math.inf)


# ---- the one-run ε lower bound (Steinke, Nasr & Jagielski 2023) --------------------------------
def test_epsilon_lower_bound_pinned_values():
    # nothing right, or no better than a coin: nothing is ruled out
    assert epsilon_lower_bound(canaries=100, guesses=10, correct=0, delta=1e-5) == 0.0
    assert epsilon_lower_bound(canaries=100, guesses=100, correct=50, delta=0.0) == 0.0
    # δ = 0, every guess right: P[W = r] ≤ p^r with p = e^ε/(1+e^ε), so ε = log(p/(1−p)), p = β^(1/r)
    p = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(canaries=1000, guesses=100, correct=100, delta=0.0, beta=0.05) == pytest.approx(
        math.log(p / (1 - p)), abs=1e-9)  # 3.49297
    # with the δ term: values of the paper's own procedure (p_value_DP_audit / get_eps_audit), computed
    # independently with its loop and pinned here
    assert epsilon_lower_bound(canaries=1000, guesses=100, correct=90, delta=1e-5) == pytest.approx(1.626143, abs=1e-5)
    assert epsilon_lower_bound(canaries=200, guesses=40, correct=40, delta=1e-5) == pytest.approx(2.548240, abs=1e-5)
    assert epsilon_lower_bound(canaries=1000, guesses=100, correct=75, delta=1e-5) == pytest.approx(0.699467, abs=1e-5)
    # all right on many guesses: large
    assert epsilon_lower_bound(canaries=1000, guesses=1000, correct=1000, delta=1e-5) > 5.5
    # the δ term only loosens the bound
    assert epsilon_lower_bound(canaries=1000, guesses=100, correct=100, delta=1e-5) < \
        epsilon_lower_bound(canaries=1000, guesses=100, correct=100, delta=0.0)


def test_epsilon_lower_bound_is_monotone_in_correct_guesses():
    for delta in (0.0, 1e-5):
        eps = [epsilon_lower_bound(canaries=500, guesses=100, correct=v, delta=delta) for v in range(101)]
        assert all(a <= b for a, b in zip(eps, eps[1:]))
        assert eps[55] == 0.0 and eps[100] > 3


def test_epsilon_lower_bound_refuses_bad_input():
    for kw in (dict(correct=11, guesses=10, canaries=100), dict(correct=1, guesses=101, canaries=100),
               dict(correct=-1, guesses=10, canaries=100), dict(correct=1.5, guesses=10, canaries=100)):
        with pytest.raises(ConfigError):
            epsilon_lower_bound(delta=1e-5, **kw)
    for kw in (dict(delta=1.0), dict(delta=float("nan")), dict(delta=1e-5, beta=0.0), dict(delta=1e-5, beta=float("nan"))):
        with pytest.raises(ConfigError):
            epsilon_lower_bound(canaries=10, guesses=4, correct=4, **kw)


def test_one_run_audit_sees_a_perfect_attack_and_not_a_blind_one():
    rng = np.random.default_rng(0)
    inc = rng.random(400) < 0.5
    perfect = one_run_audit(inc + 0.1 * rng.random(400), inc, delta=1e-5)
    assert perfect["auc"] == 1.0 and perfect["correct"] == perfect["guesses"] and perfect["epsilon_lower"] > 2
    blind = one_run_audit(rng.random(400), inc, delta=1e-5)
    assert 0.4 < blind["auc"] < 0.6 and blind["epsilon_lower"] < 0.5
    assert blind["canaries"] == 400 and blind["included"] == int(inc.sum()) and blind["confidence"] == 0.95


# ---- user-level canaries against the server's release -------------------------------------------
def _real_deltas(n: int, dims: int) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((n, dims))
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # clipped to C = 1 (norm exactly C)


def test_user_level_audit_leaks_without_noise_and_not_beyond_formal_epsilon_with_it():
    kw = dict(population=20, sample_rate=1.0, clip_norm=1.0, rounds=3, canaries=200, delta=1e-5, seed=0)
    res = user_level_canary_audit(_real_deltas(20, 1000), noise_multiplier=5.0, **kw)
    assert res["no_dp"]["auc"] > 0.9 and res["no_dp"]["epsilon_lower"] >= 1.0  # the attack can see
    formal = formal_epsilon(sample_rate=1.0, noise_multiplier=5.0, steps=3, delta=1e-5)
    assert res["dp"]["epsilon_formal"] == pytest.approx(formal)
    assert res["dp"]["epsilon_lower"] <= formal
    assert res["dp"]["auc"] < res["no_dp"]["auc"]
    assert res["dims"] == 1000 and res["canaries"] == 200 and 60 < res["dp"]["included"] < 140
    # every draw is seeded: the audit repeats
    assert user_level_canary_audit(_real_deltas(20, 1000), noise_multiplier=5.0, **kw) == res
    with pytest.raises(ConfigError, match="longer than clip_norm"):
        user_level_canary_audit(2 * _real_deltas(20, 1000), noise_multiplier=5.0, **kw)


# ---- the tiny model ---------------------------------------------------------------------------------
def _persona(beta: float) -> PersonaConfig:
    # 12 users (8 + 4), 30 train + 10 test pairs each, 48 distinct texts. The text pool depends
    # only on the seed and the pool sizes, so both datasets below share one cache.
    return PersonaConfig(
        users=12, pairs_per_user=40, seed=1, topics=4, safety_pair_fraction=0.0, unsafe_per_prompt=0,
        beta=beta, communities=(MAJORITY, MINORITY),
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Each step here is tiny: one thread is faster than two contending for shared cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tiny_minilm_dir):
    model_cfg = ModelConfig(backbone=tiny_minilm_dir, max_length=96, adapter=AdapterSpec(rank=2, personal_dims=0))
    users = group_by_user(generate(_persona(1.0)).pairs)  # strongly separated communities
    rt = get_runtime(model_cfg, adapters_for(train_shared=True, train_private=True))
    texts = {t for u in users.values() for p in (*u.train, *u.test) for t in (p.chosen, p.rejected)}
    cache = TextCache.build(rt.model, rt.backbone, texts, max_length=96)
    return model_cfg, users, rt, cache


def _round_cfg(**kw) -> RoundConfig:
    base = dict(
        server_round=1, protocol_version=PROTOCOL_VERSION, local_epochs=3, batch_size=8, learning_rate=0.05,
        head_learning_rate=0.5, projection_learning_rate=0.05, clip_norm=1.0, dp_noise_multiplier=0.1,
        dp_max_grad_norm=1.0, delta=1e-5, max_epsilon_sample=float("inf"), train_shared=True, train_private=True,
        policy_version=0,
    )
    base.update(kw)
    return RoundConfig(**base)


def _local_cfg(**kw) -> LocalTrainConfig:
    base = dict(epochs=2, batch_size=8, learning_rate=0.1, head_learning_rate=0.5, projection_learning_rate=0.05,
                noise_multiplier=1.0, max_grad_norm=1.0)
    base.update(kw)
    return LocalTrainConfig(**base)


def _weights(rt) -> dict[str, np.ndarray]:
    return {**get_arrays(rt.model, Group.SHARED), **get_arrays(rt.model, Group.PRIVATE)}


# ---- community inference: individual updates and dropout differencing ----------------------------
@pytest.mark.slow  # two federated rounds of 12 devices
def test_community_inference_and_differencing(setup, tmp_path):
    _, users, rt, cache = setup
    shared = get_arrays(rt.model, Group.SHARED)
    before = _weights(rt)
    kw = dict(shared=shared, round_cfg=_round_cfg(local_epochs=1), terms=TERMS)
    first = replay_round(rt, users, cache, seed=0, workdir=tmp_path / "first", **kw)
    second = replay_round(rt, users, cache, seed=1, workdir=tmp_path / "second", **kw)
    assert first.deltas.shape == (12, sum(first.sizes.values())) and first.uids == tuple(sorted(users))
    assert np.linalg.norm(first.deltas, axis=1).max() <= 1.0 + 1e-6  # clipped by the devices
    assert not np.array_equal(first.deltas, second.deltas)  # a different seed is a fresh round
    res = community_inference_audit(users, first, second, clip_norm=1.0, server_noise_multiplier=1.0,
                                    expected_cohort=12.0, seed=0)
    assert res["users"] == 12 and res["chance"] == pytest.approx(8 / 12) and res["folds"] == 4
    # individual clipped deltas (little DP-SGD noise, 4 local steps) give the community away
    assert res["individual_updates"] > res["chance"] + 0.1
    assert res["individual_updates"] >= res["individual_updates_whole_delta"]
    # better than the best of the same attackers on shuffled communities
    assert 0.0 <= res["chance_best_attack"] <= res["chance_best_attack_max"] < res["individual_updates"]
    head = [v for k, v in res["by_tensor"].items() if "score" in k and k.endswith("weight")]
    assert head and head[0] >= 0.9
    d = res["differencing"]
    # two SecAgg sums that differ by one device's drop-out: the difference is that device's update
    assert d["secagg_server"] == res["individual_updates"]
    assert d["noise_std_difference"] == pytest.approx(math.sqrt(2) / 12) and d["cohort"] == 12
    assert all(0.0 <= d[k] <= 1.0 for k in ("secagg_server_rerun", "released_observer"))
    # repeatable, each user on its own fresh device folder, and the runtime's weights are back
    pair = {u: users[u] for u in sorted(users)[:2]}
    again = replay_round(rt, pair, cache, seed=0, workdir=tmp_path / "again", **kw)
    assert np.array_equal(again.deltas, first.deltas[:2])
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == sorted(users)
    after = _weights(rt)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_community_inference_needs_two_communities_of_two(setup):
    _, users, _, _ = setup
    one = {u: replace(d, community="majority") for u, d in users.items()}
    with pytest.raises(ConfigError, match="≥ 2 communities"):
        community_labels(one)
    lonely = dict(one)
    uid = min(users)
    lonely[uid] = replace(users[uid], community="minority")
    with pytest.raises(ConfigError, match="'minority' has 1"):
        community_labels(lonely)
    nolabel = dict(users)
    nolabel[uid] = replace(users[uid], community=None)
    with pytest.raises(ConfigError, match="no community"):
        community_labels(nolabel)


def test_cv_accuracy_on_identical_rows_is_the_majority_share():
    labels = ["a"] * 7 + ["b"] * 3
    x = np.tile(np.arange(5.0), (10, 1))
    assert cv_accuracy(x, labels, folds=3, seed=0) == pytest.approx(0.7)
    sep = np.array([[1.0 if lab == "a" else -1.0, 0.0] for lab in labels])
    assert cv_accuracy(sep, labels, folds=3, seed=0) == 1.0


# ---- sample-level canaries on devices ---------------------------------------------------------------
def test_canary_membership_audit_runs_on_the_tiny_model(setup):
    _, users, rt, cache = setup
    shared = get_arrays(rt.model, Group.SHARED)
    before = _weights(rt)
    sub = {u: users[u] for u in sorted(users)[:2]}
    kw = dict(shared=shared, local_cfg=_local_cfg(), clip_norm=1.0, canaries_per_device=6, delta=1e-5, seed=0)
    res = canary_membership_audit(rt, sub, cache, **kw)
    for arm in ("dp", "no_dp"):
        r = res[arm]
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["epsilon_lower"]
        for attacker in ("model", "white_box"):
            assert r[attacker]["canaries"] == 12 and r[attacker]["guesses"] >= 2
    assert 0.0 < res["dp"]["epsilon_formal"] < math.inf
    assert res["dp"]["epsilon_lower"] <= res["dp"]["epsilon_formal"]
    assert res["devices"] == 2 and res["canaries"] == 12 and res["canaries_per_device"] == 6
    # the canaries are not in the caller's cache, the runtime is untouched, and the audit repeats
    assert not any(p.chosen in cache for p in canary_pairs(rt, 12, seed=0))
    after = _weights(rt)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert canary_membership_audit(rt, sub, cache, **kw) == res


def test_canaries_are_distinct_plain_words(setup):
    _, _, rt, _ = setup
    pairs = canary_pairs(rt, 50, seed=3)
    texts = [t for p in pairs for t in (p.chosen, p.rejected)]
    assert len(set(texts)) == 100 and all(len(t.split()) == 12 and t.replace(" ", "").isalpha() for t in texts)
    assert canary_pairs(rt, 50, seed=3) == pairs and canary_pairs(rt, 50, seed=4) != pairs


def test_audits_refuse_bad_calls(setup, tmp_path):
    model_cfg, users, rt, cache = setup
    shared = get_arrays(rt.model, Group.SHARED)
    with pytest.raises(ConfigError, match="adapters"):  # runtime trains private too, round does not
        replay_round(rt, users, cache, shared=shared, round_cfg=_round_cfg(train_private=False), terms=TERMS,
                     seed=0, workdir=tmp_path / "c")
    kw = dict(shared=shared, clip_norm=1.0, canaries_per_device=2, delta=1e-5, seed=0)
    with pytest.raises(ConfigError, match="noise_multiplier = 0"):
        canary_membership_audit(rt, users, cache, local_cfg=_local_cfg(noise_multiplier=0.0), **kw)
    rt_priv = get_runtime(model_cfg, adapters_for(train_shared=False, train_private=True))
    with pytest.raises(ConfigError, match="needs both"):
        canary_membership_audit(rt_priv, users, cache, local_cfg=_local_cfg(), **kw)
    stale = tmp_path / "stale" / min(users)
    stale.mkdir(parents=True)
    (stale / "accountant.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds device state"):
        replay_round(rt, users, cache, shared=shared, round_cfg=_round_cfg(), terms=TERMS, seed=0,
                     workdir=tmp_path / "stale")


def test_audit_config_ranges():
    assert AuditConfig().confidence == 0.95
    for bad in (dict(confidence=1.0), dict(confidence=float("nan")), dict(canary_devices=0),
                dict(canary_lr_scale=0.0), dict(user_canaries=1), dict(community_users=-1)):
        with pytest.raises(ConfigError):
            AuditConfig(**bad)
