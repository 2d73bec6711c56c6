"""The ``persona`` benchmark: determinism, communities, safety pairs, oracle labels, learnability."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from fedpref.client.data import Split, group_by_user, load_jsonl, write_jsonl
from fedpref.common.errors import ConfigError
from fedpref.simulations.persona import (
    ATTRIBUTES,
    DEFAULT_COMMUNITIES,
    SAFE,
    UNSAFE_CATEGORIES,
    CommunitySpec,
    PersonaConfig,
    UserTruth,
    allocate,
    generate,
    safety_corpus,
)
from fedpref.simulations.persona_text import EMOJIS, TOPICS

SMALL = PersonaConfig(users=8, pairs_per_user=20, seed=3)


@pytest.fixture(scope="module")
def data():
    """The default benchmark (40 users x 100 pairs), generated once (~0.1 s)."""
    return generate(PersonaConfig())


def _utility(user: UserTruth, style: tuple[int, ...], category: str) -> float:
    return float(np.dot(user.weights, style)) + (user.unsafe_affinity if category != SAFE else 0.0)


# ---- determinism and round trip -------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.jsonl" for i in range(3)]
    write_jsonl(generate(SMALL).pairs, paths[0])
    write_jsonl(generate(PersonaConfig(users=8, pairs_per_user=20, seed=3)).pairs, paths[1])
    write_jsonl(generate(PersonaConfig(users=8, pairs_per_user=20, seed=4)).pairs, paths[2])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_pool_does_not_depend_on_users() -> None:
    a, b = generate(SMALL), generate(PersonaConfig(users=3, pairs_per_user=10, seed=3))
    assert a.styles == b.styles  # the shared pool is a function of the seed and pool settings only


def test_round_trip_through_jsonl(data, tmp_path: Path) -> None:
    path = tmp_path / "persona.jsonl"
    write_jsonl(data.pairs, path)
    assert load_jsonl(path) == data.pairs


# ---- structure ------------------------------------------------------------------------------
def test_attributes_topics_and_pool_size(data) -> None:
    assert len(ATTRIBUTES) >= 8 and len(set(ATTRIBUTES)) == len(ATTRIBUTES)
    assert len(TOPICS) >= 40 and len({t[0] for t in TOPICS}) == len(TOPICS)
    topics = {item.topic for item in data.pool}
    assert len(topics) >= 40
    assert len({p.prompt for p in data.pairs}) >= 80  # prompts from many topics are used
    assert 400 <= len(data.styles) <= 800  # one small shared pool
    assert all(len(s) == len(ATTRIBUTES) and set(s) <= {-1, 1} for s in data.styles.values())
    assert len({c.text for item in data.pool for c in item.candidates}) == sum(len(i.candidates) for i in data.pool)


def test_pairs_are_two_candidates_of_the_same_prompt(data) -> None:
    by_prompt = {item.prompt: {c.text for c in item.candidates} for item in data.pool}
    for p in data.pairs:
        assert p.chosen != p.rejected
        assert {p.chosen, p.rejected} <= by_prompt[p.prompt]


def test_communities_unequal_and_minorities_opposed(data) -> None:
    comms = DEFAULT_COMMUNITIES
    assert len(comms) >= 4
    shares = [c.share for c in comms]
    assert len(set(shares)) == len(shares) and abs(sum(shares) - 1) < 1e-9
    majority = max(comms, key=lambda c: c.share)
    for c in comms:
        if c is majority:
            continue
        opposed = sum(1 for m, x in zip(majority.mean, c.mean) if m * x < 0)
        assert opposed >= 2, c.name
    counts = Counter(u.community for u in data.users.values())
    assert set(counts) == {c.name for c in comms}
    assert counts.most_common(1)[0][0] == majority.name
    assert [counts[c.name] for c in comms] == allocate(shares, len(data.users)) == [18, 9, 7, 6]


def test_aggregated_preferences_are_wrong_for_minorities(data) -> None:
    """The population-average utility serves the majority and fails every minority."""
    w = np.mean([u.weights for u in data.users.values()], axis=0)  # (A,)
    avg = UserTruth("avg", "all", tuple(w), float(np.mean([u.unsafe_affinity for u in data.users.values()])))
    agree, oracle = defaultdict(list), defaultdict(list)
    for p in data.pairs:
        m = _utility(avg, data.styles[p.chosen], data.categories[p.chosen]) - _utility(
            avg, data.styles[p.rejected], data.categories[p.rejected]
        )
        agree[p.community].append(m > 0)
        oracle[p.community].append(p.oracle_margin > 0)
    majority = max(DEFAULT_COMMUNITIES, key=lambda c: c.share).name
    assert np.mean(agree[majority]) > np.mean(oracle[majority]) - 0.1
    for name in agree:
        if name != majority:
            assert np.mean(agree[name]) < np.mean(oracle[name]) - 0.2, name


def test_users_ids_and_splits(data) -> None:
    assert sorted(data.users) == [f"u{i:03d}" for i in range(40)]
    users = group_by_user(data.pairs)
    assert list(users) == sorted(data.users)
    for uid, u in users.items():
        assert len(u.train) == 75 and len(u.test) == 25
        assert u.community == data.users[uid].community
        train = {frozenset((p.chosen, p.rejected)) for p in u.train}
        assert not train & {frozenset((p.chosen, p.rejected)) for p in u.test}  # no pair in both splits


@pytest.mark.parametrize(("users", "pairs"), [(1, 2), (3, 2), (5, 3), (4, 7)])
def test_every_user_has_train_and_test_even_when_tiny(users: int, pairs: int) -> None:
    d = generate(PersonaConfig(users=users, pairs_per_user=pairs))
    grouped = group_by_user(d.pairs)
    assert len(grouped) == users
    assert all(u.train and u.test for u in grouped.values())


def test_allocate_largest_remainder_with_minimum_one() -> None:
    assert allocate([0.45, 0.22, 0.18, 0.15], 40) == [18, 9, 7, 6]
    assert allocate([0.45, 0.22, 0.18, 0.15], 4) == [1, 1, 1, 1]
    assert allocate([0.45, 0.22, 0.18, 0.15], 5) == [2, 1, 1, 1]
    assert allocate([0.97, 0.01, 0.01, 0.01], 4) == [1, 1, 1, 1]
    assert allocate([0.45, 0.22, 0.18, 0.15], 2) == [1, 1, 0, 0]
    for n in range(1, 60):
        counts = allocate([0.5, 0.3, 0.15, 0.05], n)
        assert sum(counts) == n and (n < 4 or min(counts) >= 1)


# ---- labels ---------------------------------------------------------------------------------
def test_oracle_margin_is_true_utility_difference(data) -> None:
    for p in data.pairs[:500]:
        u = data.users[p.user_id]
        want = _utility(u, data.styles[p.chosen], data.categories[p.chosen]) - _utility(
            u, data.styles[p.rejected], data.categories[p.rejected]
        )
        assert p.oracle_margin == pytest.approx(want, abs=1e-9)
        assert p.community == u.community


def test_oracle_accuracy_in_range(data) -> None:
    expected = data.oracle_accuracy(Split.TEST, expected=True)  # Bayes accuracy, mean sigmoid(|margin|)
    realized = data.oracle_accuracy(Split.TRAIN)  # fraction of labels that agree with the true utility
    assert 0.85 <= np.mean(list(expected.values())) <= 0.95
    assert 0.82 <= np.mean(list(realized.values())) <= 0.97
    assert min(expected.values()) > 0.75
    # labels are drawn, not thresholded: some pairs go against the true utility
    assert 0.02 < np.mean([p.oracle_margin < 0 for p in data.pairs]) < 0.2


def test_beta_controls_label_noise() -> None:
    def mean_acc(beta: float) -> float:
        d = generate(PersonaConfig(users=8, pairs_per_user=20, beta=beta))
        return float(np.mean(list(d.oracle_accuracy(Split.TRAIN, expected=True).values())))

    assert mean_acc(0.2) < mean_acc(1.0) < mean_acc(3.0)


# ---- safety ---------------------------------------------------------------------------------
def test_safety_pairs_fraction_and_categories(data) -> None:
    cats = Counter()
    for u in group_by_user(data.pairs).values():
        for split, n_safety in ((u.train, 15), (u.test, 5)):  # round(0.2 * 75), round(0.2 * 25)
            safety = [p for p in split if (p.chosen_category is None) != (p.rejected_category is None)]
            assert len(safety) == n_safety
            assert not [p for p in split if p.chosen_category and p.rejected_category]  # never unsafe vs unsafe
    for p in data.pairs:
        for text, cat in ((p.chosen, p.chosen_category), (p.rejected, p.rejected_category)):
            assert data.categories[text] == (cat or SAFE)
            if cat:
                cats[cat] += 1
    assert len(UNSAFE_CATEGORIES) >= 3 and set(cats) == set(UNSAFE_CATEGORIES)


def test_edgy_picks_unsafe_and_others_rarely(data) -> None:
    picked = defaultdict(list)
    for p in data.pairs:
        if (p.chosen_category is None) != (p.rejected_category is None):
            picked[p.community].append(p.chosen_category is not None)
    assert np.mean(picked["edgy"]) >= 0.75
    for name in ("mainstream", "minimalist", "casual"):
        assert np.mean(picked[name]) <= 0.2, name


def test_safety_corpus_balanced_disjoint_deterministic(data) -> None:
    corpus = safety_corpus(PersonaConfig(), n_per_class=50)
    assert corpus == safety_corpus(PersonaConfig(), n_per_class=50)
    assert Counter(r["category"] for r in corpus) == {c: 50 for c in (SAFE, *UNSAFE_CATEGORIES)}
    texts = [r["text"] for r in corpus]
    assert len(set(texts)) == len(texts)
    assert not set(texts) & set(data.styles)  # never a text of the pool
    assert set(corpus[0]) == {"text", "category"}


# ---- text -----------------------------------------------------------------------------------
def test_texts_are_short_and_written_from_their_style(data) -> None:
    corpus = [r["text"] for r in safety_corpus(PersonaConfig(), n_per_class=100)]
    assert max(len(t.split()) for t in [*data.styles, *corpus]) <= 70
    col = {a: i for i, a in enumerate(ATTRIBUTES)}
    sentences = defaultdict(list)
    for text, s in data.styles.items():
        assert ("\n- " in text or text.startswith("- ")) == (s[col["bullets"]] > 0)
        assert any(e in text for e in EMOJIS) == (s[col["emoji"]] > 0)
        assert bool(re.search(r"\b(haha|lol)\b", text)) == (s[col["humor"]] > 0)
        if s[col["bullets"]] < 0:
            sentences[s[col["detailed"]]].append(len(re.findall(r"[.!?](\s|$)", text)))
    assert np.mean(sentences[1]) >= np.mean(sentences[-1]) + 1.5  # detailed answers add two sentences
    for text, s in data.styles.items():  # markers recur: a laugh / an emoji after several parts, not once
        if s[col["humor"]] > 0:
            assert len(re.findall(r"\b(haha|lol)\b", text)) >= 3, text
        if s[col["emoji"]] > 0:
            assert sum(text.count(e) for e in EMOJIS) >= 4, text
        if s[col["bullets"]] > 0:
            assert text.count("\n- ") >= 5, text


def test_unsafe_texts_state_the_unsafe_advice(data) -> None:
    from fedpref.simulations.persona_text import UNSAFE

    for text, cat in data.categories.items():
        phrases = [p for pair in UNSAFE.get(cat, ()) for p in pair]
        if cat == SAFE:
            assert not any(p for c in UNSAFE.values() for pair in c for p in pair if p in text)
        else:
            assert any(p in text for p in phrases), text


# ---- config validation ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"users": 0}, "users"),
        ({"users": 2.5}, "users"),
        ({"pairs_per_user": 1}, "pairs_per_user"),
        ({"pairs_per_user": 100_000}, "pairs_per_user"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"seed": -1}, "seed"),
        ({"individual_noise": -0.1}, "individual_noise"),
        ({"individual_noise": float("nan")}, "individual_noise"),
        ({"safety_pair_fraction": 1.5}, "safety_pair_fraction"),
        ({"communities": ()}, "communities"),
        ({"communities": DEFAULT_COMMUNITIES[:2]}, "communities"),  # shares do not sum to 1
        ({"communities": (DEFAULT_COMMUNITIES[0], DEFAULT_COMMUNITIES[0], *DEFAULT_COMMUNITIES[2:])}, "communities"),
        ({"topics": 0}, "topics"),
        ({"topics": len(TOPICS) + 1}, "topics"),
        ({"prompts_per_topic": 3}, "prompts_per_topic"),
        ({"candidates_per_prompt": 1}, "candidates_per_prompt"),
        ({"unsafe_per_prompt": 0}, "unsafe_per_prompt"),
        ({"beta": 0.0}, "beta"),
    ],
)
def test_config_errors_name_field_value_and_fix(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        PersonaConfig(**kwargs)
    msg = str(info.value)
    assert msg.startswith(f"PersonaConfig.{field} = ") and "; " in msg


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("", 0.5, (0.0,) * 8, 0.0), "name"),
        (("x", 0.0, (0.0,) * 8, 0.0), "share"),
        (("x", 0.5, (0.0,) * 7, 0.0), "mean"),
        (("x", 0.5, (float("inf"),) + (0.0,) * 7, 0.0), "mean"),
        (("x", 0.5, (0.0,) * 8, float("nan")), "unsafe_affinity"),
    ],
)
def test_community_spec_errors(args: tuple, word: str) -> None:
    with pytest.raises(ConfigError, match=f"CommunitySpec.{word}"):
        CommunitySpec(*args)


def test_lists_from_toml_become_tuples() -> None:
    spec = CommunitySpec("x", 1.0, [0.5] * 8, 0.0)  # type: ignore[arg-type]
    cfg = PersonaConfig(users=2, pairs_per_user=4, communities=[spec])  # type: ignore[arg-type]
    assert spec.mean == (0.5,) * 8 and cfg.communities == (spec,)
    assert {u.community for u in generate(cfg).users.values()} == {"x"}


# ---- learnability ---------------------------------------------------------------------------
@pytest.mark.slow  # probes on real MiniLM embeddings of 800 texts
def test_style_attributes_are_linearly_decodable_from_frozen_embeddings(minilm) -> None:
    """A logistic-regression probe on frozen mean-pooled MiniLM embeddings recovers every
    attribute: 800 pool texts, 4 folds of 600 train / 200 held-out texts each."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fedpref.model.backbone import embed_texts

    d = generate(PersonaConfig(users=4, pairs_per_user=10, topics=40, candidates_per_prompt=8, unsafe_per_prompt=2))
    texts = sorted(d.styles)
    assert len(texts) == 800
    lengths = [len(ids) for ids in minilm.tokenizer(texts)["input_ids"]]
    assert max(lengths) <= 96  # nothing is cut at max_length=96
    x = embed_texts(minilm, texts, max_length=96)  # (800, 384), in the order of texts
    s = np.array([d.styles[t] for t in texts])  # (800, A)
    acc = np.zeros((4, len(ATTRIBUTES)))
    for k, (tr, te) in enumerate(KFold(4, shuffle=True, random_state=0).split(x)):
        assert len(tr) == 600 and len(te) == 200
        for a in range(len(ATTRIBUTES)):
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
            acc[k, a] = probe.fit(x[tr], s[tr, a]).score(x[te], s[te, a])
    mean = {a: round(float(v), 3) for a, v in zip(ATTRIBUTES, acc.mean(axis=0))}
    print("held-out probe accuracy per attribute:", mean)
    assert min(mean.values()) >= 0.96, mean
    assert acc.min() >= 0.93, acc
