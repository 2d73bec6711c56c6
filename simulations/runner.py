"""``fedpref-sim run``: every method on the same users, evaluated per user, then a report.

Phases (each with a progress bar):

1. data: generate the ``persona`` benchmark, or load a JSONL of real pairs;
2. cache: run the frozen lower backbone blocks once per distinct text;
3. ``aggregated`` and ``personalized``: federated runs on Flower's Simulation Engine;
4. ``local`` and ``finetuned``: DP-SGD on each device alone (after FedAvg for ``finetuned``);
5. evaluation of every method on each user's held-out pairs, ``oracle`` from the truth;
6. ``results.json``, PNG figures and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpref.client.app import SimulatedDevices
from fedpref.client.data import UserData, group_by_user, load_jsonl, write_jsonl
from fedpref.client.device import DeviceState, Runtime, get_runtime, stable_seed, train_private_locally
from fedpref.client.terms import DeviceTerms
from fedpref.client.trainer import LocalTrainConfig, pair_accuracy
from fedpref.common.atomic import write_text_atomic
from fedpref.common.errors import ConfigError
from fedpref.common.tomlconfig import to_plain
from fedpref.model.cache import TextCache
from fedpref.model.io import load_adapter_weights
from fedpref.model.preference import get_arrays, set_arrays
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group
from fedpref.protocol.runconfig import Method
from fedpref.simulations.config import SimConfig
from fedpref.simulations.cost import PeakRSS, Phases
from fedpref.simulations.engine import device_terms, ray_session, run_on_simulation_engine
from fedpref.simulations.newusers import hold_out
from fedpref.simulations.persona import generate
from fedpref.simulations.progress import console, progress
from fedpref.simulations.safety import evaluate_safety, prepare_policy, summarize_safety



@dataclass
class MethodResult:
    per_user: dict[str, float]
    wall_seconds: float = 0.0
    epsilon_sample_max: float = 0.0
    extra: dict = field(default_factory=dict)


def prepare_data(cfg: SimConfig, data: Path | None, out: Path) -> tuple[Path, dict[str, UserData]]:
    if data is None:
        data = out / "persona.jsonl"
        write_jsonl(generate(cfg.persona).pairs, data)
    users = group_by_user(load_jsonl(data))
    return data, users


def prepare_basis(cfg: SimConfig, work: Path) -> tuple[SimConfig, dict]:
    """Fit the public attribute basis (``[attributes]``) and point the model config at it."""
    from fedpref.model.basis import build_basis, load_attribute_corpus, save_basis
    from fedpref.simulations.persona import attribute_corpus

    a = cfg.attributes
    records = load_attribute_corpus(Path(a.corpus)) if a.corpus else attribute_corpus(cfg.persona, n=a.corpus_texts)
    labels = list(records[0]["attributes"])
    if cfg.model.adapter.personal_dims != len(labels):
        raise ConfigError(f"[attributes] gives {len(labels)} attributes ({', '.join(labels)}) but "
                          f"model.adapter.personal_dims = {cfg.model.adapter.personal_dims}; set it to {len(labels)}")
    with progress() as bar:
        task = bar.add_task("attribute basis: embedding the public corpus", total=len(records))
        weight, holdout = build_basis(records, backbone=cfg.model.backbone or None, max_length=cfg.model.max_length,
                                      ridge=a.ridge, seed=cfg.runtime.seed, progress=lambda k: bar.advance(task, k))
    path = work / "attribute_basis.safetensors"
    sha = save_basis(path, weight, labels,
                     source=a.corpus or f"persona.attribute_corpus(seed={cfg.persona.seed}, n={a.corpus_texts})")
    info = {"labels": labels, "texts": len(records), "ridge": a.ridge, "sha256": sha, "holdout_sign_accuracy": holdout}
    console.print(f"[bold]attribute basis[/]: {len(labels)} probes on {len(records)} public texts, held-out sign accuracy "
                  + ", ".join(f"{n} {v:.2f}" for n, v in holdout.items()))
    return dataclasses.replace(cfg, model=cfg.model.with_attribute_basis(str(path))), info


def build_cache(rt: Runtime, users: dict[str, UserData], path: Path, max_length: int) -> TextCache:
    texts = sorted({t for u in users.values() for p in (*u.train, *u.test) for t in (p.chosen, p.rejected)})
    with progress() as prog:
        task = prog.add_task("cache frozen blocks", total=len(texts))
        cache = TextCache.build(rt.model, rt.backbone, texts, max_length=max_length,
                                progress=lambda n: prog.advance(task, n))
    cache.save(path)
    return cache


def _shared_from_checkpoint(rt: Runtime, server_dir: Path) -> dict[str, np.ndarray]:
    name = (server_dir / "checkpoints" / "LATEST").read_text().strip()
    load_adapter_weights(rt.model, SHARED_ADAPTER, server_dir / "checkpoints" / name)
    return get_arrays(rt.model, Group.SHARED)


def evaluate(rt: Runtime, users: dict[str, UserData], cache: TextCache, *, private_root: Path | None, label: str) -> dict[str, float]:
    """Held-out accuracy per user of the runtime's model (shared weights already loaded)."""
    out = {}
    with progress() as prog:
        task = prog.add_task(f"evaluate {label}", total=len(users))
        for uid, user in users.items():
            if private_root is not None:  # never sampled: the common initial adapter
                DeviceState(private_root / uid).load_private(rt)
            out[uid] = pair_accuracy(rt.model, cache, [p.chosen for p in user.test], [p.rejected for p in user.test])
            prog.advance(task)
    return out


