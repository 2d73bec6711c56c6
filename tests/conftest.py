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
