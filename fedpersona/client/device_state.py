"""Everything one user owns on their device, under one state directory (``--state DIR``).

Why one directory: the user can see, back up and delete all of it, and ``forget`` can check that
nothing of theirs is left. Why atomic writes: a device can lose power or be killed mid-round; a
half-written adapter or privacy ledger must never replace a good one. Every file is written to a temp
file in the same folder, fsynced, renamed over the old one with ``os.replace`` and the folder fsynced:
after a crash at any point the file is either the old or the new version (a stray ``.NAME.*.tmp`` may
remain; nothing reads it and ``forget`` removes it).

Files:

- ``memory.sqlite``: the preference pairs (``PreferenceMemory``; SQLite in WAL mode, its own journal).
- ``private_adapter.safetensors``: the user's private adapter, with ``rounds_trained`` in its
  metadata, so tensors and counter are replaced together by one rename.
- ``shared_adapter.safetensors``: the last shared tensors received, so generation works offline.
- ``ledger.json``: the privacy ledger (an opaque JSON object here).
- ``ref_logps.sqlite``: reference log-prob cache, sha256(model, prompt, chosen, rejected) ->
  (ref_chosen, ref_rejected); only a cache, so damaged reads count as misses.
- ``counters.json``: rounds_trained and last_round, for people and tools.
- ``meta.json``: the model id and scheme the state belongs to, and when it was created.
- ``.lock``: held (``fcntl.flock``) by the one process training on this directory.

torch and safetensors are imported only by the tensor methods, so ``feedback`` commands stay fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpersona.client.memory import MEMORY_FILE, PreferenceMemory
from fedpersona.data.schema import PreferencePair
from fedpersona.errors import UsageError
from fedpersona.io import acquire_pid_lock, fsync_dir, release_pid_lock

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PRIVATE_FILE = "private_adapter.safetensors"
SHARED_FILE = "shared_adapter.safetensors"
LEDGER_FILE = "ledger.json"
REF_CACHE_FILE = "ref_logps.sqlite"
COUNTERS_FILE = "counters.json"
META_FILE = "meta.json"
LOCK_FILE = ".lock"
FORMAT_VERSION = 1

_SQLITE_SIDECARS = ("-wal", "-shm", "-journal")
PURPOSES: dict[str, str] = {
    MEMORY_FILE: "preference memory (your feedback pairs)",
    PRIVATE_FILE: "your private adapter",
    SHARED_FILE: "last shared adapter received from the server",
    LEDGER_FILE: "privacy ledger",
    REF_CACHE_FILE: "reference log-prob cache",
    COUNTERS_FILE: "training counters",
    META_FILE: "model id and scheme this state was made for",
    LOCK_FILE: "lock held while training",
}
# What ``forget`` deletes: every file derived from the user's feedback. The shared adapter (the
# server's global tensors), meta.json and the lock file hold nothing of the user's and stay.
USER_FILES = (MEMORY_FILE, PRIVATE_FILE, LEDGER_FILE, REF_CACHE_FILE, COUNTERS_FILE)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` via ``write(temp_path)``, fsync, rename into place, fsync the folder.

    On any failure the temp file is removed and ``path`` is untouched (old version or absent).
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _read_json_object(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON object file, None if absent; a damaged file is a UsageError (never silently reset)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: {what} is not valid JSON ({err.msg} at line {err.lineno}); "
                         "restore it from a backup") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage; cpu + contiguous: what the format stores.
    data = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    replace_atomically(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))


def _load_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of a safetensors file, None if absent; unreadable -> UsageError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except FileNotFoundError:
        return None
    except Exception as err:  # safetensors raises its own SafetensorError for damaged files
        if not path.exists():
            return None
        raise UsageError(f"{path}: {what} is unreadable ({err}); restore it from a backup, or delete it "
                         "to start afresh") from None
    return tensors, metadata


def _read_metadata(path: Path, what: str) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except FileNotFoundError:
        return None
    except Exception as err:
        if not path.exists():
            return None
        raise UsageError(f"{path}: {what} is unreadable ({err}); restore it from a backup, or delete it "
                         "to start afresh") from None


# ---------------------------------------------------------------------------- reference log-probs


def ref_key(model_id: str, pair: PreferencePair) -> str:
    """Cache key of a pair's reference log-probs under a frozen base model (user_id and split excluded)."""
    return hashlib.sha256(json.dumps([model_id, pair.prompt, pair.chosen, pair.rejected]).encode()).hexdigest()


