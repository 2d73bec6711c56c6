"""Faults at load (issue 12): 200 devices on Flower's Simulation Engine, Poisson q = 0.1, and 30 %
of the sampled devices vanish in the middle of every round, after they trained (so after their
own accountant was charged) and before their reply; on the plain path and on SecAgg+, where they
are gone between the key exchange and the masked vectors, so their masks must be rebuilt from
the survivors' shares. Rounds complete or are halted as designed, and the server's ledger
charges exactly the rounds it released: recomputed here with Opacus' own RDP accountant.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

USERS, ROUNDS, Q, DROP, Z = 200, 4, 0.1, 0.3, 1.0

CONFIG = """
[model]
backbone = "{backbone}"
max_length = 32

[model.adapter]
rank = 2
personal_dims = 2

[federation]
rounds = {rounds}
client_sample_rate = {q}
clip_norm = 0.5
server_noise_multiplier = {z}
min_available_clients = {users}
round_timeout_s = 300

[local]
epochs = 1
batch_size = 8
dp_noise_multiplier = 0.5

[secagg]
# survivors must hold this share of the shares: with 30 % dropping out, the default 0.67 halts
# about every other round (RESULTS.md); 0.55 is still a strict majority for every cohort of >= 11
reconstruction_fraction = 0.55
min_cohort = 11
"""


def _run(path: str, tiny_encoder_dir, tmp_path_factory):
    from fedpref.client.app import SimulatedDevices
    from fedpref.client.data import write_jsonl
    from fedpref.protocol.runconfig import Method
    from fedpref.simulations.config import RuntimeConfig, load_sim_config
    from fedpref.simulations.engine import device_terms, run_on_simulation_engine
    from fedpref.simulations.persona import PersonaConfig, generate

    out = tmp_path_factory.mktemp(f"faults-{path}")
    data = out / "pairs.jsonl"
    write_jsonl(generate(PersonaConfig(users=USERS, pairs_per_user=10, seed=11)).pairs, data)
    cfg = out / "faults.toml"
    cfg.write_text(CONFIG.format(backbone=tiny_encoder_dir, rounds=ROUNDS, q=Q, z=Z, users=USERS))
    terms = device_terms(load_sim_config(cfg))
    run_on_simulation_engine(
        method=Method.PERSONALIZED, num_users=USERS, data=data, workdir=out / "work", config_file=cfg, cache=None,
        runtime=RuntimeConfig(secure_aggregation=path == "secagg", seed=3),
        devices=SimulatedDevices(terms=terms, drop_rate=DROP, fault_seed=3),
    )
    return out / "work"


@pytest.fixture(scope="module", params=["plain", "secagg"])
def faulty_run(request, tiny_encoder_dir, tmp_path_factory):
    return request.param, _run(request.param, tiny_encoder_dir, tmp_path_factory)


def _user_level_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acct = RDPAccountant()
    acct.history = list(history)
    return acct.get_epsilon(delta)


def test_rounds_complete_or_halt_as_designed_and_the_ledger_charges_exactly_what_was_released(faulty_run):
    from fedpref.client.app import DROPPED_REASON
    from fedpref.server.privacy import PrivacyLedger

    path, work = faulty_run
    hist = json.loads((work / "server" / "history.json").read_text())
    released = [h for h in hist if not h["halted"]]
    halted = [h for h in hist if h["halted"]]
    assert len(hist) == ROUNDS  # q < 1: a halted round is not retried, it uses up its number
    assert len(released) >= ROUNDS // 2, [h["halted"] for h in hist]
    if path == "plain":
        assert not halted  # nothing halts a plain round: it releases what was accepted
    for h in halted:  # SecAgg+ halts when the survivors hold too few shares to unmask
        assert "secure aggregation halted" in h["halted"]
    dropped = sampled = 0
    for h in hist:
        assert h["population"] == USERS and 5 <= h["sampled"] <= 40
        reasons = [d["reason"] for d in h["declined"]]
        # only the simulated faults, nothing else failed; under SecAgg+ between key exchange and masked vectors
        want = DROPPED_REASON if path == "plain" else f"[collect_masked_vectors] {DROPPED_REASON}"
        assert set(reasons) <= {want}, reasons
        if not h["halted"]:
            assert h["rejected"] == []
            assert h["accepted"] + len(reasons) == h["sampled"]  # every sampled device: accepted or dropped
            assert h["accepted"] >= 1
        dropped, sampled = dropped + len(reasons), sampled + h["sampled"]
    assert 0.15 < dropped / sampled < 0.45, (dropped, sampled)
    for h in halted:
        assert h["epsilon_user"] == 0.0 or h["epsilon_user"] == max(
            (r["epsilon_user"] for r in released if r["server_round"] < h["server_round"]), default=0.0)

    ledger = PrivacyLedger(work / "server" / "ledger.jsonl").entries()
    assert [e.round for e in ledger] == [h["server_round"] for h in released]  # one charge per released round
    assert [e.participants for e in ledger] == [h["accepted"] for h in released]
    for i, e in enumerate(ledger, start=1):  # ε after each charge, recomputed independently
        assert (e.sample_rate, e.noise_multiplier) == (Q, Z)
        assert e.epsilon == pytest.approx(_user_level_epsilon([(Z, Q, i)], e.delta), rel=1e-9)
    assert [h["epsilon_user"] for h in released] == [e.epsilon for e in ledger]


def test_every_device_that_trained_charged_its_own_accountant_once_per_round(faulty_run):
    """Charged before training: a device that dropped out after training has paid for the round."""
    from fedpref.client.trainer import LocalTrainConfig
    from fedpref.common.accounting import SampleLevelAccountant
    from fedpref.simulations.persona import PersonaConfig

    path, work = faulty_run
    hist = json.loads((work / "server" / "history.json").read_text())
    trained = sum(h["accepted"] + len(h["declined"]) for h in hist if not h["halted"])
    n_train = sum(PersonaConfig(users=USERS, pairs_per_user=10, seed=11).split_counts()[0])
    steps = LocalTrainConfig(epochs=1, batch_size=8, learning_rate=0.01, head_learning_rate=0.01,
                             projection_learning_rate=0.01, noise_multiplier=0.5, max_grad_norm=1.0).steps(n_train)
    charged = sum(t for p in (work / "clients").glob("*/accountant.json") for _, _, t in SampleLevelAccountant.load(p).history)
    if path == "plain":
        assert charged == trained * steps
    else:  # a halted SecAgg+ attempt still trained its survivors (and the dropped): charged, never released
        assert charged >= trained * steps
