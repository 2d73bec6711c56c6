"""The sealed device state: the private adapter goes into the store and back without ever being
on disk unsealed, in the same PEFT format as a saved folder. Tiny real model, real AES-GCM."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from fedpref.client.agent_home import PRIVATE_BLOB, AgentHome, tar_files, untar_files
from fedpref.client.agent_state import EncryptedDeviceState
from fedpref.client.device import adapters_for, get_runtime
from fedpref.client.store import DeviceStore
from fedpref.common.errors import DataError
from fedpref.model.config import AdapterSpec, ModelConfig
from fedpref.model.io import CONFIG_NAME, WEIGHTS_NAME, adapter_files, load_adapter_files, save_adapter
from fedpref.model.preference import get_arrays, set_arrays
from fedpref.protocol.partition import PRIVATE_ADAPTER, Group


@pytest.fixture
def rt(tiny_encoder_dir):
    cfg = ModelConfig(backbone=str(tiny_encoder_dir), adapter=AdapterSpec(rank=2))
    return get_runtime(cfg, adapters_for(train_shared=True, train_private=True))


@pytest.fixture
def state(tmp_path, rt):
    home = AgentHome(root=tmp_path / "home", server="127.0.0.1:9092", ca=tmp_path / "home" / "ca.pem",
                     model=ModelConfig())
    store = DeviceStore.create(home.store_dir)
    yield EncryptedDeviceState(home, store)
    store.close()


def _perturb(rt, seed: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    arrays = get_arrays(rt.model, Group.PRIVATE)
    new = {k: (v + torch.randn(v.shape, generator=g).numpy() * 0.1).astype(v.dtype) for k, v in arrays.items()}
    set_arrays(rt.model, Group.PRIVATE, new)
    return get_arrays(rt.model, Group.PRIVATE)


def _zero(rt) -> None:
    set_arrays(rt.model, Group.PRIVATE, {k: np.zeros_like(v) for k, v in get_arrays(rt.model, Group.PRIVATE).items()})


def _assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def _header(weights: bytes) -> dict:
    n = int.from_bytes(weights[:8], "little")
    return json.loads(weights[8:8 + n])


def _assert_same_adapter(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """The same PEFT files: identical config, tensors and metadata (safetensors writes its
    metadata map in no fixed order, so the weights' bytes may differ in the header only)."""
    assert a.keys() == b.keys() == {CONFIG_NAME, WEIGHTS_NAME}
    assert a[CONFIG_NAME] == b[CONFIG_NAME]
    assert _header(a[WEIGHTS_NAME]).get("__metadata__") == _header(b[WEIGHTS_NAME]).get("__metadata__")
    ta, tb = load_safetensors(a[WEIGHTS_NAME]), load_safetensors(b[WEIGHTS_NAME])
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].numpy().tobytes() == tb[k].numpy().tobytes(), k


def test_save_then_load_round_trips_bit_identically(state, rt):
    before = _perturb(rt, 1)
    state.save_private(rt, metadata={"round": "3"})
    sealed = state.store.unseal(PRIVATE_BLOB)
    _zero(rt)
    assert get_arrays(rt.model, Group.PRIVATE)[next(iter(before))].any() == False  # noqa: E712  (control)
    state.load_private(rt)
    _assert_bit_identical(before, get_arrays(rt.model, Group.PRIVATE))
    assert state.home.adapter_metadata()["round"] == 3
    state.save_private(rt, metadata={"round": "3"})
    where = state.store.root
    _assert_same_adapter(untar_files(state.store.unseal(PRIVATE_BLOB), where=where), untar_files(sealed, where=where))


def test_a_new_device_starts_from_the_initial_adapter(state, rt):
    _perturb(rt, 2)
    state.load_private(rt)
    _assert_bit_identical(rt.initial_private, get_arrays(rt.model, Group.PRIVATE))


def _files_outside(root: Path, store: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file() and store not in p.parents}


