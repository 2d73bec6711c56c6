"""The ranking bound: personalized order, with every flagged candidate below every safe one.

``BoundedRanker.rank(candidates)`` returns one :class:`Ranked` per candidate:

- safe candidates first, by the user's personal score (highest first);
- then every candidate the installed policy flags, least risky first (by its highest
  flagged probability; the personal score only breaks ties), each carrying its categories
  and a reason such as ``"violence: p=0.97 >= 0.50 (policy v3)"``.

Whatever the personal score, no flagged candidate outranks a safe one, and personalization
cannot reorder the flagged ones either: a false positive on a safe text then still ranks
above a clearly unsafe one. The personal score
comes from the user's full model (shared + private adapters); the flags from the policy's
:class:`~fedpref.safety_policy.classifier.SafetyModule` over the *frozen* backbone, so no
adapter can move them. With ``enforce=False`` the flags are computed and reported but the
order is the personal one: the "unbounded" arm of the falsification experiment.

The reward model scores candidate responses alone (a persona text carries its own context), so
the ranker takes no prompt; the device's API accepts one (``RankRequest.prompt``, checked
there) and does not pass it on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from fedpref.common.errors import ConfigError
from fedpref.model.backbone import Backbone, pad_batch, tokenize
from fedpref.model.preference import adapters_disabled
from fedpref.safety_policy.classifier import SafetyModule, attached

__all__ = ["BoundedRanker", "Ranked", "order_bounded"]


class Ranked(NamedTuple):
    candidate: str
    personal_score: float
    unsafe_categories: tuple[str, ...]
    allowed: bool
    reason: str = ""


def order_bounded(
    candidates: Sequence[str],
    scores: Sequence[float],
    flags: Sequence[Sequence[tuple[str, float]]],
    *,
    thresholds: dict[str, float],
    policy_version: int,
    enforce: bool = True,
) -> list[Ranked]:
    """The ordering rule alone (pure): flagged below safe, least risky first, when ``enforce``.

    Without ``enforce`` the order is the personal one. Ties keep the input order.
    """
    if not (len(candidates) == len(scores) == len(flags)):
        raise ConfigError("order_bounded: candidates, scores and flags differ in length")
    items = []
    for cand, score, fl in zip(candidates, scores, flags):
        cats = tuple(c for c, _ in fl)
        reason = "; ".join(f"{c}: p={p:.2f} >= {thresholds[c]:.2f} (policy v{policy_version})" for c, p in fl)
        items.append(Ranked(cand, float(score), cats, not cats, reason))
    risk = [max((p for _, p in fl), default=0.0) for fl in flags]

    def key(i: int) -> tuple:
        if not enforce:
            return (0, 0.0, -items[i].personal_score, i)
        return (int(not items[i].allowed), risk[i], -items[i].personal_score, i)

    order = sorted(range(len(items)), key=key)
    return [items[i] for i in order]


@dataclass
class BoundedRanker:
    """Personalized ranking bounded by a safety policy. ``model`` is the PEFT reward model."""

    model: nn.Module
    backbone: Backbone
    thresholds: dict[str, float]
    policy_version: int
    max_length: int = 96
    cache: Any = None  # a TextCache: replayed for texts it holds (exact; faster)
    enforce: bool = True

    @classmethod
    def from_policy(cls, model: nn.Module, backbone: Backbone, policy: Any, **kw: Any) -> BoundedRanker:
        """A ranker for ``model`` with ``policy``'s module attached (must already be attached)."""
        module = attached(model)
        if module is None:
            raise ConfigError("no safety module is attached to the model; install the policy first")
        return cls(model, backbone, {c.name: c.threshold for c in policy.categories}, policy.version, **kw)

    @property
    def safety(self) -> SafetyModule:
        module = attached(self.model)
        if module is None:
            raise ConfigError("the safety module was removed from the model; the ranker cannot bound anything")
        return module

    def _batches(self, texts: Sequence[str], batch_size: int = 64):
        for s in range(0, len(texts), batch_size):
            chunk = list(texts[s : s + batch_size])
            if self.cache is not None and not self.cache.missing(chunk):
                yield self.cache.batch(chunk)
            else:
                ids = tokenize(self.backbone, chunk, max_length=self.max_length)
                input_ids, mask = pad_batch(ids, int(self.backbone.tokenizer.pad_token_id))
                yield input_ids, mask, None

    @torch.no_grad()
    def scores_and_flags(self, texts: Sequence[str]) -> tuple[list[float], list[list[tuple[str, float]]]]:
        """Personal scores (adapters on) and policy flags (adapters off) of ``texts``."""
        module = self.safety
        self.model.eval()
        base = self.model.base_model.model
        scores: list[float] = []
        probs = []
        for ids, mask, rep in self._batches(texts):
            scores.extend(self.model(ids, mask, rep).tolist())
            with adapters_disabled(self.model):
                probs.append(module(base.pooled(ids, mask, rep)))
        flags = module.flags(torch.cat(probs), self.thresholds) if probs else []
        return scores, flags

    def rank(self, candidates: Sequence[str]) -> list[Ranked]:
        """``candidates`` ordered for this user: see the module docstring."""
        if not candidates or not all(isinstance(c, str) and c for c in candidates):
            raise ConfigError("rank: give at least one non-empty candidate string")
        scores, flags = self.scores_and_flags(candidates)
        return order_bounded(candidates, scores, flags, thresholds=self.thresholds,
                             policy_version=self.policy_version, enforce=self.enforce)