class RefLogpCache:
    """Reference log-prob cache in SQLite: transactions make writes atomic; reads tolerate damage.

    The base is frozen, so a pair's reference log-probs never change; losing the cache only costs a
    recomputation. A damaged file therefore reads as empty (with a warning) and is recreated on write.
    """

    _CHUNK = 500  # keys per SELECT, below SQLite's bound-parameter limit on old builds

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            try:
                conn.execute("CREATE TABLE IF NOT EXISTS ref (key TEXT PRIMARY KEY, chosen REAL NOT NULL, "
                             "rejected REAL NOT NULL)")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _discard_damaged(self, err: Exception) -> None:
        log.warning("%s: reference log-prob cache unreadable (%s); recomputing and rewriting it", self.path, err)
        self.close()
        for suffix in ("", *_SQLITE_SIDECARS):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def get_many(self, keys: Iterable[str]) -> dict[str, tuple[float, float]]:
        """The cached entries among ``keys``; a missing or damaged cache gives {} (compute them)."""
        keys = list(keys)
        if not keys or not self.path.exists():
            return {}
        found: dict[str, tuple[float, float]] = {}
        try:
            conn = self._connect()
            for start in range(0, len(keys), self._CHUNK):
                chunk = keys[start:start + self._CHUNK]
                marks = ",".join("?" * len(chunk))
                for key, chosen, rejected in conn.execute(
                        f"SELECT key, chosen, rejected FROM ref WHERE key IN ({marks})", chunk):
                    found[key] = (float(chosen), float(rejected))
        except sqlite3.DatabaseError as err:
            log.warning("%s: reference log-prob cache unreadable (%s); treating it as empty", self.path, err)
            self.close()
            return {}
        return found

    def get(self, key: str) -> tuple[float, float] | None:
        return self.get_many([key]).get(key)

    def put_many(self, entries: Mapping[str, tuple[float, float]]) -> None:
        """Store entries in one transaction (all or none); a damaged file is replaced by a fresh one."""
        rows = [(k, float(c), float(r)) for k, (c, r) in entries.items()]
        if not rows:
            return
        for attempt in (1, 2):
            try:
                conn = self._connect()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany("INSERT OR REPLACE INTO ref (key, chosen, rejected) VALUES (?, ?, ?)", rows)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return
            except sqlite3.DatabaseError as err:
                if attempt == 2 or isinstance(err, sqlite3.OperationalError):
                    raise  # locked, disk full, ...: not damage, so never discard the file for it
                self._discard_damaged(err)

    def __len__(self) -> int:
        if not self.path.exists():
            return 0
        try:
            return int(self._connect().execute("SELECT COUNT(*) FROM ref").fetchone()[0])
        except sqlite3.DatabaseError:
            self.close()
            return 0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---------------------------------------------------------------------------- the state directory


@dataclass(frozen=True)
class StateFile:
    """One file of the state directory, for ``files()`` listings."""

    name: str
    path: Path
    size: int
    purpose: str


