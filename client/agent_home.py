"""A device agent's home: identity, encrypted store, policy, and what a round needs.

Layout of ``--home DIR`` (written by ``fedpref-agent init``)::

    agent.toml            [agent] server address and CA; [model] (must match the server's);
                          [terms] the device's own privacy floor (client/terms.py)
    ca.pem                the operator's CA, pinned at init
    attribute_basis.safetensors  the operator's attribute basis (`init --basis`; optional)
    identity/node.key     ECDSA P-256 key for Flower SuperNode authentication (OpenSSH, 0600)
    identity/node.pub     the public key the operator registers (`fedpref-server nodes add`)
    store/                DeviceStore: preference pairs (SQLite) and AES-GCM sealed blobs
                            private_adapter  the PEFT folder (adapter_config.json +
                                             adapter_model.safetensors) as a tar, sealed
                            accountant       the DP-SGD accountant history, sealed
    state/policy/         PolicyStore: the pinned trust root and the installed policy
    state/shared/         the last global shared adapter received (PEFT format; public to
                          the federation, so not sealed)
    state/adapter.json    the private adapter's version (round, time) and δ
    flwr/                 FLWR_HOME of the SuperNode (installed Flower App bundles)
    logs/, run/           the SuperNode's log; the pid and start time of the agent that runs it

The ClientApp runs in a process the SuperNode starts; it finds this home through the
node config key ``fedpref-home`` and uses :class:`~fedpref.client.agent_state.EncryptedDeviceState`, so the private
adapter and the accountant are only ever on disk sealed.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from datetime import datetime, timezone
from pathlib import Path

from fedpref.client.data import PreferencePair, Split, UserData
from fedpref.client.store import DeviceStore, passphrase_from_env
from fedpref.client.terms import DeviceTerms
from fedpref.common.errors import ConfigError, DataError, FedPrefError, HomeError
from fedpref.common.tomlconfig import build, read_toml
from fedpref.model.config import ModelConfig
from fedpref.safety_policy.store import PolicyStore

if TYPE_CHECKING:
    from fedpref.client.agent_state import EncryptedDeviceState

AGENT_FILE = "agent.toml"
AGENT_TABLES = {"agent", "model", "terms"}
BASIS_FILE = "attribute_basis.safetensors"
PRIVATE_BLOB = "private_adapter"
ACCOUNTANT_BLOB = "accountant"


@dataclass(frozen=True)
class AgentHome:
    root: Path
    server: str
    ca: Path
    model: ModelConfig
    terms: DeviceTerms = DeviceTerms()  # the least privacy this device accepts, whatever a round asks

    # -- layout -------------------------------------------------------------------------
    @property
    def key_file(self) -> Path:
        return self.root / "identity" / "node.key"

    @property
    def public_key_file(self) -> Path:
        return self.root / "identity" / "node.pub"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def adapter_meta(self) -> Path:
        return self.state_dir / "adapter.json"

    @property
    def shared_dir(self) -> Path:
        return self.state_dir / "shared"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "supernode.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "run" / "agent.pid"

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, root: Path | str) -> AgentHome:
        root = Path(root).expanduser().resolve()
        path = root / AGENT_FILE
        if not root.is_dir():
            raise HomeError(f"--home {root} does not exist; run `fedpref-agent init --home {root} ...` first")
        if not path.is_file():
            raise HomeError(f"{root} is not a fedpref agent home (no {AGENT_FILE}); "
                            f"run `fedpref-agent init --home {root} ...` or fix --home")
        try:
            data = read_toml(path)
            agent = data["agent"]
            server, ca = str(agent["server"]), root / str(agent["ca"])
        except ConfigError as e:  # not UTF-8, unreadable, bad TOML: one line naming the file
            raise DataError(f"{e}; or re-create the home with `fedpref-agent init`") from None
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}: not a valid agent config ({e}); re-create the home with `fedpref-agent init`") from None
        extra = sorted({f"[{t}]" for t in set(data) - AGENT_TABLES} | {f"[agent] {k}" for k in set(agent) - {"server", "ca"}})
        if extra:  # e.g. a seed or a deterministic-noise switch: a device never seeds its DP draws
            raise ConfigError(f"{path}: unknown setting {extra[0]}; a device's config holds only [agent] server and "
                              "ca, [model] and [terms] (its DP noise always comes from the OS CSPRNG); remove it")
        model = build(ModelConfig, data.get("model"), where=f"{path} [model]")
        terms = build(DeviceTerms, data.get("terms"), where=f"{path} [terms]")
        return cls(root=root, server=server, ca=ca, model=model, terms=terms)

    def open_store(self) -> DeviceStore:
        """The store; a passphrase-protected one takes its passphrase from the environment."""
        scrypt = DeviceStore.uses_passphrase(self.store_dir)
        return DeviceStore.open(self.store_dir, passphrase=passphrase_from_env() if scrypt else None)

    def policy_store(self) -> PolicyStore:
        return PolicyStore(self.state_dir / "policy")  # where DeviceState keeps it

    def state(self, store: DeviceStore) -> EncryptedDeviceState:
        from fedpref.client.agent_state import EncryptedDeviceState  # torch: only where a model is needed

        return EncryptedDeviceState(self, store)

    def user(self, store: DeviceStore) -> UserData:
        """The device's pairs as one user's training data (a device holds out nothing)."""
        pairs = tuple(
            PreferencePair(user_id="device", prompt=p.prompt, chosen=p.chosen, rejected=p.rejected, split=Split.TRAIN)
            for p in store.pairs()
        )
        return UserData(user_id="device", community=None, train=pairs, test=())

    def adapter_metadata(self) -> dict:
        """``state/adapter.json``: the private adapter's round and update time, and the δ it is
        accounted at (``{}`` before the first round)."""
        fix = "delete it, the next round rewrites it"
        try:
            meta = json.loads(self.adapter_meta.read_bytes())
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise DataError(f"{self.adapter_meta}: cannot read it ({e.strerror or e}); {fix}") from None
        except (ValueError, RecursionError) as e:  # not UTF-8 (UnicodeDecodeError is a ValueError), not JSON
            raise DataError(f"{self.adapter_meta}: not valid JSON ({' '.join(str(e).split())[:80]}); {fix}") from None
        if not isinstance(meta, dict):
            raise DataError(f"{self.adapter_meta}: expected a JSON object, got {type(meta).__name__}; {fix}")
        return meta



def tar_files(files: Mapping[str, bytes]) -> bytes:
    """``{name: content}`` as an uncompressed tar, built in memory; the same files always give
    the same bytes (no times, owners or modes of this machine)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o600, 0
            archive.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


