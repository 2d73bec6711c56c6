"""Benchmark: a DP-SGD step (Opacus) against a plain step, same model and batch, one run.

Speed targets live here, not in tests. The ratio is what matters on a noisy machine.
"""

from __future__ import annotations

import json
import time

import torch

from fedpref.client.trainer import LocalTrainConfig, train_pairs
from fedpref.model.backbone import load_backbone
from fedpref.model.cache import TextCache
from fedpref.model.preference import AdapterSpec, build_model
from fedpref.simulations.persona import PersonaConfig, generate


def bench_dp_overhead(*, steps: int = 20, batch_size: int = 16, spec: AdapterSpec | None = None) -> dict:
    """Time ``steps`` DP and non-DP steps, interleaved in rounds of one epoch, and print ratios."""
    data = generate(PersonaConfig(users=1, pairs_per_user=steps * batch_size + 4, seed=1))
    train = [p for p in data.pairs if p.split.value == "train"]
    chosen, rejected = [p.chosen for p in train], [p.rejected for p in train]
    backbone = load_backbone()
    model = build_model(backbone, spec or AdapterSpec())
    cache = TextCache.build(model, backbone, chosen + rejected, max_length=96)
    out: dict[str, float] = {}
    for label, sigma in (("warmup", 1.0), ("non_dp", 0.0), ("dp", 1.0), ("non_dp_2", 0.0), ("dp_2", 1.0)):
        cfg = LocalTrainConfig(epochs=1, batch_size=batch_size, learning_rate=0.05, head_learning_rate=0.5, projection_learning_rate=0.05,
                               noise_multiplier=sigma, max_grad_norm=1.0, seed=0)
        t0 = time.perf_counter()
        res = train_pairs(model, cache, chosen, rejected, cfg)
        out[label] = (time.perf_counter() - t0) / max(res.steps, 1)
    non_dp = (out["non_dp"] + out["non_dp_2"]) / 2
    dp = (out["dp"] + out["dp_2"]) / 2
    result = {
        "backbone": str(backbone.path), "backbone_sha256": backbone.sha256[:16], "threads": torch.get_num_threads(), "batch_size": batch_size,
        "steps_per_mode": steps, "non_dp_step_s": non_dp, "dp_step_s": dp, "dp_over_non_dp": dp / non_dp,
    }
    print(json.dumps(result, indent=1))
    return result


def bench_neck(*, steps: int = 20, batch_size: int = 16) -> dict:
    """A DP-SGD step with LoRA on the last block (``top_layers = 1``) over one with LoRA on the
    neck (``top_layers = 0``), same data, one run: what caching the whole backbone buys."""
    data = generate(PersonaConfig(users=1, pairs_per_user=steps * batch_size + 4, seed=1))
    train = [p for p in data.pairs if p.split.value == "train"]
    chosen, rejected = [p.chosen for p in train], [p.rejected for p in train]
    out: dict[str, float] = {}
    for label, top in (("block", 1), ("neck", 0), ("block_2", 1), ("neck_2", 0)):
        backbone = load_backbone()
        model = build_model(backbone, AdapterSpec(top_layers=top))
        cache = TextCache.build(model, backbone, chosen + rejected, max_length=96)
        cfg = LocalTrainConfig(epochs=1, batch_size=batch_size, learning_rate=0.05, head_learning_rate=0.5,
                               projection_learning_rate=0.05, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
        t0 = time.perf_counter()
        res = train_pairs(model, cache, chosen, rejected, cfg)
        out[label] = (time.perf_counter() - t0) / max(res.steps, 1)
    block, neck = (out["block"] + out["block_2"]) / 2, (out["neck"] + out["neck_2"]) / 2
    result = {"threads": torch.get_num_threads(), "batch_size": batch_size, "block_step_s": block, "neck_step_s": neck,
              "block_over_neck": block / neck}
    print(json.dumps(result, indent=1))
    return result
