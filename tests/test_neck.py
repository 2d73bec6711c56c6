"""``adapter.top_layers = 0``: LoRA on a frozen identity neck over the pooled embedding.

The whole backbone is then cached per text (one pooled (H,) vector), and a training step
never runs a transformer block. These tests hold it to the same contract as the block
adapters: exact replay, the partition, frozen weights bit-identical after DP-SGD, and a
cache that refuses to be replayed into a model of another layout.
"""

import numpy as np
import pytest
import torch

from fedpref.client.data import PreferencePair, Split, UserData
from fedpref.client.device import DeviceState, user_cache
from fedpref.client.trainer import LocalTrainConfig, train_pairs
from fedpref.common.errors import ConfigError, DataError, IntegrityError
from fedpref.model.backbone import embed_texts, load_backbone, pad_batch, tokenize
from fedpref.model.cache import TextCache, layout_of
from fedpref.model.preference import AdapterSpec, build_model, get_arrays
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group, group_of
from fedpref.safety_policy.classifier import frozen_pooled

TEXTS = ["- Short answer 😀", "A long, formal and detailed exposition of the matter at hand.", "hey", "two words"]


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("fixture", ["tiny_encoder_dir", "tiny_decoder_dir"])
def test_neck_replay_is_exact_and_caches_pooled_states(fixture, request):
    backbone = load_backbone(request.getfixturevalue(fixture))
    model = build_model(backbone, AdapterSpec(rank=2, top_layers=0))
    _perturb(model)
    ids, mask = pad_batch(tokenize(backbone, TEXTS, max_length=32), int(backbone.tokenizer.pad_token_id))
    with torch.no_grad():
        full = model(ids, mask)  # (B,): runs the whole backbone
        cache = TextCache.build(model, backbone, TEXTS, max_length=32)
        ids2, mask2, replay = cache.batch(TEXTS)
        replayed = model(ids2, mask2, replay)
    assert cache.layout == "pooled" and replay is not None
    assert replay.shape == (len(TEXTS), backbone.hidden_size)  # one pooled vector per text, not (T, H)
    assert torch.equal(full, replayed)  # bit-identical
    # the cached state is the frozen backbone's pooled embedding (what the safety classifier reads too)
    np.testing.assert_allclose(replay.numpy(), embed_texts(backbone, TEXTS, max_length=32), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(frozen_pooled(model, cache, TEXTS).numpy(), replay.numpy())
    # the perturbed LoRA changes the rewards: the neck is really in the path
    with torch.no_grad(), model.disable_adapter():
        plain = model(ids2, mask2, replay)
    assert not torch.equal(plain, replayed)


def test_neck_partition_and_identity(tiny_encoder_dir):
    backbone = load_backbone(tiny_encoder_dir)
    model = build_model(backbone, AdapterSpec(rank=2, top_layers=0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(".neck." in n for n in lora)  # no block is adapted
    assert {group_of(n) for n in lora} == {Group.SHARED, Group.PRIVATE}
    base = model.base_model.model
    for n, p in model.named_parameters():
        if ".neck.base_layer." in n:
            assert group_of(n) is Group.BACKBONE and not p.requires_grad
    assert torch.equal(base.neck.base_layer.weight, torch.eye(backbone.hidden_size))
    with pytest.raises(IntegrityError, match="pooled states"):  # a (B, T, H) replay is refused, not broadcast
        base.pooled(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(2, 3, backbone.hidden_size))


def test_dp_sgd_on_the_neck_changes_lora_only(tiny_encoder_dir):
    backbone = load_backbone(tiny_encoder_dir)
    model = build_model(backbone, AdapterSpec(rank=2, top_layers=0))
    good, bad = ["a helpful detailed answer"] * 8, ["no"] * 8
    cache = TextCache.build(model, backbone, good + bad, max_length=32)
    before = {**get_arrays(model, Group.SHARED), **get_arrays(model, Group.PRIVATE)}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if group_of(n) is Group.BACKBONE}
    cfg = LocalTrainConfig(epochs=2, batch_size=4, learning_rate=0.5, head_learning_rate=0.5,
                           projection_learning_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, seed=0, noise_seed=1)
    res = train_pairs(model, cache, good, bad, cfg)
    assert res.steps == 4 and res.accountant_history  # Opacus took every step and kept its history
    after = {**get_arrays(model, Group.SHARED), **get_arrays(model, Group.PRIVATE)}
    assert any(not np.array_equal(before[k], after[k]) for k in before if ".neck.lora_" in k)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def _user(texts):
    pairs = [PreferencePair(user_id="u1", prompt="", chosen=texts[i], rejected=texts[i + 1],
                            split=Split.TRAIN if i < 2 else Split.TEST) for i in range(0, len(texts) - 1, 2)]
    return UserData("u1", None, tuple(p for p in pairs if p.split is Split.TRAIN),
                    tuple(p for p in pairs if p.split is Split.TEST))


def test_a_cache_of_another_layout_is_rebuilt_not_replayed(tiny_encoder_dir, tmp_path):
    from fedpref.client.device import Runtime

    blocks = build_model(load_backbone(tiny_encoder_dir), AdapterSpec(rank=2, top_layers=1))
    backbone = load_backbone(tiny_encoder_dir)  # build_model needs a fresh one
    neck = build_model(backbone, AdapterSpec(rank=2, top_layers=0))
    assert layout_of(blocks) == "blocks<1" and layout_of(neck) == "pooled"
    old = TextCache.build(blocks, load_backbone(tiny_encoder_dir), TEXTS, max_length=32)
    path = tmp_path / "dev" / "cache.safetensors"
    path.parent.mkdir()
    old.save(path)
    assert TextCache.load(path).layout == "blocks<1"  # the layout survives the file
    with pytest.raises(DataError, match="merge"):
        TextCache.build(neck, backbone, TEXTS[:1], max_length=32).merge(old)

    rt = Runtime(backbone=backbone, model=neck, adapters=(SHARED_ADAPTER, PRIVATE_ADAPTER), snapshot={},
                 initial_private={}, max_length=32)
    cache = user_cache(rt, _user(TEXTS), DeviceState(tmp_path / "dev"), shared_cache=old)  # the shared one does not fit either
    assert cache.fits(neck) and cache.layout == "pooled"
    assert TextCache.load(path).layout == "pooled"  # rewritten for the model the device now runs
    _, _, rep = cache.batch(TEXTS)
    assert rep is not None and rep.dim() == 2


@pytest.mark.parametrize("private_lora", [True, False])
def test_private_lora_off_trains_the_personal_head_alone(tiny_encoder_dir, private_lora):
    """``adapter.private_lora = false``: the private adapter's LoRA keeps its zero start through
    DP-SGD (frozen, so it adds no noise dimensions) while the personal head and the shared
    adapter still train; with it on, the private LoRA trains too (the test can fail both ways)."""
    backbone = load_backbone(tiny_encoder_dir)
    model = build_model(backbone, AdapterSpec(rank=2, top_layers=0, private_lora=private_lora))
    priv_lora = {n for n, _ in model.named_parameters() if f".{PRIVATE_ADAPTER}." in n and ".lora_" in n}
    assert priv_lora
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert bool(priv_lora & trainable) is private_lora
    good, bad = ["a helpful detailed answer"] * 8, ["no"] * 8
    cache = TextCache.build(model, backbone, good + bad, max_length=32)
    before = get_arrays(model, Group.PRIVATE)
    shared_before = get_arrays(model, Group.SHARED)
    cfg = LocalTrainConfig(epochs=2, batch_size=4, learning_rate=0.5, head_learning_rate=0.5,
                           projection_learning_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, seed=0, noise_seed=1)
    train_pairs(model, cache, good, bad, cfg)
    after = get_arrays(model, Group.PRIVATE)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert any(".personal_head." in k for k in changed)
    assert bool(changed & priv_lora) is private_lora
    if not private_lora:  # B stays zero: the private neck LoRA adds nothing to the features
        assert all(not after[k].any() for k in priv_lora if ".lora_B." in k)
    assert any(not np.array_equal(shared_before[k], v) for k, v in get_arrays(model, Group.SHARED).items())


def test_private_lora_must_be_a_bool():
    with pytest.raises(ConfigError, match="private_lora"):
        AdapterSpec(private_lora="no")


@pytest.mark.parametrize("fixture", ["tiny_encoder_dir", "tiny_decoder_dir"])
def test_embed_texts_batches_by_length_and_keeps_the_callers_order(fixture, request, monkeypatch):
    """embed_texts groups texts of similar token counts into one batch (less padding), yet row i
    is still texts[i]'s own embedding: the same as embedding that text alone, and every text is
    reported to ``progress`` exactly once."""
    import fedpref.model.backbone as bb_mod

    backbone = load_backbone(request.getfixturevalue(fixture))
    texts = [t * k for k in (1, 5, 2, 7, 1, 3) for t in TEXTS][:20]  # lengths out of order
    seen: list[int] = []
    widths: list[int] = []
    real_pad = bb_mod.pad_batch

    def spy(ids, pad_id):
        widths.append(max(len(x) for x in ids))
        return real_pad(ids, pad_id)

    monkeypatch.setattr(bb_mod, "pad_batch", spy)
    got = embed_texts(backbone, texts, max_length=64, batch_size=3, progress=seen.append)
    monkeypatch.undo()
    lengths = sorted(len(x) for x in tokenize(backbone, texts, max_length=64))
    assert widths == lengths[2::3] + ([lengths[-1]] if len(lengths) % 3 else [])  # each batch: the next 3 by length
    alone = np.concatenate([embed_texts(backbone, [t], max_length=64) for t in texts])
    assert got.shape == (len(texts), backbone.hidden_size)
    np.testing.assert_allclose(got, alone, rtol=1e-4, atol=1e-5)
    assert sum(seen) == len(texts) and max(seen) <= 3
    assert not np.allclose(got[0], got[1])  # rows differ: not one text broadcast
    assert embed_texts(backbone, [], max_length=64).shape == (0, backbone.hidden_size)


def test_a_batch_of_texts_with_no_token_pads_to_one_position():
    """A tokenizer without special tokens (GPT-2 style) turns "" into no token at all; sorting by
    length batches such texts together. They pad to one masked position, not a (B, 0) batch the
    backbone cannot run, and pool to a finite (zero) vector."""
    from fedpref.model.backbone import pool

    ids, mask = pad_batch([[], []], pad_id=0)
    assert ids.shape == mask.shape == (2, 1) and not mask.any()
    hidden = torch.randn(2, 1, 8)
    for decoder in (False, True):
        assert torch.isfinite(pool(hidden, mask, is_decoder=decoder)).all()
