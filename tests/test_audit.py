"""Empirical privacy audits: community inference by the server, membership inference on a device.

Real device code on MiniLM cut to 2 blocks, two communities with opposed preferences.
"""

from dataclasses import replace

import numpy as np
import pytest

from fedpref.client.data import group_by_user
from fedpref.client.device import adapters_for, get_runtime
from fedpref.client.trainer import LocalTrainConfig
from fedpref.model.cache import TextCache
from fedpref.model.config import ModelConfig
from fedpref.model.preference import AdapterSpec, get_arrays
from fedpref.protocol.errors import ConfigError
from fedpref.protocol.messages import PROTOCOL_VERSION, RoundConfig
from fedpref.protocol.partition import Group
from fedpref.simulations.audit import community_inference_audit, cv_accuracy, membership_audit
from fedpref.simulations.persona import CommunitySpec, PersonaConfig, generate

MAJORITY = CommunitySpec("majority", 0.67, (1.5,) * 8, -7.0)
MINORITY = CommunitySpec("minority", 0.33, (-1.5,) * 8, -7.0)  # opposed on every attribute


def _persona(beta: float) -> PersonaConfig:
    # 12 users (8 + 4), 30 train + 10 test pairs each, 48 distinct texts. The text pool depends
    # only on the seed and the pool sizes, so both datasets below share one cache.
    return PersonaConfig(
        users=12, pairs_per_user=40, seed=1, topics=4, safety_pair_fraction=0.0, unsafe_per_prompt=0,
        beta=beta, communities=(MAJORITY, MINORITY),
    )


@pytest.fixture(scope="module")
def setup(tiny_minilm_dir):
    model_cfg = ModelConfig(backbone=tiny_minilm_dir, max_length=96, adapter=AdapterSpec(rank=2, personal_dims=0))
    # strongly separated communities (for community inference)
    users = group_by_user(generate(_persona(1.0)).pairs)
    # nearly coin-flip labels: nothing to generalize, so a non-DP model can only memorize
    noisy = group_by_user(generate(_persona(0.05)).pairs)
    rt = get_runtime(model_cfg, adapters_for(train_shared=True, train_private=True))
    pairs = [p for us in (users, noisy) for u in us.values() for p in (*u.train, *u.test)]
    texts = {t for p in pairs for t in (p.chosen, p.rejected)}
    cache = TextCache.build(rt.model, rt.backbone, texts, max_length=96)
    return model_cfg, users, noisy, rt, cache


def _round_cfg(**kw) -> RoundConfig:
    base = dict(
        server_round=1, protocol_version=PROTOCOL_VERSION, local_epochs=3, batch_size=8, learning_rate=0.05,
        head_learning_rate=0.5, projection_learning_rate=0.05, clip_norm=1.0, dp_noise_multiplier=0.0,
        dp_max_grad_norm=1.0, delta=1e-5, max_epsilon_sample=float("inf"), train_shared=True, train_private=True,
        policy_version=0,
    )
    base.update(kw)
    return RoundConfig(**base)


def _local_cfg(**kw) -> LocalTrainConfig:
    base = dict(epochs=10, batch_size=8, learning_rate=0.1, head_learning_rate=0.5, projection_learning_rate=0.05,
                noise_multiplier=1.0, max_grad_norm=1.0)
    base.update(kw)
    return LocalTrainConfig(**base)


def _weights(rt) -> dict[str, np.ndarray]:
    return {**get_arrays(rt.model, Group.SHARED), **get_arrays(rt.model, Group.PRIVATE)}


def test_community_inference_individual_updates_leak_secure_aggregate_does_not(setup, tmp_path):
    _, users, _, rt, cache = setup
    shared = get_arrays(rt.model, Group.SHARED)
    before = _weights(rt)
    res = community_inference_audit(rt, users, cache, shared=shared, round_cfg=_round_cfg(), seed=0, workdir=tmp_path)
    assert res["users"] == 12
    assert res["chance"] == pytest.approx(8 / 12)
    assert res["folds"] == 4  # min(5, smallest community = 4)
    # one aggregate for everyone: the attacker can only learn the prior
    assert res["secure_aggregate"] == res["chance"]
    # individual clipped deltas (no DP noise, 12 local steps) give the community away
    assert res["individual_updates"] > res["chance"] + 0.1
    # the reward head alone carries it cleanly
    head = [v for k, v in res["by_tensor"].items() if "score" in k and k.endswith("weight")]
    assert head and head[0] >= 0.9
    assert all(0.0 <= v <= 1.0 for v in res["by_tensor"].values())
    # every user ran on its own fresh device folder, and the runtime's weights are back
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(users)
    after = _weights(rt)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_membership_auc_without_dp_shows_memorization(setup, tmp_path):
    model_cfg, _, noisy, _, cache = setup
    rt = get_runtime(model_cfg, adapters_for(train_shared=False, train_private=True))
    sub = {u: noisy[u] for u in sorted(noisy)[:4]}
    res = membership_audit(rt, sub, cache, local_cfg=_local_cfg(), delta=1e-5, seed=0, workdir=tmp_path)
    assert res["pairs_member"] == 4 * 30 and res["pairs_nonmember"] == 4 * 10
    assert res["no_dp"] > 0.6  # 40 plain-SGD steps on coin-flip labels: members have low loss
    assert 0.0 <= res["dp"] <= 1.0
    assert 0.0 < res["epsilon_sample"] < float("inf")
    # separate device folders for the two arms; the non-DP arm keeps no accountant
    for uid in sub:
        assert (tmp_path / "dp" / uid / "accountant.json").exists()
        assert not (tmp_path / "no_dp" / uid / "accountant.json").exists()


