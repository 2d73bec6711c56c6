"""The ``persona`` benchmark: seeded preference pairs over realistic text, with known users.

Every candidate response is written out from a style vector ``s`` in {-1,+1}^A over
:data:`ATTRIBUTES` plus topic-specific facts (see :mod:`fedpref.simulations.persona_text`).
All users draw their pairs from one shared pool of (prompt, candidates), so the number of
distinct texts stays small. A user's utility for a text is ``u = w . s`` (plus the user's
``unsafe_affinity`` if the text is unsafe); labels follow Bradley-Terry,
``P(a > b) = sigmoid(u_a - u_b)``, and each pair records ``oracle_margin = u_chosen - u_rejected``.

Randomness comes only from ``numpy.random.default_rng([seed, stream, ...])``; the pool, the
users, each user's pairs and the safety corpus use separate streams, so one seed gives
byte-identical output.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from fedpref.client.data import PreferencePair, Split
from fedpref.common.errors import ConfigError
from fedpref.common.tomlconfig import check_fields, ranged
from fedpref.simulations.persona_text import (
    ADVICE,
    BODIES,
    BRIEF,
    BULLET_HEADERS,
    CLOSERS,
    COLD_CLOSERS,
    COLD_OPENERS,
    EMOJIS,
    FRAMES,
    JOKES,
    LAUGHS,
    LEADS,
    LOW_QUALITY,
    SERIOUS,
    TOPICS,
    UNSAFE,
    WHY,
    WARM_CLOSERS,
    WARM_OPENERS,
)

ATTRIBUTES: tuple[str, ...] = ("detailed", "bullets", "formal", "technical", "warm", "hedged", "emoji", "humor")
UNSAFE_CATEGORIES: tuple[str, ...] = tuple(UNSAFE)  # ("violence", "self_harm", "fraud")
SAFE = "safe"
ELABORATIONS = 2  # extra sentences in a detailed answer (a concise one has a brevity marker instead)
A = len(ATTRIBUTES)

# Independent random streams: default_rng([seed, STREAM, ...]).
_POOL_STREAM, _USER_STREAM, _PAIR_STREAM, _CORPUS_STREAM, _ATTRIBUTE_STREAM, _QUALITY_STREAM = 1, 2, 3, 4, 5, 6
UNSAFE_ATTRIBUTE = "unsafe"  # the attribute corpus's last label: +1 for an unsafe text, -1 for a safe one


@dataclass(frozen=True)
class CommunitySpec:
    """A community of users: its population share and mean style weights (one per attribute)."""

    name: str
    share: float = ranged(gt=0, le=1, example=0.25)  # fraction of users
    mean: tuple[float, ...] = ranged(example=1.2)  # (A,) mean weight per attribute, in ATTRIBUTES order
    unsafe_affinity: float = ranged(example=-7.0)  # utility added to unsafe texts; > 0 is drawn to them

    def __post_init__(self) -> None:
        if isinstance(self.mean, list):  # TOML and JSON give lists
            object.__setattr__(self, "mean", tuple(self.mean))
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"CommunitySpec.name must be a non-empty string, got {self.name!r}; name the community")
        check_fields(self, "CommunitySpec")
        if len(self.mean) != A:
            raise ConfigError(
                f"CommunitySpec.mean of {self.name!r} has {len(self.mean)} numbers; give {A} finite numbers, one "
                f"per attribute in the order {ATTRIBUTES}"
            )


#                              detailed bullets formal technical warm hedged emoji humor
DEFAULT_COMMUNITIES: tuple[CommunitySpec, ...] = (
    # the majority: thorough, structured, formal, plain words, warm, careful; no emoji or jokes
    CommunitySpec("mainstream", 0.45, (1.2, 1.2, 1.2, -1.2, 1.2, 1.2, -1.2, -1.2), -7.0),
    # terse experts: short prose, jargon, no warmth, no hedging        (opposes on 5 attributes)
    CommunitySpec("minimalist", 0.22, (-1.2, -1.2, 1.2, 1.2, -1.2, -1.2, -1.2, -1.2), -7.0),
    # chatty friends: casual prose with emoji and jokes                (opposes on 4 attributes)
    CommunitySpec("casual", 0.18, (1.2, -1.2, -1.2, -1.2, 1.2, 1.2, 1.2, 1.2), -7.0),
    # blunt provocateurs: short, casual, cold, direct, drawn to unsafe (opposes on 6 attributes)
    CommunitySpec("edgy", 0.15, (-1.2, 1.2, -1.2, -1.2, -1.2, -1.2, 1.2, 1.2), 7.0),
)


@dataclass(frozen=True)
class PersonaConfig:
    """Everything that determines a ``persona`` dataset. Same config, same bytes."""

    users: int = ranged(40, ge=1, le=100_000)
    # train + test, at least one of each (the text pool bounds it further, see below)
    pairs_per_user: int = ranged(100, ge=2, le=100_000)
    test_fraction: float = ranged(0.25, gt=0, lt=1)  # of each user's pairs, rounded, at least 1 each side
    seed: int = ranged(0, ge=0, le=2**32 - 1)
    individual_noise: float = ranged(0.3, ge=0)  # std of a user's weights around the community mean
    safety_pair_fraction: float = ranged(0.2, ge=0, le=1)  # of each split: one safe vs one unsafe candidate
    communities: tuple[CommunitySpec, ...] = DEFAULT_COMMUNITIES
    topics: int = ranged(len(TOPICS), ge=1, le=len(TOPICS))  # how many topics of the bank the pool uses
    prompts_per_topic: int = ranged(2, ge=1, le=2)
    candidates_per_prompt: int = ranged(6, ge=2, le=16)  # safe candidates per prompt
    unsafe_per_prompt: int = ranged(2, ge=0, le=8)  # unsafe candidates per prompt
    # Bradley-Terry inverse temperature: scales weights and unsafe affinity
    beta: float = ranged(1.0, gt=0)
    # Population agreement: half of the safe candidates give unhelpful advice instead of the
    # topic's fact, and every user's utility adds quality_weight (± individual_noise) × quality
    # (+1 helpful, −1 not): a preference most users share, outside the attribute basis. 0 = off
    # (and then the data is byte-identical to a generator without it).
    quality_weight: float = ranged(0.0, ge=0, le=100, example=2.5, note="(0 = off)")

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> ConfigError:
            value = repr(getattr(self, name))
            value = value if len(value) <= 80 else value[:77] + "..."
            return ConfigError(f"PersonaConfig.{name} = {value} is invalid; {fix}")

        check_fields(self, "PersonaConfig")
        if isinstance(self.communities, list):
            object.__setattr__(self, "communities", tuple(self.communities))
        comms = self.communities
        if not isinstance(comms, tuple) or not comms or not all(isinstance(c, CommunitySpec) for c in comms):
            raise bad("communities", "give a non-empty tuple of CommunitySpec")
        if len({c.name for c in comms}) != len(comms):
            raise bad("communities", "give each community a distinct name")
        if abs(sum(c.share for c in comms) - 1.0) > 1e-6:
            raise bad("communities", f"shares sum to {sum(c.share for c in comms):.6g}; make them sum to 1")
        (tr_reg, tr_saf), (te_reg, te_saf) = self.split_counts()
        prompts = self.topics * self.prompts_per_topic
        c, k = self.candidates_per_prompt, self.unsafe_per_prompt
        if tr_saf + te_saf > 0 and k == 0:
            raise bad("unsafe_per_prompt", "give at least 1, or set safety_pair_fraction to 0")
        if tr_reg + te_reg > prompts * c * (c - 1) // 2 or tr_saf + te_saf > prompts * c * k:
            raise bad("pairs_per_user", "the text pool is too small; lower it or raise topics/candidates_per_prompt")

    def split_counts(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((train regular, train safety), (test regular, test safety)) pairs per user."""
        n_test = min(self.pairs_per_user - 1, max(1, _round(self.pairs_per_user * self.test_fraction)))
        out = []
        for n in (self.pairs_per_user - n_test, n_test):
            n_safety = _round(n * self.safety_pair_fraction)
            out.append((n - n_safety, n_safety))
        return out[0], out[1]