def _local_cfg(cfg: SimConfig, epochs: int, seed: int) -> LocalTrainConfig:
    seeded = cfg.runtime.deterministic_noise  # otherwise every draw comes from the OS CSPRNG
    return LocalTrainConfig(
        epochs=epochs, batch_size=cfg.methods.fit_batch_size(cfg.local),
        learning_rate=cfg.local.learning_rate,
        head_learning_rate=cfg.methods.private_head_learning_rate or cfg.local.head_learning_rate,
        projection_learning_rate=cfg.local.projection_learning_rate, noise_multiplier=cfg.local.dp_noise_multiplier,
        max_grad_norm=cfg.local.dp_max_grad_norm, seed=seed if seeded else None,
        noise_seed=stable_seed(seed, "noise") if seeded else None,
    )


def train_locally(
    cfg: SimConfig, rt: Runtime, users: dict[str, UserData], cache: TextCache, root: Path, *,
    epochs: int, shared: dict[str, np.ndarray] | None, label: str, spent: Path | None = None,
) -> float:
    """DP-SGD of the private adapter on each device alone, within the device's ε_sample budget
    ([local] max_epsilon_sample: fewer epochs where it runs short, as the final personalization
    does); returns the largest ε_sample. ``spent``: the clients folder of the federation these
    devices took part in (``finetuned``: FedAvg's), whose accountants the fit continues, so the
    baseline is held to the budget its rounds already drew on."""
    eps_max = 0.0
    with progress() as prog:
        task = prog.add_task(f"train {label}", total=len(users))
        for i, (uid, user) in enumerate(users.items()):
            state = DeviceState(root / uid)
            rounds = spent / uid / state.accountant_path.name if spent is not None else None
            if rounds is not None and rounds.exists() and not state.accountant_path.exists():
                state.root.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(rounds, state.accountant_path)
            eps = train_private_locally(
                rt, user, state, _local_cfg(cfg, epochs, cfg.runtime.seed + i),
                cache=cache, shared=shared, delta=cfg.federation.delta, max_epsilon=cfg.local.max_epsilon_sample,
            )
            eps_max = max(eps_max, eps)
            prog.advance(task)
    return eps_max


def _max_device_epsilon(root: Path, delta: float) -> float:
    from fedpref.common.accounting import SampleLevelAccountant

    eps = [SampleLevelAccountant.load(p).epsilon(delta) for p in root.glob("*/accountant.json")]
    return max(eps, default=0.0)


