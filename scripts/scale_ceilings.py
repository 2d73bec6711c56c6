"""No-DP ceilings of the model family on a finished run's data (RESULTS.md, issue 11).

    .venv/bin/python scripts/scale_ceilings.py results/scale-1000/work

Reads the run's text cache (pooled MiniLM states: run with `top_layers = 0`), its federated
users and its attribute basis, and prints, without DP or federation: one logistic model pooled
over every user's train pairs (what `aggregated` could reach), the same shared score plus a
per-user logistic head over the attribute probes (what `personalized` could reach), one model
per community with per-user heads over the 4 community scores (what prototypes with private
mixture weights could reach, with perfect prototypes), and the oracle. Needs scikit-learn (not a fedpref dependency: `pip install scikit-learn`).
"""
import numpy as np, torch, sys
from pathlib import Path
from fedpref.model.cache import TextCache, text_key
from fedpref.client.data import group_by_user, load_jsonl
from fedpref.model.basis import load_basis
from sklearn.linear_model import LogisticRegression
W=Path(sys.argv[1])
c=TextCache.load(W/"cache.safetensors")
users=group_by_user(load_jsonl(W/"federated.jsonl"))
B,_,_=load_basis(W/"attribute_basis.safetensors"); B=B.numpy()
F={}
def f(t):
    k=text_key(t)
    if k not in F:
        x=c.states[k].numpy(); F[k]=(x-x.mean())/x.std()
    return F[k]
def feats(pairs, kind):
    return np.array([(B@(f(p.chosen)-f(p.rejected))) if kind=="probe" else (f(p.chosen)-f(p.rejected)) for p in pairs])
def sym(X): return np.vstack([X,-X]), np.r_[np.ones(len(X)),np.zeros(len(X))]
Xtr=np.vstack([feats(u.train,"full") for u in users.values()])
m=LogisticRegression(C=1.0,fit_intercept=False,max_iter=3000).fit(*sym(Xtr))
print("pooled LR (aggregated, no DP)", np.mean([(m.decision_function(feats(u.test,"full"))>0).mean() for u in users.values()]))
accs=[]; accp=[]
for u in users.values():
    z=lambda P: np.column_stack([m.decision_function(feats(P,"full")), feats(P,"probe")])
    mu=LogisticRegression(C=1.0,fit_intercept=False,max_iter=2000).fit(*sym(z(u.train)))
    accs.append((mu.decision_function(z(u.test))>0).mean())
print("shared + per-user probes (personalized, no DP)", np.mean(accs))
comm={u.user_id: u.train[0].community for u in users.values()}
names=sorted(set(comm.values()))
cm={k: LogisticRegression(C=1.0,fit_intercept=False,max_iter=3000).fit(*sym(np.vstack(
    [feats(u.train,"full") for u in users.values() if comm[u.user_id]==k]))) for k in names}
print("own community's model (no head)", np.mean([(cm[comm[u.user_id]].decision_function(feats(u.test,"full"))>0).mean()
                                                  for u in users.values()]))
for probes in (True, False):
    z=lambda P: np.column_stack([cm[k].decision_function(feats(P,"full")) for k in names]
                                + ([feats(P,"probe")] if probes else []))
    acc=[]
    for u in users.values():
        mu=LogisticRegression(C=1.0,fit_intercept=False,max_iter=2000).fit(*sym(z(u.train)))
        acc.append((mu.decision_function(z(u.test))>0).mean())
    print(f"{len(names)} community scores{' + probes' if probes else ''}, per-user head (prototypes, no DP)", np.mean(acc))
print("oracle", np.mean([np.mean([p.oracle_margin>0 for p in u.test]) for u in users.values()]))
