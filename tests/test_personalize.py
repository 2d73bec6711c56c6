"""The final personalization (issue 11's design step): after the last round the released model
goes to every device, which fits its private adapter on it under its own DP-SGD terms, charged
before training, and sends back nothing it fitted."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict

from fedpref.client.data import write_jsonl
from fedpref.client.device import DeviceState, get_runtime, personalize
from fedpref.client.terms import DeviceTerms
from fedpref.common.errors import DataError, DeclinedRound
from fedpref.model.cache import TextCache
from fedpref.model.config import ModelConfig
from fedpref.model.preference import AdapterSpec, get_arrays, set_arrays
from fedpref.protocol.messages import (
    ALREADY_PERSONALIZED_CODE,
    K_DELTA,
    PERSONALIZE_MESSAGE_TYPE,
    PROTOCOL_VERSION,
    Attestation,
    PersonalizeReply,
    TrainMetrics,
    TrainRequest,
    personalize_reply,
    train_request,
    weights_digest,
)
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group
from fedpref.server.personalize import PersonalizeRecord, tally
from fedpref.server.validation import Expected
from test_device_privacy import BAD, GOOD, _round_config, _user

SHA = "ab" * 32


@pytest.fixture(scope="module")
def device(tiny_encoder_dir):
    rt = get_runtime(ModelConfig(backbone=tiny_encoder_dir, max_length=32, adapter=AdapterSpec(rank=2, personal_dims=3)),
                     (SHARED_ADAPTER, PRIVATE_ADAPTER))
    cache = TextCache.build(rt.model, rt.backbone, GOOD + BAD, max_length=32)
    return rt, _user(), cache


def _request(shared, **kw) -> TrainRequest:
    cfg = dict(train_shared=False, train_private=True, local_epochs=3, head_learning_rate=0.5) | kw
    return TrainRequest.from_content(train_request(shared, _round_config(**cfg), None))


def _charged(state: DeviceState) -> int:
    return sum(int(t) for _, _, t in state.accountant().history)


def _shared(rt, bump: float = 0.0) -> dict[str, np.ndarray]:
    return {k: (v + np.float32(bump)).astype(np.float32) for k, v in get_arrays(rt.model, Group.SHARED).items()}


def test_the_private_adapter_alone_is_fitted_charged_first_and_nothing_fitted_is_sent(device, tmp_path):
    rt, user, cache = device
    state = DeviceState(tmp_path / "dev")
    shared = _shared(rt, 0.01)
    set_arrays(rt.model, Group.PRIVATE, rt.initial_private)
    content = personalize(rt, user, state, _request(shared), cache=cache, terms=DeviceTerms(share_metrics=True))
    assert len(content.array_records) == 0  # no delta, no adapter: only the attestation and metrics
    reply = PersonalizeReply.from_content(content)
    assert reply.attestation.server_round == 1 and reply.attestation.frozen_identity == rt.identity
    assert reply.metrics is not None and reply.metrics.steps > 0 and reply.metrics.epsilon_sample > 0
    # the shared weights the device holds are bit for bit the released ones; the private ones moved
    assert all(np.array_equal(v, shared[k]) for k, v in get_arrays(rt.model, Group.SHARED).items())
    state.load_private(rt)  # what was saved, read back
    moved = get_arrays(rt.model, Group.PRIVATE)
    assert any(not np.array_equal(moved[k], rt.initial_private[k]) for k in moved)
    assert _charged(state) >= reply.metrics.steps  # charged (before training) at least the steps taken
    assert state.personalized_on() == weights_digest(shared)


def test_a_repeat_on_the_same_weights_is_declined_and_spends_nothing(device, tmp_path):
    rt, user, cache = device
    state = DeviceState(tmp_path / "dev")
    shared = _shared(rt, 0.02)
    personalize(rt, user, state, _request(shared), cache=cache, terms=DeviceTerms())
    spent = _charged(state)
    with pytest.raises(DeclinedRound, match="already personalized"):
        personalize(rt, user, state, _request(shared), cache=cache, terms=DeviceTerms())
    assert _charged(state) == spent > 0
    # a new release is a new model: fitted again (and charged again)
    personalize(rt, user, state, _request(_shared(rt, 0.03), server_round=2), cache=cache, terms=DeviceTerms())
    assert _charged(state) > spent


@pytest.mark.parametrize("ask, reason", [
    (dict(train_shared=True), "only that"),
    (dict(train_private=False), "only that"),
    (dict(dp_noise_multiplier=0.5), "noise multiplier is below"),
    (dict(dp_max_grad_norm=5.0), "clip is above"),
])
def test_a_request_outside_the_devices_terms_is_declined_before_any_charge(device, tmp_path, ask, reason):
    rt, user, cache = device
    state = DeviceState(tmp_path / "dev")
    with pytest.raises(DeclinedRound, match=reason):
        personalize(rt, user, state, _request(_shared(rt), **ask), cache=cache, terms=DeviceTerms())
    assert not state.accountant_path.exists() and state.personalized_on() == ""


def test_past_its_budget_the_device_keeps_its_adapter_and_declines(device, tmp_path):
    rt, user, cache = device
    state = DeviceState(tmp_path / "dev")
    with pytest.raises(DeclinedRound, match="budget"):
        personalize(rt, user, state, _request(_shared(rt), local_epochs=50), cache=cache,
                    terms=DeviceTerms(max_epsilon_sample=1.0))
    assert _charged(state) == 0 and state.personalized_on() == ""
    assert not (state.private_dir / "adapter_model.safetensors").exists()


def test_short_of_budget_the_device_fits_the_epochs_it_can_afford(device, tmp_path):
    rt, user, cache = device
    state = DeviceState(tmp_path / "dev")  # 16 pairs, batch 4: 4 steps an epoch; ε 4.87 / 6.25 / 7.33 at 1 / 2 / 3
    content = personalize(rt, user, state, _request(_shared(rt), local_epochs=3), cache=cache,
                          terms=DeviceTerms(max_epsilon_sample=5.5, share_metrics=True))
    assert _charged(state) == 4 and PersonalizeReply.from_content(content).metrics.steps <= 4
    assert state.accountant().epsilon(1e-5) <= 5.5


def test_the_finetuned_baseline_continues_its_rounds_accountant_under_the_same_budget(device, tmp_path):
    """The simulation's private-only fits (``finetuned`` after FedAvg's rounds) are held to the
    rule the final personalization follows: the fit continues the accountant the device's rounds
    left, fits the epochs the budget still affords, and none when not one fits (no charge, the
    private adapter stays the initial one). Before, each fit charged a fresh accountant."""
    from fedpref.simulations.config import load_sim_config
    from fedpref.simulations.runner import train_locally

    rt, user, cache = device
    cfg = load_sim_config(Path(__file__).parents[1] / "simulations" / "configs" / "demo.toml")
    cfg = dataclasses.replace(cfg, local=dataclasses.replace(cfg.local, max_epsilon_sample=5.5, batch_size=4),
                              methods=dataclasses.replace(cfg.methods, private_batch_size=0))
    rounds = tmp_path / "aggregated" / "clients"  # 16 pairs, batch 4: 4 steps an epoch
    for uid, steps in (("fresh", 0), ("spent", 4), ("broke", 8)):
        if steps:
            acct = DeviceState(rounds / uid).accountant()
            acct.record(noise_multiplier=cfg.local.dp_noise_multiplier, sample_rate=0.25, steps=steps)
            acct.save()
    users = {uid: dataclasses.replace(user, user_id=uid) for uid in ("fresh", "spent", "broke", "never")}
    shared = _shared(rt, 0.01)
    eps = train_locally(cfg, rt, users, cache, tmp_path / "finetuned", epochs=3, shared=shared, label="t", spent=rounds)
    prior = {"fresh": 0, "spent": 4, "broke": 8, "never": 0}
    fitted = {uid: _charged(DeviceState(tmp_path / "finetuned" / uid)) - prior[uid] for uid in users}
    # at σ = 1.1 two of the three epochs fit 5.5 from scratch, one after an epoch of rounds, none after two
    assert fitted == {"fresh": 8, "spent": 4, "broke": 0, "never": 8}
    assert eps <= 5.5 + 1e-9
    broke = DeviceState(tmp_path / "finetuned" / "broke")
    assert not broke.private_dir.exists()  # nothing fitted, nothing saved: it ranks with the initial head


def test_hostile_step_sizes_cannot_leave_a_wrecked_adapter_behind(device, tmp_path):
    rt, user, cache = device
    state = DeviceState(tmp_path / "dev")
    with pytest.raises(DeclinedRound, match="out of range"):
        personalize(rt, user, state, _request(_shared(rt), local_epochs=20, head_learning_rate=1e4, learning_rate=1e4),
                    cache=cache, terms=DeviceTerms(max_epsilon_sample=math.inf))
    assert _charged(state) > 0  # what was spent stays spent
    assert not (state.private_dir / "adapter_model.safetensors").exists() and state.personalized_on() == ""


def test_a_round_that_trains_no_shared_part_is_declined(device, tmp_path):
    from fedpref.client.device import train_round

    rt, user, cache = device
    state = DeviceState(tmp_path / "dev")
    with pytest.raises(DeclinedRound, match="personalize message"):
        train_round(rt, user, state, _request(_shared(rt)), cache=cache, terms=DeviceTerms())
    assert not state.accountant_path.exists()


def test_weights_that_compare_equal_have_one_digest():
    a = {"w": np.array([0.0, 1.5, -2.0], np.float32)}
    b = {"w": np.array([-0.0, 1.5, -2.0], np.float32)}
    assert weights_digest(a) == weights_digest(b)
    assert weights_digest(a) != weights_digest({"w": np.array([0.0, 1.5, -2.0001], np.float32)})
    assert weights_digest(a) != weights_digest({"v": a["w"]})


def test_the_servers_cap_binds_too(device, tmp_path):
    rt, user, cache = device
    state = DeviceState(tmp_path / "dev")
    with pytest.raises(DeclinedRound, match="budget"):
        personalize(rt, user, state, _request(_shared(rt), local_epochs=50, max_epsilon_sample=1.0), cache=cache,
                    terms=DeviceTerms(max_epsilon_sample=math.inf))


# --- the server's side: what it accepts back ------------------------------------------------

def _att(rnd=3, sha=SHA) -> Attestation:
    return Attestation(protocol_version=PROTOCOL_VERSION, server_round=rnd, frozen_identity=sha, policy_version=0,
                       safety_digest="")


def _to(node: int, content) -> Message:
    ins = Message(content=RecordDict(), dst_node_id=node, message_type=PERSONALIZE_MESSAGE_TYPE)
    return Message(content=content, reply_to=ins) if isinstance(content, RecordDict) else Message(content, reply_to=ins)


def test_the_server_counts_only_attested_array_free_replies(flower_task):
    good = personalize_reply(TrainMetrics(train_loss=0.5, train_accuracy=0.6, epsilon_sample=2.0, delta_norm=0.0,
                                          steps=4, seconds=0.1), _att())
    leaky = personalize_reply(None, _att())
    leaky[K_DELTA] = ArrayRecord({"w": Array(np.ones(3, np.float32))})  # a device sending what it fitted
    stale = personalize_reply(None, _att(rnd=2))
    other_model = personalize_reply(None, _att(sha="cd" * 32))
    extra = personalize_reply(None, _att())
    extra["note"] = good.config_records["attestation"]
    replies = [_to(1, good), _to(2, leaky), _to(3, stale), _to(4, other_model), _to(5, extra),
               _to(6, Error(code=4100, reason="device budget: no")),
               _to(7, Error(code=ALREADY_PERSONALIZED_CODE, reason="already personalized on these global weights"))]
    rec = PersonalizeRecord(model_round=3, model_sha256="x", epochs=1, population=8)
    exp = Expected(shapes={"w": (3,)}, dtype="float32", clip_norm=1.0, server_round=3, frozen_identity=SHA)
    metrics = tally(rec, [*replies, _to(1, good), _to(9, good)], exp, offered={str(n) for n in range(1, 8)})
    assert rec.fitted == 1 and metrics == [TrainMetrics.from_record(good["metrics"]).as_dict()]
    assert rec.fitted_earlier == 1
    assert [r["node"] for r in rec.rejected] == ["2", "3", "4", "5"]
    assert "array record" in rec.rejected[0]["reason"]
    assert [d["node"] for d in rec.declined] == ["6"]
    assert rec.answered == [str(n) for n in range(1, 8)]  # a second reply from node 1, one from node 9: ignored


def test_a_reply_with_any_array_is_refused_on_parse():
    content = personalize_reply(None, _att())
    content["private"] = ArrayRecord({"head": Array(np.zeros(2, np.float32))})
    with pytest.raises(DataError, match="array record"):
        PersonalizeReply.from_content(content)


# --- end to end on Flower's Simulation Engine -----------------------------------------------

CONFIG = """
[model]
backbone = "{backbone}"
max_length = 48

