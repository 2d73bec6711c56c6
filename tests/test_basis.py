"""The public attribute basis of the personal head (model/basis.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedpref.client.trainer import LocalTrainConfig, train_pairs
from fedpref.common.errors import ConfigError, DataError
from fedpref.model.backbone import load_backbone
from fedpref.model.basis import fit_basis, load_basis, match_feature_norm, model_identity, save_basis
from fedpref.model.cache import TextCache
from fedpref.model.config import AdapterSpec
from fedpref.model.preference import build_model, get_arrays
from fedpref.protocol.partition import Group, group_of
from fedpref.simulations.persona import ATTRIBUTES, UNSAFE_ATTRIBUTE, PersonaConfig, attribute_corpus, build_pool

GOOD = [f"Sure! Here is a friendly tip {i} 😀 keep it simple." for i in range(24)]
BAD = [f"Pursuant to inquiry {i}, a formal exposition follows herewith." for i in range(24)]


def test_fit_basis_recovers_planted_probes():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2000, 32))  # (N, H)
    true = rng.standard_normal((3, 32))  # (k, H)
    targets = feats @ true.T + 0.01 * rng.standard_normal((2000, 3))
    w = fit_basis(feats, targets, ridge=1e-3)
    assert w.shape == (3, 32) and w.dtype == np.float32
    np.testing.assert_allclose(w, true, atol=2e-3)
    with pytest.raises(ConfigError, match="same N"):
        fit_basis(feats, targets[:5])
    with pytest.raises(ConfigError, match="positive penalty"):
        fit_basis(feats, targets, ridge=0.0)


def test_match_feature_norm_equalises_the_projected_norm():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((500, 64))
    basis = 0.05 * rng.standard_normal((4, 64))
    scaled = match_feature_norm(basis, feats)
    z = feats @ scaled.T
    assert np.mean(np.sum(z * z, 1)) == pytest.approx(np.mean(np.sum(feats * feats, 1)), rel=1e-4)
    np.testing.assert_allclose(scaled / np.linalg.norm(scaled), basis / np.linalg.norm(basis), rtol=1e-4)  # direction kept


def test_save_and_load_round_trip_and_bad_files_say_what(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    sha = save_basis(tmp_path / "b.safetensors", w, ["formal", "emoji", "unsafe"], source="test")
    got, labels, sha2 = load_basis(tmp_path / "b.safetensors")
    assert torch.equal(got, torch.from_numpy(w)) and labels == ("formal", "emoji", "unsafe") and sha == sha2
    with pytest.raises(ConfigError, match=r"missing\.safetensors.*attribute_basis"):
        load_basis(tmp_path / "missing.safetensors")
    (tmp_path / "junk").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="junk: not a readable safetensors basis"):
        load_basis(tmp_path / "junk")
    from safetensors.torch import save_file

    save_file({"other": torch.zeros(2, 2)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(DataError, match="expected one float32"):
        load_basis(tmp_path / "wrong.safetensors")
    save_file({"weight": torch.full((2, 2), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(DataError, match="non-finite"):
        load_basis(tmp_path / "nan.safetensors")
    with pytest.raises(ConfigError, match="k labels"):
        save_basis(tmp_path / "c.safetensors", w, ["one"])


def test_spec_needs_personal_dims_with_a_basis():
    with pytest.raises(ConfigError, match="personal_dims = 0"):
        AdapterSpec(personal_dims=0, attribute_basis="b.safetensors")


@pytest.fixture(scope="module")
def with_basis(tiny_encoder_dir, tmp_path_factory):
    """(a backbone for its path and sha256 only: build_model needs a fresh one each time, basis file)"""
    backbone = load_backbone(tiny_encoder_dir)
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("basis") / "basis.safetensors"
    save_basis(path, rng.standard_normal((3, backbone.hidden_size)).astype(np.float32), ["a", "b", "c"])
    return backbone, path


def test_a_basis_is_frozen_not_shared_and_checked_against_the_backbone(with_basis, tmp_path):
    backbone, path = with_basis
    spec = AdapterSpec(rank=2, personal_dims=3, attribute_basis=str(path))
    model = build_model(load_backbone(backbone.path), spec)
    proj = {n: p for n, p in model.named_parameters() if "style_proj" in n}
    assert len(proj) == 1
    (name, weight), = proj.items()
    assert torch.equal(weight, load_basis(path)[0]) and not weight.requires_grad
    assert group_of(name) is Group.BACKBONE  # never trained, never sent; covered by the bit-identity check
    assert not any("style_proj" in k for k in get_arrays(model, Group.SHARED))
    assert [tuple(v.shape) for k, v in get_arrays(model, Group.PRIVATE).items() if "personal_head" in k and k.endswith("weight")] == [(1, 3)]
    # a learnt projection (no basis) is part of the shared adapter instead
    learnt = build_model(load_backbone(backbone.path), AdapterSpec(rank=2, personal_dims=3))
    assert any("style_proj" in k for k in get_arrays(learnt, Group.SHARED))
    with pytest.raises(ConfigError, match="set personal_dims = 3"):
        build_model(load_backbone(backbone.path), AdapterSpec(rank=2, personal_dims=4, attribute_basis=str(path)))


def test_dp_training_leaves_the_basis_bit_identical_and_learns_the_head(with_basis):
    _, path = with_basis
    backbone = load_backbone(with_basis[0].path)
    model = build_model(backbone, AdapterSpec(rank=2, personal_dims=3, attribute_basis=str(path)))
    cache = TextCache.build(model, backbone, GOOD + BAD, max_length=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = LocalTrainConfig(epochs=2, batch_size=8, learning_rate=0.1, head_learning_rate=1.0,
                           projection_learning_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    train_pairs(model, cache, GOOD[:16], BAD[:16], cfg)  # asserts the frozen weights itself, too
    after = dict(model.named_parameters())
    basis_name = next(n for n in before if "style_proj" in n)
    assert torch.equal(after[basis_name], before[basis_name])
    head = next(n for n in before if "personal_head" in n and n.endswith("weight") and "private" in n)
    assert not torch.equal(after[head], before[head])


def test_the_attested_identity_covers_the_basis(with_basis, tmp_path):
    backbone, path = with_basis
    plain = model_identity(backbone.sha256, AdapterSpec(rank=2))
    assert plain == backbone.sha256
    ident = model_identity(backbone.sha256, AdapterSpec(rank=2, personal_dims=3, attribute_basis=str(path)))
    assert ident != plain and len(ident) == 64
    other = tmp_path / "other.safetensors"
    w, labels, _ = load_basis(path)
    save_basis(other, (w + 1e-3).numpy(), labels)  # one probe moved a little: another identity
    assert model_identity(backbone.sha256, AdapterSpec(rank=2, personal_dims=3, attribute_basis=str(other))) != ident


def test_server_rejects_a_device_with_another_basis(with_basis, tmp_path):
    from fedpref.protocol.messages import PROTOCOL_VERSION, Attestation, TrainMetrics, TrainReply, train_reply
    from fedpref.server.validation import Expected, RejectedUpdate, validate_reply

    backbone, path = with_basis
    server = model_identity(backbone.sha256, AdapterSpec(rank=2, personal_dims=3, attribute_basis=str(path)))
    shapes = {"score.modules_to_save.shared.bias": (1,)}
    exp = Expected(shapes=shapes, dtype="float32", clip_norm=1.0, server_round=1, frozen_identity=server,
                   policy_version=0, safety_digest="")
    m = TrainMetrics(train_loss=0.5, train_accuracy=0.5, epsilon_sample=1.0, delta_norm=0.1, steps=1, seconds=0.1)
    att = Attestation(protocol_version=PROTOCOL_VERSION, server_round=1, frozen_identity=backbone.sha256,  # no basis
                      policy_version=0, safety_digest="")
    reply = TrainReply.from_content(train_reply({k: np.zeros(s, np.float32) for k, s in shapes.items()}, m, att))
    with pytest.raises(RejectedUpdate, match="attribute basis"):
        validate_reply(reply, exp)


def test_attribute_corpus_is_public_deterministic_and_labelled():
    cfg = PersonaConfig(users=4, pairs_per_user=10, seed=3)
    a, b = attribute_corpus(cfg, n=200), attribute_corpus(cfg, n=200)
    assert a == b
    pool = {c.text for item in build_pool(cfg) for c in item.candidates}
    assert not pool & {r["text"] for r in a}  # disjoint from every text users label
    assert all(list(r["attributes"]) == [*ATTRIBUTES, UNSAFE_ATTRIBUTE] for r in a)
    assert all(v in (-1, 1) for r in a for v in r["attributes"].values())
    unsafe = np.mean([r["attributes"][UNSAFE_ATTRIBUTE] == 1 for r in a])
    assert 0.15 < unsafe < 0.35
    with pytest.raises(ConfigError, match="positive integer"):
        attribute_corpus(cfg, n=0)


def test_a_corpus_file_with_a_bad_line_names_file_and_line(tmp_path):
    from fedpref.model.basis import load_attribute_corpus

    good = json.dumps({"text": "hi", "attributes": {"formal": 1, "unsafe": -1}})
    f = tmp_path / "corpus.jsonl"
    f.write_text(good + "\n" + json.dumps({"text": "x", "attributes": {"formal": 1}}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:2: attributes \['formal'\] differ"):
        load_attribute_corpus(f)
    f.write_text(good + "\n{oops\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:2: invalid JSON"):
        load_attribute_corpus(f)
    f.write_text(json.dumps({"text": "x", "attributes": {"formal": "yes"}}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:1: attribute values must be finite numbers"):
        load_attribute_corpus(f)
    f.write_text(good + "\n")
    assert load_attribute_corpus(f)[0]["text"] == "hi"


# --- the operator's and the device's commands (real processes) ---------------------------------

def _cli(*args, check=True):
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([str(Path(sys.executable).parent / args[0]), *map(str, args[1:])], capture_output=True,
                          text=True, timeout=300, env={"FEDPREF_KEY_PASSPHRASE": "pw", "PATH": "", "HOME": "/tmp"})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow  # the operator's and the device's CLIs as real processes
def test_operator_builds_a_basis_and_a_device_takes_it(tiny_minilm_dir, tmp_path):
    from fedpref.client.agent_home import BASIS_FILE, AgentHome
    from fedpref.model.config import ModelConfig
    from fedpref.model.preference import build_model

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in attribute_corpus(PersonaConfig(seed=1), n=120)))
    out = _cli("fedpref-server", "basis", "build", "--data", corpus, "--out", tmp_path / "basis.safetensors",
               "--backbone", tiny_minilm_dir).stdout
    assert "9 attribute probes" in out and "held-out sign accuracy" in out and "personal_dims = 9" in out
    weight, labels, sha = load_basis(tmp_path / "basis.safetensors")
    assert labels == (*ATTRIBUTES, UNSAFE_ATTRIBUTE) and weight.shape == (9, 384) and sha[:16] in out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(corpus.read_text().splitlines()[0] + "\n{\n")
    err = _cli("fedpref-server", "basis", "build", "--data", bad, "--out", tmp_path / "x.safetensors", check=False)
    assert err.returncode == 4 and "bad.jsonl:2: invalid JSON" in err.stderr and "Traceback" not in err.stderr
    assert not (tmp_path / "x.safetensors").exists()

    ops = tmp_path / "ops"
    _cli("fedpref-server", "init", "--home", ops, "--address", "127.0.0.1:9092")
    dev = tmp_path / "dev"
    _cli("fedpref-agent", "init", "--home", dev, "--server", "127.0.0.1:9092", "--ca", ops / "tls" / "ca.pem",
         "--root", ops / "keys" / "root.json", "--backbone", tiny_minilm_dir, "--basis", tmp_path / "basis.safetensors")
    home = AgentHome.load(dev)
    assert (dev / BASIS_FILE).read_bytes() == (tmp_path / "basis.safetensors").read_bytes()
    assert home.model.adapter.personal_dims == 9 and home.model.adapter.attribute_basis == str(dev / BASIS_FILE)
    model = build_model(load_backbone(tiny_minilm_dir), home.model.adapter)  # the device's model takes the basis
    assert torch.equal(next(p for n, p in model.named_parameters() if "style_proj" in n), weight)
    assert model_identity(load_backbone(tiny_minilm_dir).sha256, home.model.adapter) == \
        model_identity(load_backbone(tiny_minilm_dir).sha256, ModelConfig(adapter=AdapterSpec(
            personal_dims=9, attribute_basis=str(tmp_path / "basis.safetensors"))).adapter)  # same bytes, same identity

    refused = _cli("fedpref-agent", "init", "--home", tmp_path / "dev2", "--server", "127.0.0.1:9092",
                   "--ca", ops / "tls" / "ca.pem", "--root", ops / "keys" / "root.json", "--basis", corpus, check=False)
    assert refused.returncode == 4 and "not a readable safetensors basis" in refused.stderr
    assert not (tmp_path / "dev2").exists()  # nothing half-initialised
