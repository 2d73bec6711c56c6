"""Atomic writes: write a temporary sibling, fsync it, rename it over the target.

A crash leaves either the old file or the new one, never a torn one. Directories are
replaced by renaming the old one aside first; :func:`recover_dir` finishes or rolls back an
interrupted replacement on the next start.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path, *, strict: bool = False) -> None:
    """fsync a folder, so a rename or unlink in it is durable. ``strict``: a folder that cannot
    be opened is an error (the privacy ledger), not a no-op."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(fd: int, tmp: Path, path: Path, mode: int) -> None:
    """fsync and chmod the temporary file through its descriptor ``fd``, check that ``tmp``
    still names that very file (not something planted in its place), rename it over ``path``
    and fsync the folder."""
    os.fchmod(fd, mode)
    os.fsync(fd)
    st, named = os.fstat(fd), os.lstat(tmp)
    if not stat.S_ISREG(named.st_mode) or (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
        raise OSError(f"{tmp}: the temporary file was replaced while it was being written; "
                      f"{path} left as it was (is {path.parent} writable by others?)")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary sibling of ``path`` created exclusively (``mkstemp``: never
    a file or link that was already there), through its descriptor only: written, given
    ``mode``, fsynced, renamed over ``path``; then the folder is fsynced. On any failure the
    temporary file is removed and ``path`` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        _commit(fd, tmp, path, mode)
    except BaseException:
        _unlink_own(tmp, fd)
        raise
    finally:
        os.close(fd)


def _unlink_own(tmp: Path, fd: int) -> None:
    """Remove ``tmp`` if it still is the file open as ``fd`` (never what someone put in its place)."""
    try:
        st, named = os.fstat(fd), os.lstat(tmp)
    except OSError:
        return
    if (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino):
        os.unlink(tmp)


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None], *, mode: int = 0o644) -> None:
    """The atomic writer for writers that need a path (``safetensors.save_file``, ``open``):
    ``write(tmp)`` fills ``tmp``, a file name inside a private folder (``mkdtemp``: 0700, made
    for this write) next to ``path``, so nobody else can put a file or link there; the file is
    then opened without following links, fsynced and given ``mode`` through its descriptor,
    and renamed over ``path``; then the folder is fsynced. On any failure the private folder
    is removed and ``path`` is as it was. Writers of bytes use :func:`write_bytes_atomic`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp = private / path.name
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{tmp}: the writer made something other than a plain file; {path} left as it was")
            _commit(fd, tmp, path, mode)
        finally:
            os.close(fd)
        private.rmdir()
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str, *, mode: int = 0o644) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def recover_dir(path: str | os.PathLike[str]) -> None:
    """Undo a replacement that crashed between its two renames."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.replace(old, path)
    elif path.exists() and old.exists():
        shutil.rmtree(old)


def replace_dir_atomic(path: str | os.PathLike[str], fill: Callable[[Path], None]) -> None:
    """Build a directory with ``fill(tmpdir)`` (files fsynced here), then swap it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