@dataclass(frozen=True)
class UserTruth:
    """A simulated user's true preferences (already multiplied by ``beta``)."""

    user_id: str
    community: str
    weights: tuple[float, ...]  # (A,)
    unsafe_affinity: float
    quality_weight: float = 0.0  # utility per unit of a text's quality (population agreement)


@dataclass(frozen=True)
class Candidate:
    """One response in the pool."""

    text: str
    style: tuple[int, ...]  # (A,) in {-1, +1}
    category: str  # SAFE or an unsafe category
    quality: int = 1  # +1 helpful advice, -1 unhelpful (PersonaConfig.quality_weight)


@dataclass(frozen=True)
class PromptItem:
    """A prompt with its candidates: safe ones first, then unsafe ones."""

    topic: str
    prompt: str
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class PersonaData:
    """A generated dataset and its ground truth."""

    config: PersonaConfig
    pairs: list[PreferencePair]  # per user (sorted): train pairs then test pairs
    users: dict[str, UserTruth]
    styles: dict[str, tuple[int, ...]]  # text -> style vector (A,)
    categories: dict[str, str]  # text -> SAFE or unsafe category
    pool: tuple[PromptItem, ...] = field(repr=False, default=())
    qualities: dict[str, int] = field(repr=False, default_factory=dict)  # text -> ±1 (absent: +1)

    def utility(self, user_id: str, text: str) -> float:
        """The user's true utility of a pool text: w . s (+ γ·quality, + unsafe affinity if unsafe)."""
        return _utility(self.users[user_id], self.styles[text], self.categories[text], self.qualities.get(text, 1))

    def oracle_accuracy(self, split: Split | str = Split.TEST, *, expected: bool = False) -> dict[str, float]:
        """Per-user accuracy of the true utility on ``split``.

        ``expected=False``: fraction of pairs whose drawn label agrees with the true utility.
        ``expected=True``: Bayes accuracy in expectation, mean of sigmoid(|margin|).
        """
        hits: dict[str, list[float]] = {}
        for p in self.pairs:
            if p.split == Split(split):
                m = float(p.oracle_margin or 0.0)
                hits.setdefault(p.user_id, []).append(_sigmoid(abs(m)) if expected else float(m > 0))
        return {u: float(np.mean(v)) for u, v in sorted(hits.items())}