def _subset(users: dict[str, UserData], n: int) -> dict[str, UserData]:
    """``n`` users (0 = all), taken round-robin over communities: as balanced as they allow."""
    if n <= 0 or n >= len(users):
        return users
    by_comm: dict[str, list[str]] = {}
    for uid in sorted(users):
        by_comm.setdefault(users[uid].community or "all", []).append(uid)
    picked: list[str] = []
    while len(picked) < n:
        for ids in by_comm.values():
            if ids and len(picked) < n:
                picked.append(ids.pop(0))
    return {uid: users[uid] for uid in sorted(picked)}


def run_audits(cfg: SimConfig, users: dict[str, UserData], cache: TextCache, work: Path, *,
               shared: dict[str, np.ndarray], sim_policy, terms: DeviceTerms, rounds: int) -> dict:  # noqa: ANN001
    """The empirical privacy audits (:mod:`fedpref.simulations.audit`), on the run's users.

    1. Community inference: one more round of the personalized federation, from its final
       shared weights, replayed twice by ``audit.community_users`` users (what the server would
       observe next); individual updates and dropout differencing.
    2. User-level canaries against the server's release over the ``rounds`` rounds the run
       released, mixed with the first replay's real clipped deltas (reused cyclically over the
       run's population).
    3. Sample-level canaries on ``audit.canary_devices`` devices trained as in a personalized
       round from the same global weights, for ``audit.canary_epochs`` epochs at
       ``audit.canary_lr_scale`` × the [local] learning rates, DP-SGD on ([local] σ and clip)
       and off.

    Every ε lower bound holds at ``audit.confidence``; ``seconds`` times each audit. Torch runs
    with ``runtime.torch_threads`` threads meanwhile, as a simulated device does.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.runtime.torch_threads)  # the audits play devices: the devices' thread count
    try:
        return _audits(cfg, users, cache, work, shared=shared, sim_policy=sim_policy, terms=terms, rounds=rounds)
    finally:
        torch.set_num_threads(threads)


def _audits(cfg: SimConfig, users: dict[str, UserData], cache: TextCache, work: Path, *,
            shared: dict[str, np.ndarray], sim_policy, terms: DeviceTerms, rounds: int) -> dict:  # noqa: ANN001
    from fedpref.server.strategy import make_round_config
    from fedpref.simulations.audit import (
        canary_membership_audit,
        community_inference_audit,
        community_labels,
        replay_round,
        user_level_canary_audit,
    )

    a, fed, seed = cfg.audit, cfg.federation, cfg.runtime.seed
    beta = 1.0 - a.confidence
    rt = get_runtime(cfg.model, (SHARED_ADAPTER, PRIVATE_ADAPTER))
    # a personalized round's runtime: the private adapter too, unless the rounds train the shared part alone
    rt_round = rt if cfg.personalize.rounds_train_private else get_runtime(cfg.model, (SHARED_ADAPTER,))
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    cohort = _subset(users, a.community_users)
    community_labels(cohort)  # checked before anything trains
    round_cfg = make_round_config(
        fed, cfg.local, server_round=rounds + 1, train_shared=True, train_private=cfg.personalize.rounds_train_private,
        policy_version=sim_policy.policy.version if sim_policy else 0,
    )
    replays = [
        replay_round(rt_round, cohort, cache, shared=shared, round_cfg=round_cfg, terms=terms, seed=stable_seed(seed, run),
                     workdir=work / "audit" / "community" / run,
                     envelope=sim_policy.envelope_path.read_bytes() if sim_policy else None,
                     trust_root=sim_policy.root_path.read_bytes() if sim_policy else None)
        for run in ("first", "second")
    ]
    ci = community_inference_audit(cohort, *replays, clip_norm=fed.clip_norm,
                                   server_noise_multiplier=fed.server_noise_multiplier,
                                   expected_cohort=fed.client_sample_rate * len(users), seed=seed)
    seconds["community_inference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ul = user_level_canary_audit(
        replays[0].deltas, population=len(users), sample_rate=fed.client_sample_rate, clip_norm=fed.clip_norm,
        noise_multiplier=fed.server_noise_multiplier, rounds=rounds, canaries=a.user_canaries, delta=fed.delta,
        seed=seed, beta=beta,
    )
    ul["real_deltas_source"] = f"the first community replay's {len(replays[0].deltas)} clipped deltas, reused cyclically"
    seconds["user_level"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scale = a.canary_lr_scale
    local = dataclasses.replace(
        _local_cfg(cfg, a.canary_epochs, seed), batch_size=cfg.local.batch_size,  # a round's settings
        learning_rate=cfg.local.learning_rate * scale,
        head_learning_rate=cfg.local.head_learning_rate * scale,
        projection_learning_rate=cfg.local.projection_learning_rate * scale,
    )
    mi = canary_membership_audit(
        rt, _subset(users, a.canary_devices), cache, shared=shared, local_cfg=local, clip_norm=fed.clip_norm,
        canaries_per_device=a.canaries_per_device, delta=fed.delta, seed=seed, beta=beta,
    )
    mi["learning_rate_scale"] = scale
    seconds["membership"] = time.perf_counter() - t0
    return {"community_inference": ci, "membership": mi, "user_level": ul, "seconds": seconds}


def count_votes(users: dict[str, UserData]) -> dict[str, float]:
    """The ``count`` baseline: each held-out pair goes to the text more of the *other* users
    chose, in their training pairs of the same two texts (a tie, or no vote, is a coin flip).
    What a plain tally of everyone's choices predicts, with no model at all."""
    from collections import Counter, defaultdict

    votes: dict[frozenset[str], Counter] = defaultdict(Counter)
    for user in users.values():
        for p in user.train:
            votes[frozenset((p.chosen, p.rejected))][p.chosen] += 1
    out = {}
    for uid, user in users.items():
        own = Counter((frozenset((p.chosen, p.rejected)), p.chosen) for p in user.train)
        hits = []
        for p in user.test:
            key = frozenset((p.chosen, p.rejected))
            c = votes[key][p.chosen] - own[(key, p.chosen)]
            r = votes[key][p.rejected] - own[(key, p.rejected)]
            hits.append(1.0 if c > r else 0.5 if c == r else 0.0)
        out[uid] = float(np.mean(hits)) if hits else float("nan")
    return out


