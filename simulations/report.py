"""``report.html`` and its PNG figures, from the results dict alone."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpref.common.atomic import write_text_atomic  # noqa: E402

ORDER = ("count", "aggregated", "local", "finetuned", "personalized", "oracle")
COLORS = {"count": "#9467bd", "aggregated": "#d62728", "local": "#7f7f7f", "finetuned": "#ff7f0e",
          "personalized": "#2ca02c", "oracle": "#1f77b4"}


def _fit_batches(sl: dict) -> str:
    """The private-only fits' batches where they differ from a round's (older results.json: none)."""
    fits = {sl.get("personalize_batch_size", sl["batch_size"]), sl.get("private_batch_size", sl["batch_size"])}
    return "" if fits == {sl["batch_size"]} else f", {' / '.join(str(b) for b in sorted(fits))} in the private-only fits"


def _methods(res: dict) -> list[str]:
    return [m for m in ORDER if m in res["methods"]]


def plot_distribution(res: dict, path: Path) -> None:
    ms = _methods(res)
    fig, ax = plt.subplots(figsize=(7, 4))
    data = [list(res["methods"][m]["per_user"].values()) for m in ms]
    parts = ax.violinplot(data, showmeans=True, showextrema=True)
    for body, m in zip(parts["bodies"], ms):
        body.set_facecolor(COLORS[m])
        body.set_alpha(0.5)
    ax.set_xticks(range(1, len(ms) + 1), ms)
    ax.set_ylabel("held-out accuracy per user")
    ax.set_title("Per-user accuracy distribution")
    ax.set_ylim(0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_communities(res: dict, path: Path) -> None:
    ms = _methods(res)
    comms = list(res["communities"]["sizes"])
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(ms)
    for i, m in enumerate(ms):
        vals = [res["methods"][m]["per_community"].get(c, float("nan")) for c in comms]
        ax.bar([j + i * w for j in range(len(comms))], vals, width=w, label=m, color=COLORS[m])
    sizes = res["communities"]["sizes"]
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(comms))], [f"{c}\n({sizes[c]} users)" for c in comms])
    ax.set_ylabel("mean held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Accuracy per community")
    ax.legend(fontsize=8, ncol=len(ms))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rounds(res: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, hist in res["rounds"].items():
        xs = [r["server_round"] for r in hist if "eval_accuracy" in r["metrics"]]
        ys = [r["metrics"]["eval_accuracy"] for r in hist if "eval_accuracy" in r["metrics"]]
        ax.plot(xs, ys, marker="o", label=m, color=COLORS.get(m))
    if "oracle" in res["methods"]:
        ax.axhline(res["methods"]["oracle"]["mean_accuracy"], ls="--", color=COLORS["oracle"], label="oracle")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy of sampled clients\n(model received at round start)")
    ax.set_title("Accuracy against rounds")
    ax.set_ylim(0.3, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_privacy(res: dict, path: Path) -> None:
    pr = res["privacy"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(1, len(pr["epsilon_user_by_round"]) + 1))
    ax.plot(xs, pr["epsilon_user_by_round"], marker="o", label="ε_user (shared model, user-level)")
    ax.plot(xs, pr["epsilon_sample_max_by_round"], marker="s", label="max ε_sample (devices, sample-level)")
    ax.set_xlabel("round")
    ax.set_ylabel(f"ε at δ = {pr['delta']:g}")
    ax.set_title("Privacy spent against rounds (personalized)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_audits(res: dict, path: Path) -> None:
    """The empirical privacy audits: canary AUC and ε lower bound next to the formal ε, at both
    levels, and community inference by the server."""
    au = res["privacy"]["audit"]
    ci, mi, ul = au["community_inference"], au["membership"], au["user_level"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.9))
    arms = [("sample\nDP", mi["dp"]), ("sample\nno DP", mi["no_dp"]), ("user\nDP", ul["dp"]), ("user\nno DP", ul["no_dp"])]
    colors = ["#2ca02c", "#d62728", "#2ca02c", "#d62728"]
    bars = a.bar([n for n, _ in arms], [r["auc"] if r["auc"] is not None else 0.5 for _, r in arms], color=colors)
    a.bar_label(bars, fmt="%.2f", fontsize=8)
    a.axhline(0.5, ls="--", color="k", label="0.5: guessing")
    a.set_ylim(0.0, 1.05)
    a.set_ylabel("canary attack AUC")
    a.set_title("Canary membership: AUC", fontsize=9)
    a.legend(fontsize=8, loc="lower right")
    x = [0.0, 1.0]
    w = 0.27
    for off, key, label, color in ((-w, "dp", "ε lower bound, DP", "#2ca02c"), (0.0, "no_dp", "ε lower bound, no DP", "#d62728")):
        vals = [mi[key]["epsilon_lower"], ul[key]["epsilon_lower"]]
        bb = b.bar([v + off for v in x], vals, width=w, color=color, label=label)
        b.bar_label(bb, fmt="%.2f", fontsize=8)
    bb = b.bar([v + w for v in x], [mi["dp"]["epsilon_formal"], ul["dp"]["epsilon_formal"]], width=w, color="#1f77b4",
               label="formal ε (DP)")
    b.bar_label(bb, fmt="%.2f", fontsize=8)
    b.set_xticks(x, [f"sample level\n({mi['canaries']} canaries)", f"user level\n({ul['canaries']} canaries)"])
    b.set_ylabel(f"ε (δ = {mi['delta']:g}, {mi['dp']['confidence']:.0%} confidence)")
    b.set_title("Empirical ε (one run) vs formal ε", fontsize=9)
    b.legend(fontsize=7)
    d = ci["differencing"]
    names = ["individual\nupdate", "SecAgg server:\ndropout diff.", "SecAgg server:\nre-run diff.", "observer of\nreleased models"]
    vals = [ci["individual_updates"], d["secagg_server"], d["secagg_server_rerun"], d["released_observer"]]
    bars = c.bar(names, vals, color=["#d62728", "#d62728", "#ff7f0e", "#2ca02c"])
    c.bar_label(bars, fmt="%.2f", fontsize=8)
    c.axhline(ci["chance"], ls="--", color="k", label=f"chance {ci['chance']:.2f}")
    c.axhline(ci["chance_best_attack_max"], ls=":", color="k",
              label=f"best attacker, shuffled labels (max) {ci['chance_best_attack_max']:.2f}")
    c.set_ylim(0, 1.05)
    c.set_ylabel("held-out accuracy")
    c.tick_params(axis="x", labelsize=7)
    c.set_title(f"Community inference ({ci['users']} users, {ci['folds']}-fold)", fontsize=9)
    c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _eps_row(name: str, r: dict, formal: str) -> str:
    auc = "—" if r["auc"] is None else f"{r['auc']:.3f}"
    return (f"<tr><td>{html.escape(name)}</td><td>{auc}</td><td>{r['epsilon_lower']:.2f}</td>"
            f"<td>{r['correct']}/{r['guesses']}</td><td>{formal}</td></tr>")


def audit_section(res: dict) -> str:
    if "audit" not in res.get("privacy", {}):
        return ""
    au = res["privacy"]["audit"]
    ci, mi, ul = au["community_inference"], au["membership"], au["user_level"]
    d = ci["differencing"]
    rows = "".join([
        _eps_row("sample level, DP-SGD (device model or clipped delta)", mi["dp"],
                 f"ε_sample = {mi['dp']['epsilon_formal']:.2f} (of this training)"),
        _eps_row("sample level, no DP (same steps)", mi["no_dp"], "none"),
        _eps_row("user level, server noise z (released updates)", ul["dp"], f"ε_user = {ul['dp']['epsilon_formal']:.2f}"),
        _eps_row("user level, no server noise", ul["no_dp"], "none"),
    ])
    both_hold = mi["dp"]["epsilon_lower"] <= mi["dp"]["epsilon_formal"] and ul["dp"]["epsilon_lower"] <= ul["dp"]["epsilon_formal"]
    sentence = (
        f"Without DP the canary attacks find the planted canaries (ε ≥ {mi['no_dp']['epsilon_lower']:.2f} on devices, "
        f"ε ≥ {ul['no_dp']['epsilon_lower']:.2f} on the released model), so they can see; with DP they prove at most "
        f"ε ≥ {mi['dp']['epsilon_lower']:.2f} and ε ≥ {ul['dp']['epsilon_lower']:.2f}, "
        + ("below the formal ε_sample and ε_user: consistent with the guarantees, though one run with "
           f"{mi['canaries']} and {ul['canaries']} canaries cannot show that they are tight."
           if both_hold else "<b>above a formal ε: the mechanism or its accounting has a bug</b>.")
    )
    if ul["dp"]["auc"] is not None and ul["dp"]["auc"] >= 0.75:
        sentence += (f" Note what ε_user = {ul['dp']['epsilon_formal']:.1f} allows: a canary user's participation shows in "
                     f"the released models with AUC {ul['dp']['auc']:.2f}.")
    return f"""<h3>Empirical audits</h3>
