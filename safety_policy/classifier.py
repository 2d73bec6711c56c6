"""The safety classifier: K unsafe categories on top of the frozen backbone's pooled embedding.

::

    text ─► frozen backbone (no adapter, ever) ─► pool ─► (x − mean) / std ─► Linear(H, 1+K) ─► softmax
                                                   labels = ("safe", category_1, …, category_K)

A candidate is flagged for category c when p(c | text) ≥ the manifest's threshold for c.

The module reads the backbone with every adapter *disabled* (:func:`frozen_pooled`), so a
user's private LoRA can never move what the policy sees. Its parameters belong to the
``safety`` group of the partition (their names start with ``safety_module``): loaded with
``requires_grad=False``, never given to an optimizer, to Opacus or to LoRA, and digested
after every local training run (:meth:`SafetyModule.digest`).

The operator trains it from a labelled JSONL, one object per line::

    {"text": "...", "category": "violence"}     # an unsafe category
    {"text": "...", "category": "safe"}         # or  {"text": "...", "safe": true}

(multinomial logistic regression on standardised embeddings, full-batch L-BFGS) and ships the
weights in the signed bundle as ``classifier.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from fedpref.common.errors import ConfigError, DataError
from fedpref.common.jsonl import read_jsonl
from fedpref.model.preference import adapters_disabled
from fedpref.protocol.partition import SAFETY_MODULE

__all__ = [
    "CLASSIFIER_FILE",
    "CLASSIFIER_TYPE",
    "SAFE",
    "LabelledText",
    "SafetyModule",
    "attach",
    "attached",
    "build_bundle",
    "classifier_manifest",
    "frozen_pooled",
    "load_labelled_jsonl",
    "train_classifier",
]

SAFE = "safe"
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_TYPE = "linear-softmax/pooled-frozen-backbone/v1"


# --- the labelled corpus ------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledText:
    text: str
    category: str  # "safe" or an unsafe category
    line: int


def load_labelled_jsonl(path: str | Path) -> list[LabelledText]:
    """Read the operator's labelled corpus; every error is ``FILE:LINE: what; fix`` (DataError)."""
    path = Path(path)
    out: list[LabelledText] = []
    for no, obj in read_jsonl(path):
        where = f"{path}:{no}"
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f'{where}: field "text" is missing or empty; give the text to classify')
        has_cat, has_safe = "category" in obj, "safe" in obj
        if has_cat == has_safe:
            raise DataError(f'{where}: give exactly one of "category" (e.g. "violence" or "safe") and "safe": true')
        if has_safe:
            if obj["safe"] is not True:
                raise DataError(f'{where}: "safe" must be true; label an unsafe text with "category": "<name>"')
            cat = SAFE
        else:
            cat = obj["category"]
            if not isinstance(cat, str) or not cat.strip() or cat != cat.strip():
                raise DataError(f'{where}: field "category" = {cat!r}; give "safe" or an unsafe category name')
        out.append(LabelledText(text=text, category=cat, line=no))
    if not out:
        raise DataError(f"{path}: no labelled texts; one JSON object per line with text and category")
    counts = Counter(r.category for r in out)
    if counts[SAFE] == 0:
        raise DataError(f'{path}: no "safe" examples; the classifier needs safe texts to tell them apart')
    unsafe = sorted(c for c in counts if c != SAFE)
    if len(unsafe) < 1:
        raise DataError(f"{path}: no unsafe categories; label unsafe texts with their category")
    small = [c for c in (SAFE, *unsafe) if counts[c] < 5]
    if small:
        raise DataError(f"{path}: category {small[0]!r} has {counts[small[0]]} example(s); give at least 5 per category")
    return out


# --- the module ---------------------------------------------------------------------------


