"""Privacy that holds against the server (issue 10): fresh DP randomness, a device that keeps
its own terms, the accountant charged before anything is written, and nothing sent that the
device did not agree to."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedpref.client.data import PreferencePair, Split, UserData
from fedpref.client.device import DeviceState, get_runtime, train_round
from fedpref.client.terms import DeviceTerms
from fedpref.common.errors import ConfigError, DataError, DeclinedRound
from fedpref.model.cache import TextCache
from fedpref.model.config import ModelConfig
from fedpref.model.preference import AdapterSpec, get_arrays
from fedpref.protocol.messages import (
    K_METRICS,
    PROTOCOL_VERSION,
    RoundConfig,
    TrainReply,
    TrainRequest,
    record_to_arrays,
    train_request,
)
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group

GOOD = [f"Sure! Here is a friendly tip {i} 😀 keep it simple." for i in range(20)]
BAD = [f"Pursuant to inquiry {i}, a formal exposition follows herewith." for i in range(20)]


def _user() -> UserData:
    pairs = [PreferencePair("u", "p", GOOD[i], BAD[i], Split.TRAIN if i < 16 else Split.TEST) for i in range(20)]
    return UserData("u", None, tuple(p for p in pairs if p.split is Split.TRAIN), tuple(p for p in pairs if p.split is Split.TEST))


def _round_config(**kw) -> RoundConfig:
    base = dict(server_round=1, protocol_version=PROTOCOL_VERSION, local_epochs=1, batch_size=4, learning_rate=0.05,
                head_learning_rate=0.2, projection_learning_rate=0.1, clip_norm=1.0, dp_noise_multiplier=1.0,
                dp_max_grad_norm=1.0, delta=1e-5, max_epsilon_sample=math.inf, train_shared=True, train_private=True,
                policy_version=0, report_metrics=True)
    base.update(kw)
    return RoundConfig(**base)


@pytest.fixture(scope="module")
def device(tiny_encoder_dir):
    rt = get_runtime(ModelConfig(backbone=tiny_encoder_dir, max_length=32, adapter=AdapterSpec(rank=2, personal_dims=3)),
                     (SHARED_ADAPTER, PRIVATE_ADAPTER))
    user = _user()
    cache = TextCache.build(rt.model, rt.backbone, GOOD + BAD, max_length=32)
    return rt, user, cache


def _request(rt, **kw) -> TrainRequest:
    return TrainRequest.from_content(train_request(get_arrays(rt.model, Group.SHARED), _round_config(**kw), None))


# --- randomness ------------------------------------------------------------------------------

_ONE_ROUND = textwrap.dedent("""
    import hashlib, math, sys, tempfile
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_device_privacy import GOOD, BAD, _user, _round_config
    from fedpref.client.device import DeviceState, get_runtime, train_round
    from fedpref.client.terms import DeviceTerms
    from fedpref.model.cache import TextCache
    from fedpref.model.config import ModelConfig
    from fedpref.model.preference import AdapterSpec, get_arrays
    from fedpref.protocol.messages import TrainReply, TrainRequest, record_to_arrays, train_request
    from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group

    rt = get_runtime(ModelConfig(backbone={backbone!r}, max_length=32, adapter=AdapterSpec(rank=2, personal_dims=3)),
                     (SHARED_ADAPTER, PRIVATE_ADAPTER))
    shared = get_arrays(rt.model, Group.SHARED)
    cache = TextCache.build(rt.model, rt.backbone, GOOD + BAD, max_length=32)
    out = []
    for seeds in ((None, None), (11, 12)):
        req = TrainRequest.from_content(train_request(shared, _round_config(), None))
        state = DeviceState(Path(tempfile.mkdtemp()))
        content = train_round(rt, _user(), state, req, cache=cache, terms=DeviceTerms(), batch_seed=seeds[0], noise_seed=seeds[1])
        delta = record_to_arrays(TrainReply.from_content(content).delta)
        out.append(hashlib.sha256(b"".join(delta[k].tobytes() for k in sorted(delta))).hexdigest())
    print(" ".join(out))
