"""One Ray instance for consecutive federations (``engine.ray_session``, what ``fedpref-sim run``
opens around its federations): the second run goes on the first run's Ray node and actor
processes, yet computes exactly what a run on a fresh Ray does, even when a file a cache is keyed
by (the config path) now holds something else; a failed or interrupted run, and leaving the
session, end Ray."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

from fedpref.common.errors import SimulationRuntimeError
from fedpref.simulations import engine

CONFIG = """
[model]
backbone = "{backbone}"
max_length = 96

[model.adapter]
rank = {rank}
personal_dims = 2

[federation]
rounds = 1
client_sample_rate = 1.0
clip_norm = 1.0
server_noise_multiplier = 0.5
min_available_clients = 4
round_timeout_s = 300

[local]
epochs = 1
batch_size = 8
dp_noise_multiplier = 0.5
"""


# -- without Ray ------------------------------------------------------------------------------------

def test_another_flower_release_fails_closed_with_a_clear_error():
    engine.check_flower_for_reuse(engine.REUSE_TESTED_FLWR)  # the pinned one passes
    with pytest.raises(SimulationRuntimeError, match=r"flwr 1\.99\.0 is installed.*flwr==1\.42\.0"):
        engine.check_flower_for_reuse("1.99.0")


def test_a_new_run_in_a_reused_process_clears_every_fedpref_cache(monkeypatch):
    from fedpref.client import app, device

    monkeypatch.setattr(engine, "_WORKER_RUN", None)
    calls = []

    @functools.lru_cache(maxsize=1)
    def keyed_by_path(path: str) -> int:
        calls.append(path)
        return len(calls)

    monkeypatch.setattr(app, "keyed_by_path", keyed_by_path, raising=False)
    keyed_by_path.__module__ = app.__name__
    assert engine.enter_run("run-1") == []  # a fresh process: nothing to forget
    assert keyed_by_path("cfg.toml") == 1
    assert engine.enter_run("run-1") == []  # the same run: caches kept
    assert keyed_by_path("cfg.toml") == 1
    cleared = engine.enter_run("run-2")  # the next run in this process
    assert {"fedpref.client.app.keyed_by_path", "fedpref.client.app._model_config", "fedpref.client.app._users",
            "fedpref.client.app._trust_root", "fedpref.client.app._shared_cache",
            "fedpref.client.device.get_runtime"} <= set(cleared)
    assert device.get_runtime.cache_info().currsize == 0
    assert keyed_by_path("cfg.toml") == 2  # read again, not the previous run's value


def test_the_backend_swap_is_undone_whatever_happens():
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    with pytest.raises(KeyboardInterrupt):
        with engine._session_backend():
            assert raybackend.RayBackend is not original and issubclass(raybackend.RayBackend, original)
            raise KeyboardInterrupt
    assert raybackend.RayBackend is original


# -- on Ray -----------------------------------------------------------------------------------------

def _federate(out, name, *, data, cfg, policy_kit, policy: bool):
    from fedpref.protocol.runconfig import Method
    from fedpref.simulations.config import RuntimeConfig

    engine.run_on_simulation_engine(
        method=Method.PERSONALIZED, num_users=4, data=data, workdir=out / name, config_file=cfg, cache=None,
        runtime=RuntimeConfig(client_cpus=1.0, seed=5),
        policy=policy_kit.dir / "policy-v1.dsse.json" if policy else None, root=policy_kit.root_path if policy else None,
    )
    return out / name


def _actor_pids(session) -> list[int]:
    import ray

    return sorted(ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in session.pool.pool]))


def _private_adapters(work) -> dict[str, dict[str, bytes]]:
    """Each user's private adapter, tensor by tensor (the file's header order varies from save to save)."""
    from safetensors.numpy import load_file

    return {p.parent.parent.parent.name: {k: v.tobytes() for k, v in load_file(p).items()}
            for p in sorted((work / "clients").glob("*/adapters/private/adapter_model.safetensors"))}


@pytest.mark.slow  # three federations on Ray
def test_consecutive_federations_share_ray_and_actors_and_compute_what_fresh_ones_do(policy_kit, tmp_path, monkeypatch):
    import json

    import ray
    from flwr.server.superlink.fleet.vce import vce_api

    from fedpref.simulations import dispatch

    flower_poll, handed = vce_api.add_messages_to_queue, []

    def spy(state, node_ids):  # noqa: ANN001, ANN202 - the real poll, its messages counted
        got = real_take(state, node_ids)
        handed.extend(got)
        return got

    real_take = dispatch.take_undelivered
    monkeypatch.setattr(dispatch, "take_undelivered", spy)

    from fedpref.client.data import write_jsonl
    from fedpref.simulations.persona import CommunitySpec, PersonaConfig, generate

    comms = (CommunitySpec("a", 0.5, (1.0,) * 8, -5.0), CommunitySpec("b", 0.5, (-1.0,) * 8, 5.0))
    data = tmp_path / "persona.jsonl"
    write_jsonl(generate(PersonaConfig(users=4, pairs_per_user=24, seed=1, communities=comms)).pairs, data)
    cfg = tmp_path / "cfg.toml"
    assert not ray.is_initialized()
    with engine.ray_session() as session:
        cfg.write_text(CONFIG.format(backbone=policy_kit.backbone, rank=2))
        first = _federate(tmp_path, "first", data=data, cfg=cfg, policy_kit=policy_kit, policy=True)
        assert ray.is_initialized()  # kept for the next run
        node, actors, pids = ray.get_runtime_context().get_node_id(), session.actor_ids, _actor_pids(session)
        assert len(actors) == len(pids) == int(ray.cluster_resources()["CPU"])
        # the same config path now holds another model (rank 4): a process that kept the first
        # run's config, runtime or safety module would train the wrong model and be declined
        cfg.write_text(CONFIG.format(backbone=policy_kit.backbone, rank=4))
        second = _federate(tmp_path, "second", data=data, cfg=cfg, policy_kit=policy_kit, policy=False)
        assert (session.runs, session.reused) == (2, 1)
        assert ray.get_runtime_context().get_node_id() == node  # one Ray instance
        assert session.actor_ids == actors and _actor_pids(session) == pids  # the same actor processes
    assert not ray.is_initialized()  # the session ended Ray

    fresh = _federate(tmp_path, "fresh", data=data, cfg=cfg, policy_kit=policy_kit, policy=False)  # a fresh Ray
    assert not ray.is_initialized()  # without a session, Flower's backend ends Ray after the run, as before

    for work, policy_version in ((first, 1), (second, 0), (fresh, 0)):
        (hist,) = json.loads((work / "server" / "history.json").read_text())
        assert hist["accepted"] == 4 and not hist["rejected"] and not hist["declined"], hist
        for uid_dir in (work / "clients").iterdir():
            state = uid_dir / "policy" / "state.json"
            assert (json.loads(state.read_text())["version"] if state.exists() else 0) == policy_version
    # every message of the three runs (one round of 4 devices each) went through fedpref's
    # dispatcher, once, and Flower's own poll is back in place after the runs
    assert len(handed) == 3 * 4 and len(set(map(id, handed))) == 12 and vce_api.add_messages_to_queue is flower_poll
    # seeded DP noise and batches: each device's round on a reused actor is bit for bit a fresh one's
    assert _private_adapters(second) == _private_adapters(fresh) and len(_private_adapters(fresh)) == 4
    assert _private_adapters(second) != _private_adapters(first)  # (rank 2 vs 4: the comparison can fail)


@pytest.mark.slow  # starts Ray
@pytest.mark.parametrize("error", [RuntimeError("Simulation Runtime crashed"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_run_ends_ray(error, monkeypatch, tmp_path):
    import ray

    from fedpref.client.app import SimulatedDevices
    from fedpref.protocol.runconfig import Method
    from fedpref.simulations.config import RuntimeConfig

    def crash(**kwargs):
        assert ray.is_initialized()
        raise error

    monkeypatch.setattr(engine, "_run_simulation", crash)
    with pytest.raises(type(error)):
        with engine.ray_session() as session:
            with pytest.raises(type(error)):
                engine.run_on_simulation_engine(
                    method=Method.AGGREGATED, num_users=2, data=tmp_path / "none.jsonl", workdir=tmp_path / "w",
                    config_file=tmp_path / "none.toml", cache=None, runtime=RuntimeConfig(),
                    devices=SimulatedDevices())
            assert not ray.is_initialized() and session.pool is None  # the failed run ended Ray at once
            raise error  # and the session, left by the same error, stays clean
    assert not ray.is_initialized()


@pytest.mark.slow  # two federations on Ray
def test_a_seeded_run_that_samples_repeats_bit_for_bit(policy_kit, tmp_path):
    """Same config, same numbers, with q < 1 too: Flower draws new node ids every run, and the
    server samples in the users' order (server.strategy.sampling_order), not by those ids."""
    import json

    from safetensors.numpy import load_file

    from fedpref.client.data import write_jsonl
    from fedpref.simulations.persona import CommunitySpec, PersonaConfig, generate

    comms = (CommunitySpec("a", 0.5, (1.0,) * 8, -5.0), CommunitySpec("b", 0.5, (-1.0,) * 8, 5.0))
    data = tmp_path / "persona.jsonl"
    write_jsonl(generate(PersonaConfig(users=8, pairs_per_user=16, seed=1, communities=comms)).pairs, data)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.format(backbone=policy_kit.backbone, rank=2).replace(
        "rounds = 1\nclient_sample_rate = 1.0", "rounds = 2\nclient_sample_rate = 0.5").replace(
        "min_available_clients = 4", "min_available_clients = 2"))
    from fedpref.protocol.runconfig import Method
    from fedpref.simulations.config import RuntimeConfig

    works = []
    with engine.ray_session():
        for name in ("one", "two"):
            engine.run_on_simulation_engine(
                method=Method.AGGREGATED, num_users=8, data=data, workdir=tmp_path / name, config_file=cfg, cache=None,
                runtime=RuntimeConfig(client_cpus=1.0, seed=5))
            works.append(tmp_path / name / "server")
    hist = [[(r["sampled"], r["accepted"], r["update_norm"]) for r in json.loads((w / "history.json").read_text())]
            for w in works]
    assert hist[0] == hist[1] and len(hist[0]) == 2 and all(0 < s < 8 for s, _, _ in hist[0]), hist
    released = [load_file(w / "checkpoints" / "round-0002" / "adapter_model.safetensors") for w in works]
    assert released[0].keys() == released[1].keys()
    assert all(np.array_equal(released[0][k], released[1][k]) for k in released[0])