class SafetyModule(nn.Module):
    """Standardise the pooled frozen embedding, then a linear softmax over ``labels``."""

    def __init__(self, hidden_size: int, labels: Sequence[str]) -> None:
        super().__init__()
        labels = tuple(labels)
        if len(labels) < 2 or labels[0] != SAFE or len(set(labels)) != len(labels):
            raise ConfigError(f"safety labels {labels!r}: the first must be {SAFE!r}, then distinct categories")
        self.labels = labels
        self.mean = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self.std = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.linear = nn.Linear(hidden_size, len(labels))
        self.linear.requires_grad_(False)

    @property
    def categories(self) -> tuple[str, ...]:
        return self.labels[1:]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, L) probabilities
        return F.softmax(self.linear((pooled - self.mean) / self.std), dim=-1)

    def digest(self) -> str:
        """sha256 over the exact bytes of every parameter, by sorted name (what devices attest)."""
        h = hashlib.sha256()
        for name, p in sorted(self.named_parameters(), key=lambda kv: kv[0]):
            h.update(name.encode() + b"\0" + str(tuple(p.shape)).encode() + b"\0")
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def to_bytes(self) -> bytes:
        tensors = {n: p.detach().contiguous().clone() for n, p in self.named_parameters()}
        return st_save(tensors, metadata={"labels": json.dumps(list(self.labels))})

    @classmethod
    def from_bytes(cls, data: bytes, labels: Sequence[str]) -> SafetyModule:
        """Load weights (from a *verified* policy); shapes and labels must agree."""
        try:
            tensors = st_load(bytes(data))
        except Exception as e:  # safetensors raises its own error types
            raise ConfigError(f"{CLASSIFIER_FILE} is not a valid safetensors file ({e})") from None
        want = {"mean", "std", "linear.weight", "linear.bias"}
        if set(tensors) != want:
            raise ConfigError(f"{CLASSIFIER_FILE} holds tensors {sorted(tensors)}; expected {sorted(want)}")
        hidden = int(tensors["mean"].shape[0])
        module = cls(hidden, labels)
        own = dict(module.named_parameters())
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(own[name].shape) or t.dtype != torch.float32:
                raise ConfigError(f"{CLASSIFIER_FILE}: tensor {name} is {t.dtype} {tuple(t.shape)}, expected float32 {tuple(own[name].shape)}")
        with torch.no_grad():
            for name, t in tensors.items():
                own[name].copy_(t)
        module.requires_grad_(False)
        return module

    @classmethod
    def from_policy(cls, policy: Any) -> SafetyModule:
        """The module carried by a verified :class:`~fedpref.safety_policy.Policy`."""
        clf = policy.classifier
        if clf.get("type") != CLASSIFIER_TYPE or clf.get("file") not in policy.files:
            raise ConfigError(f"policy v{policy.version}: classifier {dict(clf).get('type')!r} is not {CLASSIFIER_TYPE!r}")
        labels = tuple(clf.get("labels", ()))
        cats = tuple(c.name for c in policy.categories)
        if labels[1:] != cats:
            raise ConfigError(f"policy v{policy.version}: classifier labels {labels} do not match categories {cats}")
        return cls.from_bytes(policy.files[clf["file"]], labels)

    def flags(self, probs: torch.Tensor, thresholds: Mapping[str, float]) -> list[list[tuple[str, float]]]:
        """Per row, the (category, probability) pairs at or above their threshold."""
        out = []
        for row in probs.detach().cpu().numpy():
            out.append([(c, float(row[i + 1])) for i, c in enumerate(self.categories) if row[i + 1] >= thresholds[c]])
        return out


def attach(model: nn.Module, module: SafetyModule | None) -> None:
    """Install ``module`` (frozen) as the reward model's ``safety_module``; ``None`` removes it.

    Its parameters then appear in ``model.named_parameters()`` under the ``safety`` group of
    the partition, so the trainer's frozen-weights check and the partition check cover them.
    """
    base = model.base_model.model
    if module is None:
        if hasattr(base, SAFETY_MODULE):
            delattr(base, SAFETY_MODULE)
        return
    module.requires_grad_(False)
    setattr(base, SAFETY_MODULE, module)


def attached(model: nn.Module) -> SafetyModule | None:
    """The reward model's installed safety module, if any."""
    return getattr(model.base_model.model, SAFETY_MODULE, None)