""")


@pytest.mark.slow  # two real processes that train
def test_two_fresh_processes_give_different_deltas_unless_a_simulation_seeds_them(tiny_encoder_dir, tmp_path):
    """The same round, the same weights, the same data, in two new processes: a deployed device's
    delta differs (fresh noise and batches from the OS CSPRNG); with the simulation's explicit
    seeds the two are bit-identical, which shows the comparison can fail."""
    script = tmp_path / "one_round.py"
    script.write_text(_ONE_ROUND.format(tests=str(Path(__file__).parent), backbone=tiny_encoder_dir))
    runs = [subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    (fresh_a, seeded_a), (fresh_b, seeded_b) = (r.stdout.split() for r in runs)
    assert seeded_a == seeded_b
    assert fresh_a != fresh_b


def test_server_noise_is_fresh_and_not_derivable_from_the_config():
    """The released noise of a deployed server differs run to run, and no seed a config could
    carry (the run seed, a round number) regenerates it; the simulation's seeded mode repeats."""
    from fedpref.server.release import fresh_generators, noisy_mean, seeded_generators

    total = {"w": np.zeros(4096)}

    def noise(gen):
        return noisy_mean(total, expected_cohort=10.0, clip_norm=1.0, noise_multiplier=1.0, rng=gen)["w"]

    deployed = fresh_generators()
    a, b = noise(deployed(1)), noise(deployed(1))
    assert not np.allclose(a, b)
    assert 0.08 < a.std() < 0.12  # z·C/E[m] = 0.1
    for seed in range(16):
        for rnd in (0, 1):
            assert not np.allclose(a, noise(seeded_generators(seed)(rnd)))
            assert not np.allclose(a, noise(np.random.default_rng([seed, 7919, rnd])))  # the old derivation
    np.testing.assert_array_equal(noise(seeded_generators(3)(2)), noise(seeded_generators(3)(2)))


def test_no_production_path_reseeds_torchs_global_generator(tiny_encoder_dir):
    import torch

    from fedpref.model.backbone import load_backbone
    from fedpref.model.preference import build_model

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_model(load_backbone(tiny_encoder_dir), AdapterSpec(rank=2))
    assert torch.equal(torch.rand(3), expected)  # building a model left the global stream where it was


# --- the device's own terms ------------------------------------------------------------------

@pytest.mark.parametrize("ask, reason", [
    (dict(dp_noise_multiplier=0.5), "below this device's floor"),
    (dict(dp_max_grad_norm=5.0), "above this device's ceiling"),
])
def test_a_round_asking_less_than_the_device_terms_is_declined_before_training(device, tmp_path, ask, reason):
    rt, user, cache = device
    state = DeviceState(tmp_path / "d")
    with pytest.raises(DeclinedRound, match=reason):
        train_round(rt, user, state, _request(rt, **ask), cache=cache, terms=DeviceTerms(min_noise_multiplier=1.0))
    assert not state.accountant_path.exists() and not (state.root / "adapters" / PRIVATE_ADAPTER).exists()


def test_the_device_budget_is_its_own_whatever_the_server_caps(device, tmp_path):
    rt, user, cache = device
    state = DeviceState(tmp_path / "d")
    terms = DeviceTerms(min_noise_multiplier=1.0, max_epsilon_sample=7.0)  # 4 steps at q = 1/4: ε 4.9, 6.3, 7.3
    rounds = 0
    with pytest.raises(DeclinedRound, match="device budget"):
        for rnd in range(1, 50):
            train_round(rt, user, state, _request(rt, server_round=rnd, max_epsilon_sample=math.inf), cache=cache, terms=terms)
            rounds += 1
    assert rounds == 2
    assert state.accountant().epsilon(terms.delta) <= 7.0  # never past the device's own budget


@pytest.mark.parametrize("field, value", [
    ("dp_noise_multiplier", float("nan")), ("dp_noise_multiplier", float("inf")), ("clip_norm", float("nan")),
    ("clip_norm", float("inf")), ("max_epsilon_sample", float("nan")), ("dp_max_grad_norm", float("nan")),
    ("delta", 2.0), ("local_epochs", 0), ("learning_rate", float("-inf")),
])
def test_a_round_config_with_nan_inf_or_out_of_range_numbers_is_refused_on_receipt(device, field, value):
    from fedpref.client.app import parse_request

    rt, _, _ = device
    content = train_request(get_arrays(rt.model, Group.SHARED), _round_config(), None)
    content.config_records["config"][field] = value
    with pytest.raises(DataError, match=field):
        TrainRequest.from_content(content)
    with pytest.raises(DeclinedRound, match="malformed round request"):
        parse_request(content)


