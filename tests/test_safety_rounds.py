"""The safety policy in use: classifier, frozen module, ranking bound, distribution in rounds,
attestation, and the tampered client. Everything is real: a classifier trained on the 2-block
MiniLM, Ed25519 signatures, the device's policy store, the server strategy."""

import dataclasses
import json
from datetime import timedelta

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict

from fedpref.client.data import PreferencePair, Split, UserData
from fedpref.client.device import DeviceState, PolicyRefused, enforce_policy, get_runtime, train_round
from fedpref.client.terms import DeviceTerms
from fedpref.client.trainer import trainable_groups
from fedpref.common.errors import DataError
from fedpref.model.backbone import embed_texts, load_backbone
from fedpref.model.cache import TextCache
from fedpref.model.config import ModelConfig
from fedpref.model.preference import AdapterSpec, build_model, check_partition, get_arrays
from fedpref.protocol.messages import (
    PROTOCOL_VERSION,
    Attestation,
    RoundConfig,
    TrainMetrics,
    TrainReply,
    TrainRequest,
    arrays_to_record,
    train_reply,
    train_request,
)
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group, group_of
from fedpref.safety_policy import PolicyError, load_root, verify_envelope
from fedpref.safety_policy.classifier import (
    SafetyModule,
    attach,
    attached,
    frozen_pooled,
    load_labelled_jsonl,
    train_classifier,
)
from fedpref.safety_policy.ranking import BoundedRanker, order_bounded
from fedpref.server.app import load_server_policy
from fedpref.server.config import FederationConfig, LocalConfig
from fedpref.server.privacy import AccountantKind, PrivacyLedger, UserLevelBudget
from fedpref.server.release import seeded_generators
from fedpref.server.strategy import FedPrefStrategy

# --- the labelled corpus -----------------------------------------------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('{"category": "safe"}', 'field "text"'),
        ('{"text": "x", "category": "safe", "safe": true}', "exactly one"),
        ('{"text": "x", "safe": false}', '"safe" must be true'),
        ('{"text": "x", "category": 3}', 'field "category"'),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_labelled_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "labels.jsonl"
    good = "".join(json.dumps({"text": f"ok {i}", "category": c}) + "\n" for c in ("safe", "fraud") for i in range(5))
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        load_labelled_jsonl(path)
    assert str(e.value).startswith(f"{path}:12:") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_labelled_jsonl_needs_safe_examples_and_enough_per_class(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "category": "fraud"}) + "\n" for i in range(9)))
    with pytest.raises(DataError, match='no "safe" examples'):
        load_labelled_jsonl(path)
    path.write_text("".join(json.dumps({"text": f"t{i}", "safe": True}) + "\n" for i in range(9))
                    + json.dumps({"text": "x", "category": "fraud"}) + "\n")
    with pytest.raises(DataError, match="'fraud' has 1 example"):
        load_labelled_jsonl(path)


def test_classifier_separates_and_round_trips():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 3
    x = np.concatenate([c + rng.normal(size=(50, 16)) for c in centers]).astype(np.float32)
    labels = ["safe"] * 50 + ["fraud"] * 50 + ["self_harm"] * 50 + ["violence"] * 50
    module, report = train_classifier(x, labels)
    assert module.labels == ("safe", "fraud", "self_harm", "violence")
    assert report["validation"]["accuracy"] > 0.95
    assert all(not p.requires_grad for p in module.parameters())
    clone = SafetyModule.from_bytes(module.to_bytes(), module.labels)
    assert clone.digest() == module.digest()
    with torch.no_grad():
        clone.linear.weight[0, 0] += 1e-3
    assert clone.digest() != module.digest()


# --- the policy on a model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def kit_model(policy_kit):
    backbone = load_backbone(policy_kit.backbone)
    model = build_model(backbone, AdapterSpec(rank=2, personal_dims=4))
    root = load_root(policy_kit.root, now=policy_kit.now)
    policy = verify_envelope(policy_kit.envelopes[1], root, last_version=0, now=policy_kit.now)
    attach(model, SafetyModule.from_policy(policy))
    return backbone, model, policy


def test_safety_module_is_frozen_and_outside_every_adapter(kit_model):
    _, model, _ = kit_model
    names = [n for n, _ in model.named_parameters() if group_of(n) is Group.SAFETY]
    assert names and all("safety_module" in n for n in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in names)
    check_partition(model)  # nothing trainable outside shared/private
    assert not any(n in names for ns in trainable_groups(model).values() for n in ns)
    assert not any("lora" in n for n in names)


