"""The secure-aggregation switch of the regular apps: `make_server_app` / `make_client_app`
(what `flwr run` and `fedpref-sim` use) run SecAgg+ when the run config says
``secure-aggregation = true``, with the signed safety policy distributed and attested."""

import json

import pytest

from fedpref.client.data import write_jsonl
from fedpref.protocol.runconfig import Method
from fedpref.simulations.config import RuntimeConfig
from fedpref.simulations.engine import run_on_simulation_engine
from fedpref.simulations.persona import CommunitySpec, PersonaConfig, generate

pytestmark = pytest.mark.slow  # a SecAgg+ federation on Flower's Simulation Engine (Ray)

CONFIG = """
[model]
backbone = "{backbone}"
max_length = 96

[model.adapter]
rank = 2
personal_dims = 2

[federation]
rounds = 2
client_sample_rate = 1.0
clip_norm = 1.0
server_noise_multiplier = 0.5
min_available_clients = 4
round_timeout_s = 300

[local]
epochs = 1
batch_size = 8
dp_noise_multiplier = 0.5

[personalize]
epochs = 1
"""


@pytest.fixture(scope="module")
def secure_run(policy_kit, tmp_path_factory):
    out = tmp_path_factory.mktemp("secure")
    comms = (CommunitySpec("a", 0.5, (1.0,) * 8, -5.0), CommunitySpec("b", 0.5, (-1.0,) * 8, 5.0))
    data = out / "persona.jsonl"
    write_jsonl(generate(PersonaConfig(users=4, pairs_per_user=24, seed=1, communities=comms)).pairs, data)
    cfg = out / "cfg.toml"
    cfg.write_text(CONFIG.format(backbone=policy_kit.backbone))
    run_on_simulation_engine(
        method=Method.PERSONALIZED, num_users=4, data=data, workdir=out / "work", config_file=cfg, cache=None,
        runtime=RuntimeConfig(client_cpus=1.0, secure_aggregation=True),
        policy=policy_kit.dir / "policy-v1.dsse.json", root=policy_kit.root_path,
    )
    return out / "work"


def test_the_switch_runs_secagg_with_the_policy(secure_run, policy_kit):
    server = secure_run / "server"
    summary = json.loads((server / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary.get("secure_aggregation") is True
    hist = json.loads((server / "history.json").read_text())
    assert [r["accepted"] for r in hist] == [4, 4] and all(not r["rejected"] for r in hist)
    assert len((server / "ledger.jsonl").read_text().splitlines()) == 2
    # every device installed policy v1 from the envelope the server sent, and attested it
    for uid_dir in (secure_run / "clients").iterdir():
        state = json.loads((uid_dir / "policy" / "state.json").read_text())
        assert state["version"] == 1
        assert (uid_dir / "adapters" / "private" / "adapter_model.safetensors").exists()
    assert not list(server.rglob("*private*"))


def test_after_secagg_every_device_personalizes_on_the_released_model(secure_run):
    rec = json.loads((secure_run / "server" / "personalize.json").read_text())
    assert rec["model_round"] == 2 and rec["population"] == 4 and rec["fitted"] == 4, rec
    assert not rec["declined"] and not rec["rejected"] and rec["missing"] == 0
    on = {(d / "personalized-on.txt").read_text().strip() for d in (secure_run / "clients").iterdir()}
    assert on == {rec["model_sha256"]}