[model.adapter]
rank = 2
personal_dims = 0         # the head reads the features: no learnt projection, so the rounds may skip it
private_lora = false
objective = "decoupled"

[federation]
rounds = 2
client_sample_rate = 1.0
clip_norm = 1.0
server_noise_multiplier = 1.0
min_available_clients = 3

[local]
epochs = 1
batch_size = 8
dp_noise_multiplier = 1.0

[personalize]
epochs = {epochs}
head_learning_rate = 0.1
rounds_train_private = {rounds_train_private}
"""


def _run(tmp_path, backbone, *, epochs: int, workdir=None):
    from fedpref.protocol.runconfig import Method
    from fedpref.simulations.config import RuntimeConfig
    from fedpref.simulations.engine import run_on_simulation_engine
    from fedpref.simulations.persona import CommunitySpec, PersonaConfig, generate

    data = tmp_path / "persona.jsonl"
    if not data.exists():
        comms = (CommunitySpec("a", 0.5, (1.0,) * 8, -5.0), CommunitySpec("b", 0.5, (-1.0,) * 8, 5.0))
        write_jsonl(generate(PersonaConfig(users=3, pairs_per_user=16, seed=2, communities=comms)).pairs, data)
    cfg = tmp_path / f"cfg-{epochs}.toml"
    # with the final fit, the rounds train the shared model alone (the demo's setting)
    cfg.write_text(CONFIG.format(backbone=backbone, epochs=epochs, rounds_train_private=str(epochs == 0).lower()))
    work = workdir or tmp_path / f"work-{epochs}"
    run_on_simulation_engine(method=Method.PERSONALIZED, num_users=3, data=data, workdir=work, config_file=cfg,
                             cache=None, runtime=RuntimeConfig(client_cpus=1.0))
    return work


def _steps(client_dir) -> int:
    return _charged(DeviceState(client_dir))


@pytest.mark.slow  # Flower's Simulation Engine (Ray), twice
def test_every_device_fits_on_the_released_model_once(tiny_encoder_dir, tmp_path):
    from fedpref.model.io import load_adapter_weights

    work = _run(tmp_path, tiny_encoder_dir, epochs=2)
    server = work / "server"
    rec = json.loads((server / "personalize.json").read_text())
    assert rec["population"] == 3 and rec["fitted"] == 3 and not rec["declined"] and not rec["rejected"]
    assert rec["model_round"] == 2
    summary = json.loads((server / "summary.json").read_text())
    assert summary["personalize"]["fitted"] == 3
    # the model each device fitted on is the released round-2 checkpoint, bit for bit
    rt = get_runtime(ModelConfig(backbone=tiny_encoder_dir, max_length=48,
                                 adapter=AdapterSpec(rank=2, personal_dims=0, private_lora=False, objective="decoupled")),
                     (SHARED_ADAPTER,))
    load_adapter_weights(rt.model, SHARED_ADAPTER, server / "checkpoints" / "round-0002")
    released = weights_digest(get_arrays(rt.model, Group.SHARED))
    assert rec["model_sha256"] == released
    clients = sorted((work / "clients").iterdir())
    assert [DeviceState(c).personalized_on() for c in clients] == [released] * 3
    # and each charged the fit: more DP-SGD steps than the same rounds without the step
    plain = _run(tmp_path, tiny_encoder_dir, epochs=0)
    assert not (plain / "server" / "personalize.json").exists()
    more = [_steps(c) - _steps(plain / "clients" / c.name) for c in clients]
    assert all(m > 0 for m in more), more
    # a restart on the same workdir (every round done): the Simulation Engine gives the same users new
    # node ids, so a new record starts; every device answers "already personalized" and spends nothing
    before = [_steps(c) for c in clients]
    _run(tmp_path, tiny_encoder_dir, epochs=2, workdir=work)
    assert [_steps(c) for c in clients] == before
    again = json.loads((server / "personalize.json").read_text())
    assert (again["population"], again["fitted"], again["fitted_earlier"], again["missing"]) == (3, 0, 3, 0)
    assert not list(server.rglob("*private*"))


# --- the switch: rounds that train the shared model alone ------------------------------------

@pytest.mark.parametrize("rounds_train_private, method, want", [
    (True, "personalized", True), (False, "personalized", False), (False, "aggregated", False),
])
def test_rounds_train_the_private_adapter_only_where_the_config_says(tiny_encoder_dir, tmp_path, rounds_train_private,
                                                                   method, want):
    from fedpref.protocol.runconfig import from_run_config
    from fedpref.server.app import load_server_settings, prepare_federation

    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[model]\nbackbone = "{tiny_encoder_dir}"\nmax_length = 32\n[model.adapter]\nrank = 2\n'
                   f'personal_dims = 2\n[personalize]\nepochs = 2\n'
                   f'rounds_train_private = {str(rounds_train_private).lower()}\n')
    run = from_run_config({"config": str(cfg), "workdir": str(tmp_path / "work"), "method": method})
    f = prepare_federation(run, load_server_settings(str(cfg)))
    f.bar.close()
    rc = f.strategy.round_config(1)
    assert rc.train_shared and rc.train_private is want


def test_a_config_that_would_never_train_a_private_adapter_is_refused(tmp_path):
    from fedpref.common.errors import ConfigError
    from fedpref.server.app import load_server_settings

    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[personalize]\nepochs = 0\nrounds_train_private = false\n")
    with pytest.raises(ConfigError, match="never train a private adapter"):
        load_server_settings(str(cfg))
    cfg.write_text("[personalize]\nepochs = -1\n")
    with pytest.raises(ConfigError, match="personalize"):
        load_server_settings(str(cfg))


# --- the server's step against real devices, in process --------------------------------------

def _server(rt, tmp_path):
    from fedpref.server.config import FederationConfig, LocalConfig
    from fedpref.server.privacy import AccountantKind, PrivacyLedger, UserLevelBudget
    from fedpref.server.release import fresh_generators
    from fedpref.server.strategy import FedPrefStrategy, RoundRecord

    shared = _shared(rt, 0.05)
    fed = FederationConfig(rounds=2, client_sample_rate=1.0, report_eval_metrics=True, min_available_clients=1,
                           round_timeout_s=1.0)  # none connected: the step waits 1 s for a device, then gives up
    budget = UserLevelBudget(max_epsilon=math.inf, delta=1e-5, accountant=AccountantKind.RDP,
                             ledger=PrivacyLedger(tmp_path / "ledger.jsonl"))
    s = FedPrefStrategy(fed=fed, local=LocalConfig(batch_size=4, dp_noise_multiplier=1.0),
                        shapes={k: v.shape for k, v in shared.items()}, frozen_identity=rt.identity, budget=budget,
                        generators=fresh_generators())
    s.history.append(RoundRecord(server_round=2, population=3, sampled=3, replied=3, accepted=3))
    return s, shared


def _devices(rt, user, cache, tmp_path, *, lose=(), refuse=()):
    """``send`` for personalize_devices: each node runs the real device step on its own state;
    the replies of the nodes in ``lose`` never arrive; those in ``refuse`` decline (as a device
    with a policy it cannot verify would)."""
    from fedpref.client.app import declined_reply
    from fedpref.common.errors import PolicyRefused

    asked = []

    def send(messages, timeout):
        replies = []
        for m in messages:
            req = TrainRequest.from_content(m.content)
            asked.append(req.config)
            try:
                if m.metadata.dst_node_id in refuse:
                    raise PolicyRefused("safety policy refused, previous policy stays in force: expired")
                reply = Message(personalize(rt, user, DeviceState(tmp_path / f"node{m.metadata.dst_node_id}"), req,
                                            cache=cache, terms=DeviceTerms(share_metrics=True)), reply_to=m)
            except DeclinedRound as e:
                reply = declined_reply(m, e)
            if m.metadata.dst_node_id not in lose:
                replies.append(reply)
        return replies

    return send, asked


def test_a_restart_offers_the_model_to_connected_devices_that_have_not_answered(device, tmp_path, flower_task):
    from fedpref.server.config import PersonalizeConfig
    from fedpref.server.personalize import load_record, personalize_devices

    rt, user, cache = device
    strategy, shared = _server(rt, tmp_path)
    cfg = PersonalizeConfig(epochs=2, head_learning_rate=0.1)
    send, asked = _devices(rt, user, cache, tmp_path, lose={3})
    rec = personalize_devices(strategy, cfg, shared, server_dir=tmp_path, node_ids=lambda: [3, 1, 2], send=send)
    assert (rec.population, rec.fitted, rec.missing, rec.answered) == (3, 2, 1, ["1", "2"])
    assert asked[0].train_private and not asked[0].train_shared and asked[0].local_epochs == 2
    assert asked[0].server_round == 2 and asked[0].report_metrics  # metrics asked on the plain path
    spent = {n: _charged(DeviceState(tmp_path / f"node{n}")) for n in (1, 2, 3)}
    assert all(x > 0 for x in spent.values())  # node 3 fitted too: only its answer was lost
    # the server starts again on the same model: only node 3 (no answer yet) is offered it; it fitted already
    send, asked = _devices(rt, user, cache, tmp_path)
    rec = personalize_devices(strategy, cfg, shared, server_dir=tmp_path, node_ids=lambda: [1, 2, 3], send=send)
    assert len(asked) == 1 and (rec.fitted, rec.fitted_earlier, rec.missing, rec.declined) == (2, 1, 0, [])
    assert {n: _charged(DeviceState(tmp_path / f"node{n}")) for n in (1, 2, 3)} == spent
    # a device that joins later (a new user) is offered the model at the next start, and only it
    send, asked = _devices(rt, user, cache, tmp_path)
    rec = personalize_devices(strategy, cfg, shared, server_dir=tmp_path, node_ids=lambda: [1, 2, 3, 4], send=send)
    assert len(asked) == 1 and (rec.population, rec.fitted, rec.fitted_earlier, rec.missing) == (4, 3, 1, 0)
    assert DeviceState(tmp_path / "node4").personalized_on() == weights_digest(shared)
    # a device that declined (a policy it could not verify) is asked again at the next start, and fits then
    send, asked = _devices(rt, user, cache, tmp_path, refuse={5})
    rec = personalize_devices(strategy, cfg, shared, server_dir=tmp_path, node_ids=lambda: [1, 2, 3, 4, 5], send=send)
    assert len(asked) == 1 and [d["node"] for d in rec.declined] == ["5"] and rec.fitted == 3
    send, asked = _devices(rt, user, cache, tmp_path)
    rec = personalize_devices(strategy, cfg, shared, server_dir=tmp_path, node_ids=lambda: [1, 2, 3, 4, 5], send=send)
    assert len(asked) == 1 and rec.declined == [] and (rec.population, rec.fitted, rec.fitted_earlier) == (5, 4, 1)
    # every connected device has a final answer: nothing is sent
    send, asked = _devices(rt, user, cache, tmp_path)
    assert personalize_devices(strategy, cfg, shared, server_dir=tmp_path, node_ids=lambda: [1, 2, 3, 4, 5],
                               send=send) == rec
    assert asked == [] and load_record(tmp_path) == rec


def test_replies_are_tallied_in_the_order_offered_whatever_order_they_arrive_in(device, tmp_path, flower_task):
    """The record's lists and its metric means follow the order the nodes were offered in (in a
    simulation, the users' order), not the order the actors happened to answer in."""
    from fedpref.server.config import PersonalizeConfig
    from fedpref.server.personalize import personalize_devices

    rt, user, cache = device
    strategy, shared = _server(rt, tmp_path)
    send, _ = _devices(rt, user, cache, tmp_path, refuse={1, 2})
    rec = personalize_devices(strategy, PersonalizeConfig(epochs=1, head_learning_rate=0.1), shared,
                              server_dir=tmp_path, node_ids=lambda: [3, 1, 4, 2],
                              send=lambda messages, timeout: send(messages, timeout)[::-1])  # answers arrive reversed
    # in arrival order these would be 2, 4, 1, 3 and 2, 1; in sorted ids 1, 2, 3, 4 and 1, 2
    assert rec.answered == ["3", "1", "4", "2"] and [d["node"] for d in rec.declined] == ["1", "2"]
    assert rec.fitted == 2 and rec.metrics