@pytest.mark.parametrize("version", [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1])
def test_a_round_of_another_protocol_version_is_declined_before_anything_is_charged(device, tmp_path, version):
    """The version is checked first: on receipt (whatever other fields that version has) and
    again by train_round, before the policy, the terms and the charge."""
    from fedpref.client.app import parse_request

    rt, user, cache = device
    content = train_request(get_arrays(rt.model, Group.SHARED), _round_config(), None)
    content.config_records["config"]["protocol_version"] = version
    del content.config_records["config"]["policy_version"]
    with pytest.raises(DeclinedRound, match=f"protocol version {version} != {PROTOCOL_VERSION}"):
        parse_request(content)
    state = DeviceState(tmp_path / "d")
    req = TrainRequest(shared=get_arrays(rt.model, Group.SHARED), config=_round_config(protocol_version=version),
                       envelope=None)
    with pytest.raises(DeclinedRound, match=f"protocol version {version} unsupported"):
        train_round(rt, user, state, req, cache=cache, terms=DeviceTerms())
    assert not state.accountant_path.exists() and not (state.root / "adapters" / PRIVATE_ADAPTER).exists()


@pytest.mark.parametrize("bad", [dict(min_noise_multiplier=0.0), dict(min_noise_multiplier=float("nan")),
                                 dict(max_grad_norm=float("inf")), dict(max_epsilon_sample=float("nan")),
                                 dict(delta=0.0), dict(delta=float("nan"))])
