"""How much of the persona benchmark frozen MiniLM features can carry (RESULTS.md, "Where
frozen features lose the signal"). No DP, no federation: per-user logistic regression on the
pair differences of each user's train pairs, evaluated on the user's test pairs.

    .venv/bin/python scripts/feature_ceilings.py [--users 40] [--pairs-per-user 100] [--seed 0]

About a minute on 2 cores (704 texts to embed, then 40 × 14 small fits).
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import KFold, cross_val_score

from fedpref.model.backbone import embed_texts, load_backbone
from fedpref.simulations.persona import ATTRIBUTES, SAFE, PersonaConfig, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--pairs-per-user", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    d = generate(PersonaConfig(users=args.users, pairs_per_user=args.pairs_per_user, seed=args.seed))
    texts = sorted(d.styles)
    idx = {t: i for i, t in enumerate(texts)}
    feats = embed_texts(load_backbone(None), texts, max_length=96)  # (N, H)
    feats = (feats - feats.mean(1, keepdims=True)) / feats.std(1, keepdims=True)  # the model's layer norm
    styles = np.array([d.styles[t] for t in texts], float)  # (N, A)
    unsafe = np.array([d.categories[t] != SAFE for t in texts], float)[:, None]  # (N, 1)

    for a, name in enumerate(ATTRIBUTES):
        acc = cross_val_score(LogisticRegression(max_iter=2000), feats, styles[:, a] > 0, cv=5).mean()
        print(f"probe {name:<10} {acc:.3f}")

    predicted = np.zeros_like(styles)
    for tr, te in KFold(5, shuffle=True, random_state=0).split(feats):
        predicted[te] = Ridge(alpha=10.0).fit(feats[tr], styles[tr]).predict(feats[te])
    within = np.vstack([feats[[idx[c.text] for c in item.candidates]] - feats[[idx[c.text] for c in item.candidates]].mean(0)
                        for item in d.pool])
    pcs = np.linalg.svd(within, full_matrices=False)[2][:16]  # (16, H)
    pca = feats @ pcs.T
    pca /= pca.std(0)

    by_user: dict[str, list] = {}
    for p in d.pairs:
        by_user.setdefault(p.user_id, []).append(p)
    comm = {u: t.community for u, t in d.users.items()}

    def per_user(x: np.ndarray, c: float, only: str = "") -> dict[str, float]:
        out = {}
        for u, ps in sorted(by_user.items()):
            tr = [p for p in ps if p.split == "train"]
            te = [p for p in ps if p.split == "test"]
            if only:
                te = [p for p in te if (p.chosen_category is None and p.rejected_category is None) == (only == "regular")]
            xtr = np.array([x[idx[p.chosen]] - x[idx[p.rejected]] for p in tr])
            xte = np.array([x[idx[p.chosen]] - x[idx[p.rejected]] for p in te])
            m = LogisticRegression(C=c, max_iter=3000, fit_intercept=False)
            m.fit(np.vstack([xtr, -xtr]), np.r_[np.ones(len(xtr)), np.zeros(len(xtr))])
            out[u] = float((m.decision_function(xte) > 0).mean())
        return out

    def row(tag: str, accs: dict[str, float]) -> None:
        per = {c: np.mean([a for u, a in accs.items() if comm[u] == c]) for c in sorted(set(comm.values()))}
        print(f"{tag:<46} mean {np.mean(list(accs.values())):.3f}  " + "  ".join(f"{c} {v:.3f}" for c, v in per.items()))

    row("oracle", d.oracle_accuracy())
    for c in (0.01, 0.1, 1.0):
        row(f"features, C={c}", per_user(feats, c))
    row("features, C=0.01, regular pairs", per_user(feats, 0.01, "regular"))
    row("features, C=0.01, safety pairs", per_user(feats, 0.01, "safety"))
    row("16 within-prompt principal directions, C=0.1", per_user(pca, 0.1))
    row("predicted styles, C=0.1", per_user(predicted, 0.1))
    row("features + unsafe indicator (x10), C=0.01", per_user(np.hstack([feats, 10 * unsafe]), 0.01))
    row("predicted styles + unsafe indicator, C=1", per_user(np.hstack([predicted, unsafe]), 1.0))
    row("true styles + unsafe indicator, C=1", per_user(np.hstack([styles, unsafe]), 1.0))


if __name__ == "__main__":
    main()
