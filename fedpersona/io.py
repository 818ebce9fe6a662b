"""Crash-safe file writes, the one toolkit every part uses: write a temp file in the same folder, fsync it,
rename it into place with ``os.replace`` and fsync the folder.

Why: a run, a server or a device can be killed or lose power at any moment; a half-written summary,
adapter, ledger or checkpoint must never replace a good one. After a crash at any point a file is either
its old or its new version (a stray ``.NAME.*.tmp`` may remain; nothing reads it).

A file system that refuses a write (no space left, a quota, a read-only mount, no permission) is the
user's to fix, and says so: ``storage_error`` turns such an ``OSError`` into a one-line ``StorageError``
naming the place and what to do, never "damaged" (the data already there is intact).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpersona.errors import UsageError

# errno values meaning "the file system refused the write", with what the user can do about each
STORAGE_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on the device holding {path}; free some space there, then run it again",
    errno.EDQUOT: "the disk quota is used up on {path}; free some space (or have the quota raised), then run it "
                  "again",
    errno.EROFS: "{path} is on a read-only file system; choose a writable place (or remount it read-write)",
    errno.EACCES: "no permission to write {path}; choose a place you may write to (or fix its permissions)",
    errno.EPERM: "the operating system does not allow writing {path}; choose another place",
}


class StorageError(UsageError):
    """The file system refused a write (``STORAGE_ERRNOS``): a one-line message naming the place and what to
    do (a device reports it as ``storage-unwritable``: ``fedpersona.client.failures``)."""


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust-backed writers (safetensors) report an errno


def as_os_error(err: BaseException, path: str | Path | None = None) -> OSError | None:
    """``err`` as an ``OSError`` with its errno: itself if it is one; for a writer that wraps the system's error
    in its own exception (safetensors: "... No space left on device (os error 28)"), a new one; else None.

    Args:
        err: what a write raised.
        path: the file written (the new error's filename).

    Returns:
        The ``OSError``, or None when ``err`` carries no errno.
    """
    if isinstance(err, OSError):
        return err
    found = _OS_ERROR.search(str(err))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), None if path is None else str(path))


def storage_error(err: OSError, path: str | Path, doing: str) -> StorageError | None:
    """The one-line ``StorageError`` for ``err`` when it is a refused write, else None.

    Args:
        err: what the write raised.
        path: the file or folder being written (named in the message).
        doing: what was being done, e.g. ``"feedback add"`` (the message's start).

    Returns:
        The error to raise (``from None``), or None for other errors (they are not the file system's refusal).
    """
    if err.errno not in STORAGE_ERRNOS:
        return None
    return StorageError(f"{doing}: " + STORAGE_ERRNOS[err.errno].format(path=path) + "; nothing was changed")


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
        OSError: from the writer or the file system (a full disk: ``errno.ENOSPC``; a writer that wraps the
            system's error, as safetensors does, is re-raised as the ``OSError`` it names); the temp file is
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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, OSError) and (os_error := as_os_error(err, path)) is not None:
            raise os_error from err  # a writer's own wrapper of ENOSPC & co: the errno for our callers
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
    holder dies, so a crash never leaves it taken. Release with ``release_pid_lock``.

    The pid is a note for people (who holds it); the lock is the flock. Writing the pid can fail once the
    lock is taken (a full disk, a quota): then the lock is released and the descriptor closed before the
    error is raised, so a long-lived process is never left holding a lock it does not know it has.

    Args:
        path: the lock file (created if missing, mode 0600).

    Returns:
        ``(fd, None)`` or ``(None, holder)``.

    Raises:
        OSError: the lock file cannot be opened or written (``storage_error`` tells a refused write).
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        return None, holder if holder.isdigit() else None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)  # closing the descriptor drops the flock
        raise
    return fd, None


def release_pid_lock(fd: int) -> None:
    """Release a lock from ``acquire_pid_lock``: the pid note is cleared where the disk allows, and the
    descriptor is closed (which drops the flock) on every path."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass  # a read-only or failing disk: the stale pid note is harmless, the lock goes with the descriptor
    finally:
        os.close(fd)
