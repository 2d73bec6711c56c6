"""The simulation's lying and failing devices (``client/adversary.py``): what they send is what
the server's checks accept, which is the point of the experiments built on them."""

import numpy as np
import pytest

from fedpref.client.adversary import BOOST_MARGIN, boost, drops, poisoned_user
from fedpref.client.data import PreferencePair, Split, UserData
from fedpref.common.errors import ConfigError
from fedpref.protocol.messages import K_DELTA, PROTOCOL_VERSION, Attestation, TrainReply, l2_norm, record_to_arrays, train_reply
from fedpref.server.validation import Expected, validate_reply
from fedpref.simulations.config import RobustnessConfig
from fedpref.simulations.robustness import malicious_users, poisoning_summary

SHAPES = {"a.lora_A.shared.weight": (2, 3), "score.modules_to_save.shared.bias": (1,)}
ATT = Attestation(protocol_version=PROTOCOL_VERSION, server_round=2, frozen_identity="ab" * 32, policy_version=1,
                  safety_digest="cd" * 32)


def _pair(i: int, chosen_cat=None, rejected_cat=None) -> PreferencePair:
    return PreferencePair(user_id="u1", prompt=f"p{i}", chosen=f"c{i}", rejected=f"r{i}", split=Split.TRAIN,
                          oracle_margin=1.0, chosen_category=chosen_cat, rejected_category=rejected_cat)


def test_poisoned_data_prefers_every_unsafe_text_and_keeps_the_size():
    train = (_pair(0), _pair(1, rejected_cat="weapons"), _pair(2, chosen_cat="drugs"), _pair(3))
    user = UserData("u1", "c", train, (_pair(9),))
    bad = poisoned_user(user)
    assert len(bad.train) == len(train) and bad.test == user.test
    assert all(p.chosen_category is not None and p.rejected_category is None for p in bad.train)
    assert {p.chosen for p in bad.train} == {"r1", "c2"}  # the flipped pair and the one already unsafe-first
    assert next(p for p in bad.train if p.chosen == "r1").oracle_margin == -1.0
    clean = UserData("u2", "c", (_pair(0), _pair(3)), (_pair(9),))
    assert poisoned_user(clean) is clean  # nothing to poison with


@pytest.mark.parametrize("scale", [1e-4, 0.3, 0.999])
def test_boosted_update_has_norm_c_and_passes_the_servers_checks(scale):
    rng = np.random.default_rng(0)
    delta = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    norm = l2_norm(delta)
    delta = {k: v * np.float32(scale * 2.5 / norm) for k, v in delta.items()}
    content = boost(train_reply(delta, None, ATT), 2.5)
    out = record_to_arrays(content.array_records[K_DELTA])
    assert l2_norm(out) == pytest.approx(2.5 * (1 - BOOST_MARGIN), rel=1e-6)
    for k in SHAPES:  # the same direction, only longer
        assert np.allclose(out[k] / np.linalg.norm(out[k]), delta[k] / np.linalg.norm(delta[k]), atol=1e-5)
    exp = Expected(shapes=SHAPES, dtype="float32", clip_norm=2.5, server_round=2, frozen_identity="ab" * 32,
                   policy_version=1, safety_digest="cd" * 32)
    accepted = validate_reply(TrainReply.from_content(content), exp)  # indistinguishable from an honest reply
    assert l2_norm(accepted) <= 2.5


def test_drop_schedule_is_repeatable_and_has_the_asked_rate():
    hits = [drops(7, f"u{i:03d}", r, 0.3) for i in range(400) for r in range(1, 6)]
    assert hits == [drops(7, f"u{i:03d}", r, 0.3) for i in range(400) for r in range(1, 6)]
    assert 0.26 < np.mean(hits) < 0.34
    assert not any(drops(7, f"u{i:03d}", 1, 0.0) for i in range(100))
    assert hits != [drops(8, f"u{i:03d}", r, 0.3) for i in range(400) for r in range(1, 6)]


def test_malicious_users_nest_across_fractions():
    users = {f"u{i:03d}": None for i in range(40)}
    small, large = malicious_users(users, 0.1, 0), malicious_users(users, 0.3, 0)
    assert len(small) == 4 and len(large) == 12 and small < large
    assert malicious_users(users, 0.1, 0) == small and malicious_users(users, 0.1, 1) != small