# ---- pure helpers ---------------------------------------------------------------------------
def _round(x: float) -> int:
    """Round half up (Python's round() is half-to-even)."""
    return math.floor(x + 0.5)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _utility(user: UserTruth, style: tuple[int, ...], category: str, quality: int = 1) -> float:
    u = float(np.dot(user.weights, style)) + (user.quality_weight * quality if user.quality_weight else 0.0)
    return u + (user.unsafe_affinity if category != SAFE else 0.0)


def allocate(shares: list[float], total: int) -> list[int]:
    """Split ``total`` by largest remainder; every share gets >= 1 when ``total >= len(shares)``."""
    quotas = [s * total for s in shares]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(shares)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    while total >= len(shares) and 0 in counts:  # move one from the most over-served share
        donor = max((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: (counts[i] - quotas[i], -i))
        counts[donor] -= 1
        counts[counts.index(0)] += 1
    return counts


# ---- text rendering -------------------------------------------------------------------------
def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _lower_first(s: str) -> str:
    return s if s.startswith("I ") else s[:1].lower() + s[1:]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def render(
    rng: np.random.Generator,
    topic: int,
    style: tuple[int, ...],
    unsafe: tuple[str, str] | None = None,
    *,
    phrase: tuple[str, str] | None = None,
) -> str:
    """Write one response for topic index ``topic`` from its style vector (A,).

    One short piece of topic advice (``unsafe`` or ``phrase``, a (plain, technical) phrase pair, replaces it)
    carries the content; the style markers recur throughout so that style dominates, and both
    levels of each attribute write about as much text. Layout, one "- " line per part under a
    list header when bulleted: warm/cold opener, framed advice (behind a brevity marker when concise),
    ``ELABORATIONS`` elaborations when detailed, closer, joke/serious remark, warm/cold sign-off;
    formal/casual and hedged/direct wording in every sentence, an emoji after every part but the
    elaborations, a laugh after the advice, the first elaboration and the closer.
    """
    detailed, bullets, formal, technical, warm, hedged, emoji, humor = (int(v) > 0 for v in style)
    fo, he, te = (1 if formal else -1), (1 if hedged else -1), (1 if technical else -1)
    name, _, facts = TOPICS[topic]
    phrase = unsafe if unsafe is not None else phrase if phrase is not None else facts[int(rng.integers(len(facts)))]
    advice = f"{_pick(rng, FRAMES[te])} {_pick(rng, ADVICE[(fo, he)]).format(f=phrase[int(technical)])}"
    if not detailed:
        advice = f"{_pick(rng, BRIEF[fo])} {_lower_first(advice)}"
    body = [advice]
    if detailed:
        leads = rng.permutation(len(LEADS[(fo, he)]))[:ELABORATIONS]
        verbs = rng.permutation(len(BODIES[(te, fo)]))[:ELABORATIONS]
        body += [f"{LEADS[(fo, he)][int(i)]} {BODIES[(te, fo)][int(j)]}." for i, j in zip(leads, verbs)]
    body.append(_pick(rng, CLOSERS[(fo, he)]).format(why=_pick(rng, WHY[te])))
    if humor:  # laugh after the advice, the first elaboration and the closer
        body = [f"{x} {_pick(rng, LAUGHS)}" if k in (0, 1, len(body) - 1) else x for k, x in enumerate(body)]
    body.append(_pick(rng, JOKES if humor else SERIOUS).format(topic=name))
    lines = [
        _pick(rng, (WARM_OPENERS if warm else COLD_OPENERS)[fo]),
        *body,
        _pick(rng, (WARM_CLOSERS if warm else COLD_CLOSERS)[fo]),
    ]
    if emoji:  # after every part but the elaborations
        marks = [EMOJIS[int(i)] for i in rng.integers(len(EMOJIS), size=len(lines))]
        skip = set(range(2, len(body) - 1))
        lines = [x if k in skip else f"{x} {m}" for k, (x, m) in enumerate(zip(lines, marks))]
    if bullets:
        return "\n".join([_pick(rng, BULLET_HEADERS[fo])] + ["- " + x for x in lines])
    return " ".join(lines)


def _random_style(rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(v) for v in rng.choice(np.array([-1, 1]), size=A))  # (A,)


def _unique_render(
    rng: np.random.Generator, topic: int, style: tuple[int, ...], used: set[str], unsafe: tuple[str, str] | None,
    phrase: tuple[str, str] | None = None,
) -> str:
    """Render until the text is new (styles stay fixed; only wording changes)."""
    for _ in range(200):
        text = render(rng, topic, style, unsafe, phrase=phrase)
        if text not in used:
            used.add(text)
            return text
    raise ConfigError(f"cannot write a new text for topic {TOPICS[topic][0]!r}; lower candidates_per_prompt")


def build_pool(config: PersonaConfig) -> tuple[PromptItem, ...]:
    """The shared pool: for each prompt, ``candidates_per_prompt`` safe and ``unsafe_per_prompt`` unsafe texts."""
    rng = np.random.default_rng([config.seed, _POOL_STREAM])
    qrng = np.random.default_rng([config.seed, _QUALITY_STREAM]) if config.quality_weight else None
    used: set[str] = set()
    items = []
    for t in range(config.topics):
        name, prompts, _ = TOPICS[t]
        for prompt in prompts[: config.prompts_per_topic]:
            cands = []
            for i in range(config.candidates_per_prompt):
                style = _random_style(rng)
                # with quality on, every other safe candidate (in a random order) gives unhelpful advice
                low = qrng is not None and i % 2 == 1
                phrase = LOW_QUALITY[int(qrng.integers(len(LOW_QUALITY)))] if low and qrng is not None else None
                cands.append(Candidate(_unique_render(rng, t, style, used, None, phrase), style, SAFE, -1 if low else 1))
            for _ in range(config.unsafe_per_prompt):
                cat = UNSAFE_CATEGORIES[int(rng.integers(len(UNSAFE_CATEGORIES)))]
                phrase = UNSAFE[cat][int(rng.integers(len(UNSAFE[cat])))]
                style = _random_style(rng)
                cands.append(Candidate(_unique_render(rng, t, style, used, phrase), style, cat))
            items.append(PromptItem(name, prompt, tuple(cands)))
    return tuple(items)


# ---- users and labels -----------------------------------------------------------------------
def make_users(config: PersonaConfig) -> dict[str, UserTruth]:
    """Users u000, u001, ...: community by largest remainder (shuffled), weights = mean + noise."""
    rng = np.random.default_rng([config.seed, _USER_STREAM])
    comms = config.communities
    counts = allocate([c.share for c in comms], config.users)
    assign = rng.permutation(np.repeat(np.arange(len(comms)), counts))  # (users,)
    width = max(3, len(str(config.users - 1)))
    users = {}
    for i, ci in enumerate(assign):
        c = comms[int(ci)]
        w = config.beta * (np.asarray(c.mean) + config.individual_noise * rng.standard_normal(A))  # (A,)
        aff = config.beta * (c.unsafe_affinity + config.individual_noise * rng.standard_normal())
        uid = f"u{i:0{width}d}"
        users[uid] = UserTruth(uid, c.name, tuple(float(x) for x in w), float(aff))
    if config.quality_weight:  # a separate stream: the users' other weights stay as without it
        qrng = np.random.default_rng([config.seed, _QUALITY_STREAM, 1])
        for uid in sorted(users):
            g = config.beta * (config.quality_weight + config.individual_noise * qrng.standard_normal())
            users[uid] = dataclasses.replace(users[uid], quality_weight=float(g))
    return users


def _label_pairs(
    config: PersonaConfig,
    user: UserTruth,
    index: int,
    pool: tuple[PromptItem, ...],
    regular: list[tuple[int, int, int]],
    safety: list[tuple[int, int, int]],
) -> list[PreferencePair]:
    """Draw one user's pairs (train then test) from the (prompt, cand, cand) lists; never repeated."""
    rng = np.random.default_rng([config.seed, _PAIR_STREAM, index])
    (tr_reg, tr_saf), (te_reg, te_saf) = config.split_counts()
    reg = [regular[int(i)] for i in rng.choice(len(regular), size=tr_reg + te_reg, replace=False)]
    saf = [safety[int(i)] for i in rng.choice(len(safety), size=tr_saf + te_saf, replace=False)] if safety else []
    plan = [
        (Split.TRAIN, reg[:tr_reg] + saf[:tr_saf]),
        (Split.TEST, reg[tr_reg:] + saf[tr_saf:]),
    ]
    out = []
    for split, triples in plan:
        for t in rng.permutation(len(triples)):
            p, i, j = triples[int(t)]
            a, b = pool[p].candidates[i], pool[p].candidates[j]
            if rng.random() < 0.5:
                a, b = b, a
            ua, ub = _utility(user, a.style, a.category, a.quality), _utility(user, b.style, b.category, b.quality)
            if rng.random() >= _sigmoid(ua - ub):
                a, b, ua, ub = b, a, ub, ua
            out.append(
                PreferencePair(
                    user_id=user.user_id,
                    prompt=pool[p].prompt,
                    chosen=a.text,
                    rejected=b.text,
                    split=split,
                    community=user.community,
                    oracle_margin=ua - ub,
                    chosen_category=None if a.category == SAFE else a.category,
                    rejected_category=None if b.category == SAFE else b.category,
                )
            )
    return out


def generate(config: PersonaConfig | None = None) -> PersonaData:
    """Generate the benchmark: pool, users and every user's labelled pairs."""
    config = config or PersonaConfig()
    pool = build_pool(config)
    users = make_users(config)
    c, k = config.candidates_per_prompt, config.unsafe_per_prompt
    regular = [(p, i, j) for p in range(len(pool)) for i in range(c) for j in range(i + 1, c)]  # safe vs safe
    safety = [(p, i, c + j) for p in range(len(pool)) for i in range(c) for j in range(k)]  # safe vs unsafe
    pairs = []
    for index, uid in enumerate(sorted(users)):
        pairs.extend(_label_pairs(config, users[uid], index, pool, regular, safety))
    cands = [cand for item in pool for cand in item.candidates]
    return PersonaData(
        config=config,
        pairs=pairs,
        users=users,
        styles={x.text: x.style for x in cands},
        categories={x.text: x.category for x in cands},
        pool=pool,
        qualities={x.text: x.quality for x in cands if x.quality != 1},
    )


SAFETY_CORPUS_PER_CLASS = 400  # the demo's [safety] corpus_per_class: the classifier RESULTS.md reports


def safety_corpus(config: PersonaConfig | None = None, *, n_per_class: int = SAFETY_CORPUS_PER_CLASS) -> list[dict]:
    """Labelled texts for training a safety classifier, disjoint from the pool's texts.

    ``n_per_class`` texts for ``"safe"`` and for each unsafe category, over all topics, from a
    separate random stream. Records: ``{"text": ..., "category": "safe" | <category>}``, shuffled.
    The default is the demo's (400 per class), so ``fedpref-sim generate --safety-corpus`` (the
    README's operator path) writes the very corpus the demo's policy classifier is trained on.
    """
    config = config or PersonaConfig()
    if not isinstance(n_per_class, int) or n_per_class < 1:
        raise ConfigError(f"safety_corpus n_per_class = {n_per_class!r} is invalid; give a positive integer")
    rng = np.random.default_rng([config.seed, _CORPUS_STREAM])
    used = {cand.text for item in build_pool(config) for cand in item.candidates}
    records = []
    for cat in (SAFE, *UNSAFE_CATEGORIES):
        for _ in range(n_per_class):
            topic = int(rng.integers(len(TOPICS)))
            phrase = None if cat == SAFE else UNSAFE[cat][int(rng.integers(len(UNSAFE[cat])))]
            records.append({"text": _unique_render(rng, topic, _random_style(rng), used, phrase), "category": cat})
    return [records[int(i)] for i in rng.permutation(len(records))]


def attribute_corpus(config: PersonaConfig | None = None, *, n: int = 1200, unsafe_fraction: float = 0.25) -> list[dict]:
    """Public texts labelled with their response attributes, disjoint from the pool.

    What an operator has in practice from annotated public data (rated responses to public
    prompts): ``{"text": ..., "attributes": {"detailed": ±1, ..., "humor": ±1, "unsafe": ±1}}``,
    random styles over all topics, ``unsafe_fraction`` of them unsafe. No user and no label of
    any user is involved. The simulation fits the attribute basis (:mod:`fedpref.model.basis`)
    on it.
    """
    config = config or PersonaConfig()
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"attribute_corpus n = {n!r} is invalid; give a positive integer")
    if not 0.0 <= unsafe_fraction <= 1.0:
        raise ConfigError(f"attribute_corpus unsafe_fraction = {unsafe_fraction!r}; give a fraction in [0, 1]")
    rng = np.random.default_rng([config.seed, _ATTRIBUTE_STREAM])
    used = {cand.text for item in build_pool(config) for cand in item.candidates}
    records = []
    for _ in range(n):
        topic = int(rng.integers(len(TOPICS)))
        style = _random_style(rng)
        unsafe = bool(rng.random() < unsafe_fraction)
        phrase = None
        if unsafe:
            cat = UNSAFE_CATEGORIES[int(rng.integers(len(UNSAFE_CATEGORIES)))]
            phrase = UNSAFE[cat][int(rng.integers(len(UNSAFE[cat])))]
        text = _unique_render(rng, topic, style, used, phrase)
        labels = {a: int(v) for a, v in zip(ATTRIBUTES, style)} | {UNSAFE_ATTRIBUTE: 1 if unsafe else -1}
        records.append({"text": text, "attributes": labels})
    return records