def test_the_fit_runs_at_its_own_batch_not_the_rounds(device, tmp_path, flower_task):
    """[personalize] batch_size is what the message asks for (0: the rounds' [local] batch), and
    the device runs it: 16 pairs at batch 16 is one DP-SGD step an epoch, at batch 4 four."""
    from fedpref.server.config import PersonalizeConfig
    from fedpref.server.personalize import personalize_devices

    rt, user, cache = device
    strategy, shared = _server(rt, tmp_path)  # [local] batch_size = 4
    steps = {}
    for batch, want in ((16, 16), (0, 4)):
        send, asked = _devices(rt, user, cache, tmp_path / f"b{batch}")
        rec = personalize_devices(strategy, PersonalizeConfig(epochs=2, batch_size=batch), shared,
                                  server_dir=tmp_path / f"b{batch}", node_ids=lambda: [1], send=send)
        assert rec.fitted == 1 and [c.batch_size for c in asked] == [want]
        steps[want] = _charged(DeviceState(tmp_path / f"b{batch}" / "node1"))
    assert len(user.train) == 16 and steps == {16: 2, 4: 8}  # 2 epochs of 16/batch expected batches


def test_under_secure_aggregation_no_metrics_are_asked_and_none_connected_is_no_record(device, tmp_path, flower_task):
    from fedpref.server.config import PersonalizeConfig
    from fedpref.server.personalize import personalize_devices

    rt, user, cache = device
    strategy, shared = _server(rt, tmp_path)
    cfg = PersonalizeConfig(epochs=1)
    send, asked = _devices(rt, user, cache, tmp_path)
    assert personalize_devices(strategy, cfg, shared, server_dir=tmp_path, node_ids=list, send=send) is None
    assert asked == [] and not (tmp_path / "personalize.json").exists()
    rec = personalize_devices(strategy, cfg, shared, server_dir=tmp_path, node_ids=lambda: [1], send=send, secure=True)
    assert rec.fitted == 1 and rec.metrics == {} and not asked[0].report_metrics


