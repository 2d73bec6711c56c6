"""The atomic writers never write, chmod or rename through a name someone else could have put
a link at: bytes go through the descriptor of a file created exclusively, and a writer that
needs a path gets one inside a private folder made for that write."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from fedpref.common.atomic import write_atomic, write_bytes_atomic, write_text_atomic


def _plant_links(monkeypatch, victim: Path) -> None:
    """A hostile user of a shared folder swaps every fresh temporary file for a link to ``victim``
    right after it is created (the race the writer must not lose)."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        os.unlink(name)
        os.symlink(victim, name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def _fill(data: bytes):
    return lambda tmp: Path(tmp).write_bytes(data)


@pytest.mark.parametrize("writer", ["bytes", "path"])
def test_a_link_planted_at_the_temporary_name_is_never_followed(tmp_path, monkeypatch, writer):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o600)
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "out.json"
    target.write_bytes(b"old")
    _plant_links(monkeypatch, victim)
    if writer == "bytes":
        with pytest.raises(OSError, match="replaced while it was being written"):
            write_bytes_atomic(target, b"new", mode=0o644)
        assert target.read_bytes() == b"old"
    else:  # a private folder: nothing can be planted in it
        write_atomic(target, _fill(b"new"), mode=0o644)
        assert target.read_bytes() == b"new"
    assert victim.read_bytes() == b"precious" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not target.is_symlink()


def test_a_writer_gets_a_path_in_a_private_folder_and_leaves_nothing_behind(tmp_path):
    seen = {}

    def write(tmp: Path) -> None:
        folder = tmp.parent
        seen["folder"] = folder
        st = folder.stat()
        seen["private"] = (stat.S_IMODE(st.st_mode), st.st_uid, folder.parent == tmp_path)
        with open(tmp, "w") as fh:  # what write_jsonl and safetensors' save_file do with it
            fh.write("data")

    write_atomic(tmp_path / "f.jsonl", write, mode=0o600)
    assert seen["private"] == (0o700, os.getuid(), True)
    assert (tmp_path / "f.jsonl").read_text() == "data"
    assert stat.S_IMODE((tmp_path / "f.jsonl").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.jsonl"]


def test_a_writer_that_leaves_a_link_is_refused_and_nothing_changes(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "out"
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        write_atomic(target, lambda tmp: os.symlink(victim, tmp))
    assert target.read_bytes() == b"old" and not target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "victim"]


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_bytes_and_text_get_their_mode_and_a_failure_leaves_the_old_file(tmp_path, mode):
    target = tmp_path / "a" / "b.txt"
    write_text_atomic(target, "héllo", mode=mode)
    assert target.read_text(encoding="utf-8") == "héllo" and stat.S_IMODE(target.stat().st_mode) == mode
    write_bytes_atomic(target, b"x" * (1 << 20), mode=mode)  # larger than one write
    assert target.read_bytes() == b"x" * (1 << 20)

    def boom(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_atomic(target, boom)
    assert target.read_bytes() == b"x" * (1 << 20)
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.txt"]