def test_device_terms_reject_no_dp_nan_and_out_of_range(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        DeviceTerms(**bad)


def test_a_deployed_device_declines_a_run_that_asks_for_seeded_noise():
    from flwr.app import Context, RecordDict

    from fedpref.client.app import NODE_CONFIG_KEY, train_for_node
    from fedpref.protocol.runconfig import from_run_config

    run = from_run_config({"deterministic-noise": True})
    ctx = Context(run_id=1, node_id=1, node_config={NODE_CONFIG_KEY: "/nonexistent"}, state=RecordDict(), run_config={})
    with pytest.raises(DeclinedRound, match="seeded DP noise"):
        train_for_node(run, ctx, None)  # type: ignore[arg-type]  # refused before the request is read


# --- what leaves the device ------------------------------------------------------------------

def test_metrics_leave_only_when_asked_and_allowed(device, tmp_path):
    rt, user, cache = device
    cases = {(True, True): True, (True, False): False, (False, True): False}
    for i, ((asked, allowed), sent) in enumerate(cases.items()):
        content = train_round(rt, user, DeviceState(tmp_path / str(i)), _request(rt, report_metrics=asked), cache=cache,
                              terms=DeviceTerms(share_metrics=allowed))
        assert (K_METRICS in content.metric_records) is sent
        reply = TrainReply.from_content(content)
        assert (reply.metrics is not None) is sent
        if sent:
            assert set(reply.metrics.as_dict()) >= {"train_loss", "epsilon_sample", "eval_accuracy"}
            assert "num-examples" not in content.metric_records[K_METRICS]  # no claim of data size


# --- crash ordering --------------------------------------------------------------------------

class _Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["during_training", "save_private", "received_global", "reply"])
def test_a_crash_at_any_step_after_the_charge_never_under_counts(device, tmp_path, monkeypatch, step):
    """Fault injection: the round's steps are on disk (fsynced) before training starts, so a
    crash during training, while saving the adapter, or before the reply leaves the accountant
    at least at what the trained adapter embodies."""
    import fedpref.client.device as device_mod
    from fedpref.common.accounting import SampleLevelAccountant

    rt, user, cache = device
    state = DeviceState(tmp_path / "d")
    req = _request(rt)
    planned = req.config.local_epochs * math.ceil(len(user.train) / req.config.batch_size)
    if step == "during_training":
        monkeypatch.setattr(device_mod, "train_pairs", lambda *a, **k: (_ for _ in ()).throw(_Crash()))
    elif step == "reply":
        monkeypatch.setattr(device_mod, "train_reply", lambda *a, **k: (_ for _ in ()).throw(_Crash()))
    else:
        monkeypatch.setattr(DeviceState, step, lambda *a, **k: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        train_round(rt, user, state, req, cache=cache, terms=DeviceTerms())
    on_disk = SampleLevelAccountant.load(state.accountant_path)
    assert sum(t for _, _, t in on_disk.history) == planned
    if step in ("during_training", "save_private"):
        assert not (state.root / "adapters" / PRIVATE_ADAPTER).exists()  # nothing trained was written


def test_the_charge_is_saved_before_training_starts(device, tmp_path, monkeypatch):
    import fedpref.client.device as device_mod

    rt, user, cache = device
    state = DeviceState(tmp_path / "d")
    seen: list[int] = []
    real = device_mod.train_pairs

    def spy(*a, **k):
        seen.append(sum(t for _, _, t in json.loads(state.accountant_path.read_text())["history"]))
        return real(*a, **k)

    monkeypatch.setattr(device_mod, "train_pairs", spy)
    train_round(rt, user, state, _request(rt), cache=cache, terms=DeviceTerms())
    assert seen and seen[0] > 0
    assert sum(t for _, _, t in state.accountant().history) == seen[0]  # nothing added after training


# --- deployment never seeds ------------------------------------------------------------------

@pytest.mark.parametrize("config", [{"runtime": {"deterministic_noise": True}}, {"runtime": {"seed": 7}},
                                    {"deterministic-noise": True}])
def test_the_server_cli_refuses_a_seeded_mode(config):
    from fedpref.server.deploy import refuse_seeded

    with pytest.raises(ConfigError, match="simulation switch"):
        refuse_seeded(config, where="ops/config.toml")
    refuse_seeded({"federation": {"rounds": 3}, "deterministic-noise": False}, where="ops/config.toml")  # off is fine


def test_an_agent_home_refuses_seeded_settings_and_loads_its_terms(tmp_path):
    from fedpref.client.agent_home import AGENT_FILE, AgentHome

    (tmp_path / AGENT_FILE).write_text('[agent]\nserver = "h:1"\nca = "ca.pem"\n\n[terms]\nmin_noise_multiplier = 2.0\n')
    home = AgentHome.load(tmp_path)
    assert home.terms == DeviceTerms(min_noise_multiplier=2.0)
    for extra in ('[agent]\nserver = "h:1"\nca = "ca.pem"\ndeterministic_noise = true\n',
                  '[agent]\nserver = "h:1"\nca = "ca.pem"\n[runtime]\nseed = 1\n'):
        (tmp_path / AGENT_FILE).write_text(extra)
        with pytest.raises(ConfigError, match="OS CSPRNG"):
            AgentHome.load(tmp_path)
    (tmp_path / AGENT_FILE).write_text('[agent]\nserver = "h:1"\nca = "ca.pem"\n[terms]\nmin_noise_multiplier = 0.0\n')
    with pytest.raises(ConfigError, match="min_noise_multiplier"):
        AgentHome.load(tmp_path)


def test_device_generators_carry_a_full_random_state_not_a_32_bit_seed():
    """torch's manual_seed keeps only 32 bits of a seed (a server could search 2**32 noise
    streams); a device's generator gets its whole MT19937 state from the OS CSPRNG instead.
    A state from any 32-bit seed satisfies MT's init recurrence word by word; a random one
    does not (probability 2**-32 per word)."""
    import torch

    from fedpref.client.trainer import generator

    def words(g):
        return g.get_state().numpy()[24:24 + 8 * 624].view("<u8").astype(np.uint64)

    def follows_init(w):
        prev, nxt = int(w[0]), int(w[1])
        return nxt == (1812433253 * (prev ^ (prev >> 30)) + 1) & 0xFFFFFFFF

    seeded = torch.Generator().manual_seed(2**40 + 5)
    assert follows_init(words(seeded))  # the control: a manual seed, of whatever width, is 32 bits
    assert torch.equal(torch.randn(4, generator=seeded), torch.randn(4, generator=torch.Generator().manual_seed(5)))
    fresh = [generator(None) for _ in range(3)]
    for g in fresh:
        w = words(g)
        assert not follows_init(w) and len(set(w.tolist())) > 600
    draws = [torch.randn(8, generator=g) for g in fresh]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(torch.randn(4, generator=generator(9)), torch.randn(4, generator=generator(9)))  # simulations repeat


# --- SecAgg+: a device does not hand one device's secrets to a deviating server ----------------

def _secagg_msg(configs: dict):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return Message(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), dst_node_id=1,
                   message_type=MessageType.TRAIN)


