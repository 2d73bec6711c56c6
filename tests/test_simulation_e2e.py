"""End to end: `fedpref-sim run` on Flower's Simulation Engine (Ray), tiny model, 6 users.

Two communities with opposed preferences; the run must show what the paper claims:
personalization serves the minority that one aggregated model does not. The personal head
reads a public attribute basis (``[attributes]``), as in the demo: the run config carries it to
the ServerApp and every ClientApp, and their attested frozen-weights identity must agree.
"""

import json
import subprocess
import sys

import pytest

CONFIG = """
[persona]
users = 6
pairs_per_user = 60
seed = 3

[[persona.communities]]
name = "majority"
share = 0.67
mean = [1.5, 1.5, 1.5, -1.5, 1.5, 1.5, -1.5, -1.5]
unsafe_affinity = -7.0

[[persona.communities]]
name = "minority"
share = 0.33
mean = [-1.5, -1.5, -1.5, 1.5, -1.5, -1.5, 1.5, 1.5]
unsafe_affinity = 7.0

[model]
backbone = "{backbone}"
max_length = 96

[model.adapter]
rank = 2
personal_dims = 9

[attributes]
corpus_texts = 300

[federation]
rounds = 3
client_sample_rate = 1.0
clip_norm = 1.0
server_noise_multiplier = 0.3
min_available_clients = 6

[local]
epochs = 3
batch_size = 8
learning_rate = 0.01
head_learning_rate = 0.5
dp_noise_multiplier = 0.5

[methods]
local_epochs = 3
finetune_epochs = 3

[runtime]
client_cpus = 1.0

[safety]
corpus_per_class = 60
tamper_users = ["u001"]
"""