def _ledger(server_dir: Path) -> list[dict]:
    from fedpref.server.privacy import PrivacyLedger

    return [dataclasses.asdict(e) for e in PrivacyLedger(server_dir / "ledger.jsonl").entries()]


def _tamper_report(rounds: dict[str, list[dict]], tampered: tuple[str, ...]) -> dict:
    """What the server did with the tampered devices' replies (from its round history): they
    attest the expected digest, so it rejects none (the attestation is a self-declaration)."""
    rejected = {
        m: [{"round": r["server_round"], **x} for r in hist for x in r["rejected"] if "safety digest" in x["reason"]]
        for m, hist in rounds.items()
    }
    return {
        "users": list(tampered),
        "rejected_updates": {m: len(v) for m, v in rejected.items()},
        "example_reason": next((x["reason"] for v in rejected.values() for x in v), None),
    }


def run_simulation(cfg: SimConfig, *, out: Path, data: Path | None, config_file: Path, verbose: bool = False) -> dict:
    """Run every method and return the results dict (also written to ``out/results.json``)."""
    t_start = time.perf_counter()
    import torch

    phases = Phases()
    threads = torch.get_num_threads()
    try:
        # ray_session: every federation of the run on one Ray instance and its warm actors; Ray ends here
        with PeakRSS() as peak, ray_session():  # PeakRSS: the whole process tree's memory, Ray's included
            return _run(cfg, out=out, data=data, config_file=config_file, verbose=verbose, phases=phases, peak=peak,
                        t_start=t_start)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: SimConfig, *, out: Path, data: Path | None, config_file: Path, verbose: bool, phases: Phases,
         peak: PeakRSS, t_start: float) -> dict:
    from fedpref.simulations.evaluation import summarize
    from fedpref.simulations.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)  # a run starts from nothing: no stale adapters or ledgers
    work.mkdir()
    user_data = data is not None
    with phases("data"):
        data, users = prepare_data(cfg, data, out)
    unknown = sorted(set(cfg.safety.tamper_users) - set(users))
    if unknown:  # checked before any expensive phase
        raise ConfigError(f"safety.tamper_users names {unknown[:3]}, not users of the data; use ids such as {sorted(users)[0]!r}")
    terms = device_terms(cfg)  # checked before any expensive phase too
    users_all = users
    users, new_users = hold_out(users_all, cfg.new_users.fraction, cfg.runtime.seed)
    from fedpref.simulations.robustness import check_fractions

    check_fractions(cfg.robustness, len(users))  # before any expensive phase
    from fedpref.server.config import check_personalize_model

    fits_basis = bool(cfg.attributes.corpus_texts or cfg.attributes.corpus)  # [attributes]: a public basis is fitted
    check_personalize_model(cfg.personalize, dataclasses.replace(cfg.model.adapter, attribute_basis="<fitted>")
                            if fits_basis else cfg.model.adapter, where=str(config_file))
    if set(cfg.safety.tamper_users) & set(new_users):
        raise ConfigError(f"safety.tamper_users names held-out new users {sorted(set(cfg.safety.tamper_users) & set(new_users))}; "
                          "name users of the federation, or set new_users.fraction = 0")
    if new_users:  # the federation's own data file: the held-out users are in no run
        data = work / "federated.jsonl"
        write_jsonl([p for u in users.values() for p in (*u.train, *u.test)], data)
    console.print(f"[bold]fedpref-sim[/]: {len(users)} users" + (f" (+ {len(new_users)} held out as new users)" if new_users else "")
                  + f", data {data}")
    basis_info: dict | None = None
    if cfg.attributes.corpus_texts or cfg.attributes.corpus:
        if user_data and not cfg.attributes.corpus:
            console.print("[yellow]warning[/]: the attribute basis is fitted on the persona generator's public corpus; "
                          "for data not generated by `fedpref-sim generate`, set [attributes] corpus = FILE.jsonl "
                          "(labelled public texts) or corpus_texts = 0")
        with phases("attribute_basis"):
            cfg, basis_info = prepare_basis(cfg, work)

    with phases("cache"):
        rt_both = get_runtime(cfg.model, (SHARED_ADAPTER, PRIVATE_ADAPTER))
        cache_path = work / "cache.safetensors"
        cache = build_cache(rt_both, users_all, cache_path, cfg.model.max_length)
    with phases("safety_policy"):
        sim_policy = prepare_policy(cfg, work) if cfg.safety.enabled else None
    # the backbone's forward passes are done (every text above is embedded once); what follows
    # plays devices, whose small per-step tensors run fastest on the devices' own thread count:
    # with more threads than that, OpenMP's workers spin against each other and the federation's
    # actors (measured: 0.18 s per local-only user with 1 thread, 2.2 s with 2 on this 2-core machine)
    import torch

    torch.set_num_threads(cfg.runtime.torch_threads)
    if sim_policy is not None:
        console.print(f"[bold]safety policy[/]: v{sim_policy.policy.version} signed "
                      f"{cfg.safety.signature_threshold}-of-{cfg.safety.signers}, digest {sim_policy.digest[:12]}…")
    safety_evals: dict[str, dict] = {}

    results: dict[Method, MethodResult] = {}
    rounds: dict[str, list[dict]] = {}
    devices = SimulatedDevices(terms=terms, tamper_safety=frozenset(cfg.safety.tamper_users if sim_policy else ()),
                               drop_rate=cfg.robustness.drop_rate, fault_seed=cfg.runtime.seed)

    federations: list[Path] = []

    def federate(method: Method, workdir: Path, devices: SimulatedDevices, runtime) -> None:  # noqa: ANN001
        federations.append(workdir)
        with phases("federation"):
            run_on_simulation_engine(
                method=method, num_users=len(users), data=data, workdir=workdir,
                config_file=config_file, cache=cache_path, runtime=runtime, verbose=verbose,
                policy=sim_policy.envelope_path if sim_policy else None, root=sim_policy.root_path if sim_policy else None,
                devices=devices, attribute_basis=cfg.model.adapter.attribute_basis,
            )

    def evaluate_federated(method: Method, workdir: Path, label: str) -> tuple[dict[str, float], dict | None]:
        with phases("evaluation"):
            return _evaluate_federated(method, workdir, label)

    def _evaluate_federated(method: Method, workdir: Path, label: str) -> tuple[dict[str, float], dict | None]:
        personal = method is Method.PERSONALIZED
        rt = get_runtime(cfg.model, (SHARED_ADAPTER, PRIVATE_ADAPTER) if personal else (SHARED_ADAPTER,))
        _shared_from_checkpoint(rt, workdir / "server")
        private_root = workdir / "clients" if personal else None
        per_user = evaluate(rt, users, cache, label=label, private_root=private_root)
        safety = evaluate_safety(rt, users, cache, sim_policy.policy, label=label, private_root=private_root) \
            if sim_policy is not None else None
        return per_user, safety

    for method in (Method.AGGREGATED, Method.PERSONALIZED):
        t0 = time.perf_counter()
        console.print(f"[bold]{method.value}[/]: {cfg.federation.rounds} rounds on Flower's Simulation Engine")
        federate(method, work / method.value, devices, cfg.runtime)
        wall = time.perf_counter() - t0
        rounds[method.value] = json.loads((work / method.value / "server" / "history.json").read_text())
        per_user, safety = evaluate_federated(method, work / method.value, method.value)
        results[method] = MethodResult(
            per_user=per_user, wall_seconds=wall,
            epsilon_sample_max=_max_device_epsilon(work / method.value / "clients", cfg.federation.delta),
        )
        if safety is not None:
            safety_evals[method.value] = safety

    robustness = None
    if cfg.robustness.poison_fractions or cfg.robustness.secure_aggregation_fractions:
        from fedpref.simulations.robustness import run_poisoning

        robustness = run_poisoning(
            cfg, users, cache, work, sim_policy=sim_policy, terms=terms,
            run_federation=lambda wd, devs, runtime: federate(Method.PERSONALIZED, wd, devs, runtime),
            evaluate_personalized=lambda wd, label: evaluate_federated(Method.PERSONALIZED, wd, label),
            base_acc=results[Method.PERSONALIZED].per_user, base_safety=safety_evals.get(Method.PERSONALIZED.value),
        )

    # local: private adapter only, no federation
    t0 = time.perf_counter()
    rt_priv = get_runtime(cfg.model, (PRIVATE_ADAPTER,))
    with phases("local_training"):
        eps = train_locally(cfg, rt_priv, users, cache, work / "local", epochs=cfg.methods.local_epochs, shared=None, label="local")
    with phases("evaluation"):
        local_acc = evaluate(rt_priv, users, cache, private_root=work / "local", label="local")
    results[Method.LOCAL] = MethodResult(per_user=local_acc, wall_seconds=time.perf_counter() - t0, epsilon_sample_max=eps)

    # finetuned: FedAvg's global model, then private fine-tuning on each device
    t0 = time.perf_counter()
    shared = _shared_from_checkpoint(rt_both, work / Method.AGGREGATED.value / "server")
    with phases("local_training"):
        eps = train_locally(cfg, rt_both, users, cache, work / "finetuned", epochs=cfg.methods.finetune_epochs, shared=shared,
                            label="finetuned", spent=work / Method.AGGREGATED.value / "clients")
    set_arrays(rt_both.model, Group.SHARED, shared)
    with phases("evaluation"):
        finetuned_acc = evaluate(rt_both, users, cache, private_root=work / "finetuned", label="finetuned")
    results[Method.FINETUNED] = MethodResult(
        per_user=finetuned_acc,
        wall_seconds=time.perf_counter() - t0 + results[Method.AGGREGATED].wall_seconds,
        epsilon_sample_max=max(eps, results[Method.AGGREGATED].epsilon_sample_max),
    )

    new_user_results = None
    if new_users:
        from fedpref.simulations.newusers import new_user_study

        with phases("new_users"):
            new_user_results = new_user_study(
                cfg, new_users, cache, work, rt_both=rt_both, rt_priv=rt_priv,
                rt_shared=get_runtime(cfg.model, (SHARED_ADAPTER,)),
                shared_personalized=_shared_from_checkpoint(rt_both, work / Method.PERSONALIZED.value / "server"),
                shared_aggregated=shared,
            )

    audits = None
    if cfg.audit.enabled:
        shared_pers = _shared_from_checkpoint(rt_both, work / Method.PERSONALIZED.value / "server")
        released = len(_ledger(work / Method.PERSONALIZED.value / "server")) or cfg.federation.rounds
        with phases("audits"):
            audits = run_audits(cfg, users, cache, work, shared=shared_pers, sim_policy=sim_policy, terms=terms,
                                rounds=released)

    oracle = {
        uid: float(np.mean([p.oracle_margin > 0 for p in u.test])) for uid, u in users.items()
        if all(p.oracle_margin is not None for p in u.test)
    }
    if len(oracle) == len(users):
        results[Method.ORACLE] = MethodResult(per_user=oracle)
    results[Method.COUNT] = MethodResult(per_user=count_votes(users))

    res = summarize(
        cfg=cfg, users=users, results=results, rounds=rounds, work=work,
        wall_seconds=time.perf_counter() - t_start, config=to_plain(cfg),
    )
    res["privacy"]["ledger"] = _ledger(work / Method.PERSONALIZED.value / "server")
    personalized = work / Method.PERSONALIZED.value / "server" / "personalize.json"
    if personalized.exists():  # the final personalization ([personalize] epochs > 0)
        res["personalize"] = json.loads(personalized.read_text())
    if audits is not None:
        res["privacy"]["audit"] = audits
    if basis_info is not None:
        res["attribute_basis"] = basis_info
    if robustness is not None:
        res["robustness"] = robustness
    if new_user_results is not None:
        res["new_users"] = new_user_results
    if sim_policy is not None:
        res["safety"] = summarize_safety(safety_evals, users, sim_policy, _tamper_report(rounds, cfg.safety.tamper_users))
    res["cost"].update(cost_summary(phases, peak, federations, cfg.runtime))  # everything but writing the report
    write_text_atomic(out / "results.json", json.dumps(res, indent=1, allow_nan=False))
    write_report(res, out)
    return res


