"""A public attribute basis for the personal head: k frozen linear probes on the pooled features.

::

    f = LN(pool(backbone(text)))  (H,)   ─►   style_proj = B (k × H), frozen   ─►   personal_head (k → 1)

Each row of ``B`` is a ridge-regression probe, fitted by the operator (or the simulation) on a
*public* labelled corpus, that reads one response attribute (formal, detailed, emoji, ...,
unsafe) from the frozen embedding. A user's private head then holds k weights over those
attributes instead of H: under DP-SGD the noise is spread over k coordinates instead of H,
and there is far less for a membership attack to find (RESULTS.md, "attribute basis").

This is the multi-objective reward-model pattern (public attribute rewards, a per-user
mixture over them); here the mixture is private and trained on the device.

With a basis the projection is not trained, not sent and not part of the shared adapter: it is
a frozen base weight (group ``backbone`` of the partition, covered by the bit-identity check),
and the frozen-weights identity that devices attest (:func:`model_identity`) covers it, so a
device with another basis is rejected by the server. The file is a safetensors file with one
float32 tensor ``weight`` of shape (k, H) and its attribute names in the metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedpref.common.atomic import write_bytes_atomic
from fedpref.common.errors import ConfigError, DataError
from fedpref.common.jsonl import read_jsonl
from fedpref.model.config import AdapterSpec

BASIS_KEY = "weight"


def load_attribute_corpus(path: str | Path) -> list[dict]:
    """``{"text": str, "attributes": {name: number}}`` per line, every line the same names."""
    path = Path(path)
    records, names = [], None
    for i, rec in read_jsonl(path):
        attrs = rec.get("attributes") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not isinstance(attrs, dict) or not attrs:
            raise DataError(f'{path}:{i}: expected {{"text": "...", "attributes": {{"name": 1, ...}}}}')
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in attrs.values()):
            raise DataError(f"{path}:{i}: attribute values must be finite numbers (e.g. 1 / -1)")
        if names is None:
            names = list(attrs)
        elif list(attrs) != names:
            raise DataError(f"{path}:{i}: attributes {list(attrs)} differ from line 1's {names}; use the same names, in order")
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no labelled texts")
    return records


def fit_basis(features: np.ndarray, targets: np.ndarray, *, ridge: float = 10.0) -> np.ndarray:
    """Ridge probes, no intercept: ``argmin_B |F Bᵀ − T|² + ridge |B|²``; returns B, (k, H).

    ``features`` (N, H) are the model's standardised pooled embeddings; ``targets`` (N, k) the
    attribute labels (e.g. ±1).
    """
    f = np.asarray(features, np.float64)
    t = np.asarray(targets, np.float64)
    if f.ndim != 2 or t.ndim != 2 or len(f) != len(t) or len(f) == 0:
        raise ConfigError(f"fit_basis needs features (N, H) and targets (N, k) with the same N ≥ 1; got {f.shape} and {t.shape}")
    if not (math.isfinite(ridge) and ridge > 0):
        raise ConfigError(f"basis ridge = {ridge!r}; give a positive penalty, e.g. 10")
    h = f.shape[1]
    w = np.linalg.solve(f.T @ f + ridge * np.eye(h), f.T @ t)  # (H, k)
    return w.T.astype(np.float32)  # (k, H)


def match_feature_norm(basis: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Scale the basis so that ``‖B f‖`` has the mean norm of ``‖f‖`` over ``features``.

    DP-SGD clips each pair's gradient over *all* trainable weights at once. The shared head
    reads f (H numbers), the personal head B f (k numbers); unscaled, the personal head's
    gradient is about sqrt(k / H) of the shared head's and gets almost none of the clip
    budget when both train together. At equal norms they share it evenly (RESULTS.md).
    """
    b = np.asarray(basis, np.float64)
    f = np.asarray(features, np.float64)
    z = f @ b.T  # (N, k)
    scale = math.sqrt(float(np.mean(np.sum(f * f, axis=1))) / max(float(np.mean(np.sum(z * z, axis=1))), 1e-12))
    return (b * scale).astype(np.float32)


