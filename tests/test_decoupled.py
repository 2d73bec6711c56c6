"""``adapter.objective = "decoupled"``: a personalized round's shared delta is the population's.

With the joint objective the shared part learns only what the user's private head leaves over,
so the global model the federation builds is worse than FedAvg's (RESULTS.md). Decoupled, the
same DP-SGD step sums two Bradley-Terry losses: the shared score's own, and score.detach() +
the personal head's. These tests hold it to that: the shared update does not depend on the
private head, the personal reward is the usual reward, and Opacus takes the step as before.
"""

import numpy as np
import pytest
import torch

from fedpref.client.trainer import LocalTrainConfig, is_decoupled, train_pairs
from fedpref.common.errors import ConfigError, IntegrityError
from fedpref.model.backbone import load_backbone
from fedpref.model.cache import TextCache
from fedpref.model.preference import AdapterSpec, build_model, get_arrays, set_arrays
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group

GOOD = ["a helpful detailed answer", "a formal, careful reply", "step one, then step two", "thanks, here it is"]
BAD = ["no", "whatever lol", "go away", "meh"]


def _model(backbone, objective, adapters=(SHARED_ADAPTER, PRIVATE_ADAPTER)):
    return build_model(backbone, AdapterSpec(rank=2, top_layers=0, private_lora=False, objective=objective),
                       adapters=adapters)


def _shared_delta_after_sgd(backbone, objective, personal_scale):
    """Plain SGD (σ = 0, fixed batches) from the same start, with the private head set to
    ``personal_scale`` × a fixed direction; returns (shared delta, private after)."""
    model = _model(backbone, objective)
    cache = TextCache.build(model, backbone, GOOD + BAD, max_length=32)
    priv = get_arrays(model, Group.PRIVATE)
    rng = np.random.default_rng(0)
    set_arrays(model, Group.PRIVATE, {k: (rng.standard_normal(v.shape) * personal_scale).astype(np.float32)
                                      if ".personal_head." in k else v for k, v in priv.items()})
    before = get_arrays(model, Group.SHARED)
    cfg = LocalTrainConfig(epochs=3, batch_size=4, learning_rate=0.5, head_learning_rate=0.5,
                           projection_learning_rate=0.5, noise_multiplier=0.0, max_grad_norm=1.0, seed=3)
    train_pairs(model, cache, GOOD * 2, BAD * 2, cfg)
    after = get_arrays(model, Group.SHARED)
    return {k: after[k] - before[k] for k in before}, get_arrays(model, Group.PRIVATE)