def untar_files(blob: bytes, *, where: Path) -> dict[str, bytes]:
    """The files of a tar made by :func:`tar_files` (or by ``tarfile.add`` of a flat folder, as
    earlier versions sealed the adapter), read in memory: nothing is extracted to disk."""
    def bad(reason: str) -> DataError:
        return DataError(f"{where}: the sealed adapter is not a valid adapter archive ({reason}); "
                         "run `fedpref-agent forget` to start the adapter afresh")

    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as archive:
            for member in archive:
                if not member.isreg() or "/" in member.name or member.name in ("", ".", ".."):
                    raise bad(f"member {member.name!r} is not a plain file")
                if member.name in files:
                    raise bad(f"member {member.name!r} appears twice")
                data = archive.extractfile(member)
                files[member.name] = data.read() if data is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise bad(str(e)) from None
    return files


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def forget(home: AgentHome, store: DeviceStore, *, destroy_key: bool = False) -> dict:
    """Delete the preference pairs, the sealed adapter and accountant, and derived state.

    Deletion is physical (see :mod:`fedpref.client.store`): the pairs' pages are zeroed and the
    database rebuilt, the sealed blobs overwritten before they are unlinked. With
    ``destroy_key`` the store's key file is overwritten and removed and ``store.json`` (salt,
    key check) removed too, so nothing left on disk decrypts; the store is closed for good."""
    pairs = store.clear_pairs()
    try:
        adapter = store.delete(PRIVATE_BLOB)
        accountant = store.delete(ACCOUNTANT_BLOB)
        home.adapter_meta.unlink(missing_ok=True)
        shutil.rmtree(home.shared_dir, ignore_errors=True)
        if destroy_key:
            store.destroy()
    except (FedPrefError, OSError) as e:  # the pairs are gone already: say so, and what is left
        what = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        raise DataError(f"forget deleted {pairs} pairs, then stopped: {what}; fix that and run "
                        "`fedpref-agent forget` again to delete the rest") from None
    return {"pairs_deleted": pairs, "adapter_deleted": adapter, "accountant_deleted": accountant}
