"""Local DP-SGD: exact per-pair gradients, frozen weights untouched, accounting carried over."""

import numpy as np
import pytest
import torch

from fedpref.client.trainer import LocalTrainConfig, assert_frozen_unchanged, pair_accuracy, train_pairs, _frozen_snapshot
from fedpref.common.errors import ConfigError, IntegrityError
from fedpref.model.backbone import load_backbone
from fedpref.model.cache import TextCache
from fedpref.model.preference import AdapterSpec, bradley_terry_loss, build_model, get_arrays
from fedpref.protocol.partition import Group

GOOD = [f"Sure! Here is a friendly tip {i} 😀 keep it simple." for i in range(24)]
BAD = [f"Pursuant to inquiry {i}, a formal exposition follows herewith." for i in range(24)]


@pytest.fixture(scope="module")
def setup(tiny_encoder_dir):
    backbone = load_backbone(tiny_encoder_dir)
    model = build_model(backbone, AdapterSpec(rank=2))
    cache = TextCache.build(model, backbone, GOOD + BAD, max_length=32)
    return backbone, model, cache


def _cfg(**kw):
    base = dict(epochs=2, batch_size=8, learning_rate=0.1, head_learning_rate=1.0, projection_learning_rate=0.1,
                noise_multiplier=1.0, max_grad_norm=1.0)
    base.update(kw)
    return LocalTrainConfig(**base)


def test_opacus_per_pair_gradients_match_autograd(setup):
    """Two forward calls per step (chosen, rejected) must give each pair's own gradient."""
    from opacus import GradSampleModule

    _, model, cache = setup
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    pairs = [(GOOD[i], BAD[i]) for i in range(3)]
    # reference: one pair at a time
    ref = []
    for c, r in pairs:
        model.zero_grad()
        ic, mc, rc = cache.batch([c])
        ir, mr, rr = cache.batch([r])
        bradley_terry_loss(model(ic, mc, rc), model(ir, mr, rr)).backward()
        ref.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    gsm = GradSampleModule(model)
    try:
        gsm.zero_grad()
        ic, mc, rc = cache.batch([c for c, _ in pairs])
        ir, mr, rr = cache.batch([r for _, r in pairs])
        loss = bradley_terry_loss(gsm(ic, mc, rc), gsm(ir, mr, rr))  # mean: Opacus rescales by the batch size
        loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                for i in range(len(pairs)):
                    torch.testing.assert_close(p.grad_sample[i], ref[i][n], rtol=1e-4, atol=1e-6)
    finally:
        gsm._close()


def test_dp_training_learns_and_keeps_frozen_weights(setup):
    _, model, cache = setup
    snapshot = _frozen_snapshot(model)
    shared0 = get_arrays(model, Group.SHARED)
    res = train_pairs(model, cache, GOOD[:16], BAD[:16], _cfg(epochs=4))
    cfg = _cfg(epochs=4)
    assert res.steps == cfg.steps(16) == 4 * 2
    # the budget check's prediction is exactly what Opacus' accountant recorded
    assert res.accountant_history == [(1.0, cfg.sample_rate(16), cfg.steps(16))]
    assert_frozen_unchanged(model, snapshot)
    shared1 = get_arrays(model, Group.SHARED)
    assert any(not np.array_equal(shared0[k], shared1[k]) for k in shared0)
    assert pair_accuracy(model, cache, GOOD[16:], BAD[16:]) >= 0.75


def test_accountant_history_is_continued(setup):
    _, model, cache = setup
    first = train_pairs(model, cache, GOOD[:16], BAD[:16], _cfg(epochs=1))
    second = train_pairs(model, cache, GOOD[:16], BAD[:16], _cfg(epochs=1), accountant_history=first.accountant_history)
    assert sum(h[2] for h in second.accountant_history) == sum(h[2] for h in first.accountant_history) + second.steps


def test_frozen_weight_change_is_detected(setup):
    _, model, _ = setup
    snapshot = _frozen_snapshot(model)
    name = next(iter(snapshot))
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] += 1.0
    try:
        with pytest.raises(IntegrityError, match="changed during local training"):
            assert_frozen_unchanged(model, snapshot)
    finally:
        with torch.no_grad():
            dict(model.named_parameters())[name].copy_(snapshot[name])


def test_hooks_are_removed_after_training(setup):
    _, model, cache = setup
    train_pairs(model, cache, GOOD[:8], BAD[:8], _cfg(epochs=1))
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    # training again on the same model works (hooks were closed)
    train_pairs(model, cache, GOOD[:8], BAD[:8], _cfg(epochs=1))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="epochs"):
        _cfg(epochs=0)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        _cfg(noise_multiplier=-1)


def test_seeded_noise_repeats_and_unseeded_noise_does_not(setup):
    """Simulations may seed DP-SGD noise (noise_seed) so a config gives the same numbers twice."""
    from fedpref.model.preference import set_arrays

    _, model, cache = setup
    start = {g: get_arrays(model, g) for g in (Group.SHARED, Group.PRIVATE)}

    def run(**kw):
        for g, arrays in start.items():
            set_arrays(model, g, arrays)
        torch.manual_seed(len(kw))  # moves the default generator: only an explicit seed may repeat
        train_pairs(model, cache, GOOD[:16], BAD[:16], _cfg(epochs=1, seed=3, **kw))
        return get_arrays(model, Group.SHARED)

    a, b = run(noise_seed=11), run(noise_seed=11, max_grad_norm=1.0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = run(noise_seed=12)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