def test_membership_audit_is_deterministic_given_seed(setup, tmp_path):
    model_cfg, _, noisy, _, cache = setup
    rt = get_runtime(model_cfg, adapters_for(train_shared=False, train_private=True))
    sub = {u: noisy[u] for u in sorted(noisy)[:2]}
    cfg = _local_cfg(epochs=1)
    before = _weights(rt)
    a = membership_audit(rt, sub, cache, local_cfg=cfg, delta=1e-5, seed=3, workdir=tmp_path / "a")
    b = membership_audit(rt, sub, cache, local_cfg=cfg, delta=1e-5, seed=3, workdir=tmp_path / "b")
    assert a == b
    after = _weights(rt)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_community_inference_with_dp_is_deterministic_given_seed(setup, tmp_path):
    _, users, _, rt, cache = setup
    ids = [u for u in sorted(users) if users[u].community == "majority"][:2]
    ids += [u for u in sorted(users) if users[u].community == "minority"][:2]
    sub = {u: users[u] for u in ids}
    shared = get_arrays(rt.model, Group.SHARED)
    cfg = _round_cfg(local_epochs=1, dp_noise_multiplier=1.0)
    a = community_inference_audit(rt, sub, cache, shared=shared, round_cfg=cfg, seed=5, workdir=tmp_path / "a")
    b = community_inference_audit(rt, sub, cache, shared=shared, round_cfg=cfg, seed=5, workdir=tmp_path / "b")
    assert a == b
    assert a["folds"] == 2 and a["chance"] == 0.5 and 0.0 <= a["individual_updates"] <= 1.0


def test_cv_accuracy_on_identical_rows_is_the_majority_share():
    labels = ["a"] * 7 + ["b"] * 3
    x = np.tile(np.arange(5.0), (10, 1))
    assert cv_accuracy(x, labels, folds=3, seed=0) == pytest.approx(0.7)
    # and separable rows are found
    sep = np.array([[1.0 if lab == "a" else -1.0, 0.0] for lab in labels])
    assert cv_accuracy(sep, labels, folds=3, seed=0) == 1.0


def test_community_inference_needs_two_communities_of_two(setup, tmp_path):
    _, users, _, rt, cache = setup
    shared = get_arrays(rt.model, Group.SHARED)
    one = {u: replace(d, community="majority") for u, d in users.items()}
    with pytest.raises(ConfigError, match="≥ 2 communities"):
        community_inference_audit(rt, one, cache, shared=shared, round_cfg=_round_cfg(), seed=0, workdir=tmp_path)
    lonely = dict(one)
    uid = min(users)
    lonely[uid] = replace(users[uid], community="minority")
    with pytest.raises(ConfigError, match="'minority' has 1"):
        community_inference_audit(rt, lonely, cache, shared=shared, round_cfg=_round_cfg(), seed=0, workdir=tmp_path)
    nolabel = dict(users)
    nolabel[uid] = replace(users[uid], community=None)
    with pytest.raises(ConfigError, match="no community"):
        community_inference_audit(rt, nolabel, cache, shared=shared, round_cfg=_round_cfg(), seed=0, workdir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing trained


def test_audits_refuse_bad_calls(setup, tmp_path):
    model_cfg, users, noisy, rt, cache = setup
    shared = get_arrays(rt.model, Group.SHARED)
    with pytest.raises(ConfigError, match="adapters"):  # runtime trains private too, round does not
        community_inference_audit(rt, users, cache, shared=shared, round_cfg=_round_cfg(train_private=False),
                                  seed=0, workdir=tmp_path / "c")
    rt_priv = get_runtime(model_cfg, adapters_for(train_shared=False, train_private=True))
    with pytest.raises(ConfigError, match="noise_multiplier = 0"):
        membership_audit(rt_priv, noisy, cache, local_cfg=_local_cfg(noise_multiplier=0.0), delta=1e-5, seed=0,
                         workdir=tmp_path / "m")
    with pytest.raises(ConfigError, match="shared="):
        membership_audit(rt, noisy, cache, local_cfg=_local_cfg(), delta=1e-5, seed=0, workdir=tmp_path / "m")
    stale = tmp_path / "stale" / "dp" / min(noisy)
    stale.mkdir(parents=True)
    (stale / "accountant.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds device state"):
        membership_audit(rt_priv, noisy, cache, local_cfg=_local_cfg(), delta=1e-5, seed=0, workdir=tmp_path / "stale")