def test_frozen_pooled_ignores_adapters_and_equals_the_bare_backbone(kit_model, policy_kit):
    backbone, model, _ = kit_model
    texts = [json.loads(line)["text"] for line in policy_kit.corpus.read_text().splitlines()[:12]]
    with torch.no_grad():  # make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    cache = TextCache.build(model, backbone, texts, max_length=96)
    got = frozen_pooled(model, cache, texts).numpy()
    fresh = load_backbone(policy_kit.backbone)
    want = embed_texts(fresh, texts, max_length=96)
    np.testing.assert_allclose(got, want, atol=1e-5)
    ids, mask, rep = cache.batch(texts)
    with torch.no_grad():
        adapted = model.base_model.model.pooled(ids, mask, rep).numpy()
    assert not np.allclose(adapted, want, atol=1e-3)  # the adapters do change the reward path


def test_order_bounded_puts_every_flagged_candidate_below_every_safe_one():
    cands = ["a", "b", "c", "d"]
    scores = [9.0, 1.0, 5.0, -3.0]
    flags = [[("violence", 0.97)], [], [("fraud", 0.6), ("violence", 0.55)], []]
    thr = {"violence": 0.5, "fraud": 0.5}
    out = order_bounded(cands, scores, flags, thresholds=thr, policy_version=3)
    assert [r.candidate for r in out] == ["b", "d", "c", "a"]  # flagged: least risky first (0.6 < 0.97)
    assert [r.allowed for r in out] == [True, True, False, False]
    assert out[3].unsafe_categories == ("violence",) and "violence: p=0.97 >= 0.50 (policy v3)" in out[3].reason
    assert out[2].unsafe_categories == ("fraud", "violence")
    free = order_bounded(cands, scores, flags, thresholds=thr, policy_version=3, enforce=False)
    assert [r.candidate for r in free] == ["a", "c", "b", "d"] and not free[0].allowed


def test_ranker_flags_unsafe_texts_whatever_the_personal_score(kit_model, policy_kit):
    backbone, model, policy = kit_model
    rows = [json.loads(line) for line in policy_kit.corpus.read_text().splitlines()]
    safe = [r["text"] for r in rows if r["category"] == "safe"][:3]
    unsafe = [r["text"] for r in rows if r["category"] != "safe"][:3]
    ranker = BoundedRanker.from_policy(model, backbone, policy, max_length=96)
    with torch.no_grad():  # a user who loves the unsafe texts: personal head along their direction
        feats = frozen_pooled(model, TextCache.build(model, backbone, unsafe + safe, max_length=96), unsafe + safe)
        f = torch.nn.functional.layer_norm(feats, feats.shape[-1:])
        head = model.base_model.model.score.modules_to_save[SHARED_ADAPTER]
        head.weight.copy_((f[:3].mean(0) - f[3:].mean(0))[None] * 10)
    scores, flags = ranker.scores_and_flags(unsafe + safe)
    assert min(scores[:3]) > max(scores[3:])  # personally, unsafe wins
    n_flagged = sum(bool(f) for f in flags[:3])
    assert n_flagged >= 2 and not any(flags[3:])
    ranking = ranker.rank(unsafe + safe)
    allowed = [r.allowed for r in ranking]
    assert allowed == sorted(allowed, reverse=True)  # all safe first
    assert ranking[0].candidate in safe
    assert all(r.reason for r in ranking if not r.allowed)
    unbounded = dataclasses.replace(ranker, enforce=False).rank(unsafe + safe)
    assert unbounded[0].candidate in unsafe


# --- the device in a round ---------------------------------------------------------------


TERMS = DeviceTerms(min_noise_multiplier=0.8)  # the requests below ask σ = 0.8


def _user(policy_kit) -> UserData:
    rows = [json.loads(line) for line in policy_kit.corpus.read_text().splitlines()]
    safe = [r["text"] for r in rows if r["category"] == "safe"]
    pairs = [PreferencePair("u0", "p", safe[2 * i], safe[2 * i + 1], Split.TRAIN if i < 12 else Split.TEST) for i in range(16)]
    return UserData("u0", None, tuple(p for p in pairs if p.split is Split.TRAIN), tuple(p for p in pairs if p.split is Split.TEST))


def _request(rt, *, version: int, envelope: bytes | None, rnd: int = 1) -> TrainRequest:
    cfg = RoundConfig(
        server_round=rnd, protocol_version=PROTOCOL_VERSION, local_epochs=1, batch_size=4, learning_rate=0.05,
        head_learning_rate=0.2, projection_learning_rate=0.1, clip_norm=1.0, dp_noise_multiplier=0.8,
        dp_max_grad_norm=1.0, delta=1e-5, max_epsilon_sample=float("inf"), train_shared=True, train_private=True,
        policy_version=version,
    )
    return TrainRequest.from_content(train_request(get_arrays(rt.model, Group.SHARED), cfg, envelope))