class DeviceState:
    """A user's state directory; implements ``fedpersona.client.local.PrivateStore``.

    Open pieces lazily (``memory``, ``ref_cache``) so a ``feedback`` command touches only the memory.
    Use as a context manager (or call ``close``) to close databases and release the lock.
    """

    def __init__(self, state_dir: str | Path, *, test_fraction: float = 0.2, create: bool = True) -> None:
        self.dir = Path(state_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise UsageError(f"--state {self.dir}: exists and is not a directory")
        if not self.dir.exists():
            if not create:
                raise UsageError(f"--state {self.dir}: no device state here; add feedback first or check the path")
            self.dir.mkdir(parents=True, mode=0o700)  # the user's private data: owner only
        self.test_fraction = test_fraction
        self._memory: PreferenceMemory | None = None
        self._ref_cache: RefLogpCache | None = None
        self._lock_fd: int | None = None
        self._lock_depth = 0

    # ------------------------------------------------------------------ paths
    @property
    def memory_path(self) -> Path:
        return self.dir / MEMORY_FILE

    @property
    def private_path(self) -> Path:
        return self.dir / PRIVATE_FILE

    @property
    def shared_path(self) -> Path:
        return self.dir / SHARED_FILE

    @property
    def ledger_path(self) -> Path:
        return self.dir / LEDGER_FILE

    @property
    def ref_cache_path(self) -> Path:
        return self.dir / REF_CACHE_FILE

    @property
    def counters_path(self) -> Path:
        return self.dir / COUNTERS_FILE

    @property
    def meta_path(self) -> Path:
        return self.dir / META_FILE

    @property
    def lock_path(self) -> Path:
        return self.dir / LOCK_FILE

    # ------------------------------------------------------------------ pieces
    @property
    def memory(self) -> PreferenceMemory:
        if self._memory is None:
            self._memory = PreferenceMemory(self.memory_path, test_fraction=self.test_fraction)
        return self._memory

    @property
    def ref_cache(self) -> RefLogpCache:
        if self._ref_cache is None:
            self._ref_cache = RefLogpCache(self.ref_cache_path)
        return self._ref_cache

    def close(self) -> None:
        """Close the databases and release the lock if held."""
        self.close_pieces()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None
            self._lock_depth = 0

    def close_pieces(self) -> None:
        """Close the databases but keep the lock (if held)."""
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        if self._ref_cache is not None:
            self._ref_cache.close()
            self._ref_cache = None

    def __enter__(self) -> DeviceState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ lock
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's training lock (re-entrant within this object).

        A second process (or a second DeviceState on the same directory) gets a UsageError at once
        instead of two trainings overwriting each other's private adapter and ledger. The kernel drops
        the lock when the holder dies, so a crash never leaves the directory locked.
        """
        if self._lock_fd is None:
            fd, holder = acquire_pid_lock(self.lock_path)
            if fd is None:
                who = f" (pid {holder})" if holder else ""
                raise UsageError(f"--state {self.dir}: another fedpersona process{who} is training on this "
                                 "state directory; wait for it to finish, or use a different --state")
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                release_pid_lock(self._lock_fd)
                self._lock_fd = None

    @property
    def locked(self) -> bool:
        """Whether this object holds the training lock."""
        return self._lock_fd is not None

    # ------------------------------------------------------------------ PrivateStore
    def load_private(self) -> dict[str, torch.Tensor] | None:
        loaded = _load_tensors(self.private_path, "private adapter")
        return None if loaded is None else loaded[0]

    def save_private(self, tensors: Mapping[str, torch.Tensor], rounds_trained: int, *,
                     server_round: int | None = None) -> None:
        """Replace the private adapter; ``rounds_trained`` rides in its metadata (one atomic rename).

        counters.json is written after it, for people and tools; ``rounds_trained()`` reads the adapter.
        """
        _save_tensors(self.private_path, tensors, {"format": f"fedpersona.private/{FORMAT_VERSION}",
                                                    "rounds_trained": str(int(rounds_trained))})
        counters = self.counters()
        counters.update(rounds_trained=int(rounds_trained), updated=_now())
        if server_round is not None:
            counters["last_round"] = int(server_round)
        _write_json(self.counters_path, counters)

    def rounds_trained(self) -> int:
        metadata = _read_metadata(self.private_path, "private adapter")
        return 0 if metadata is None else int(metadata.get("rounds_trained", 0))

    def counters(self) -> dict[str, Any]:
        """counters.json: rounds_trained, last_round (None before the first round), updated."""
        stored = _read_json_object(self.counters_path, "training counters") or {}
        return {"rounds_trained": 0, "last_round": None, **stored}

    # ------------------------------------------------------------------ shared tensors
    def load_shared(self) -> dict[str, torch.Tensor] | None:
        loaded = _load_tensors(self.shared_path, "shared adapter")
        return None if loaded is None else loaded[0]

    def save_shared(self, tensors: Mapping[str, torch.Tensor], *, server_round: int | None = None) -> None:
        metadata = {"format": f"fedpersona.shared/{FORMAT_VERSION}", "received": _now()}
        if server_round is not None:
            metadata["server_round"] = str(int(server_round))
        _save_tensors(self.shared_path, tensors, metadata)

    # ------------------------------------------------------------------ ledger and meta
    def load_ledger(self) -> dict[str, Any]:
        """The privacy ledger; {} if none. A damaged ledger raises: resetting it would under-count spending."""
        return _read_json_object(self.ledger_path, "privacy ledger") or {}

    def save_ledger(self, ledger: Mapping[str, Any]) -> None:
        _write_json(self.ledger_path, dict(ledger))

    def meta(self) -> dict[str, Any] | None:
        return _read_json_object(self.meta_path, "state metadata")

    def bind(self, model_id: str, scheme: str) -> dict[str, Any]:
        """Record (or check) the model and scheme this state belongs to; returns meta.json's content.

        A private adapter only fits the model and scheme it was trained with, so a mismatch is refused
        while one exists. Without one the directory is rebound, and the old shared adapter (which fits
        only the old model) is dropped.
        """
        current = self.meta()
        if current is not None and (current.get("model_id"), current.get("scheme")) != (model_id, scheme):
            if self.private_path.exists():
                raise UsageError(
                    f"--state {self.dir}: holds a private adapter for model {current.get('model_id')!r} with scheme "
                    f"{current.get('scheme')!r}, not model {model_id!r} with scheme {scheme!r}; use another --state, "
                    "or run `fedpersona feedback forget` to drop the private adapter")
            self.shared_path.unlink(missing_ok=True)
            current = None
        if current is None:
            current = {"model_id": model_id, "scheme": scheme, "created": _now(), "format": FORMAT_VERSION}
            _write_json(self.meta_path, current)
        return current

    # ------------------------------------------------------------------ listing and forgetting
    def files(self) -> list[StateFile]:
        """Every file in the state directory (strays included), with what it is for."""
        found = []
        for path in sorted(self.dir.iterdir()):
            if path.is_file():
                base = path.name
                for suffix in _SQLITE_SIDECARS:
                    base = base.removesuffix(suffix)
                purpose = PURPOSES.get(base, "temporary file of an interrupted write"
                                       if base.startswith(".") and base.endswith(".tmp") else "")
                found.append(StateFile(path.name, path, path.stat().st_size, purpose))
        return found

    def forget(self) -> list[str]:
        """Delete everything of the user's: pairs, private adapter, ledger, counters, ref cache.

        Takes the training lock (refused while training runs), wipes the pairs inside the database
        first (so a process holding it open sees an empty memory), then deletes the files, their
        SQLite sidecars and any temp files of interrupted writes. Returns the names deleted.
        """
        removed: list[str] = []
        with self.lock():
            if self.memory_path.exists():
                try:
                    self.memory.forget()
                except UsageError:
                    pass  # a damaged database is deleted below all the same
            self.close_pieces()
            for name in USER_FILES:
                for suffix in ("", *_SQLITE_SIDECARS):
                    path = self.dir / f"{name}{suffix}"
                    if path.exists():
                        path.unlink()
                        removed.append(path.name)
                for tmp in self.dir.glob(f".{name}.*.tmp"):
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp.name)
            fsync_dir(self.dir)
        return removed