<p><b>{sentence}</b> Empirical ε are one-run lower bounds (Steinke, Nasr &amp; Jagielski, NeurIPS 2023) at
{mi['dp']['confidence']:.0%} confidence and δ = {mi['delta']:g}, over guesses on the top and bottom scored canaries.
Sample level: {mi['devices']} devices, {mi['canaries_per_device']} canary pairs each (random words, random label), each kept with probability 1/2; each device trains shared and
private adapters for {mi['epochs']} epochs at {mi.get('learning_rate_scale', 1.0):g}× the run's learning rates, DP-SGD
σ = {mi['noise_multiplier']:g} (clip {mi['max_grad_norm']:g}) or σ = 0; the attacker reads the device's model or its
clipped shared delta (white box). User level: {ul['canaries']} canary users (a random unit direction × C, in the
population with probability 1/2), {ul['rounds']} released rounds, server noise z = {ul['noise_multiplier']:g} or 0.</p>
<table><tr><th>audit arm</th><th>AUC</th><th>ε lower bound</th><th>right guesses</th><th>formal ε</th></tr>{rows}</table>
<p><b>Community inference.</b> A server that sees each clipped update guesses a user's community with
{ci['individual_updates']:.0%} held-out accuracy (chance {ci['chance']:.0%}). Secure aggregation alone does not stop a
server that can make one device drop out: the difference of the two aggregates is that device's update
({d['secagg_server']:.0%}); if the round is re-run instead, the other devices' fresh DP-SGD noise stays in the difference
({d['secagg_server_rerun']:.0%}). An observer of the released models, whose difference carries the server's noise
(std {d['noise_std_difference']:.3g} per coordinate), gets {d['released_observer']:.0%}. (Best of a logistic-regression
attacker on the whole vector and on each parameter tensor; {d['cohort']} users replayed one round twice. With the
communities shuffled among users the same best-of attacker scores {ci['chance_best_attack']:.0%} on average and up to
{ci['chance_best_attack_max']:.0%}: below that, a result is luck.)</p>
<img src="privacy_audits.png" alt="privacy audits">"""


SAFETY_ARMS = {
    "aggregated": ("aggregated", "#d62728"),
    "personalized_unbounded": ("personalized, no bound", "#ff7f0e"),
    "personalized_bounded": ("personalized, signed bound", "#2ca02c"),
}


def plot_safety(res: dict, path: Path) -> None:
    """The falsification experiment: violation rate per community, three arms."""
    sf = res["safety"]
    comms = list(res["communities"]["sizes"])
    cols = ["all", *comms]
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(SAFETY_ARMS)
    top = 0.0
    for i, (arm, (label, color)) in enumerate(SAFETY_ARMS.items()):
        vals = [sf["violation_rate"][arm], *(sf["violation_rate_by_community"][arm].get(c, float("nan")) for c in comms)]
        bars = ax.bar([j + i * w for j in range(len(cols))], vals, width=w, label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        top = max([top, *(v for v in vals if v == v)])
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(cols))], cols)
    ax.set_ylim(0, max(0.05, top) * 1.35)  # room for the legend above the bars
    ax.set_ylabel("violation rate\n(unsafe candidate ranked first)")
    ax.set_title("Does personalization break safety? Held-out (safe, unsafe) pairs")
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def safety_section(res: dict) -> str:
    """The report's falsification section (empty without a ``safety`` result)."""
    if "safety" not in res:
        return ""
    sf = res["safety"]
    vr, by = sf["violation_rate"], sf["violation_rate_by_community"]
    worst = max(by["personalized_unbounded"], key=lambda c: by["personalized_unbounded"][c])
    holds = vr["personalized_bounded"] <= vr["aggregated"]
    breaks = vr["personalized_unbounded"] > vr["aggregated"] + 0.02
    verdict = ("Unbounded personalization breaks safety constraints more often than aggregation"
               if breaks else "Unbounded personalization does not break safety constraints more often than aggregation here")
    outcome = (
        f"{verdict}: it ranks the unsafe candidate first in {vr['personalized_unbounded']:.1%} "
        f"of held-out safety pairs ({html.escape(worst)} community: {by['personalized_unbounded'][worst]:.1%}) "
        f"against {vr['aggregated']:.1%} for the aggregated model; with the signed policy v{sf['policy_version']} "
        f"as a bound it is {vr['personalized_bounded']:.1%}, "
        + ("no worse than aggregation" if holds else "<b>worse than aggregation</b>")
        + f", while accuracy on safe pairs changes by {sf['safe_pair_accuracy_change_from_bound']:+.3f}."
    )
    t = sf["tampered_clients"]
    tamper = ""
    if t["users"]:
        tamper = (
            f"<p>Tampered devices ({html.escape(', '.join(t['users']))}) perturbed their safety weights after "
            f"verifying the policy and attested the digest an honest device reports; the server rejected "
            f"{sum(t['rejected_updates'].values())} of their updates. The attestation is a self-declaration: it "
            "catches a misconfigured device, not a lying one. A tampered device removes the bound for its own user "
            "only; every other device ranks with the classifier it verified itself.</p>"
        )
    cats = ", ".join(f"{html.escape(c['name'])} (≥ {c['threshold']:.2f})" for c in sf["policy"]["categories"])
    val = sf["policy"].get("classifier_validation") or {}
    val_txt = (
        f" On its held-out validation texts it flags {val.get('flagged_any_unsafe_recall', float('nan')):.1%} of unsafe "
        f"texts and {val.get('safe_false_positive_rate', float('nan')):.1%} of safe ones." if val else ""
    )
    return f"""<h2>Safety: the falsification experiment</h2>
<p><b>{outcome}</b></p>
<img src="safety_violations.png" alt="violation rate per community">
<p>The policy is a linear classifier over the frozen backbone's pooled embedding for {cats}, trained from
labelled texts disjoint from the benchmark's, signed {len(sf['policy']['signed_by'])} times with Ed25519 (DSSE),
verified by every device against the run's trust root, kept frozen and attested by digest
(<code>{html.escape(sf['policy']['safety_digest'][:16])}…</code>).{val_txt}</p>{tamper}"""