@pytest.fixture
def device(policy_kit, tmp_path):
    rt = get_runtime(ModelConfig(backbone=policy_kit.backbone, adapter=AdapterSpec(rank=2, personal_dims=4)),
                     (SHARED_ADAPTER, PRIVATE_ADAPTER))
    user = _user(policy_kit)
    cache = TextCache.build(rt.model, rt.backbone, [t for p in (*user.train, *user.test) for t in (p.chosen, p.rejected)], max_length=96)
    return rt, user, cache, DeviceState(tmp_path / "u0")


def test_device_installs_verifies_trains_and_attests_the_digest(device, policy_kit):
    rt, user, cache, state = device
    expected = load_server_policy(policy_kit.dir / "policy-v1.dsse.json", policy_kit.root_path,
                                  backbone_sha256=rt.backbone.sha256)
    content = train_round(rt, user, state, _request(rt, version=1, envelope=policy_kit.envelopes[1]), cache=cache,
                          trust_root=policy_kit.root, terms=TERMS)
    att = TrainReply.from_content(content).attestation
    assert att.policy_version == 1 and att.safety_digest == expected.digest
    assert state.policy_store().version == 1
    # next round: no envelope (the server knows the device holds v1), same attestation
    content = train_round(rt, user, state, _request(rt, version=1, envelope=None, rnd=2), cache=cache, trust_root=policy_kit.root, terms=TERMS)
    assert TrainReply.from_content(content).attestation.safety_digest == expected.digest
    assert attached(rt.model).digest() == expected.digest  # unchanged by two rounds of DP-SGD


def test_device_refuses_a_tampered_envelope_and_keeps_the_old_policy(device, policy_kit):
    rt, user, cache, state = device
    enforce_policy(rt, state, required_version=1, envelope=policy_kit.envelopes[1], trust_root=policy_kit.root)
    bad = bytearray(policy_kit.envelopes[2])
    i = bad.index(b'"payload":"') + 40
    bad[i] = ord("A") if bad[i] != ord("A") else ord("B")
    with pytest.raises(PolicyRefused, match="previous policy stays in force"):
        train_round(rt, user, state, _request(rt, version=2, envelope=bytes(bad)), cache=cache, trust_root=policy_kit.root, terms=TERMS)
    assert state.policy_store().version == 1
    assert not (state.root / "adapters" / PRIVATE_ADAPTER).exists()  # refused before any training


def test_device_follows_a_key_rotation_sent_with_the_envelope(device, policy_kit):
    """Root v2 (new keys, signed by the old threshold and the new) travels with a policy signed
    only by the new keys: the device follows the chain, then installs; without it, it refuses."""
    from fedpref.safety_policy import generate_signing_key, make_root_body, rotate_root, sign_policy

    rt, user, cache, state = device
    enforce_policy(rt, state, required_version=1, envelope=policy_kit.envelopes[1], trust_root=policy_kit.root)
    new_keys = [generate_signing_key() for _ in range(2)]
    body = make_root_body(new_keys, 2, expires=policy_kit.now + timedelta(days=30), version=2)
    root_v2 = rotate_root(load_root(policy_kit.root), body, policy_kit.keys[:2], new_keys)
    env = sign_policy(policy_kit.manifest, policy_kit.files, new_keys, version=2, issued_at=policy_kit.now,
                      expires_at=policy_kit.now + timedelta(days=7))
    with pytest.raises(PolicyRefused, match="previous policy stays in force"):
        enforce_policy(rt, state, required_version=2, envelope=env, trust_root=policy_kit.root)
    assert state.policy_store().version == 1
    # the roots as the server sends them: every version, oldest first, through the wire format
    cfg_req = _request(rt, version=2, envelope=env)
    req = TrainRequest.from_content(train_request(cfg_req.shared, cfg_req.config, env, (policy_kit.root, root_v2)))
    assert req.roots == (policy_kit.root, root_v2)
    enforce_policy(rt, state, required_version=2, envelope=req.envelope, trust_root=policy_kit.root, roots=req.roots)
    assert state.policy_store().version == 2 and state.policy_store().trusted_root().version == 2
    forged = make_root_body([generate_signing_key()], 1, expires=policy_kit.now + timedelta(days=30), version=3)
    from fedpref.safety_policy import sign_root

    with pytest.raises(PolicyRefused):  # a root v3 not signed by v2's keys is not followed
        enforce_policy(rt, state, required_version=2, envelope=env + b" ", trust_root=policy_kit.root,
                       roots=(root_v2, sign_root(forged, [generate_signing_key()])))
    assert state.policy_store().trusted_root().version == 2


