"""The sealed device state of an agent home: the private adapter (PEFT format, as a tar) and
the DP accountant live AES-GCM encrypted in the home's :class:`DeviceStore`; the hidden-state
cache of the user's texts is never written. The adapter's PEFT files and their tar are built
and read in memory, so the private adapter is never on disk unsealed, not even in a temporary
folder. Kept apart from :mod:`fedpref.client.agent_home` because it needs torch, which the
agent's light commands (init, feedback, status) do not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedpref.client.agent_home import ACCOUNTANT_BLOB, PRIVATE_BLOB, AgentHome, now_utc, tar_files, untar_files
from fedpref.client.device import DeviceState, Runtime
from fedpref.client.store import DeviceStore
from fedpref.common.accounting import SampleLevelAccountant
from fedpref.common.atomic import write_text_atomic
from fedpref.model.io import adapter_files, load_adapter_files, save_adapter
from fedpref.model.preference import set_arrays
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group


class EncryptedDeviceState(DeviceState):
    """:class:`DeviceState` whose private adapter and accountant live sealed in the store."""

    def __init__(self, home: AgentHome, store: DeviceStore) -> None:
        super().__init__(home.state_dir)
        self.home = home
        self.store = store

    @property
    def cache_path(self) -> Path | None:
        return None  # hidden states of the user's texts are rebuilt in memory, never written

    def load_private(self, rt: Runtime) -> None:
        blob = self.store.unseal(PRIVATE_BLOB)
        if blob is None:
            set_arrays(rt.model, Group.PRIVATE, rt.initial_private)
            return
        where = self.store.root / "vault" / f"{PRIVATE_BLOB}.enc"
        load_adapter_files(rt.model, PRIVATE_ADAPTER, untar_files(blob, where=where), where=where,
                           fix="run `fedpref-agent forget` to start the adapter afresh")

    def save_private(self, rt: Runtime, *, metadata: dict[str, str] | None = None) -> None:
        self.store.seal(PRIVATE_BLOB, tar_files(adapter_files(rt.model, PRIVATE_ADAPTER, metadata=metadata)))
        meta = {"round": int((metadata or {}).get("round", 0)), "updated_at": now_utc()}
        write_text_atomic(self.home.adapter_meta, json.dumps(self.home.adapter_metadata() | meta), mode=0o600)

    def accountant(self) -> SampleLevelAccountant:
        where = self.store.root / "vault" / f"{ACCOUNTANT_BLOB}.enc"
        blob = self.store.unseal(ACCOUNTANT_BLOB)
        if blob is None:
            self.refuse_lost_accountant(has_private=self.store.unseal(PRIVATE_BLOB) is not None, where=where)
            return SampleLevelAccountant(where)
        return SampleLevelAccountant.from_bytes(blob, where)

    def save_accountant(self, acct: SampleLevelAccountant) -> None:
        self.store.seal(ACCOUNTANT_BLOB, acct.to_bytes())

    def personalized_on(self) -> str:
        return str(self.home.adapter_metadata().get("personalized_on", ""))

    def record_personalized(self, sha256: str) -> None:  # the released model's digest: public, kept in clear
        write_text_atomic(self.home.adapter_meta, json.dumps(self.home.adapter_metadata() | {"personalized_on": sha256}),
                          mode=0o600)

    def received_global(self, rt: Runtime, server_round: int, shared: dict[str, np.ndarray]) -> None:
        set_arrays(rt.model, Group.SHARED, shared)  # the round's delta is already computed
        save_adapter(rt.model, SHARED_ADAPTER, self.home.shared_dir, metadata={"round": str(server_round)})
