"""The client's on-disk policy store; it fails closed.

Layout of the store folder::

    state.json                 {"version": int, "envelope_sha256": hex | null, "root_revoked": [keyid]}
    policy-v<version>.dsse.json  the installed envelope, exact bytes as received
    root.json                  the trusted root envelope (exact bytes)

Every file is written atomically (temp file, fsync, ``os.replace``, fsync of the folder).
Installing writes the new envelope under its own name first; replacing ``state.json`` is the
commit point; the old envelope is deleted afterwards. So a failed verification or a crash at
any point leaves the previous policy and version in force. The store is meant for one process
at a time (no locking).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpref.common.errors import ConfigError
from fedpref.safety_policy.bundle import POLICY_NAME, write_file_atomic
from fedpref.safety_policy.dsse import strict_json_loads
from fedpref.safety_policy.errors import PolicyStoreError
from fedpref.safety_policy.root import TrustRoot, follow_root_chain, load_root
from fedpref.safety_policy.verify import MAX_ENVELOPE_SIZE, Policy, verify_envelope

__all__ = ["PolicyStore"]

STATE_FILENAME = "state.json"
ROOT_FILENAME = "root.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class PolicyStore:
    """The installed policy (envelope + version) and the trusted root, in one folder."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    # --- state ----------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        path = self.dir / STATE_FILENAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {"version": 0, "envelope_sha256": None, "root_revoked": []}
        state = strict_json_loads(raw, PolicyStoreError, str(path))
        if (
            not isinstance(state, dict)
            or set(state) != {"version", "envelope_sha256", "root_revoked"}
            or not isinstance(state["version"], int)
            or isinstance(state["version"], bool)
            or state["version"] < 0
            or not (state["envelope_sha256"] is None or (isinstance(state["envelope_sha256"], str)
                                                         and _HEX64.fullmatch(state["envelope_sha256"])))
            or (state["version"] > 0) != (state["envelope_sha256"] is not None)
            or not isinstance(state["root_revoked"], list)
            or not all(isinstance(k, str) for k in state["root_revoked"])
        ):
            raise PolicyStoreError(f"{path} is corrupt; refusing to trust this policy store")
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        text = json.dumps(state, sort_keys=True, indent=2) + "\n"
        write_file_atomic(self.dir / STATE_FILENAME, text.encode("ascii"))

    def _envelope_path(self, version: int) -> Path:
        return self.dir / f"policy-v{version}.dsse.json"

    @property
    def version(self) -> int:
        """Version of the installed policy, 0 when none (read from disk each time)."""
        return int(self._read_state()["version"])

    @property
    def envelope_sha256(self) -> str | None:
        """sha256 of the installed envelope, ``None`` when none."""
        return self._read_state()["envelope_sha256"]

    def installed_envelope(self) -> bytes | None:
        """The installed envelope bytes (unverified), ``None`` when none."""
        state = self._read_state()
        if state["version"] == 0:
            return None
        try:
            return self._envelope_path(state["version"]).read_bytes()
        except FileNotFoundError:
            raise PolicyStoreError(f"installed envelope for v{state['version']} is missing from {self.dir}") from None

    # --- policies -------------------------------------------------------------------------

    def install(
        self,
        envelope: bytes,
        root: TrustRoot,
        *,
        now: datetime,
        backbone_sha256: str | None = None,
        expected_name: str = POLICY_NAME,
        max_size: int = MAX_ENVELOPE_SIZE,
    ) -> Policy:
        """Verify ``envelope`` (version must exceed the installed one) and install it.

        On any error it raises (a :class:`PolicyError`, or ``ConfigError`` for a naive
        ``now``) and the previous envelope and version stay in force.
        """
        state = self._read_state()
        policy = verify_envelope(envelope, root, last_version=state["version"], now=now,
                                 expected_name=expected_name, backbone_sha256=backbone_sha256, max_size=max_size)
        new_path = self._envelope_path(policy.version)
        old_path = self._envelope_path(state["version"]) if state["version"] else None
        try:
            write_file_atomic(new_path, bytes(envelope))
            self._write_state({**state, "version": policy.version, "envelope_sha256": policy.envelope_sha256})
        except OSError as exc:
            new_path.unlink(missing_ok=True)
            raise PolicyStoreError(f"could not persist policy v{policy.version} in {self.dir}: {exc}") from exc
        if old_path is not None and old_path != new_path:
            try:
                old_path.unlink(missing_ok=True)
            except OSError:
                pass  # a stale file is harmless: state.json names the installed version
        return policy

    def current(
        self,
        root: TrustRoot,
        now: datetime,
        *,
        backbone_sha256: str | None = None,
        expected_name: str = POLICY_NAME,
        max_size: int = MAX_ENVELOPE_SIZE,
    ) -> Policy | None:
        """Re-verify and return the installed policy, ``None`` when none is installed.

        Raises (fail closed) when the installed envelope no longer verifies (e.g. it expired,
        or its keys were rotated out) or the store is inconsistent.
        """
        state = self._read_state()
        if state["version"] == 0:
            return None
        envelope = self.installed_envelope()
        assert envelope is not None
        if hashlib.sha256(envelope).hexdigest() != state["envelope_sha256"]:
            raise PolicyStoreError(f"installed envelope v{state['version']} does not match state.json")
        policy = verify_envelope(envelope, root, last_version=state["version"] - 1, now=now,
                                 expected_name=expected_name, backbone_sha256=backbone_sha256, max_size=max_size)
        if policy.version != state["version"]:
            raise PolicyStoreError(f"installed envelope carries v{policy.version}, state.json says v{state['version']}")
        return policy

    # --- the trust root -------------------------------------------------------------------

    def trusted_root(self, *, now: datetime | None = None) -> TrustRoot | None:
        """The persisted trust root (re-checked against its own keys), ``None`` when none."""
        try:
            data = (self.dir / ROOT_FILENAME).read_bytes()
        except FileNotFoundError:
            return None
        root = load_root(data, now=now)
        revoked = frozenset(self._read_state()["root_revoked"]) - set(root.keys)
        return dataclasses.replace(root, revoked=revoked)

    def init_root(self, root_bytes: bytes, *, now: datetime | None = None) -> TrustRoot:
        """Persist the initial (trusted-on-first-use) root. Idempotent for the same bytes;
        refuses (``ConfigError``) to replace a different root: use :meth:`update_root`."""
        root = load_root(root_bytes, now=now)
        existing = self.dir / ROOT_FILENAME
        if existing.exists():
            if existing.read_bytes() == bytes(root_bytes):
                return self.trusted_root() or root
            raise ConfigError(f"{existing} already holds a trust root; rotate it with update_root")
        write_file_atomic(existing, bytes(root_bytes))
        return root

    def update_root(self, new_roots: bytes | Sequence[bytes], *, now: datetime | None = None) -> TrustRoot:
        """Follow one or more root rotations from the persisted root and persist the result.

        On any error (e.g. :class:`RootRotationError`) the persisted root is unchanged.
        """
        trusted = self.trusted_root()
        if trusted is None:
            raise ConfigError(f"no trust root in {self.dir}; call init_root first")
        chain = [new_roots] if isinstance(new_roots, (bytes, bytearray)) else list(new_roots)
        root = follow_root_chain(trusted, [bytes(r) for r in chain], now=now)
        state = self._read_state()
        try:
            # revoked ids first: extra ones are harmless (the current root's keys are subtracted)
            self._write_state({**state, "root_revoked": sorted(root.revoked | set(state["root_revoked"]))})
            write_file_atomic(self.dir / ROOT_FILENAME, root.raw)
        except OSError as exc:
            raise PolicyStoreError(f"could not persist root v{root.version} in {self.dir}: {exc}") from exc
        return root
