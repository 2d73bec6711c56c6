"""scripts/design_limits.py, the offline model RESULTS.md compares designs with: its accounting is
Opacus', a device never passes its budget, and without noise it learns what the data holds."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "design_limits.py"


@pytest.fixture(scope="module")
def dl():  # noqa: ANN201 - the script as a module
    spec = importlib.util.spec_from_file_location("design_limits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["design_limits"] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("design_limits", None)


def test_epsilon_is_opacus_rdp_accountant(dl) -> None:  # noqa: ANN001
    steps = [(1.1, 1.0)] * 2 + [(1.1, 16 / 75)] * 25 + [(0.8, 0.1)] * 3
    acc = RDPAccountant()
    for sigma, rate in steps:
        acc.step(noise_multiplier=sigma, sample_rate=rate)
    assert dl.epsilon(steps) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert dl.epsilon([(1.1, 0.1)] * 10) == pytest.approx(2.8379, abs=1e-3)  # RESULTS.md's ε_user at 1,000 users
    assert dl.epsilon([]) == 0.0


def _population(dl, users_per_community: int = 60, seed: int = 0):  # noqa: ANN001, ANN202
    """Two communities with opposite preferences along one direction of a 12-d space, and a
    direction every user agrees on; the 'probes' see only the shared direction."""
    rng = np.random.default_rng(seed)
    h = 12
    taste, shared = np.eye(h)[0], np.eye(h)[1]
    pop = object.__new__(dl.Population)
    pop.basis = np.eye(h)[1:3]  # probes: the shared direction and a direction of pure noise
    pop.train, pop.test, pop.community, correct = [], [], [], []
    for name, sign in (("a", 1.0), ("b", -1.0)):
        for _ in range(users_per_community):
            w = 3.0 * (sign * taste + shared)
            for split, n in ((pop.train, 40), (pop.test, 40)):
                x = rng.standard_normal((n, h))
                x *= np.where(rng.random(n) < 1 / (1 + np.exp(-(x @ w))), 1.0, -1.0)[:, None]  # chosen - rejected
                split.append(x)
            correct.append(np.mean(pop.test[-1] @ w > 0))
            pop.community.append(name)
    pop.communities = ["a", "b"]
    pop.smallest = "a"
    pop.oracle = pop.oracle_smallest = float(np.mean(correct))  # the true weights' test accuracy
    return pop


def test_no_noise_prototypes_learn_both_communities(dl) -> None:  # noqa: ANN001
    pop = _population(dl)
    base = dl.Design("t", rounds=10, q=0.5, z=0.0, sigma=0.0, step=3.0, final_epochs=5, final_batch=8)
    one = dl.run(pop, base, seed=0)
    two = dl.run(pop, replace(base, prototypes=2, hard=True, oracle=True, server_step=2.0), seed=0)
    # one shared score can only learn what both agree on; a prototype per community learns both tastes
    assert one["personalized"] < 0.85 * pop.oracle  # measured: 0.72 against an oracle of 0.88
    assert min(two["per_community"].values()) > 0.95 * pop.oracle  # measured: 0.87 and 0.88


def test_no_device_passes_its_budget(dl) -> None:  # noqa: ANN001
    pop = _population(dl, users_per_community=20)
    d = dl.Design("t", prototypes=2, rounds=12, q=0.5, pre_epochs=2, final_epochs=20, final_batch=8, budget=6.0)
    r = dl.run(pop, d, seed=1)
    assert 0 < r["max_epsilon_sample"] <= 6.0
    assert r["declined_rounds"] > 0  # the budget bound: without it some device would pass 6
    assert r["epsilon_user"] == pytest.approx(dl.epsilon([(1.1, 0.5)] * 12))
