"""End to end: `fedpref-sim run` on Flower's Simulation Engine (Ray), tiny model, 6 federated users
(and 2 more held out as new users).

Two communities with opposed preferences; the run must show what the paper claims:
personalization serves the minority that one aggregated model does not. The personal head
reads a public attribute basis (``[attributes]``), as in the demo: the run config carries it to
the ServerApp and every ClientApp, and their attested frozen-weights identity must agree.
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # fedpref-sim run end to end on Ray (minutes)

CONFIG = """
[persona]
users = 8
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

[robustness]
poison_fractions = [0.34]
secure_aggregation_fractions = [0.34]

[new_users]
fraction = 0.2
pairs = [0, 5, 20]
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
    for method in ("aggregated", "personalized"):  # every device attests the same identity
        for rnd in res["rounds"][method]:
            assert rnd["accepted"] == 6 and rnd["rejected"] == [] and rnd["declined"] == []


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


def test_a_lying_tampered_client_is_accepted_and_the_runs_complete(run):
    """The tampered device attests the digest an honest one reports: the server cannot tell (the
    attestation is a self-declaration), so nothing it sends is rejected."""
    res = json.loads((run[0] / "results.json").read_text())
    t = res["safety"]["tampered_clients"]
    assert t["users"] == ["u001"]
    for method in ("aggregated", "personalized"):
        hist = res["rounds"][method]
        assert len(hist) == 3  # every round completed
        assert t["rejected_updates"][method] == 0
        for r in hist:
            assert r["accepted"] == 6 and r["policy_version"] == 1
        # the envelope goes to every node once; afterwards each attests v1 and gets none
        assert [r["policy_sent"] for r in hist] == [6, 0, 0]
    assert "self-declaration" in (run[0] / "report.html").read_text()


def test_new_users_join_with_k_pairs(run):
    res = json.loads((run[0] / "results.json").read_text())
    nu = res["new_users"]
    assert len(nu["users"]) == 2 and nu["pairs"] == [0, 5, 20]
    assert not set(nu["users"]) & set(res["methods"]["personalized"]["per_user"])  # in no run
    for m in ("personalized", "local", "aggregated", "oracle"):
        for k in ("0", "5", "20"):
            assert 0.0 <= nu[m][k]["mean_accuracy"] <= 1.0 and set(nu[m][k]["per_user"]) == set(nu["users"])
    assert nu["local"]["0"]["mean_accuracy"] == 0.5  # an untrained private head scores every text alike
    assert nu["aggregated"]["0"] == nu["aggregated"]["20"]  # it does not use the pairs
    html = (run[0] / "report.html").read_text()
    assert "New users" in html and (run[0] / "new_users.png").stat().st_size > 1000
    # the held-out users trained nowhere in the federation
    work = run[0] / "work"
    assert not any((work / "personalized" / "clients" / u).exists() for u in nu["users"])


def test_under_secagg_the_liars_are_unseen_and_the_honest_bound_holds(run):
    res = json.loads((run[0] / "results.json").read_text())
    r = res["robustness"]["poisoning_secagg"]["0.34"]
    assert r["users"] == 4 and 0.0 <= r["bounded_violation"] <= r["unbounded_violation"] <= 1.0
    assert res["robustness"]["paths"] == ["plain", "secagg"]
    hist = json.loads((run[0] / "work" / "robustness" / "secagg-0.34" / "server" / "history.json").read_text())
    assert len(hist) == 3 and all(h["accepted"] == 6 and not h["halted"] for h in hist)


def test_poisoning_by_devices_that_attest_like_honest_ones(run):
    res = json.loads((run[0] / "results.json").read_text())
    rb = res["robustness"]
    none, attacked = rb["poisoning"]["none"], rb["poisoning"]["0.34"]
    assert none["users"] == 6 and attacked["users"] == 4 and len(attacked["malicious"]) == 2
    assert attacked["baseline"]["users"] == 4
    for r in (none, attacked, attacked["baseline"]):
        assert 0.0 <= r["honest_accuracy"] <= 1.0
        assert 0.0 <= r["bounded_violation"] <= r["unbounded_violation"] <= 1.0  # the bound only removes violations
    # the liars' updates were accepted: every sampled device's reply, every round
    hist = json.loads((run[0] / "work" / "robustness" / "plain-0.34" / "server" / "history.json").read_text())
    assert len(hist) == 3 and all(h["accepted"] == 6 and not h["rejected"] for h in hist)
    html = (run[0] / "report.html").read_text()
    assert "Robustness: lying devices" in html and (run[0] / "robustness_poisoning.png").stat().st_size > 1000


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