def frozen_pooled(model: nn.Module, cache: Any, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """Pooled embeddings of the backbone with every adapter disabled, (N, H), replaying ``cache``.

    ``model`` is the PEFT-wrapped reward model; its LoRA layers and heads are switched off
    for the duration, so the result is the frozen backbone's and nothing a user trains.
    """
    base = model.base_model.model
    out = []
    model.eval()
    with torch.no_grad(), adapters_disabled(model):
        for s in range(0, len(texts), batch_size):
            ids, mask, rep = cache.batch(texts[s : s + batch_size])
            out.append(base.pooled(ids, mask, rep))
    return torch.cat(out) if out else torch.zeros(0, 0)


# --- training -----------------------------------------------------------------------------


def train_classifier(
    features: np.ndarray,
    labels: Sequence[str],
    *,
    categories: Sequence[str] | None = None,
    l2: float = 1e-3,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[SafetyModule, dict[str, Any]]:
    """Fit the module on ``features`` (N, H) with string ``labels``; return it and a report.

    A stratified ``val_fraction`` is held out for the report (accuracy, per-category recall
    and the safe false-positive rate at threshold 0.5); the module is then refitted on all rows.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(labels):
        raise ConfigError(f"features {x.shape} and {len(labels)} labels do not match")
    cats = tuple(categories) if categories is not None else tuple(sorted(set(labels) - {SAFE}))
    all_labels = (SAFE, *cats)
    index = {c: i for i, c in enumerate(all_labels)}
    unknown = sorted(set(labels) - set(all_labels))
    if unknown:
        raise ConfigError(f"labels {unknown} are not among the categories {list(cats)}")
    y = np.array([index[c] for c in labels], dtype=np.int64)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), dtype=bool)
    for k in range(len(all_labels)):
        idx = np.flatnonzero(y == k)
        rng.shuffle(idx)
        val[idx[: int(round(val_fraction * len(idx)))]] = True
    report: dict[str, Any] = {"examples": {c: int((y == i).sum()) for c, i in index.items()}}
    if val.any() and (~val).any():
        probe = _fit(x[~val], y[~val], all_labels, l2=l2, seed=seed)
        with torch.no_grad():
            p = probe(torch.from_numpy(x[val])).numpy()
        pred, yv = p.argmax(1), y[val]
        report["validation"] = {
            "examples": int(val.sum()),
            "accuracy": float((pred == yv).mean()),
            "recall": {c: float((pred[yv == i] == i).mean()) if (yv == i).any() else None for c, i in index.items() if i},
            "flagged_any_unsafe_recall": float((pred[yv != 0] != 0).mean()) if (yv != 0).any() else None,
            "safe_false_positive_rate": float((pred[yv == 0] != 0).mean()) if (yv == 0).any() else None,
        }
    module = _fit(x, y, all_labels, l2=l2, seed=seed)
    return module, report


def _fit(x: np.ndarray, y: np.ndarray, labels: tuple[str, ...], *, l2: float, seed: int) -> SafetyModule:
    with torch.random.fork_rng(devices=[]):  # the same classifier for a seed; torch's global generator untouched
        torch.manual_seed(seed)
        return _fit_lbfgs(x, y, labels, l2=l2)


def _fit_lbfgs(x: np.ndarray, y: np.ndarray, labels: tuple[str, ...], *, l2: float) -> SafetyModule:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    module = SafetyModule(x.shape[1], labels)
    with torch.no_grad():
        module.mean.copy_(xt.mean(0))
        module.std.copy_(xt.std(0).clamp_min(1e-6))
    z = (xt - module.mean) / module.std
    w = torch.zeros(len(labels), x.shape[1], requires_grad=True)
    b = torch.zeros(len(labels), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        module.linear.weight.copy_(w)
        module.linear.bias.copy_(b)
    module.requires_grad_(False)
    return module


def classifier_manifest(module: SafetyModule, *, pooling: str, max_length: int, report: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's free-form ``classifier`` object for ``module``."""
    return {
        "type": CLASSIFIER_TYPE,
        "file": CLASSIFIER_FILE,
        "labels": list(module.labels),
        "hidden_size": int(module.mean.shape[0]),
        "pooling": pooling,
        "max_length": int(max_length),
        "training": json.loads(json.dumps(report, allow_nan=False)),
    }


def build_bundle(
    data: str | Path | Sequence[LabelledText],
    out: str | Path,
    *,
    backbone: str | None = None,
    max_length: int = 96,
    threshold: float = 0.5,
    seed: int = 0,
    validity_days: int = 90,
    now: datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train the classifier from a labelled JSONL (or its already loaded records) and write an
    (unsigned) bundle folder.

    The manifest gets version 1 and a ``validity_days`` window from ``now``; ``policy sign``
    sets the real version and expiry. Returns the manifest written.
    """
    from fedpref.model.backbone import embed_texts, load_backbone
    from fedpref.safety_policy.bundle import POLICY_NAME, format_rfc3339, write_bundle_dir

    if not (0.0 < threshold < 1.0) or not math.isfinite(threshold):
        raise ConfigError(f"threshold = {threshold}; give a probability in (0, 1), e.g. 0.5")
    records = load_labelled_jsonl(data) if isinstance(data, (str, Path)) else list(data)
    bb = load_backbone(backbone or None)
    texts = [r.text for r in records]
    feats = embed_texts(bb, texts, max_length=max_length, progress=progress)
    module, report = train_classifier(feats, [r.category for r in records], seed=seed)
    now = now or datetime.now(timezone.utc)
    manifest = {
        "name": POLICY_NAME,
        "version": 1,
        "issued_at": format_rfc3339(now),
        "expires_at": format_rfc3339(now + timedelta(days=validity_days)),
        "backbone_sha256": bb.sha256,
        "categories": [{"name": c, "threshold": float(threshold)} for c in module.categories],
        "classifier": classifier_manifest(
            module, pooling="last-token" if bb.is_decoder else "mean", max_length=max_length, report=report),
    }
    return write_bundle_dir(out, manifest, {CLASSIFIER_FILE: module.to_bytes()})