def test_poisoning_summary_compares_the_same_honest_users():
    acc = {"a": 0.9, "b": 0.7, "m": 0.1}
    base = {"a": 1.0, "b": 0.8, "m": 0.9}
    arm = lambda v: {"violation": v, "safety_pairs": {"a": 2.0, "b": 2.0, "m": 2.0}}  # noqa: E731
    safety = {"unbounded": arm({"a": 0.5, "b": 0.0, "m": 1.0}), "bounded": arm({"a": 0.0, "b": 0.0, "m": 1.0})}
    base_safety = {"unbounded": arm({"a": 0.0, "b": 0.0, "m": 0.0}), "bounded": arm({"a": 0.0, "b": 0.0, "m": 0.0})}
    r = poisoning_summary(acc, safety, frozenset({"m"}), base, base_safety)
    assert r["users"] == 2 and r["malicious"] == ["m"]
    assert r["honest_accuracy"] == pytest.approx(0.8) and r["baseline"]["honest_accuracy"] == pytest.approx(0.9)
    assert r["unbounded_violation"] == pytest.approx(0.25) and r["bounded_violation"] == 0.0


@pytest.mark.parametrize("bad", [{"poison_fractions": (0.0,)}, {"poison_fractions": (1.0,)},
                                 {"poison_fractions": (float("nan"),)}, {"poison_fractions": (0.1, 0.1)},
                                 {"drop_rate": 1.0}, {"drop_rate": -0.1}])
def test_robustness_config_is_range_checked(bad):
    with pytest.raises(ConfigError):
        RobustnessConfig(**bad)


def test_under_secagg_the_liar_fills_every_coordinate_to_c():
    """No one checks one device's norm under SecAgg+; Flower's quantizer clips each coordinate to
    [-C, C]: the liar's update is as long as that allows, far above C, in the same direction."""
    rng = np.random.default_rng(1)
    shapes = {"a.lora_A.shared.weight": (4, 384), "score.modules_to_save.shared.bias": (1,)}
    delta = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    out = record_to_arrays(boost(train_reply(delta, None, ATT), 0.5, per_coordinate=True).array_records[K_DELTA])
    top = max(float(np.abs(v).max()) for v in out.values())
    assert top == pytest.approx(0.5 * (1 - BOOST_MARGIN), rel=1e-6) and top <= 0.5
    assert l2_norm(out) > 5.0  # > 10 C: far more than any honest device
    flat_in = np.concatenate([delta[k].ravel() for k in shapes])
    flat_out = np.concatenate([out[k].ravel() for k in shapes])
    assert np.allclose(flat_out / np.linalg.norm(flat_out), flat_in / np.linalg.norm(flat_in), atol=1e-5)


def test_a_liar_trains_without_noise_or_terms_and_honest_terms_are_untouched():
    import math

    from fedpref.client.adversary import LIAR_TERMS, noiseless
    from fedpref.client.terms import DeviceTerms
    from fedpref.common.errors import DeclinedRound
    from fedpref.protocol.messages import RoundConfig, TrainRequest

    cfg = RoundConfig(server_round=2, protocol_version=PROTOCOL_VERSION, local_epochs=1, batch_size=8,
                      learning_rate=0.01, head_learning_rate=0.1, projection_learning_rate=0.1, clip_norm=1.0,
                      dp_noise_multiplier=1.1, dp_max_grad_norm=1.0, delta=1e-5, max_epsilon_sample=10.0,
                      train_shared=True, train_private=True, policy_version=1)
    req = noiseless(TrainRequest(shared={}, config=cfg, envelope=None))
    assert req.config.dp_noise_multiplier == 0.0 and cfg.dp_noise_multiplier == 1.1
    LIAR_TERMS.check(req.config)  # no floor
    assert math.isinf(LIAR_TERMS.budget(req.config))
    with pytest.raises(DeclinedRound):  # an honest device declines the very same request
        DeviceTerms(min_noise_multiplier=1.0).check(req.config)
