import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedpref.common.errors import DataError
from fedpref.protocol.messages import (
    PROTOCOL_VERSION,
    Attestation,
    RoundConfig,
    TrainMetrics,
    TrainReply,
    TrainRequest,
    record_to_arrays,
    train_reply,
    train_request,
)


def _cfg(**kw):
    base = dict(server_round=3, protocol_version=PROTOCOL_VERSION, local_epochs=2, batch_size=16, learning_rate=0.05,
                head_learning_rate=0.5, projection_learning_rate=0.05, clip_norm=1.0, dp_noise_multiplier=1.1, dp_max_grad_norm=1.0, delta=1e-5,
                max_epsilon_sample=math.inf, train_shared=True, train_private=True, policy_version=2)
    base.update(kw)
    return RoundConfig(**base)


def test_round_config_roundtrip():
    cfg = _cfg()
    assert RoundConfig.from_record(cfg.to_record()) == cfg


def test_train_request_roundtrip_with_and_without_envelope():
    shared = {"a.lora_A.shared.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    for env in (None, b"\x00envelope"):
        req = TrainRequest.from_content(train_request(shared, _cfg(), env))
        assert req.config == _cfg()
        assert req.envelope == env
        assert list(req.shared) == list(shared)
        for k in shared:
            np.testing.assert_array_equal(req.shared[k], shared[k])


def test_train_reply_roundtrip():
    delta = {"x": np.full((3,), 0.25, np.float32)}
    metrics = TrainMetrics(train_loss=0.6, train_accuracy=0.7, epsilon_sample=1.5,
                           delta_norm=0.4, steps=5, seconds=0.1)
    att = Attestation(protocol_version=PROTOCOL_VERSION, server_round=3, frozen_identity="ab" * 32, policy_version=2, safety_digest="cd" * 32)
    reply = TrainReply.from_content(train_reply(delta, metrics, att))
    assert reply.metrics == metrics
    assert reply.attestation == att
    np.testing.assert_array_equal(record_to_arrays(reply.delta)["x"], delta["x"])


def test_a_reply_of_the_previous_wire_format_is_refused_for_its_protocol_version():
    """Protocol 1 sent the attestation's frozen weights as ``backbone_sha256``; renaming it to
    ``frozen_identity`` bumped the version, so a device of that release declines the round
    (its own version check, before it charges anything) and a reply of it is refused as another
    protocol version, not as a malformed attestation."""
    assert PROTOCOL_VERSION > 1 and _cfg().protocol_version == PROTOCOL_VERSION  # what a v1 device refuses
    old = ConfigRecord({"protocol_version": 1, "server_round": 3, "backbone_sha256": "b" * 64,
                        "policy_version": 1, "safety_digest": "d" * 64})
    content = RecordDict({"delta": train_reply({"x": np.zeros(2, np.float32)}, None, Attestation(
        PROTOCOL_VERSION, 3, "a" * 64, 1, "d" * 64)).array_records["delta"], "attestation": old})
    with pytest.raises(DataError, match=r"^Attestation: protocol version 1 != 2 \(the sender runs an older fedpref"):
        TrainReply.from_content(content)
    newer = _cfg().to_record()
    newer["protocol_version"] = PROTOCOL_VERSION + 1
    del newer["policy_version"]  # another version may add, drop or rename fields: the version is named first
    with pytest.raises(DataError, match="protocol version 3 != 2"):
        RoundConfig.from_record(newer)


def test_reply_missing_record_is_a_data_error():
    with pytest.raises(DataError, match="lacks record"):
        TrainReply.from_content(RecordDict({"metrics": ConfigRecord({})}))


def test_wrong_type_in_config_is_named():
    rec = _cfg().to_record()
    rec["local_epochs"] = "two"
    with pytest.raises(DataError, match="local_epochs"):
        RoundConfig.from_record(rec)


def test_request_survives_flower_message(flower_task):
    content = train_request({"k": np.zeros(2, np.float32)}, _cfg(), b"env")
    msg = Message(content=content, dst_node_id=7, message_type="train")
    assert TrainRequest.from_content(msg.content).envelope == b"env"


def test_run_config_paths_and_run_id(tmp_path):
    from fedpref.protocol.runconfig import APP_ROOT, Method, from_run_config

    run = from_run_config({"data": "simulations/data/persona-small.jsonl", "workdir": "~/x/{run_id}", "method": "aggregated"}, run_id=42)
    assert run.data == APP_ROOT / "simulations" / "data" / "persona-small.jsonl" and run.data.is_file()
    assert run.workdir.name == "42" and run.workdir.is_absolute() and "~" not in str(run.workdir)
    assert run.method is Method.AGGREGATED
    with pytest.raises(Exception, match="personalized"):
        from_run_config({"data": "d.jsonl", "method": "local"})


@pytest.mark.parametrize("bad", [-1, True, 2.5, "8"])
def test_run_config_population_is_a_count(bad):
    from fedpref.common.errors import ConfigError
    from fedpref.protocol.runconfig import from_run_config

    assert from_run_config({}).population == 0
    assert from_run_config({"population": 1000}).population == 1000
    with pytest.raises(ConfigError, match="population"):
        from_run_config({"population": bad})


def test_the_population_raises_the_nodes_a_server_waits_for_never_lowers_them():
    import dataclasses

    from fedpref.protocol.runconfig import from_run_config
    from fedpref.server.app import load_server_settings, settings_for_run

    base = load_server_settings("")
    need = base.federation.min_available_clients
    assert settings_for_run(from_run_config({}), base) == base
    assert settings_for_run(from_run_config({"population": 500}), base).federation.min_available_clients == 500
    assert settings_for_run(from_run_config({"population": 1}), base).federation.min_available_clients == need
    more = settings_for_run(from_run_config({"population": 50, "rounds": 7}), base).federation
    assert (more.min_available_clients, more.rounds) == (50, 7)
    assert dataclasses.replace(more, min_available_clients=need, rounds=base.federation.rounds) == base.federation
