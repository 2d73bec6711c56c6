"""Property: whatever the devices send, a round completes, and a rejected reply changes nothing.

Each example is one round of the plain strategy with 1-6 replies drawn from the hostile
replies of ``test_validation_property`` (spoofed metadata, odd dtypes, huge or empty arrays,
random bytes, hostile attestations) plus hostile metric records (NaN, inf, huge, negative,
an example count of 2**62), as they arrive on the wire. The round must never raise; its
released weights and ledger line must be exactly those of the same round given only the
replies it accepted; and only accepted nodes may change the server's state.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings, strategies as st

from fedpref.protocol.messages import K_ATTESTATION, K_DELTA, K_METRICS
from fedpref.server.config import FederationConfig, LocalConfig
from fedpref.server.privacy import AccountantKind, PrivacyLedger, UserLevelBudget
from fedpref.server.release import seeded_generators
from fedpref.server.strategy import FedPrefStrategy

from test_validation_property import ATT, SHA, SHAPES, replies

ROUND = ATT["server_round"]
METRIC_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**63), 2**63 - 1),
                          st.sampled_from([0.5, 1, 2**62, -1.0, float("nan"), float("inf")]))
METRIC_NAMES = st.sampled_from(["train_loss", "train_accuracy", "epsilon_sample", "delta_norm", "steps", "seconds",
                                "eval_accuracy", "num-examples", "weight", ""])


@st.composite
def wire_message(draw, node: int) -> Message:
    reply = draw(replies())
    content = RecordDict({K_DELTA: reply.delta})
    if draw(st.integers(0, 9)):
        try:
            content[K_ATTESTATION] = ConfigRecord(asdict(reply.attestation))
        except Exception:  # noqa: BLE001 - a value Flower cannot carry: the reply goes without one
            pass
    if draw(st.booleans()):
        content[K_METRICS] = MetricRecord(draw(st.dictionaries(METRIC_NAMES, METRIC_VALUES, max_size=8)))
    ins = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=ins)


def _strategy(tmp_path, tag: str) -> FedPrefStrategy:
    fed = FederationConfig(rounds=5, client_sample_rate=0.5, clip_norm=1.0, server_noise_multiplier=1.0)
    budget = UserLevelBudget(max_epsilon=float("inf"), delta=1e-5, accountant=AccountantKind.RDP,
                             ledger=PrivacyLedger(tmp_path / f"ledger-{tag}.jsonl"))
    s = FedPrefStrategy(fed=fed, local=LocalConfig(), shapes=SHAPES, frozen_identity=SHA, budget=budget,
                        generators=seeded_generators(7), policy=lambda: (ATT["policy_version"], ATT["safety_digest"], None))
    s._global = {k: np.zeros(v, np.float32) for k, v in SHAPES.items()}
    s._population = 8
    return s


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                    HealthCheck.function_scoped_fixture])
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(*(wire_message(i + 1) for i in range(n)))))
def test_a_round_survives_any_replies_and_rejected_ones_change_nothing(tmp_path_factory, flower_task, messages):
    tmp = tmp_path_factory.mktemp("round")
    full = _strategy(tmp, "full")
    released, _ = full.aggregate_train(ROUND, list(messages))  # never raises
    rec = full.history[-1]
    rejected = {r["node"] for r in rec.rejected}
    assert rec.replied == len(messages) and rec.accepted + len(rejected) == len(messages)
    accepted = [m for m in messages if str(m.metadata.src_node_id) not in rejected]
    assert set(full.node_policy) == {m.metadata.src_node_id for m in accepted}  # no state from a rejected reply
    alone = _strategy(tmp, "alone")
    expected, _ = alone.aggregate_train(ROUND, accepted)
    for k in SHAPES:
        np.testing.assert_array_equal(released[k].numpy(), expected[k].numpy())
    (line_full,), (line_alone,) = full.budget.ledger.entries(), alone.budget.ledger.entries()
    assert line_full.participants == line_alone.participants == rec.accepted
    assert all(np.isfinite(released[k].numpy()).all() for k in SHAPES)
    assert all(np.isfinite(v) for v in rec.metrics.values())