def build_basis(
    records: Sequence[dict],
    *,
    backbone: str | None = None,
    max_length: int = 96,
    ridge: float = 10.0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Embed labelled texts with the frozen backbone and fit the scaled basis on all of them.

    Returns ``(weight (k, H), held-out sign accuracy per attribute)``: before the final fit,
    probes fitted on 80 % of the texts are scored on the other 20 % (seeded split).
    """
    import torch.nn.functional as F

    from fedpref.model.backbone import embed_texts, load_backbone

    labels = list(records[0]["attributes"])
    texts = [r["text"] for r in records]
    bb = load_backbone(backbone)
    pooled = torch.from_numpy(embed_texts(bb, texts, max_length=max_length, progress=progress))
    feats = F.layer_norm(pooled, pooled.shape[-1:]).numpy()  # what the reward model's heads read
    targets = np.array([[float(r["attributes"][n]) for n in labels] for r in records])
    order = np.random.default_rng([seed, 11]).permutation(len(records))
    held, fit = order[: len(order) // 5], order[len(order) // 5 :]
    holdout: dict[str, float] = {}
    if len(held) and len(fit):
        check = fit_basis(feats[fit], targets[fit], ridge=ridge)
        holdout = {n: float(np.mean(np.sign(feats[held] @ check[i]) == np.sign(targets[held, i])))
                   for i, n in enumerate(labels)}
    return match_feature_norm(fit_basis(feats, targets, ridge=ridge), feats), holdout


def save_basis(path: str | Path, weight: np.ndarray, labels: Sequence[str], *, source: str = "") -> str:
    """Write the basis atomically; returns its sha256 (of the file's bytes)."""
    w = np.asarray(weight, np.float32)
    if w.ndim != 2 or w.shape[0] != len(labels) or not np.isfinite(w).all():
        raise ConfigError(f"a basis is a finite (k, H) matrix with k labels; got {w.shape} and {len(labels)} labels")
    data = st_save({BASIS_KEY: torch.from_numpy(w.copy())},
                   metadata={"labels": json.dumps(list(labels)), "source": source})
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def load_basis(path: str | Path) -> tuple[torch.Tensor, tuple[str, ...], str]:
    """(weight (k, H), attribute labels, sha256 of the file); a bad file is one clear error."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"attribute basis {p}: {e.strerror}; set [model.adapter] attribute_basis to the "
                          "operator's basis file, or to \"\" for a learnt projection") from None
    try:
        tensors = st_load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # safetensors' own layout
        labels = tuple(json.loads((header.get("__metadata__") or {}).get("labels", "[]")))
    except Exception as e:  # safetensors and json raise their own types
        raise DataError(f"attribute basis {p}: not a readable safetensors basis ({e}); rebuild it") from None
    w = tensors.get(BASIS_KEY)
    if set(tensors) != {BASIS_KEY} or w is None or w.ndim != 2 or w.dtype != torch.float32:
        raise DataError(f"attribute basis {p}: holds {sorted(tensors)}; expected one float32 (k, H) tensor {BASIS_KEY!r}")
    if not torch.isfinite(w).all():
        raise DataError(f"attribute basis {p}: non-finite values; rebuild it")
    if len(labels) != w.shape[0]:
        labels = tuple(f"attribute_{i}" for i in range(w.shape[0]))
    return w, labels, hashlib.sha256(data).hexdigest()


def model_identity(backbone_sha256: str, spec: AdapterSpec) -> str:
    """What a device attests as its frozen weights: the backbone's sha256, combined with the
    attribute basis's when the spec names one (server and device must agree on both)."""
    if not spec.attribute_basis:
        return backbone_sha256
    _, _, basis_sha = load_basis(spec.attribute_basis)
    return hashlib.sha256(f"{backbone_sha256}+basis:{basis_sha}".encode()).hexdigest()


__all__ = ["BASIS_KEY", "build_basis", "fit_basis", "load_attribute_corpus", "load_basis", "match_feature_norm",
           "model_identity", "save_basis"]
