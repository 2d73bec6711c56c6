"""Tables over runs: the scale curve, mean ± sd over seeds, and targets that can fail."""

import json
from pathlib import Path

import pytest

from fedpref.common.errors import DataError
from fedpref.simulations.tables import scale_curve, seed_table, targets


def _run(tmp_path: Path, name: str, *, users: int = 4, seed: int = 0, pers: float = 0.8, local: float = 0.7,
         agg: float = 0.65, oracle: float = 0.9, small: float = 0.8, small_oracle: float = 0.9,
         nu: tuple[float, float, float] = (0.7, 0.55, 0.68), eps: float = 3.0, pairs: int = 100) -> Path:
    per_user = {f"u{i}": pers for i in range(users)}

    def m(acc: float, smallest: float | None = None) -> dict:
        return {"mean_accuracy": acc, "per_community": {"big": acc, "tiny": acc if smallest is None else smallest},
                "per_user": per_user}

    res = {
        "methods": {"personalized": m(pers, small), "local": m(local), "aggregated": m(agg),
                    "oracle": m(oracle, small_oracle)},
        "communities": {"sizes": {"big": users - 1, "tiny": 1}, "smallest": "tiny"},
        "new_users": {k: {"10": {"mean_accuracy": v}} for k, v in zip(("personalized", "local", "aggregated"), nu)},
        "privacy": {"epsilon_user": eps, "epsilon_sample_max": 6.0},
        "cost": {"wall_seconds": 100.0, "peak_rss_bytes": 2**30},
        "config": {"runtime": {"seed": seed}, "persona": {"pairs_per_user": pairs}},
    }
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_targets_can_be_met_and_missed():
    good = {"personalized": 0.85, "local": 0.7, "aggregated": 0.7, "oracle": 0.9, "smallest_community_personalized": 0.8,
            "smallest_community_oracle": 0.9, "new_users_k10_personalized": 0.8, "new_users_k10_local": 0.6,
            "new_users_k10_aggregated": 0.75}
    assert all(t["met"] for t in targets(good).values())
    bad = {**good, "personalized": 0.72}
    verdicts = targets(bad)
    assert not verdicts["personalized_vs_local"]["met"] and not verdicts["personalized_vs_aggregated"]["met"]
    assert not verdicts["personalized_vs_oracle"]["met"]
    assert targets({})["personalized_vs_local"]["met"] is None  # unknown is not "met"


def test_seed_table_mean_sd_and_every_seed_rule(tmp_path):
    runs = [_run(tmp_path, f"s{s}", seed=s, pers=p, small=sm)
            for s, p, sm in ((0, 0.80, 0.80), (1, 0.90, 0.70), (2, 0.85, 0.80))]
    doc = seed_table(runs)
    assert doc["seeds"] == [0, 1, 2]
    assert doc["mean"]["personalized"] == pytest.approx(0.85)
    assert doc["sd"]["personalized"] == pytest.approx(0.05)
    # the mean of the smallest community (0.767) meets 0.85 x 0.9 = 0.765, but seed 1 (0.70) does not
    assert doc["mean"]["smallest_community_personalized"] >= 0.85 * 0.9
    assert doc["targets"]["smallest_community"]["met"] is False


def test_scale_curve_sorted_by_users_and_fixed_pairs(tmp_path):
    runs = [_run(tmp_path, "big", users=20, pers=0.8), _run(tmp_path, "small", users=4, pers=0.7)]
    curve = scale_curve(runs)
    assert curve["users"] == [4, 20] and curve["same_epsilon_user"]
    assert [p["personalized"] for p in curve["points"]] == [0.7, 0.8]
    with pytest.raises(DataError, match="pairs_per_user"):
        scale_curve([*runs, _run(tmp_path, "other", users=8, pairs=50)])
    assert not scale_curve([*runs, _run(tmp_path, "eps", users=8, eps=9.0)])["same_epsilon_user"]


def test_missing_or_damaged_results_are_one_line(tmp_path, capsys):
    from fedpref.simulations.cli import main

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_bytes(b"\xff\xfe{")
    for args in (["seeds", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                 ["curve", str(tmp_path / "bad"), "--out", str(tmp_path / "o")]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code != 0
        err = capsys.readouterr().err
        assert "Traceback" not in err and "results.json" in err and len(err.strip().splitlines()) == 1
