"""Crash-safe file writes, the one toolkit every part uses: write a temp file in the same folder, fsync it,
rename it into place with ``os.replace`` and fsync the folder.

Why: a run, a server or a device can be killed or lose power at any moment; a half-written summary,
adapter, ledger or checkpoint must never replace a good one. After a crash at any point a file is either
its old or its new version (a stray ``.NAME.*.tmp`` may remain; nothing reads it).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (the directory entry itself is fsynced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(current)
    return current


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temp_path)`` (any writer that takes a file name, e.g. safetensors'
    ``save_file``), then fsync the temp file, rename it into place and fsync the folder.

    Args:
        path: the file to create or replace; its folder is created if missing.
        write: called once with the temp file's path (in the same folder) to fill it.

    Raises:
        OSError: from the writer or the file system (a full disk: ``errno.ENOSPC``); the temp file is
            removed and ``path`` is untouched (its old version, or absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 otherwise: outputs get the modes open() would give
        os.close(fd)
        write(tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # without this a power cut can lose the rename
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` as UTF-8 at ``path``, replaced atomically (``atomic_write``)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` at ``path``, replaced atomically (``atomic_write``)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented UTF-8 JSON at ``path``, replaced atomically (``atomic_write``)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line and fsync it: a crash loses at most the line being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(obj) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def acquire_pid_lock(path: str | Path) -> tuple[int | None, str | None]:
    """An exclusive, non-blocking ``flock`` on ``path`` holding our pid: ``(fd, None)`` when acquired,
    ``(None, holder pid or None)`` when another process holds it. The kernel drops the lock when the
    holder dies, so a crash never leaves it taken. Release with ``release_pid_lock``."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        return None, holder if holder.isdigit() else None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, None


def release_pid_lock(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.close(fd)