def test_device_refuses_when_the_required_version_never_arrived(device, policy_kit):
    rt, user, cache, state = device
    with pytest.raises(PolicyRefused, match="enforces policy v1, this device has v0"):
        train_round(rt, user, state, _request(rt, version=1, envelope=None), cache=cache, trust_root=policy_kit.root, terms=TERMS)


def test_device_refuses_an_expired_policy(device, policy_kit):
    rt, _, _, state = device
    enforce_policy(rt, state, required_version=1, envelope=policy_kit.envelopes[1], trust_root=policy_kit.root)
    with pytest.raises(PolicyRefused, match="expired"):
        enforce_policy(rt, state, required_version=1, envelope=None, trust_root=policy_kit.root,
                       now=policy_kit.now + timedelta(days=8))


def test_server_refuses_to_start_with_a_policy_its_root_does_not_trust(policy_kit, tmp_path):
    from fedpref.safety_policy import generate_signing_key, make_root_body, sign_root

    other = [generate_signing_key()]
    (tmp_path / "other-root.json").write_bytes(sign_root(make_root_body(other, 1, expires=policy_kit.now + timedelta(days=3)), other))
    sha = load_backbone(policy_kit.backbone).sha256
    with pytest.raises(PolicyError):
        load_server_policy(policy_kit.dir / "policy-v1.dsse.json", tmp_path / "other-root.json", backbone_sha256=sha)
    with pytest.raises(PolicyError):
        load_server_policy(policy_kit.dir / "policy-v1.dsse.json", policy_kit.root_path, backbone_sha256="0" * 64)


# --- the server: distribution and the tampered client ------------------------------------

SHA = "ab" * 32
KEY = "w.lora_A.shared.weight"


def _strategy(tmp_path, policy, seed=0):
    fed = FederationConfig(rounds=3, client_sample_rate=1.0, clip_norm=1.0, server_noise_multiplier=1.0)
    budget = UserLevelBudget(max_epsilon=float("inf"), delta=1e-5, accountant=AccountantKind.RDP,
                             ledger=PrivacyLedger(tmp_path / f"ledger-{seed}-{id(policy)}.jsonl"))
    s = FedPrefStrategy(fed=fed, local=LocalConfig(), shapes={KEY: (4,)}, frozen_identity=SHA, budget=budget,
                        generators=seeded_generators(seed), policy=lambda: policy)
    s._global = {KEY: np.zeros(4, np.float32)}
    s._population = 3
    return s


def _reply(node, delta, *, digest, version=1):
    ins = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    m = TrainMetrics(train_loss=0.5, train_accuracy=0.5, epsilon_sample=1.0, delta_norm=0.1, steps=1, seconds=0.1)
    att = Attestation(protocol_version=PROTOCOL_VERSION, server_round=1, frozen_identity=SHA, policy_version=version, safety_digest=digest)
    return Message(content=train_reply({KEY: np.asarray(delta, np.float32)}, m, att), reply_to=ins)


class _Grid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return self.ids


def test_envelope_goes_only_to_nodes_without_the_current_version(tmp_path, flower_task):
    s = _strategy(tmp_path, (2, "d" * 64, b"ENVELOPE-V2"))
    s.node_policy = {11: 2, 12: 1}
    msgs = list(s.configure_train(1, arrays_to_record(s._global), None, _Grid([11, 12, 13])))
    got = {m.metadata.dst_node_id: TrainRequest.from_content(m.content).envelope for m in msgs}
    assert got == {11: None, 12: b"ENVELOPE-V2", 13: b"ENVELOPE-V2"}
    assert all(TrainRequest.from_content(m.content).config.policy_version == 2 for m in msgs)


def test_a_tampered_client_is_rejected_and_leaves_the_global_model_unchanged(tmp_path, flower_task, caplog):
    good = "d" * 64
    honest = [_reply(1, [0.2, 0, 0, 0], digest=good), _reply(2, [0, 0.3, 0, 0], digest=good)]
    tampered = _reply(3, [0.9, 0.0, 0.0, -0.4], digest="e" * 64)  # its own safety weights were modified
    with_attacker = _strategy(tmp_path, (1, good, b"E"), seed=5)
    with caplog.at_level("WARNING", logger="fedpref.server"):
        a, _ = with_attacker.aggregate_train(1, [*honest, tampered])
    without = _strategy(tmp_path, (1, good, b"E"), seed=5)
    b, _ = without.aggregate_train(1, honest)
    np.testing.assert_array_equal(a[KEY].numpy(), b[KEY].numpy())
    rec = with_attacker.history[-1]
    assert rec.accepted == 2 and len(rec.rejected) == 1 and "safety digest" in rec.rejected[0]["reason"]
    assert any("rejected update from node 3" in r.message and "safety digest" in r.message for r in caplog.records)