def test_the_server_samples_from_every_virtual_device_even_when_they_register_late(policy_kit, tmp_path, monkeypatch):
    """Flower starts the ServerApp before the engine registers its nodes. With nodes that register
    slowly, a server that waited only for min_available_clients (2 here) would sample from the first
    few; the simulation's run config carries the population, and the server waits for all 8."""
    import json
    import time

    from flwr.server.superlink.fleet.vce import vce_api

    from fedpref.client.data import write_jsonl
    from fedpref.protocol.runconfig import Method
    from fedpref.simulations.config import RuntimeConfig
    from fedpref.simulations.persona import PersonaConfig, generate

    register = vce_api._register_nodes

    def slowly(num_nodes, state_factory):  # noqa: ANN001, ANN202 - two nodes at once, the rest 4 s later
        state = state_factory.state()
        create, made = state.create_node, []

        def create_node(*a, **k):  # noqa: ANN002, ANN003, ANN202
            made.append(1)
            if len(made) == 3:
                time.sleep(4.0)
            return create(*a, **k)

        monkeypatch.setattr(state, "create_node", create_node)
        try:
            return register(num_nodes, state_factory)
        finally:
            monkeypatch.setattr(state, "create_node", create)

    monkeypatch.setattr(vce_api, "_register_nodes", slowly)
    data = tmp_path / "persona.jsonl"
    write_jsonl(generate(PersonaConfig(users=8, pairs_per_user=16, seed=1)).pairs, data)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.format(backbone=policy_kit.backbone, rank=2).replace(
        "min_available_clients = 4", "min_available_clients = 2"))
    with engine.ray_session():
        engine.run_on_simulation_engine(
            method=Method.AGGREGATED, num_users=8, data=data, workdir=tmp_path / "run", config_file=cfg, cache=None,
            runtime=RuntimeConfig(client_cpus=1.0, seed=5))
    hist = json.loads((tmp_path / "run" / "server" / "history.json").read_text())
    assert [(r["population"], r["sampled"]) for r in hist] == [(8, 8)]
