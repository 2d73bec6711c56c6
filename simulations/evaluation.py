"""Turn per-user accuracies and round histories into the ``results.json`` document."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedpref.client.data import UserData
from fedpref.protocol.partition import Group
from fedpref.protocol.runconfig import Method


def p10(values: list[float]) -> float:
    """10th percentile over users (linear interpolation, numpy's default)."""
    return float(np.percentile(values, 10)) if values else float("nan")


def method_summary(per_user: dict[str, float], users: dict[str, UserData]) -> dict:
    by_comm: dict[str, list[float]] = defaultdict(list)
    for uid, acc in per_user.items():
        by_comm[users[uid].community or "all"].append(acc)
    vals = list(per_user.values())
    return {
        "mean_accuracy": float(np.mean(vals)),
        "p10_accuracy": p10(vals),
        "per_community": {c: float(np.mean(v)) for c, v in sorted(by_comm.items())},
        "per_user": dict(sorted(per_user.items())),
    }


def _param_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    return int(sum(4 * math.prod(s) for s in shapes.values()))


def summarize(*, cfg, users: dict[str, UserData], results: dict, rounds: dict[str, list[dict]], work: Path, wall_seconds: float, config: dict) -> dict:  # noqa: ANN001
    from fedpref.client.device import get_runtime
    from fedpref.model.preference import params_of
    from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER

    methods = {m.value: {**method_summary(r.per_user, users), "wall_seconds": r.wall_seconds,
                         "epsilon_sample_max": r.epsilon_sample_max} for m, r in results.items()}
    pers = rounds.get(Method.PERSONALIZED.value, [])
    rt = get_runtime(cfg.model, (SHARED_ADAPTER, PRIVATE_ADAPTER))
    from fedpref.protocol.messages import arrays_to_record

    shared_shapes = {n: tuple(p.shape) for n, p in params_of(rt.model, Group.SHARED).items()}
    shared_bytes = _param_bytes(shared_shapes)
    serialized = arrays_to_record({n: np.zeros(s, np.float32) for n, s in shared_shapes.items()}).count_bytes()
    # what a device learns privately (a frozen private LoRA, with private_lora = false, is not)
    private_bytes = _param_bytes({n: tuple(p.shape) for n, p in params_of(rt.model, Group.PRIVATE).items()
                                  if p.requires_grad})
    up = [r["bytes_up_per_client"] for r in pers if r["bytes_up_per_client"]]
    down = [r["bytes_down_per_client"] for r in pers if r["bytes_down_per_client"]]
    communities = sorted({u.community or "all" for u in users.values()})
    sizes = {c: sum(1 for u in users.values() if (u.community or "all") == c) for c in communities}
    return {
        "methods": methods,
        "privacy": {
            "delta": cfg.federation.delta,
            "epsilon_user": pers[-1]["epsilon_user"] if pers else 0.0,
            "epsilon_sample_max": results[Method.PERSONALIZED].epsilon_sample_max,
            "accountant": "RDP (Opacus RDPAccountant)",
            "secure_aggregation": bool(cfg.runtime.secure_aggregation),
            "user_level": {
                "client_sample_rate": cfg.federation.client_sample_rate,
                "server_noise_multiplier": cfg.federation.server_noise_multiplier,
                "clip_norm": cfg.federation.clip_norm,
                "rounds": len(pers),
            },
            "sample_level": {
                "noise_multiplier": cfg.local.dp_noise_multiplier,
                "max_grad_norm": cfg.local.dp_max_grad_norm,
                "batch_size": cfg.local.batch_size,  # a round's
                "private_batch_size": cfg.methods.fit_batch_size(cfg.local),  # private-only fits
                "personalize_batch_size": cfg.personalize.fit_batch_size(cfg.local),  # the final step
                "epsilon_sample_max_by_method": {m: r["epsilon_sample_max"] for m, r in methods.items()
                                                 if m not in ("oracle", "count")},  # no DP there
            },
            "epsilon_user_by_round": [r["epsilon_user"] for r in pers],
            "epsilon_sample_max_by_round": [r["epsilon_sample_max"] for r in pers],
        },
        "cost": {
            "rounds": len(pers),
            "wall_seconds": wall_seconds,
            "bytes_up_per_client_round": int(np.mean(up)) if up else 0,
            "bytes_down_per_client_round": int(np.mean(down)) if down else 0,
            "shared_delta_bytes": shared_bytes,  # raw float32
            "shared_delta_serialized_bytes": int(serialized),  # the same, as a Flower ArrayRecord (npy headers)
            "private_adapter_bytes": private_bytes,
            "shared_plus_private_bytes": shared_bytes + private_bytes,
            "client_compute_seconds": _client_seconds(pers),
            "personalized_wall_seconds": methods[Method.PERSONALIZED.value]["wall_seconds"],
        },
        "rounds": rounds,
        "communities": {"sizes": sizes, "smallest": min(communities, key=lambda c: (sizes[c], c))},
        "config": config,
    }


def _client_seconds(history: list[dict]) -> float:
    """Sum over rounds of (mean client train seconds × accepted clients)."""
    return float(sum(r["metrics"].get("seconds", 0.0) * r["accepted"] for r in history))