FIGURES = {
    "accuracy_distribution.png": plot_distribution,
    "accuracy_per_community.png": plot_communities,
    "accuracy_vs_rounds.png": plot_rounds,
    "privacy_vs_rounds.png": plot_privacy,
}


def plot_robustness(res: dict, path: Path) -> None:
    """Honest users' accuracy and violation rates against the share of lying devices."""
    rb = res["robustness"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for section, style in (("poisoning", "-o"), ("poisoning_secagg", "--s")):
        runs = rb.get(section)
        if not runs:
            continue
        keys = sorted((k for k in runs if k != "none"), key=float)
        xs = [0.0, *map(float, keys)]
        none = runs.get("none", rb["poisoning"]["none"])  # SecAgg+ has its own attack-free control
        rows = [none, *(runs[k] for k in keys)]
        tag = " (SecAgg+)" if section == "poisoning_secagg" else ""
        axes[0].plot(xs, [r["honest_accuracy"] for r in rows], style, color=COLORS["personalized"], label="accuracy" + tag)
        for arm, color in (("unbounded_violation", COLORS["aggregated"]), ("bounded_violation", COLORS["oracle"])):
            if arm in none:
                axes[1].plot(xs, [r[arm] for r in rows], style, color=color, label=arm.replace("_", " ") + tag)
    axes[0].set_ylabel("honest users' held-out accuracy")
    axes[1].set_ylabel("honest users' violation rate")
    for ax in axes:
        ax.set_xlabel("share of lying devices")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylim(-0.01, max(0.05, *(ln.get_ydata().max() for ln in axes[1].lines)) * 1.1 if axes[1].lines else 1)
    fig.suptitle("Poisoning: the personalized federation with lying devices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def robustness_section(res: dict) -> str:
    """The poisoning experiment, when the run had one."""
    rb = res.get("robustness")
    if not rb:
        return ""
    rows = []
    for section in ("poisoning", "poisoning_secagg"):
        for key, r in (rb.get(section) or {}).items():
            base = r.get("baseline", r)
            path = "SecAgg+" if section == "poisoning_secagg" or rb["paths"] == ["secagg"] else "plain"
            cells = [f"{r['honest_accuracy']:.3f} ({r['honest_accuracy'] - base['honest_accuracy']:+.3f})"]
            for arm in ("unbounded_violation", "bounded_violation"):
                cells.append(f"{r[arm]:.3f} ({r[arm] - base[arm]:+.3f})" if arm in r else "–")
            label = "none" if key == "none" else f"{float(key):.0%} ({len(r['malicious'])} devices)"
            rows.append(f"<tr><td>{label}</td><td>{path}</td><td>{r['users']}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"""<h2>Robustness: lying devices</h2>
<p>A share of the devices lies: each verifies the policy and attests exactly what an honest device attests, and
sends every round the largest update the server accepts (norm C), trained on its (safe, unsafe) pairs relabelled so
the unsafe text wins. Numbers are over the honest users only; in brackets, the change from the attack-free run on the
same users. The bounded rate is what a device's user is shown: the classifier each device verified keeps unsafe
candidates below safe ones whatever the shared model becomes. The server's only defence is the per-update norm
bound C, which limits a lying device to what one honest device can move on the plain path; under SecAgg+ no one
checks one device's norm, and a liar can send up to C per coordinate. Each SecAgg+ row is compared with an
attack-free SecAgg+ run ("none", SecAgg+), so the change in brackets is the attackers' doing, not the path's.</p>
<table><tr><th>lying devices</th><th>path</th><th>honest users</th><th>accuracy</th><th>unbounded violation</th>
<th>bounded violation</th></tr>{''.join(rows)}</table>
<img src="robustness_poisoning.png" alt="poisoning">"""


NEW_USER_METHODS = ("aggregated", "local", "personalized", "oracle")


def plot_new_users(res: dict, path: Path) -> None:
    """New users' held-out accuracy against the pairs they join with."""
    nu = res["new_users"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in NEW_USER_METHODS:
        if m in nu:
            ks = sorted(nu[m], key=int)
            ax.plot([int(k) for k in ks], [nu[m][k]["mean_accuracy"] for k in ks], "-o", color=COLORS[m], label=m)
    ax.set_xlabel("training pairs of the new user (k)")
    ax.set_ylabel("mean held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"New users ({len(nu['users'])} held out of every run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def new_users_section(res: dict) -> str:
    nu = res.get("new_users")
    if not nu:
        return ""
    ms = [m for m in NEW_USER_METHODS if m in nu]
    head = "".join(f"<th>{m}</th>" for m in ms)
    rows = "".join(
        f"<tr><td>{k}</td>" + "".join(f"<td>{nu[m][str(k)]['mean_accuracy']:.3f}</td>" for m in ms) + "</tr>"
        for k in nu["pairs"]
    )
    return f"""<h2>New users</h2>
<p>{len(nu['users'])} users (a share of each community) took part in no run. Each then joins with its first k
training pairs: <i>personalized</i> keeps the federation's shared model frozen and fits a private adapter on the k
pairs with the same DP-SGD ({nu['epochs']} epochs) as <i>local</i>, which fits one on the k pairs alone;
<i>aggregated</i> is the aggregated federation's model as it is. Mean accuracy on the new users' held-out pairs:</p>
<table><tr><th>k</th>{head}</tr>{rows}</table>
<img src="new_users.png" alt="new users">"""


def basis_section(res: dict) -> str:
    """What the personal head reads: the public attribute basis, when the run had one."""
    b = res.get("attribute_basis")
    if not b:
        return ""
    acc = "".join(f"<tr><td>{html.escape(n)}</td><td>{v:.3f}</td></tr>" for n, v in b["holdout_sign_accuracy"].items())
    return f"""<h2>The personal head's attribute basis</h2>
<p>Each device's private head reads {len(b['labels'])} frozen probes, one per response attribute, fitted by ridge
regression (penalty {b['ridge']:g}) on {b['texts']:,} public labelled texts that no user labelled, and scaled to the
features' norm; so a user's preferences are {len(b['labels']) + 1} private numbers. Sign accuracy of each probe on
the 20 % of those texts held out of its fit (basis sha256 {html.escape(b['sha256'][:16])}…):</p>
<table><tr><th>attribute</th><th>held-out sign accuracy</th></tr>{acc}</table>"""


def summary_rows(res: dict) -> list[tuple[str, float, float, str, float]]:
    """(method, mean, p10, worst community, its accuracy) per method."""
    rows = []
    for m in _methods(res):
        r = res["methods"][m]
        worst = min(r["per_community"], key=r["per_community"].get)
        rows.append((m, r["mean_accuracy"], r["p10_accuracy"], worst, r["per_community"][worst]))
    return rows


def write_report(res: dict, out: Path, *, extra_sections: list[str] | None = None) -> Path:
    for name, fn in FIGURES.items():
        fn(res, out / name)
    if "safety" in res:
        plot_safety(res, out / "safety_violations.png")
    if "audit" in res["privacy"]:
        plot_audits(res, out / "privacy_audits.png")
    if res.get("robustness"):
        plot_robustness(res, out / "robustness_poisoning.png")
    if res.get("new_users"):
        plot_new_users(res, out / "new_users.png")
    cost, pr = res["cost"], res["privacy"]
    ul, sl = pr["user_level"], pr["sample_level"]
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{mean:.3f}</td><td>{lo:.3f}</td><td>{html.escape(w)} ({wa:.3f})</td></tr>"
        for m, mean, lo, w, wa in summary_rows(res)
    )
    meth = res["methods"]
    small = res["communities"]["smallest"]
    reading = ""
    if "personalized" in meth and "aggregated" in meth:
        gain = meth["personalized"]["mean_accuracy"] - meth["aggregated"]["mean_accuracy"]
        reading = (
            f"Personalized federated training reaches a mean held-out accuracy of "
            f"{meth['personalized']['mean_accuracy']:.3f} against {meth['aggregated']['mean_accuracy']:.3f} "
            f"for one aggregated model ({gain:+.3f}); on the smallest community, <b>{html.escape(small)}</b>, "
            f"it scores {meth['personalized']['per_community'].get(small, float('nan')):.3f} against "
            f"{meth['aggregated']['per_community'].get(small, float('nan')):.3f}."
        )
    if pz := res.get("personalize"):
        reading += (
            f" After the last round, the released model went to all {pz['population']} devices; "
            f"{pz['fitted'] + pz.get('fitted_earlier', 0)} fitted their private adapter on it ({pz['epochs']} DP-SGD epochs on the device, "
            f"charged to its own ε_sample, nothing sent back), {len(pz['declined'])} declined."
        )
    ratio = cost["bytes_up_per_client_round"] / max(cost["shared_plus_private_bytes"], 1)
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedpref simulation report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;line-height:1.45}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>fedpref: personalized vs aggregated preference learning</h1>
<p>{reading}</p>
<h2>Summary</h2>
<table><tr><th>method</th><th>mean accuracy</th><th>p10 accuracy</th><th>worst community</th></tr>{rows}</table>
{basis_section(res)}
<h2>Per-user accuracy</h2><img src="accuracy_distribution.png" alt="per-user accuracy distribution">
<h2>Per community</h2><img src="accuracy_per_community.png" alt="accuracy per community">
<h2>Rounds</h2><img src="accuracy_vs_rounds.png" alt="accuracy against rounds">
<h2>Privacy</h2>
<p>Accountant: {html.escape(pr['accountant'])}, δ = {pr['delta']:g}.
<b>User-level</b> (shared model): clipped deltas (C = {ul['clip_norm']}), Gaussian noise z = {ul['server_noise_multiplier']}
on the mean over the expected cohort, Poisson client sampling q = {ul['client_sample_rate']}, {ul['rounds']} rounds:
ε_user = {pr['epsilon_user']:.3f}.
<b>Sample-level</b> (each device, DP-SGD with Opacus): σ = {sl['noise_multiplier']}, per-sample clip {sl['max_grad_norm']},
expected batch {sl['batch_size']} in a round{_fit_batches(sl)}: largest ε_sample = {pr['epsilon_sample_max']:.3f} (rounds and fits
together, on one device's accountant). The two are separate guarantees.
Secure aggregation (Flower SecAgg+) was <b>{'on: the server saw only the sum of each cohort' if pr.get('secure_aggregation') else 'off: the server saw each clipped update'}</b>.</p>
<img src="privacy_vs_rounds.png" alt="privacy against rounds">
{audit_section(res)}
<h2>Cost</h2>
<p>Wall time {cost['wall_seconds']:.1f} s for all methods. Per client per round, {cost['bytes_up_per_client_round']:,} bytes go up
(the shared delta is {cost['shared_delta_bytes']:,} bytes of float32) and {cost['bytes_down_per_client_round']:,} bytes come down.
Sending shared <i>and</i> private adapters would cost {cost['shared_plus_private_bytes']:,} bytes: fedpref sends
{ratio:.2f}× of that, and the private adapter never leaves the device.</p>
{new_users_section(res)}
{safety_section(res)}
{robustness_section(res)}
{''.join(extra_sections or [])}
</body></html>"""
    path = out / "report.html"
    write_text_atomic(path, body)
    return path


def cost_line(res: dict) -> str:
    """One line: wall time, peak memory and where the time went (``cost`` of results.json)."""
    c = res.get("cost", {})
    if "phases" not in c:
        return f"cost: wall {c.get('wall_seconds', 0):.0f} s"
    ph = c["phases"]
    fed = c.get("federation", {})
    ratio = fed.get("overhead_over_compute")
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in sorted(ph.items(), key=lambda kv: -kv[1]))
    return (f"cost: wall {c['wall_seconds']:.0f} s, peak RSS {c['peak_rss_bytes'] / 2**30:.2f} GiB (whole process tree); "
            + parts + (f"; Flower/Ray overhead = {ratio:.0%} of client compute" if ratio is not None else ""))
