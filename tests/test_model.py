"""The preference model: backbone identity, pooling, adapters, replay cache, PEFT format."""

import json

import numpy as np
import pytest
import torch

from fedpref.common.errors import ConfigError
from fedpref.model.backbone import backbone_sha256, load_backbone, pad_batch, pool, tokenize
from fedpref.model.cache import TextCache
from fedpref.model.io import CONFIG_NAME, WEIGHTS_NAME, adapter_exists, load_adapter_weights, save_adapter
from fedpref.model.preference import (
    AdapterSpec,
    bradley_terry_loss,
    build_model,
    digest_of,
    get_arrays,
    params_of,
    set_arrays,
)
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group, group_of

TEXTS = ["- Short answer 😀", "A long, formal and detailed exposition of the matter at hand.", "hey"]


def _perturb(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def test_pool_mean_and_last_token():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.allclose(pool(h, mask, is_decoder=False)[0], h[0, :2].mean(0))
    assert torch.equal(pool(h, mask, is_decoder=True)[0], h[0, 1])
    assert torch.equal(pool(h, mask, is_decoder=True)[1], h[1, 2])


def test_backbone_sha256_is_over_weight_files(tiny_encoder_dir, tmp_path):
    a = backbone_sha256(tiny_encoder_dir)
    assert a == backbone_sha256(tiny_encoder_dir) and len(a) == 64
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_encoder_dir, copy)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert backbone_sha256(copy) != a


def test_missing_backbone_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("fixture", ["tiny_encoder_dir", "tiny_decoder_dir"])
def test_replay_is_exact_for_encoders_and_decoders(fixture, request):
    backbone = load_backbone(request.getfixturevalue(fixture))
    assert backbone.is_decoder == (fixture == "tiny_decoder_dir")
    model = build_model(backbone, AdapterSpec(rank=2, top_layers=1))
    _perturb(model)
    ids, mask = pad_batch(tokenize(backbone, TEXTS, max_length=32), int(backbone.tokenizer.pad_token_id))
    with torch.no_grad():
        full = model(ids, mask)  # (B,)
        cache = TextCache.build(model, backbone, TEXTS, max_length=32)
        ids2, mask2, replay = cache.batch(TEXTS)
        replayed = model(ids2, mask2, replay)
    assert replay is not None and replay.shape[:2] == ids.shape
    assert torch.equal(full, replayed)  # bit-identical, not approximately equal
    assert full.abs().sum() > 0


def test_partition_of_built_model(tiny_encoder_dir):
    model = build_model(load_backbone(tiny_encoder_dir), AdapterSpec(rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(params_of(model, Group.SHARED)) | set(params_of(model, Group.PRIVATE))
    assert any("score.modules_to_save.shared" in n for n in trainable)
    assert any("style_proj.modules_to_save.shared" in n for n in trainable)
    assert any("personal_head.modules_to_save.private" in n for n in trainable)
    assert all(group_of(n) is Group.BACKBONE for n, p in model.named_parameters() if not p.requires_grad)
    # LoRA only on the top block
    lora_layers = {n.split(".layer.")[1].split(".")[0] for n in trainable if "lora_" in n}
    assert lora_layers == {"1"}


def test_adapter_targets_must_exist(tiny_encoder_dir):
    with pytest.raises(ConfigError, match="match no module"):
        build_model(load_backbone(tiny_encoder_dir), AdapterSpec(targets=("nonexistent",)))


def test_peft_format_roundtrip(tiny_encoder_dir, tmp_path):
    from peft import PeftModel

    backbone = load_backbone(tiny_encoder_dir)
    model = build_model(backbone, AdapterSpec(rank=2))
    _perturb(model)
    before = get_arrays(model, Group.PRIVATE)
    save_adapter(model, PRIVATE_ADAPTER, tmp_path / "private")
    cfg = json.loads((tmp_path / "private" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["modules_to_save"] == ["personal_head"]
    assert cfg["target_modules"] == ["encoder.encoder.layer.1.attention.self.value"]
    assert (tmp_path / "private" / WEIGHTS_NAME).is_file()
    assert adapter_exists(tmp_path / "private")
    set_arrays(model, Group.PRIVATE, {k: np.zeros_like(v) for k, v in before.items()})
    load_adapter_weights(model, PRIVATE_ADAPTER, tmp_path / "private")
    after = get_arrays(model, Group.PRIVATE)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    # PEFT itself reads the folder
    other = build_model(load_backbone(tiny_encoder_dir), AdapterSpec(rank=2), adapters=(SHARED_ADAPTER,))
    assert isinstance(other, PeftModel)
    other.load_adapter(str(tmp_path / "private"), adapter_name="loaded")
    assert "loaded" in other.peft_config


def test_interrupted_directory_replace_is_recovered(tiny_encoder_dir, tmp_path):
    model = build_model(load_backbone(tiny_encoder_dir), AdapterSpec(rank=2))
    target = tmp_path / "private"
    save_adapter(model, PRIVATE_ADAPTER, target)
    target.rename(tmp_path / "private.old")  # crash between the two renames
    assert adapter_exists(target)


def test_digest_changes_with_any_bit(tiny_encoder_dir):
    model = build_model(load_backbone(tiny_encoder_dir), AdapterSpec(rank=2))
    d0 = digest_of(model, [Group.BACKBONE])
    p = next(p for n, p in model.named_parameters() if group_of(n) is Group.BACKBONE)
    with torch.no_grad():
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(1e9))
    assert digest_of(model, [Group.BACKBONE]) != d0


def test_bradley_terry_loss_values():
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(np.log(2))
    assert bradley_terry_loss(torch.tensor([10.0]), torch.tensor([0.0])).item() < 1e-4


def test_personal_head_without_projection(tiny_encoder_dir):
    """personal_dims = 0: the private head reads the standardised features directly."""
    model = build_model(load_backbone(tiny_encoder_dir), AdapterSpec(rank=2, personal_dims=0))
    names = [n for n, _ in model.named_parameters()]
    assert not any("style_proj" in n for n in names)
    head = params_of(model, Group.PRIVATE)
    assert any(n.endswith("personal_head.modules_to_save.private.weight") and p.shape == (1, 32) for n, p in head.items())
