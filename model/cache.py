"""Cache of what the frozen part of the backbone computes for each text.

The blocks below the first adapted block never change, so their output for a text is a
pure function of (backbone, text, max_length). :class:`TextCache` stores token ids and that
hidden state per text, keyed by the sha256 of the text, in one safetensors file. Batches
built from it replay exactly the same numbers the full forward pass computes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

from fedpref.common.atomic import write_atomic
from fedpref.common.errors import DataError
from fedpref.model.backbone import Backbone, pad_batch, tokenize


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def layout_of(model: torch.nn.Module) -> str:
    """What a cache built for ``model`` holds per text: ``pooled`` (a neck model), ``blocks<N>``
    (the output of the N frozen lower blocks) or ``ids`` (every block adapted)."""
    reward_model = model.base_model.model if hasattr(model, "base_model") else model
    if getattr(reward_model, "neck_mode", False):
        return "pooled"
    return f"blocks<{reward_model.first_adapted}" if reward_model.first_adapted else "ids"


class TextCache:
    """Token ids (and, when some blocks are frozen, their states) per text."""

    def __init__(self, ids: dict[str, torch.Tensor], states: dict[str, torch.Tensor], pad_id: int,
                 layout: str = "") -> None:
        self.ids = ids  # key -> (T,) int64
        # key -> (T, H) float32 lower-block states, or (H,) pooled states of a neck model;
        # empty when every block is adapted
        self.states = states
        self.pad_id = pad_id
        self.layout = layout  # layout_of(model) of the model it was built for; "" = unknown (old file)

    def __contains__(self, text: str) -> bool:
        return text_key(text) in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: torch.nn.Module,
        backbone: Backbone,
        texts: Iterable[str],
        *,
        max_length: int,
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> TextCache:
        """Run the frozen lower blocks once per distinct text."""
        reward_model = model.base_model.model if hasattr(model, "base_model") else model
        unique = sorted({t for t in texts}, key=len)  # similar lengths batch together: less padding
        pad_id = int(backbone.tokenizer.pad_token_id)
        ids: dict[str, torch.Tensor] = {}
        states: dict[str, torch.Tensor] = {}
        has_lower = bool(reward_model.first_adapted)
        layout = layout_of(model)
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            toks = tokenize(backbone, chunk, max_length=max_length)
            input_ids, mask = pad_batch(toks, pad_id)  # (B, T)
            lower = reward_model.lower_states(input_ids, mask) if has_lower else None  # (B, T, H)
            for i, text in enumerate(chunk):
                k = text_key(text)
                n = len(toks[i])
                ids[k] = input_ids[i, :n].clone()
                if lower is not None:  # (T, H) per text; on a neck the pooled (H,)
                    states[k] = (lower[i] if lower.dim() == 2 else lower[i, :n]).float().clone()
            if progress is not None:
                progress(len(chunk))
        return cls(ids, states, pad_id, layout)

    def fits(self, model: torch.nn.Module) -> bool:
        """Whether this cache was built for a model of ``model``'s layout (replaying a cache of
        another layout would feed the wrong states)."""
        return self.layout == layout_of(model)

    def merge(self, other: TextCache) -> None:
        if other.layout != self.layout:
            raise DataError(f"cannot merge a {other.layout!r} text cache into a {self.layout!r} one; rebuild it")
        self.ids.update(other.ids)
        self.states.update(other.states)

    def missing(self, texts: Iterable[str]) -> list[str]:
        return sorted({t for t in texts if text_key(t) not in self.ids})

    def batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input_ids (B, T), attention_mask (B, T), replay (B, T, H) or None), right-padded."""
        keys = [text_key(t) for t in texts]
        try:
            toks = [self.ids[k].tolist() for k in keys]
        except KeyError:
            raise DataError("a text is not in the hidden-state cache; build the cache over every text first") from None
        input_ids, mask = pad_batch(toks, self.pad_id)
        if not self.states:
            return input_ids, mask, None
        first = self.states[keys[0]] if keys else next(iter(self.states.values()))
        if first.dim() == 1:  # pooled states of a neck model: (B, H)
            try:
                return input_ids, mask, torch.stack([self.states[k] for k in keys])
            except (KeyError, RuntimeError):
                raise DataError("the hidden-state cache does not hold a pooled state for every text; rebuild it") from None
        h = first.shape[-1]
        replay = torch.zeros((len(keys), input_ids.shape[1], h), dtype=torch.float32)  # (B, T, H)
        for i, k in enumerate(keys):
            s = self.states[k]
            replay[i, : s.shape[0]] = s
        return input_ids, mask, replay

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically write one safetensors file (owner-only: the texts' hidden states)."""
        tensors = {f"ids.{k}": v for k, v in self.ids.items()}
        tensors.update({f"h.{k}": v.contiguous() for k, v in self.states.items()})
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"pad_id": str(self.pad_id), "layout": self.layout}), mode=0o600)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TextCache:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        pad_id = int(meta.get("pad_id", "0"))
        tensors = load_file(str(path))
        ids = {k[4:]: v for k, v in tensors.items() if k.startswith("ids.")}
        states = {k[2:]: v for k, v in tensors.items() if k.startswith("h.")}
        return cls(ids, states, pad_id, meta.get("layout", ""))
