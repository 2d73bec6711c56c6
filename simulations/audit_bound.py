"""The one-run empirical ε lower bound of the canary audits (:mod:`fedpref.simulations.audit`).

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
(arXiv:2305.08846): m canaries, each included independently with probability 1/2, one training
run; an attacker who guesses in/out for r of them and gets v right rules out every ε for which
v right guesses would be too unlikely. Small, pure functions; no training here.
"""

from __future__ import annotations

import numpy as np

from fedpref.common.errors import ConfigError


def _p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[≥ ``correct`` of ``guesses`` right] under an (ε, δ)-DP mechanism: the bound of Steinke
    et al.'s main theorem, P[Bin(r, q) ≥ v] + 2mδ·max_{1≤i≤v} P[v−i ≤ Bin(r, q) < v]/i,
    with q = e^ε/(1+e^ε)."""
    from scipy.special import expit
    from scipy.stats import binom

    q = float(expit(epsilon))
    tail = float(binom.sf(correct - 1, guesses, q))  # P[Bin(r, q) ≥ v]
    if correct == 0 or delta == 0:
        return min(1.0, tail)
    below = binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)  # P[Bin = v−1], …, P[Bin = 0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(1.0, tail + 2 * canaries * delta * alpha)


def epsilon_lower_bound(*, canaries: int, guesses: int, correct: int, delta: float, beta: float = 0.05) -> float:
    """The largest ε that ``correct`` right guesses out of ``guesses`` rule out, at confidence 1−β.

    One-run auditing (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
    NeurIPS 2023, arXiv:2305.08846; the main theorem of §3 and the p-value / ε search of their
    appendix code): ``canaries`` (m) canaries are each included independently with probability
    1/2; the attacker, seeing only the mechanism's output, guesses in/out for ``guesses`` (r) of
    them and abstains on the rest. If the mechanism is (ε, δ)-DP with respect to each canary,
    the number of right guesses W satisfies, for every v,

        P[W ≥ v] ≤ P[Bin(r, e^ε/(1+e^ε)) ≥ v] + 2mδ · max_{1≤i≤v} P[v−i ≤ Bin(r, ·) < v] / i.

    The result is the largest ε (by bisection, to ~1e-9) at which that bound is still below β
    for v = ``correct``: the mechanism is not (ε', δ)-DP for any ε' below it, with probability
    1−β over the canaries' inclusion. 0 when even ε = 0 explains the count (e.g. 0 right). With
    δ = 0 and r = v this is log(p/(1−p)), p = β^(1/r).
    """
    for name, v in (("canaries", canaries), ("guesses", guesses), ("correct", correct)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ConfigError(f"epsilon_lower_bound: {name} = {v!r}; use an integer ≥ 0")
    if not correct <= guesses <= canaries:
        raise ConfigError(f"epsilon_lower_bound: need correct ≤ guesses ≤ canaries; got {correct}, {guesses}, {canaries}")
    if not 0 <= delta < 1:
        raise ConfigError(f"epsilon_lower_bound: delta = {delta!r}; use a probability in [0, 1), e.g. 1e-5")
    if not 0 < beta < 1:
        raise ConfigError(f"epsilon_lower_bound: beta = {beta!r}; use 1 − confidence in (0, 1), e.g. 0.05")

    def p(eps: float) -> float:
        return _p_value(canaries=int(canaries), guesses=int(guesses), correct=int(correct), epsilon=eps, delta=delta)

    if p(0.0) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p(hi) < beta and hi < 1e4:  # as ε → ∞ the bound → 1 > β
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p(mid) < beta else (lo, mid)
    return lo


GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)  # k/m: guess "in" for the top k scores, "out" for the bottom k


def one_run_audit(scores: np.ndarray, included: np.ndarray, *, delta: float, beta: float = 0.05,
                  family: int = 1) -> dict:
    """AUC and the one-run ε lower bound of an attack's ``scores`` (higher: guessed included).

    The attacker guesses "included" for the k highest scores and "excluded" for the k lowest,
    for each k = f·m, f in :data:`GUESS_FRACTIONS`; every k (and each of ``family`` attacks
    the caller reports) gets a Bonferroni share β/(len·family) of the error, so the largest of
    the bounds holds at confidence 1−β. Ties are broken by canary index, which the attacker
    knows and which is independent of inclusion.
    """
    from sklearn.metrics import roc_auc_score

    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    if m < 2 or scores.shape != included.shape or not np.all(np.isfinite(scores)):
        raise ConfigError(f"one_run_audit: need ≥ 2 finite scores, one per canary; got {scores.shape}, {included.shape}")
    order = np.lexsort((np.arange(m), -scores))  # highest score first
    share = beta / (len(GUESS_FRACTIONS) * family)
    best = {"epsilon_lower": 0.0, "guesses": 0, "correct": 0}
    for f in GUESS_FRACTIONS:
        k = max(1, min(m // 2, round(f * m)))
        correct = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        eps = epsilon_lower_bound(canaries=m, guesses=2 * k, correct=correct, delta=delta, beta=share)
        if eps > best["epsilon_lower"] or not best["guesses"]:
            best = {"epsilon_lower": eps, "guesses": 2 * k, "correct": correct}
    both = 0 < included.sum() < m
    return {
        "auc": float(roc_auc_score(included, scores)) if both else None,
        **best,
        "canaries": m,
        "included": int(included.sum()),
        "confidence": 1 - beta,
    }


__all__ = ["GUESS_FRACTIONS", "epsilon_lower_bound", "one_run_audit"]