def test_load_and_save_write_nothing_outside_the_store(state, rt, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a temporary file or folder outside the store was requested")

    real_mkstemp = tempfile.mkstemp

    def mkstemp_in_store(*args, dir=None, prefix="", **kwargs):  # noqa: A002  (write_bytes_atomic's temp sibling)
        sealed = dir is not None and (Path(dir) == state.store.root or state.store.root in Path(dir).parents)
        meta = dir is not None and Path(dir) == state.home.state_dir and prefix.startswith(".adapter.json.")
        if not (sealed or meta):
            refuse()
        return real_mkstemp(*args, dir=dir, prefix=prefix, **kwargs)

    for name in ("mkdtemp", "TemporaryDirectory", "NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_in_store)
    weights = _perturb(rt, 3)
    plain = adapter_files(rt.model, PRIVATE_ADAPTER)[WEIGHTS_NAME]
    tmp_before = set(Path(tempfile.gettempdir()).iterdir())
    outside_before = _files_outside(tmp_path, state.store.root)

    state.save_private(rt, metadata={"round": "1"})
    _zero(rt)
    state.load_private(rt)

    _assert_bit_identical(weights, get_arrays(rt.model, Group.PRIVATE))
    assert set(Path(tempfile.gettempdir()).iterdir()) == tmp_before
    outside_after = _files_outside(tmp_path, state.store.root)
    assert set(outside_after) - set(outside_before) == {str(state.home.adapter_meta)}  # round and time only
    tensor_bytes = plain[-256:]  # the tail of the safetensors data: raw adapter weights
    for root in (tmp_path, state.store.root):
        for p in root.rglob("*"):
            assert not p.is_file() or tensor_bytes not in p.read_bytes(), f"{p} holds the adapter in clear"
    assert sorted(p.name for p in (state.store.root / "vault").iterdir()) == [f"{PRIVATE_BLOB}.enc"]


def test_a_blob_sealed_by_earlier_versions_still_loads(state, rt, tmp_path):
    """Earlier versions sealed ``tar`` of a folder written by save_adapter (tarfile.add)."""
    weights = _perturb(rt, 4)
    folder = tmp_path / "old" / PRIVATE_ADAPTER
    save_adapter(rt.model, PRIVATE_ADAPTER, folder, metadata={"round": "2"})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        for f in sorted(folder.iterdir()):
            archive.add(f, arcname=f.name, recursive=False)
    state.store.seal(PRIVATE_BLOB, buf.getvalue())
    _zero(rt)
    state.load_private(rt)
    _assert_bit_identical(weights, get_arrays(rt.model, Group.PRIVATE))


def test_adapter_files_are_exactly_the_saved_folder(rt, tmp_path):
    """One implementation of the PEFT format: the folder holds the in-memory files' bytes."""
    _perturb(rt, 5)
    files = adapter_files(rt.model, PRIVATE_ADAPTER, metadata={"round": "7"})
    save_adapter(rt.model, PRIVATE_ADAPTER, tmp_path / "a", metadata={"round": "7"})
    _assert_same_adapter({p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}, files)
    assert _header(files[WEIGHTS_NAME])["__metadata__"] == {"format": "pt", "round": "7"}
    assert untar_files(tar_files(files), where=tmp_path) == files


def test_a_broken_sealed_adapter_names_the_fix(state, rt, tmp_path):
    files = adapter_files(rt.model, PRIVATE_ADAPTER)
    state.store.seal(PRIVATE_BLOB, tar_files({**files, WEIGHTS_NAME: files[WEIGHTS_NAME][:100]}))
    with pytest.raises(DataError, match=r"private_adapter\.enc.*cannot read the adapter.*fedpref-agent forget"):
        state.load_private(rt)
    state.store.delete(PRIVATE_BLOB)
    state.store.seal(PRIVATE_BLOB, tar_files({CONFIG_NAME: files[CONFIG_NAME]}))
    with pytest.raises(DataError, match=r"adapter_model\.safetensors: adapter file missing.*fedpref-agent forget"):
        state.load_private(rt)
    with pytest.raises(DataError, match=r"cannot read the adapter.*delete the folder"):
        load_adapter_files(rt.model, PRIVATE_ADAPTER, {**files, WEIGHTS_NAME: b"junk"}, where=tmp_path)


@pytest.mark.parametrize("kind", ["symlink", "subdir", "twice", "garbage"])
def test_untar_refuses_anything_but_plain_files(tmp_path, kind):
    buf = io.BytesIO()
    if kind == "garbage":
        blob = b"not a tar at all" * 40
    else:
        with tarfile.open(fileobj=buf, mode="w") as archive:
            if kind == "symlink":
                info = tarfile.TarInfo(CONFIG_NAME)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                archive.addfile(info)
            else:
                name = "../x" if kind == "subdir" else CONFIG_NAME
                for _ in range(2 if kind == "twice" else 1):
                    info = tarfile.TarInfo(name)
                    info.size = 2
                    archive.addfile(info, io.BytesIO(b"{}"))
        blob = buf.getvalue()
    with pytest.raises(DataError, match=r"not a valid adapter archive.*fedpref-agent forget"):
        untar_files(blob, where=tmp_path / "vault" / "private_adapter.enc")
