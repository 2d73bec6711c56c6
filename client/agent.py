"""The device agent's operations on its home: ``init``, the pairs, ranking, status and forget.

``fedpref-agent`` (:mod:`fedpref.client.agent_cli`) and the local gRPC API
(:mod:`fedpref.client.api`) both call them; the SuperNode a device runs is
:mod:`fedpref.client.supervisor`. Errors are :class:`~fedpref.common.errors.FedPrefError`
subclasses with one-line messages.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from fedpref.client.agent_home import AGENT_FILE, BASIS_FILE, AgentHome, forget
from fedpref.client.supervisor import running_pid
from fedpref.client.terms import DeviceTerms
from fedpref.common.errors import AlreadyRunningError, ConfigError, DataError
from fedpref.common.netaddr import parse_address

if TYPE_CHECKING:
    from fedpref.client.store import FeedbackPair


# --- init ----------------------------------------------------------------------------------


def _read_ca(path: Path) -> bytes:
    from cryptography import x509

    try:
        data = path.read_bytes()
        x509.load_pem_x509_certificates(data)
    except OSError as e:
        raise ConfigError(f"--ca {path}: {e.strerror}; give the operator's tls/ca.pem") from None
    except ValueError:
        raise DataError(f"--ca {path}: not a PEM certificate; give the operator's tls/ca.pem") from None
    return data


def _identity() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())  # Flower SuperNode auth: ECDSA on a NIST curve, OpenSSH
    private = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption())
    public = key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
    return private, public + b" fedpref-agent\n"


def init_home(home: Path, *, server: str, ca: Path, root: Path, backbone: str = "", passphrase: bool = False,
              basis: Path | None = None, terms: dict[str, object] | None = None) -> Path:
    """Create the device identity, the encrypted store and the pinned trust root in ``home``
    (new or empty), all or nothing; returns the home's absolute path.

    ``terms`` are :class:`DeviceTerms` fields (agent.toml ``[terms]``); ``passphrase`` derives
    the store key from ``FEDPREF_STORE_PASSPHRASE`` instead of writing a key file.
    """
    from fedpref.client.store import PASSPHRASE_ENV, DeviceStore
    from fedpref.common.atomic import write_bytes_atomic, write_text_atomic
    from fedpref.common.tomlconfig import dump_tables, to_plain
    from fedpref.model.config import ModelConfig
    from fedpref.safety_policy.store import PolicyStore

    home = home.expanduser().absolute()
    host, port = parse_address(server)
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise ConfigError(f"--home {home} exists and is not empty; refusing to re-initialise it (use a new folder)")
    ca_bytes = _read_ca(ca)
    try:
        root_bytes = root.read_bytes()
    except OSError as e:
        raise ConfigError(f"--root {root}: {e.strerror}; give the operator's keys/root.json") from None
    model = ModelConfig(backbone=backbone)
    device_terms = DeviceTerms(**(terms or {}))  # type: ignore[arg-type]
    if basis is not None:
        from fedpref.model.basis import load_basis

        weight, _, _ = load_basis(basis)  # a bad file fails here, before anything is written
        model = model.with_attribute_basis(str(home / BASIS_FILE), personal_dims=int(weight.shape[0]))
    secret = os.environ.get(PASSPHRASE_ENV) if passphrase else None
    if passphrase and not secret:
        raise ConfigError(f"--passphrase needs the passphrase in {PASSPHRASE_ENV}")
    home.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=home.parent, prefix=f".{home.name}.", suffix=".init"))
    try:  # build everything aside, then one rename: a failed init leaves nothing behind
        PolicyStore(tmp / "state" / "policy").init_root(root_bytes)
        private, public = _identity()
        write_bytes_atomic(tmp / "identity" / "node.key", private, mode=0o600)
        write_bytes_atomic(tmp / "identity" / "node.pub", public)
        write_bytes_atomic(tmp / "ca.pem", ca_bytes)
        if basis is not None:
            write_bytes_atomic(tmp / BASIS_FILE, basis.read_bytes())
        DeviceStore.create(tmp / "store", passphrase=secret).close()
        write_text_atomic(tmp / AGENT_FILE, "# fedpref device agent, written by `fedpref-agent init`.\n"
                          "# [model] must match the server's [model].\n\n" + dump_tables({
                              "agent": {"server": f"{host}:{port}", "ca": "ca.pem"},
                              "model": to_plain(model),
                              "terms": to_plain(device_terms),
                          }))
        os.chmod(tmp, 0o700)
        if home.exists():
            home.rmdir()  # empty: checked above
        os.replace(tmp, home)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return home


# --- the agent's operations (CLI and gRPC API share them) --------------------------------------


class Agent:
    """The operations of :class:`fedpref.client.api.AgentBackend` on one home."""

    def __init__(self, home: AgentHome) -> None:
        self.home = home

    def add_feedback(self, prompt: str, chosen: str, rejected: str, *, source: str = "api") -> tuple[int, int]:
        """Store one pair; returns its id and the number of pairs on the device."""
        with self.home.open_store() as store:
            return store.add_pair(prompt, chosen, rejected, source=source), store.count()

    def import_feedback(self, file: Path) -> tuple[int, int]:
        """Store every pair of a JSONL file, or none; returns how many, and the total."""
        with self.home.open_store() as store:
            return store.import_jsonl(file), store.count()

    def pairs(self) -> list[FeedbackPair]:
        with self.home.open_store() as store:
            return store.pairs()

    def rank(self, prompt: str, candidates: list[str]) -> tuple[list[dict], int]:
        """``candidates`` ordered for this user within the installed policy (:class:`BoundedRanker`).

        ``prompt`` is part of the agent's API (``RankRequest.prompt``, ``rank --prompt``) and is
        unused by design: the reward model scores each candidate alone.
        """
        from fedpref.client.device import adapters_for, get_runtime, set_safety_module
        from fedpref.model.io import adapter_exists, load_adapter_weights
        from fedpref.protocol.partition import SHARED_ADAPTER
        from fedpref.safety_policy.classifier import SafetyModule
        from fedpref.safety_policy.ranking import BoundedRanker

        h = self.home
        now = datetime.now(timezone.utc)
        if not adapter_exists(h.shared_dir):
            raise ConfigError(f"{h.root} has no model yet: the device has not taken part in a round; "
                              f"run `fedpref-agent start --home {h.root}` and wait for a round")
        rt = get_runtime(h.model, adapters_for(train_shared=True, train_private=True))
        policy_store = h.policy_store()
        root = policy_store.trusted_root(now=now)
        policy = policy_store.current(root, now, backbone_sha256=rt.backbone.sha256) if root is not None else None
        if policy is None:
            raise ConfigError("no safety policy is installed on this device yet; ranking is offered only within "
                              "the signed bound (it arrives with the first round)")
        with h.open_store() as store:
            load_adapter_weights(rt.model, SHARED_ADAPTER, h.shared_dir)
            h.state(store).load_private(rt)
        set_safety_module(rt, SafetyModule.from_policy(policy), policy.envelope_sha256)
        ranked = BoundedRanker.from_policy(rt.model, rt.backbone, policy, max_length=h.model.max_length).rank(
            candidates)
        return [{"candidate": r.candidate, "personal_score": float(r.personal_score),
                 "unsafe_categories": list(r.unsafe_categories), "allowed": bool(r.allowed), "reason": r.reason}
                for r in ranked], policy.version

    def status(self) -> dict:
        from fedpref.common.tomlconfig import to_plain

        h = self.home
        with h.open_store() as store:
            pairs = store.count()
            acct = h.state(store).accountant()
        meta = h.adapter_metadata()
        delta = h.terms.delta  # the device accounts at its own δ
        eps = acct.epsilon(delta) if acct.history else 0.0
        version = f"round {meta['round']} ({meta.get('updated_at', '?')})" if "round" in meta else ""
        return {"home": str(h.root), "pairs": pairs, "adapter_version": version,
                # sha256 of the released model the adapter was last personalized on ("" = never)
                "personalized_on": str(meta.get("personalized_on", "")),
                "policy_version": h.policy_store().version,
                "epsilon_sample": eps, "delta": delta, "server": h.server, "terms": to_plain(h.terms),
                "node_public_key": h.public_key_file.read_text().strip() if h.public_key_file.exists() else "",
                "running": running_pid(h) is not None}

    def forget(self, *, destroy_key: bool = False) -> dict:
        with self.home.open_store() as store:
            return forget(self.home, store, destroy_key=destroy_key)


def forget_home(h: AgentHome, *, everything: bool = False) -> dict:
    """``fedpref-agent forget``: refuse while the agent runs, then :meth:`Agent.forget`; with
    ``everything`` also destroy the store key and the device key and delete the whole home."""
    from fedpref.client.store import shred

    if running_pid(h) is not None:
        raise AlreadyRunningError(f"the agent of {h.root} is running; stop it before forgetting")
    out = Agent(h).forget(destroy_key=everything)
    if everything:
        shred(h.key_file)  # the device's identity: nobody can act as this device again
        shutil.rmtree(h.root)
    return out
