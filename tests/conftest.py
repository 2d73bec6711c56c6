"""Shared fixtures. Everything here builds real objects; nothing is mocked."""

from __future__ import annotations

import pytest


@pytest.fixture
def flower_task():
    """Flower needs a task identity to build Messages outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture(scope="session")
def minilm():
    """The real default backbone, loaded once per session (offline, ~1 s)."""
    from fedpref.model.backbone import load_backbone

    return load_backbone()


def _save_tiny(path, config) -> str:
    """A randomly initialised model from ``config`` with MiniLM's tokenizer, saved as a folder."""
    import shutil

    import torch
    from transformers import AutoModel

    from fedpref.model.backbone import default_backbone_path

    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    model.save_pretrained(path)
    src = default_backbone_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    return str(path)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), cfg)


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), cfg)


@pytest.fixture(scope="session")
def tiny_minilm_dir(tmp_path_factory):
    """MiniLM cut to its first 2 blocks (built from a config with num_hidden_layers=2):
    real embeddings, a third of the compute. For the end-to-end simulation tests."""
    import shutil

    from transformers import AutoConfig, AutoModel

    from fedpref.model.backbone import default_backbone_path

    src = default_backbone_path()
    out = tmp_path_factory.mktemp("minilm-2")
    cfg = AutoConfig.from_pretrained(src, local_files_only=True, num_hidden_layers=2)
    AutoModel.from_pretrained(src, config=cfg, local_files_only=True).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return str(out)


@pytest.fixture(scope="session")
def policy_kit(tiny_minilm_dir, tmp_path_factory):
    """A real signed safety policy for the 2-block MiniLM: corpus → classifier → bundle →
    2-of-3 Ed25519 root → envelopes v1 and v2 (DSSE). Keys stay in memory."""
    import json
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from fedpref.safety_policy import generate_signing_key, make_root_body, read_bundle_dir, sign_policy, sign_root
    from fedpref.safety_policy.classifier import build_bundle
    from fedpref.simulations.persona import PersonaConfig, safety_corpus

    d = tmp_path_factory.mktemp("policy")
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in safety_corpus(PersonaConfig(), n_per_class=40)))
    now = datetime.now(timezone.utc)
    build_bundle(corpus, d / "bundle", backbone=tiny_minilm_dir, max_length=96, now=now)
    keys = [generate_signing_key() for _ in range(3)]
    root = sign_root(make_root_body(keys, 2, expires=now + timedelta(days=30)), keys)
    (d / "root.json").write_bytes(root)
    manifest, files = read_bundle_dir(d / "bundle")
    envs = {}
    for v in (1, 2):
        envs[v] = sign_policy(manifest, files, keys[:2], version=v, issued_at=now, expires_at=now + timedelta(days=7))
        (d / f"policy-v{v}.dsse.json").write_bytes(envs[v])
    return SimpleNamespace(dir=d, corpus=corpus, keys=keys, root=root, root_path=d / "root.json",
                           envelopes=envs, manifest=manifest, files=files, now=now, backbone=tiny_minilm_dir)