def cost_summary(phases: Phases, peak: PeakRSS, federations: list[Path], runtime) -> dict:  # noqa: ANN001
    """``cost``'s wall time, peak memory and phase split; the federation's wall time split into
    the devices' own work (every ClientApp call's seconds, over the actors that run at once)
    and Flower/Ray's (the rest of the federation's wall time)."""
    import os

    from fedpref.client.app import DEVICE_SECONDS_FILE

    device_seconds = 0.0
    calls = 0
    for wd in federations:
        f = wd / DEVICE_SECONDS_FILE
        if f.exists():
            vals = [float(x) for x in f.read_text().split()]
            device_seconds += sum(vals)
            calls += len(vals)
    actors = max(1, int((os.cpu_count() or 1) // max(runtime.client_cpus, 1e-9))) if not runtime.ray_address else 1
    split = phases.split()
    fed = split.pop("federation", 0.0)
    compute = min(fed, device_seconds / actors)
    split["client_compute"] = compute
    split["flower_ray_overhead"] = fed - compute
    peak.sample()
    return {
        "wall_seconds": phases.elapsed(),
        "peak_rss_bytes": int(peak.peak),
        "phases": split,
        "federation": {"wall_seconds": fed, "client_calls": calls, "device_seconds": device_seconds, "actors": actors,
                       "overhead_over_compute": (fed - compute) / compute if compute > 0 else None},
    }


__all__ = ["run_simulation", "MethodResult"]