@pytest.mark.parametrize("text", ['{"model_round": 1}', "[]", "not json", '{"declined": 5}', '{"offered": ["x"]}'])
def test_a_damaged_record_is_one_clear_error(tmp_path, text):
    from fedpref.server.personalize import PersonalizeRecord, load_record

    record = dataclasses.asdict(PersonalizeRecord(model_round=1, model_sha256="x", epochs=1, population=1))
    good = json.dumps(record)
    (tmp_path / "personalize.json").write_text(good)
    assert load_record(tmp_path).population == 1
    older = {k: v for k, v in record.items() if k not in ("offered", "answered")}  # before per-device records
    (tmp_path / "personalize.json").write_text(json.dumps(older))
    assert load_record(tmp_path) is None
    bad = {'{"declined": 5}': good.replace('"declined": []', '"declined": 5'),
           '{"offered": ["x"]}': good.replace('"offered": []', '"offered": ["x"]')}.get(text, text)
    (tmp_path / "personalize.json").write_text(bad)
    with pytest.raises(DataError, match="personalize.json"):
        load_record(tmp_path)


def test_rounds_without_the_private_part_need_a_public_basis():
    from fedpref.common.errors import ConfigError
    from fedpref.server.config import PersonalizeConfig, check_personalize_model
    from fedpref.server.deploy import INIT_PERSONALIZE

    shared_only = PersonalizeConfig(epochs=5, rounds_train_private=False)
    with pytest.raises(ConfigError, match="learns its style projection"):
        check_personalize_model(shared_only, AdapterSpec(personal_dims=8), where="cfg.toml")
    check_personalize_model(shared_only, AdapterSpec(personal_dims=9, attribute_basis="basis.safetensors"), where="x")
    check_personalize_model(shared_only, AdapterSpec(personal_dims=0), where="x")
    # what `fedpref-server init` writes goes with its default model (a learnt projection)
    check_personalize_model(PersonalizeConfig(**INIT_PERSONALIZE), AdapterSpec(), where="init")