@pytest.fixture(scope="module")
def run(tiny_minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    cfg = out / "tiny.toml"
    cfg.write_text(CONFIG.format(backbone=tiny_minilm_dir))
    proc = subprocess.run(
        [sys.executable, "-m", "fedpref.simulations.cli", "run", "--config", str(cfg), "--out", str(out / "res")],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "res", proc


def test_results_have_every_key(run):
    res = json.loads((run[0] / "results.json").read_text())
    for m in ("aggregated", "local", "finetuned", "personalized", "oracle"):
        r = res["methods"][m]
        assert 0.0 <= r["mean_accuracy"] <= 1.0 and 0.0 <= r["p10_accuracy"] <= 1.0
        assert set(r["per_community"]) == {"majority", "minority"}
        assert len(r["per_user"]) == 6
    p = res["privacy"]
    assert p["delta"] == 1e-5 and p["epsilon_user"] > 0 and p["epsilon_sample_max"] > 0
    assert len(p["epsilon_user_by_round"]) == 3
    assert res["cost"]["rounds"] == 3 and res["cost"]["wall_seconds"] > 0
    assert res["config"]["federation"]["rounds"] == 3


def test_the_attribute_basis_reaches_server_and_devices(run):
    res = json.loads((run[0] / "results.json").read_text())
    basis = res["attribute_basis"]
    assert len(basis["labels"]) == 9 and basis["labels"][-1] == "unsafe" and basis["texts"] == 300
    assert min(basis["holdout_sign_accuracy"].values()) > 0.6  # real probes, even on the 2-block backbone
    assert res["config"]["model"]["adapter"]["attribute_basis"].endswith("attribute_basis.safetensors")
    for method in ("aggregated", "personalized"):  # every honest device attests the same identity
        for rnd in res["rounds"][method]:
            assert rnd["accepted"] == 5 and [r["reason"] for r in rnd["rejected"]] == [rnd["rejected"][0]["reason"]]
            assert "safety digest" in rnd["rejected"][0]["reason"]  # only the tampering device


def test_personalized_beats_aggregated_on_the_minority(run):
    res = json.loads((run[0] / "results.json").read_text())
    pers = res["methods"]["personalized"]["per_community"]["minority"]
    agg = res["methods"]["aggregated"]["per_community"]["minority"]
    assert pers > agg, (pers, agg)


def test_only_the_shared_delta_goes_up(run):
    cost = json.loads((run[0] / "results.json").read_text())["cost"]
    # exactly one serialized shared delta per reply: the raw float32 delta plus npy headers
    assert cost["bytes_up_per_client_round"] == cost["shared_delta_serialized_bytes"]
    assert cost["shared_delta_bytes"] < cost["bytes_up_per_client_round"] < cost["shared_plus_private_bytes"]


def test_report_and_figures_are_written(run):
    out = run[0]
    html = (out / "report.html").read_text()
    for fig in ("accuracy_distribution.png", "accuracy_per_community.png", "accuracy_vs_rounds.png", "privacy_vs_rounds.png"):
        assert (out / fig).stat().st_size > 1000
        assert fig in html
    assert "RDP" in html and "δ" in html
    assert "attribute basis" in html and "held-out sign accuracy" in html


def test_summary_table_is_printed(run):
    stdout = run[1].stdout
    assert "personalized" in stdout and "mean acc" in stdout and "worst community" in stdout


def test_private_adapters_stay_in_client_folders(run):
    work = run[0] / "work" / "personalized"
    adapters = list((work / "clients").glob("*/adapters/private/adapter_model.safetensors"))
    assert len(adapters) == 6
    assert not list((work / "server").rglob("*private*"))


def test_safety_results_and_the_falsification_experiment(run):
    res = json.loads((run[0] / "results.json").read_text())
    sf = res["safety"]
    for arm in ("aggregated", "personalized_unbounded", "personalized_bounded"):
        assert 0.0 <= sf["violation_rate"][arm] <= 1.0
        assert set(sf["violation_rate_by_community"][arm]) == {"majority", "minority"}
    assert sf["policy_version"] == 1
    # the bound can only remove violations: flagged candidates never outrank safe ones
    assert sf["violation_rate"]["personalized_bounded"] <= sf["violation_rate"]["personalized_unbounded"]
    assert len(sf["policy"]["signed_by"]) == 2  # 2-of-3 root
    html = (run[0] / "report.html").read_text()
    assert "safety_violations.png" in html and (run[0] / "safety_violations.png").stat().st_size > 1000
    assert "falsification" in html


def test_the_tampered_client_is_rejected_and_the_runs_complete(run):
    res = json.loads((run[0] / "results.json").read_text())
    t = res["safety"]["tampered_clients"]
    assert t["users"] == ["u001"]
    for method in ("aggregated", "personalized"):
        hist = res["rounds"][method]
        assert len(hist) == 3  # every round completed
        assert t["rejected_updates"][method] == 3  # q = 1: sampled, and rejected, every round
        for r in hist:
            assert r["accepted"] == 5 and r["policy_version"] == 1
            assert any("safety digest" in x["reason"] and "does not match policy v1" in x["reason"] for x in r["rejected"])
        # the envelope goes to every node once; afterwards the accepted ones attest v1 and get none;
        # the tampered node's replies are rejected, so its claim to hold v1 is never recorded
        assert [r["policy_sent"] for r in hist] == [6, 1, 1]
    assert "safety digest" in run[1].stderr  # the reason is in the server log


def test_privacy_audits_and_ledger_are_reported(run):
    res = json.loads((run[0] / "results.json").read_text())
    au = res["privacy"]["audit"]
    ci, mi, ul = au["community_inference"], au["membership"], au["user_level"]
    assert ci["chance"] == 4 / 6 and ci["users"] == 6
    # a SecAgg server that differences two sums, one with a device dropped, sees that device's delta
    assert ci["differencing"]["secagg_server"] == ci["individual_updates"]
    assert 0.0 <= ci["individual_updates"] <= 1.0 and ci["individual_updates"] >= ci["individual_updates_whole_delta"]
    for r in (mi, ul):
        assert 0.0 <= r["dp"]["auc"] <= 1.0 and 0.0 <= r["no_dp"]["auc"] <= 1.0
        assert 0.0 <= r["dp"]["epsilon_lower"] <= r["dp"]["epsilon_formal"]  # above the formal ε would be a bug
    assert ul["dp"]["epsilon_formal"] == pytest.approx(res["privacy"]["epsilon_user"])
    ledger = res["privacy"]["ledger"]
    assert [e["round"] for e in ledger] == [1, 2, 3]
    assert ledger[-1]["epsilon"] == res["privacy"]["epsilon_user"]
    assert res["privacy"]["secure_aggregation"] is False
    html = (run[0] / "report.html").read_text()
    assert "privacy_audits.png" in html and (run[0] / "privacy_audits.png").stat().st_size > 1000