def test_secagg_guard_refuses_a_minority_threshold_and_both_secrets_of_one_node(flower_task):
    from flwr.app import Context, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    from fedpref.client.secagg import secagg_guard

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    passed = []

    def nxt(msg, context):
        passed.append(msg)
        return "ok"

    def stage(name, **kw):
        return _secagg_msg({Key.STAGE: name, **kw})

    with pytest.raises(DeclinedRound, match="not a majority"):
        secagg_guard(stage(Stage.SETUP, **{Key.SHARE_NUMBER: 4, Key.THRESHOLD: 2}), ctx, nxt)
    assert secagg_guard(stage(Stage.SETUP, **{Key.SHARE_NUMBER: 4, Key.THRESHOLD: 3}), ctx, nxt) == "ok"
    with pytest.raises(DeclinedRound, match="both secrets"):  # node 7 alive and dropped in one request
        secagg_guard(stage(Stage.UNMASK, **{Key.ACTIVE_NODE_ID_LIST: [5, 7], Key.DEAD_NODE_ID_LIST: [7]}), ctx, nxt)
    assert secagg_guard(stage(Stage.UNMASK, **{Key.ACTIVE_NODE_ID_LIST: [5, 7], Key.DEAD_NODE_ID_LIST: [9]}), ctx, nxt) == "ok"
    with pytest.raises(DeclinedRound, match="both secrets"):  # ... or across two requests of the round
        secagg_guard(stage(Stage.UNMASK, **{Key.ACTIVE_NODE_ID_LIST: [5], Key.DEAD_NODE_ID_LIST: [7]}), ctx, nxt)
    assert len(passed) == 2
    # a new round (setup) starts afresh
    assert secagg_guard(stage(Stage.SETUP, **{Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2}), ctx, nxt) == "ok"
    assert secagg_guard(stage(Stage.UNMASK, **{Key.ACTIVE_NODE_ID_LIST: [5], Key.DEAD_NODE_ID_LIST: [7]}), ctx, nxt) == "ok"


def test_global_weights_that_are_not_finite_bounded_float32_are_declined(device, tmp_path):
    rt, user, cache = device
    for bad in (np.nan, 1e6):
        req = _request(rt)
        k = next(iter(req.shared))
        req.shared[k] = req.shared[k].copy()
        req.shared[k].flat[0] = bad
        with pytest.raises(DeclinedRound, match="malformed round request"):
            train_round(rt, user, DeviceState(tmp_path / str(bad)), req, cache=cache, terms=DeviceTerms())


def test_a_failure_on_the_device_reaches_the_server_as_a_constant_reason(flower_task, tmp_path):
    from flwr.app import Context, Message, RecordDict

    from fedpref.client.app import DEVICE_ERROR_REASON, NODE_CONFIG_KEY, handle_train

    secret_home = tmp_path / "alice-private-home"
    content = train_request({"k": np.zeros(2, np.float32)}, _round_config(), None)
    msg = Message(content=content, dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={NODE_CONFIG_KEY: str(secret_home)}, state=RecordDict(), run_config={})
    reply = handle_train(msg, ctx, {})
    assert reply.has_error() and reply.error.reason == DEVICE_ERROR_REASON
    assert "alice" not in reply.error.reason


def test_two_rounds_charging_at_once_both_count(tmp_path, monkeypatch):
    """Flower can run two rounds (two runs) on one device at once: the accountant's load, check
    and save are one step under a lock, so neither charge is lost (without the lock the slow
    save below makes the second load miss the first charge)."""
    import threading
    import time

    from fedpref.client.device import charge_before_training
    from fedpref.client.trainer import LocalTrainConfig

    local = LocalTrainConfig(epochs=1, batch_size=4, learning_rate=0.1, head_learning_rate=0.1,
                             projection_learning_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0)
    state = DeviceState(tmp_path / "d")
    real_save = DeviceState.save_accountant
    monkeypatch.setattr(DeviceState, "save_accountant", lambda self, acct: (time.sleep(0.3), real_save(self, acct)))
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def charge():
        start.wait()
        try:
            charge_before_training(state, local, 16, max_epsilon=math.inf, delta=1e-5)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=charge) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(t for _, _, t in state.accountant().history) == 2 * local.steps(16)


def test_a_lost_accountant_next_to_a_trained_adapter_fails_closed(device, tmp_path):
    from fedpref.common.errors import IntegrityError

    rt, user, cache = device
    state = DeviceState(tmp_path / "d")
    train_round(rt, user, state, _request(rt), cache=cache, terms=DeviceTerms())
    state.accountant_path.unlink()
    with pytest.raises(IntegrityError, match="accountant does not"):
        train_round(rt, user, state, _request(rt, server_round=2), cache=cache, terms=DeviceTerms())
