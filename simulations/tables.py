"""Tables and curves over several runs: the scale curve and the mean ± sd over seeds.

Both read finished runs' ``results.json`` files and check each target of issue 11 as a
number that can fail; neither runs anything itself (``scripts/scale_curve.sh`` and
``scripts/seeds.sh`` run the simulations).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedpref.common.atomic import write_text_atomic
from fedpref.common.errors import DataError

CURVE_METHODS = ("personalized", "local", "aggregated", "finetuned", "count", "oracle")


def load_results(run_dir: Path) -> dict:
    """A finished run's results.json (one clear error when it is missing or damaged)."""
    path = Path(run_dir) / "results.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no results.json; run `fedpref-sim run --out {run_dir}` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable results.json ({type(e).__name__}); rerun that simulation") from None


def _users(res: dict) -> int:
    return len(res["methods"]["personalized"]["per_user"])


def _new_user(res: dict, method: str, k: str) -> float | None:
    return res.get("new_users", {}).get(method, {}).get(k, {}).get("mean_accuracy")


def run_row(res: dict) -> dict:
    """The numbers one run contributes to a table: mean accuracy per method, the smallest
    community's personalized accuracy, new users at k = 10, ε and cost."""
    m = res["methods"]
    smallest = res["communities"]["smallest"]
    row = {f"{k}": m[k]["mean_accuracy"] for k in CURVE_METHODS if k in m}
    row["smallest_community"] = smallest
    row["smallest_community_personalized"] = m["personalized"]["per_community"][smallest]
    row["smallest_community_oracle"] = m["oracle"]["per_community"][smallest] if "oracle" in m else None
    for meth in ("personalized", "local", "aggregated"):
        row[f"new_users_k10_{meth}"] = _new_user(res, meth, "10")
    row["epsilon_user"] = res["privacy"]["epsilon_user"]
    row["epsilon_sample_max"] = res["privacy"]["epsilon_sample_max"]
    row["users"] = _users(res)
    cost = res.get("cost", {})
    row["wall_seconds"] = cost.get("wall_seconds")
    row["peak_rss_bytes"] = cost.get("peak_rss_bytes")
    return row


def targets(row: dict) -> dict[str, dict]:
    """Issue 11's targets for one run (or a mean row), each with its value, bound and verdict."""
    def t(value: float | None, bound: float | None, what: str) -> dict:
        ok = None if value is None or bound is None else bool(value >= bound)
        return {"value": value, "bound": bound, "met": ok, "what": what}

    p, loc, agg, orc = row.get("personalized"), row.get("local"), row.get("aggregated"), row.get("oracle")
    nu_p, nu_l, nu_a = (row.get(f"new_users_k10_{m}") for m in ("personalized", "local", "aggregated"))
    return {
        "personalized_vs_local": t(p, None if loc is None else loc + 0.03, "personalized >= local + 0.03"),
        "personalized_vs_aggregated": t(p, None if agg is None else agg + 0.10, "personalized >= aggregated + 0.10"),
        "personalized_vs_oracle": t(p, None if orc is None else 0.90 * orc, "personalized >= 0.90 x oracle"),
        "smallest_community": t(row.get("smallest_community_personalized"),
                                None if row.get("smallest_community_oracle") is None
                                else 0.85 * row["smallest_community_oracle"], "smallest community >= 0.85 x its oracle"),
        "new_users_vs_local": t(nu_p, None if nu_l is None else nu_l + 0.10, "new users, k=10: personalized >= local + 0.10"),
        "new_users_vs_aggregated": t(nu_p, nu_a, "new users, k=10: personalized >= aggregated"),
    }


def seed_table(run_dirs: list[Path]) -> dict:
    """Mean ± sd over runs of the same config with different ``--seed`` (issue 11's 3-seed table).
    A target over seeds is met when the mean meets it, except the smallest community's, which
    must hold in every seed."""
    rows = [run_row(load_results(d)) for d in run_dirs]
    if not rows:
        raise DataError("no runs given; pass the --out folders of `fedpref-sim run --seed S`")
    seeds = [load_results(d)["config"]["runtime"]["seed"] for d in run_dirs]
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    mean = {k: float(np.mean([r[k] for r in rows if r.get(k) is not None])) for k in keys}
    sd = {k: float(np.std([r[k] for r in rows if r.get(k) is not None], ddof=1)) if len(rows) > 1 else 0.0 for k in keys}
    verdicts = targets(mean)
    per_seed = [targets(r) for r in rows]
    verdicts["smallest_community"]["met"] = all(v["smallest_community"]["met"] for v in per_seed)
    verdicts["smallest_community"]["what"] += " (in every seed)"
    return {"runs": [str(d) for d in run_dirs], "seeds": seeds, "mean": mean, "sd": sd, "per_seed": rows,
            "targets": verdicts}


def scale_curve(run_dirs: list[Path]) -> dict:
    """Accuracy per method against the number of federated users; the runs must differ in the
    number of users only (same pairs per user, q, z, rounds: the same ε_user)."""
    results = sorted((load_results(d) for d in run_dirs), key=_users)
    if not results:
        raise DataError("no runs given; pass the --out folders of the scale configs")
    eps = {round(r["privacy"]["epsilon_user"], 6) for r in results}
    pairs = {r["config"]["persona"]["pairs_per_user"] for r in results}
    if len(pairs) > 1:
        raise DataError(f"the runs have different pairs_per_user {sorted(pairs)}; a scale curve fixes it")
    points = [run_row(r) for r in results]
    return {"users": [p["users"] for p in points], "points": points, "epsilon_user": sorted(eps),
            "same_epsilon_user": len(eps) == 1, "pairs_per_user": pairs.pop()}


def plot_scale_curve(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedpref.simulations.report import COLORS

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    xs = curve["users"]
    for m in CURVE_METHODS:
        ys = [p.get(m) for p in curve["points"]]
        if all(y is not None for y in ys):
            axes[0].plot(xs, ys, "-o", label=m, color=COLORS.get(m))
    for m in ("personalized", "local", "aggregated"):
        ys = [p.get(f"new_users_k10_{m}") for p in curve["points"]]
        if all(y is not None for y in ys):
            axes[1].plot(xs, ys, "-o", label=m, color=COLORS.get(m))
    for ax, title in zip(axes, ("federated users' held-out accuracy", "new users with 10 pairs")):
        ax.set_xscale("log")
        ax.set_xlabel("federated users")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Scale curve at ε_user = {', '.join(f'{e:.2f}' for e in curve['epsilon_user'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(doc: dict, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    write_text_atomic(path, json.dumps(doc, indent=1, allow_nan=False))
    return path


__all__ = ["load_results", "plot_scale_curve", "run_row", "scale_curve", "seed_table", "targets", "write_table"]