def test_the_shared_update_ignores_the_private_head_when_decoupled(tiny_encoder_dir):
    backbone = load_backbone(tiny_encoder_dir)
    d0, _ = _shared_delta_after_sgd(backbone, "decoupled", 0.0)
    d1, p1 = _shared_delta_after_sgd(backbone, "decoupled", 3.0)
    assert any(np.abs(v).max() > 1e-4 for v in d0.values())  # the shared part did train
    # every shared weight but a learnt style projection, which learns from the personal loss by design
    for k in (k for k in d0 if ".style_proj." not in k):
        np.testing.assert_allclose(d1[k], d0[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # the joint objective's shared update does depend on it: the test can fail
    j0, _ = _shared_delta_after_sgd(backbone, "joint", 0.0)
    j1, _ = _shared_delta_after_sgd(backbone, "joint", 3.0)
    assert max(float(np.abs(j1[k] - j0[k]).max()) for k in j0) > 1e-4


def test_decoupled_rewards_and_a_dp_sgd_step(tiny_encoder_dir):
    backbone = load_backbone(tiny_encoder_dir)
    model = _model(backbone, "decoupled")
    assert is_decoupled(model)
    cache = TextCache.build(model, backbone, GOOD + BAD, max_length=32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids, mask, rep = cache.batch(GOOD)
    with torch.no_grad():
        both = model(ids, mask, rep, both=True)  # (B, 2)
        plain = model(ids, mask, rep)  # (B,)
    assert both.shape == (len(GOOD), 2)
    torch.testing.assert_close(both[:, 1], plain)  # column 1 is the user's reward
    assert not torch.allclose(both[:, 0], plain)  # column 0 is the shared score alone
    before = {**get_arrays(model, Group.SHARED), **get_arrays(model, Group.PRIVATE)}
    cfg = LocalTrainConfig(epochs=2, batch_size=4, learning_rate=0.5, head_learning_rate=0.5,
                           projection_learning_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, seed=0, noise_seed=1)
    res = train_pairs(model, cache, GOOD * 2, BAD * 2, cfg)
    assert res.steps == 4 and res.accountant_history
    after = {**get_arrays(model, Group.SHARED), **get_arrays(model, Group.PRIVATE)}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert any(".personal_head." in k for k in changed) and any(".score." in k for k in changed)
    assert not any(f".{PRIVATE_ADAPTER}." in k and ".lora_B." in k and after[k].any() for k in after)


def test_a_private_only_fit_is_not_decoupled(tiny_encoder_dir):
    backbone = load_backbone(tiny_encoder_dir)
    assert not is_decoupled(_model(backbone, "decoupled", adapters=(PRIVATE_ADAPTER,)))
    assert not is_decoupled(_model(backbone, "decoupled", adapters=(SHARED_ADAPTER,)))
    assert not is_decoupled(_model(backbone, "joint"))


@pytest.mark.parametrize("kwargs, match", [
    ({"objective": "both"}, "objective"),
    ({"objective": "decoupled", "private_lora": True}, "private_lora = false"),
])
def test_bad_objectives_are_one_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdapterSpec(**kwargs)


def test_a_saved_trained_private_lora_is_reset_when_private_lora_is_off(tiny_encoder_dir, tmp_path):
    """red-team: a home trained with private_lora = true, switched to false + decoupled, must not
    load a trained (frozen, but active) private LoRA that changes what the shared score reads."""
    from fedpref.model.io import load_adapter_weights, save_adapter

    backbone = load_backbone(tiny_encoder_dir)
    on = build_model(backbone, AdapterSpec(rank=2, top_layers=0, private_lora=True))
    with torch.no_grad():
        for n, p in on.named_parameters():
            if f".{PRIVATE_ADAPTER}." in n:
                p.add_(0.3)
    save_adapter(on, PRIVATE_ADAPTER, tmp_path / "private")
    off = _model(backbone, "decoupled")
    load_adapter_weights(off, PRIVATE_ADAPTER, tmp_path / "private")
    arrays = get_arrays(off, Group.PRIVATE)
    assert all(not v.any() for k, v in arrays.items() if ".lora_B." in k)  # reset: adds nothing
    assert any(v.any() for k, v in arrays.items() if ".personal_head." in k)  # the head is kept


def test_check_partition_refuses_a_re_enabled_private_lora(tiny_encoder_dir):
    from fedpref.common.errors import IntegrityError
    from fedpref.model.preference import check_partition

    model = _model(load_backbone(tiny_encoder_dir), "decoupled")
    check_partition(model)
    model.base_model.set_adapter([SHARED_ADAPTER, PRIVATE_ADAPTER])  # PEFT re-enables every active LoRA
    with pytest.raises(IntegrityError, match="private_lora = false"):
        check_partition(model)


def test_a_safety_check_leaves_the_private_lora_frozen(tiny_encoder_dir):
    """PEFT's disable_adapter() re-enables every active LoRA on exit: after the safety module's
    frozen-backbone pass, a private_lora = false model had a trainable private LoRA again (a
    1,000-user run then failed check_partition in finetuning). adapters_disabled restores it."""
    from fedpref.model.preference import adapters_disabled, check_partition
    from fedpref.safety_policy.classifier import frozen_pooled

    backbone = load_backbone(tiny_encoder_dir)
    model = _model(backbone, "decoupled")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    cache = TextCache.build(model, backbone, GOOD, max_length=32)
    frozen_pooled(model, cache, GOOD)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    check_partition(model)
    with model.disable_adapter():  # PEFT alone: the bug this guards against (the test can fail)
        pass
    with pytest.raises(IntegrityError):
        check_partition(model)
    with adapters_disabled(model):
        pass
