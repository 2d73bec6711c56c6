"""The persona benchmark's population-agreement component and the ``count`` baseline (issue 11)."""

import dataclasses

import numpy as np
import pytest

from fedpref.client.data import PreferencePair, Split, UserData, group_by_user
from fedpref.simulations.persona import SAFE, PersonaConfig, generate
from fedpref.simulations.persona_text import LOW_QUALITY
from fedpref.simulations.runner import count_votes

SMALL = PersonaConfig(users=12, pairs_per_user=40, seed=4)


def test_quality_off_leaves_the_data_byte_identical():
    a, b = generate(SMALL), generate(dataclasses.replace(SMALL, quality_weight=0.0))
    assert a.pairs == b.pairs and a.users == b.users and b.qualities == {}


def test_quality_on_half_the_safe_candidates_give_unhelpful_advice_that_everyone_dislikes():
    d = generate(dataclasses.replace(SMALL, quality_weight=3.0))
    plain = generate(SMALL)
    assert [u.weights for u in d.users.values()] == [u.weights for u in plain.users.values()]  # styles unchanged
    gammas = [u.quality_weight for u in d.users.values()]
    assert all(g > 0 for g in gammas) and abs(np.mean(gammas) - 3.0) < 0.5
    safe = [c for item in d.pool for c in item.candidates if c.category == SAFE]
    low = [c for c in safe if c.quality == -1]
    assert len(low) * 2 == len(safe)
    bad_phrases = {x for pair in LOW_QUALITY for x in pair}
    assert all(any(p in c.text for p in bad_phrases) for c in low)
    assert not any(any(p in c.text for p in bad_phrases) for c in safe if c.quality == 1)
    uid, text = next(iter(d.users)), low[0].text
    u = d.users[uid]
    assert d.utility(uid, text) == pytest.approx(float(np.dot(u.weights, low[0].style)) - u.quality_weight)
    # labels follow it: a helpful text beats an unhelpful one of the same prompt most of the time
    wins = [p.chosen_category is None and d.qualities.get(p.chosen, 1) == 1
            for p in d.pairs if {d.qualities.get(p.chosen, 1), d.qualities.get(p.rejected, 1)} == {1, -1}
            and p.chosen_category is None and p.rejected_category is None]
    assert np.mean(wins) > 0.75


def _pair(uid, a, b, split=Split.TEST):
    return PreferencePair(user_id=uid, prompt="p", chosen=a, rejected=b, split=split)


def test_count_is_the_majority_of_the_other_users_and_never_counts_the_user_itself():
    users = {
        "u1": UserData("u1", None, (_pair("u1", "x", "y", Split.TRAIN),), (_pair("u1", "x", "y"), _pair("u1", "z", "w"))),
        "u2": UserData("u2", None, (_pair("u2", "y", "x", Split.TRAIN),), (_pair("u2", "y", "x"),)),
        "u3": UserData("u3", None, (_pair("u3", "x", "y", Split.TRAIN),), (_pair("u3", "w", "z"),)),
    }
    acc = count_votes(users)
    # u1: others voted x once (u3), y once (u2): a tie on x-y (0.5); z-w unseen (0.5)
    assert acc["u1"] == 0.5
    assert acc["u2"] == 0.0  # others (u1, u3) chose x; u2's held-out choice is y
    assert acc["u3"] == 0.5  # w-z never voted on


def test_count_on_generated_data_rises_with_agreement():
    low = np.mean(list(count_votes(group_by_user(generate(dataclasses.replace(SMALL, users=30)).pairs)).values()))
    high = np.mean(list(count_votes(group_by_user(generate(
        dataclasses.replace(SMALL, users=30, quality_weight=4.0)).pairs)).values()))
    assert high > low + 0.05
