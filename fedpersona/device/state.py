"""Everything one user owns on their device, under one state directory (``--state DIR``).

Why one directory: the user can see, back up and delete all of it, and ``forget`` can check that
nothing of theirs is left. Why atomic writes: a device can lose power or be killed mid-round; a
half-written adapter or privacy ledger must never replace a good one. Every file is written to a temp
file in the same folder, fsynced, renamed over the old one with ``os.replace`` and the folder fsynced:
after a crash at any point the file is either the old or the new version (a stray ``.NAME.*.tmp`` may
remain; nothing reads it and ``forget`` removes it).

Files:

- ``memory.sqlite``: the preference pairs and the conversations of ``fedpersona chat``
  (``PreferenceMemory``; SQLite in WAL mode, its own journal).
- ``private_adapter.safetensors``: the user's private adapter, with ``rounds_trained`` in its
  metadata, so tensors and counter are replaced together by one rename.
- ``shared_adapter.safetensors``: the last shared tensors received, so generation works offline.
- ``ledger.json``: the privacy ledger (an opaque JSON object here).
- ``ref_logps.sqlite``: reference log-prob cache, sha256(model, prompt, chosen, rejected) ->
  (ref_chosen, ref_rejected); only a cache, so damaged reads count as misses.
- ``counters.json``: rounds_trained and last_round, for people and tools.
- ``meta.json``: the model id and scheme the state belongs to, when it was created, and whether a
  privacy ledger was ever started (so a deleted ledger is noticed, never silently started afresh).
- ``last_reply.safetensors``: the last training reply sent, with its run lineage and round: a round a
  resumed server asks for again is answered with it, not trained (and paid for) twice.
- ``secure_aggregation.json``: during a round under secure aggregation, this user's SecAgg+ state (its
  key pairs, self-mask seed, and the shares its neighbours entrusted to it; ``fedpersona.client.secure``),
  removed when the round's unmask stage is answered.
- ``policy.json``: the user's privacy policy (``fedpersona.device.policy``); ``forget`` keeps it.
- ``privacy_record.json``: what forgotten pairs had cost (``fedpersona.device.privacy_record``; hashes,
  no text); ``forget`` keeps it.
- ``.lock``: held (``fcntl.flock``) by the one process training on this directory.

torch and safetensors are imported only by the tensor methods, so ``feedback`` commands stay fast.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpersona.device.memory import MEMORY_FILE, SQLITE_SIDECARS, PreferenceMemory
from fedpersona.device.policy import POLICY_FILE
from fedpersona.device.privacy_record import RECORD_FILE
from fedpersona.errors import UsageError
from fedpersona.io import (acquire_pid_lock, atomic_write, atomic_write_json, fsync_dir, release_pid_lock,
                           storage_error)

if TYPE_CHECKING:
    import torch

    from fedpersona.device.ref_cache import RefLogpCache

log = logging.getLogger(__name__)

PRIVATE_FILE = "private_adapter.safetensors"
SHARED_FILE = "shared_adapter.safetensors"
LEDGER_FILE = "ledger.json"
REF_CACHE_FILE = "ref_logps.sqlite"
COUNTERS_FILE = "counters.json"
META_FILE = "meta.json"
LOCK_FILE = ".lock"
LAST_REPLY_FILE = "last_reply.safetensors"
SECURE_AGGREGATION_FILE = "secure_aggregation.json"  # fedpersona.client.secure: one round's SecAgg+ secrets
FORMAT_VERSION = 1

PURPOSES: dict[str, str] = {
    MEMORY_FILE: "preference memory (your feedback pairs and chats)",
    PRIVATE_FILE: "your private adapter",
    SHARED_FILE: "last shared adapter received from the server",
    LEDGER_FILE: "privacy ledger",
    REF_CACHE_FILE: "reference log-prob cache",
    COUNTERS_FILE: "training counters",
    META_FILE: "model id and scheme this state was made for",
    LOCK_FILE: "lock held while training",
    LAST_REPLY_FILE: "last training reply sent (answers a resumed server's repeated round)",
    POLICY_FILE: "your privacy policy (what this device accepts)",
    RECORD_FILE: "what forgotten pairs had cost (hashes, no text)",
    SECURE_AGGREGATION_FILE: "secure aggregation: this round's keys and the shares neighbours entrusted to it",
}
# What ``forget`` deletes: every file derived from the user's feedback. The shared adapter (the
# server's global tensors), meta.json and the lock file hold nothing of the user's and stay.
# The privacy record (hashes and spent budgets, no text) and the user's policy stay too.
USER_FILES = (MEMORY_FILE, PRIVATE_FILE, LEDGER_FILE, REF_CACHE_FILE, COUNTERS_FILE, LAST_REPLY_FILE,
              SECURE_AGGREGATION_FILE)
LEDGER_STARTED = "ledger_started"  # meta.json: a ledger was saved in this state (until forget/reset-budget)


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None if absent: tells a replaced file from the one held open."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _overwrite(path: Path) -> None:
    """Zero ``path``'s bytes in place and fsync them (before it is unlinked): whoever still has the file open
    reads zeros. (What the storage keeps of earlier blocks, e.g. on a copy-on-write file system or an SSD's
    remapped cells, is the file system's; this makes the data unreadable through the file.)"""
    size = path.stat().st_size
    block = 1 << 20
    with open(path, "r+b") as handle:
        for start in range(0, size, block):
            handle.write(bytes(min(block, size - start)))
        handle.flush()
        os.fsync(handle.fileno())


def _holders(identities: set[tuple[int, int]]) -> list[int]:
    """Pids of other processes with a descriptor open on one of ``identities`` ((device, inode) pairs)."""
    found: list[int] = []
    proc = Path("/proc")
    if not identities or not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                try:
                    info = fd.stat()
                except OSError:
                    continue
                if (info.st_dev, info.st_ino) in identities:
                    found.append(int(entry.name))
                    break
        except OSError:  # another user's process, or one that just ended
            continue
    return sorted(found)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json_object(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON object file, None if absent; a damaged file is a UsageError (never silently reset)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: {what} is not UTF-8 text; restore it from a backup") from None
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
    atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))


def _load_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of a safetensors file, None if absent; unreadable or holding NaN/Inf ->
    UsageError naming it."""
    import torch
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
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # trained on, such a tensor would turn every later reply and answer into NaN
        raise UsageError(f"{path}: {what} holds NaN or Inf values ({len(bad)} of {len(tensors)} tensors, e.g. "
                         f"{bad[0]}); restore it from a backup, or delete it to start afresh") from None
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


# ---------------------------------------------------------------------------- the state directory


@dataclass(frozen=True)
class StateFile:
    """One file of the state directory, for ``files()`` listings."""

    name: str
    path: Path
    size: int
    purpose: str


class DeviceState:
    """A user's state directory; implements ``fedpersona.round.stores.PrivateStore``.

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
            try:
                self.dir.mkdir(parents=True, mode=0o700)  # the user's private data: owner only
            except OSError as err:
                raise (storage_error(err, self.dir, f"--state {self.dir}") or err) from None
        self.test_fraction = test_fraction
        self._memory: PreferenceMemory | None = None
        self._memory_identity: tuple[int, int] | None = None
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
        """The preference memory, reopened when its file was deleted or replaced since it was opened (a
        `feedback forget` + import in another process while a long-lived client holds it open: without
        this the client would go on reading the deleted file's pairs)."""
        identity = _file_identity(self.memory_path)
        if self._memory is not None and identity != self._memory_identity:
            self._memory.close()
            self._memory = None
        if self._memory is None:
            self._memory = PreferenceMemory(self.memory_path, test_fraction=self.test_fraction)
            self._memory_identity = _file_identity(self.memory_path)
        return self._memory

    @property
    def ref_cache(self) -> RefLogpCache:
        from fedpersona.device.ref_cache import RefLogpCache

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
        atomic_write_json(self.counters_path, counters)

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
        meta = self.meta()
        if meta is not None and not meta.get(LEDGER_STARTED):  # before the ledger: a crash leaves the flag set
            atomic_write_json(self.meta_path, {**meta, LEDGER_STARTED: True})
        atomic_write_json(self.ledger_path, dict(ledger))

    def ledger_problem(self) -> str | None:
        """Why this state must not start a fresh ledger (None if it may): the ledger is missing or empty
        while a private adapter, a past round or an earlier ledger shows that budget was spent here."""
        if self.load_ledger():
            return None
        meta = self.meta() or {}
        evidence = [what for what, present in (
            ("a private adapter", self.private_path.exists()),
            ("past rounds in counters.json", bool(self.counters().get("rounds_trained"))),
            ("a ledger was started (meta.json)", bool(meta.get(LEDGER_STARTED))),
        ) if present]
        if not evidence:
            return None
        state = "empty" if self.ledger_path.exists() else "missing"
        return (f"--state {self.dir}: the privacy ledger is {state} but this state shows spent budget "
                f"({', '.join(evidence)}); restore {LEDGER_FILE} from a backup, or start over knowingly with "
                f"`fedpersona feedback reset-budget --state {self.dir}`")

    def check_files(self) -> None:
        """Read every state file a round depends on, so damage is a UsageError naming the file *before*
        anything is trained or spent (not after the ledger has paid for a round that cannot be sent):
        JSON files parse, adapters load and hold only finite values, every database page reads."""
        from fedpersona.device.policy import DevicePolicy
        from fedpersona.privacy.ledger import PrivacyLedger

        self.meta()
        self.counters()
        ledger = self.load_ledger()
        if ledger:
            try:
                PrivacyLedger.from_json(ledger)
            except UsageError as err:
                raise UsageError(f"{self.ledger_path}: {err}; restore it from a backup") from None
        self.load_private()
        self.load_shared()
        _load_tensors(self.dir / LAST_REPLY_FILE, "last reply")
        DevicePolicy.load(self.dir)
        if self.memory_path.exists():
            self.memory.check()

    # ------------------------------------------------------------------ the last reply (idempotent rounds)
    def save_reply(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, str | int | float]) -> None:
        """Keep the reply just computed for (``info['lineage']``, ``info['round']``) until the next one."""
        _save_tensors(self.dir / LAST_REPLY_FILE, tensors, {k: json.dumps(v) for k, v in info.items()})

    def load_reply(self, lineage: str, server_round: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The stored reply if it answered round ``server_round`` of run lineage ``lineage``, else None."""
        path = self.dir / LAST_REPLY_FILE
        metadata = _read_metadata(path, "last reply")
        if not metadata:
            return None
        info = {k: json.loads(v) for k, v in metadata.items()}
        if info.get("lineage") != lineage or info.get("round") != server_round:
            return None
        loaded = _load_tensors(path, "last reply")
        return None if loaded is None else (loaded[0], info)

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
            atomic_write_json(self.meta_path, current)
        return current

    # ------------------------------------------------------------------ listing and forgetting
    def files(self) -> list[StateFile]:
        """Every file in the state directory (strays included), with what it is for."""
        found = []
        for path in sorted(self.dir.iterdir()):
            if path.is_file():
                base = path.name
                for suffix in SQLITE_SIDECARS:
                    base = base.removesuffix(suffix)
                purpose = PURPOSES.get(base, "temporary file of an interrupted write"
                                       if base.startswith(".") and base.endswith(".tmp") else "")
                found.append(StateFile(path.name, path, path.stat().st_size, purpose))
        return found

    def _retire_ledger(self, record: Any) -> None:
        """Hand what the ledger spent, and which pairs it covered, to the privacy record (before deletion)."""
        if not self.ledger_path.exists():
            return
        try:
            ledger, readable = self.load_ledger(), True
        except UsageError:
            ledger, readable = None, False  # unreadable: recorded as an unbounded spend
        try:
            pairs = self.memory.list(None, 0) if self.memory_path.exists() else []
        except UsageError:
            pairs = []
        record.retire(ledger, pairs, readable=readable)  # rows carry prompt, chosen, rejected

    def reset_budget(self) -> list[str]:
        """Start the privacy budget over, knowingly: delete the private adapter, counters, last reply and the
        ledger flag (the pairs stay). Rounds already sent are then outside every later guarantee."""
        removed = []
        with self.lock():
            for name in (PRIVATE_FILE, COUNTERS_FILE, LAST_REPLY_FILE, LEDGER_FILE):
                path = self.dir / name
                if path.exists():
                    path.unlink()
                    removed.append(name)
            meta = self.meta()
            if meta is not None:
                atomic_write_json(self.meta_path, {**meta, LEDGER_STARTED: False, "budget_reset": _now()})
            fsync_dir(self.dir)
        return removed

    def open_elsewhere(self) -> list[int]:
        """Pids of other processes that hold one of the user's files open (Linux: ``/proc/PID/fd``; elsewhere,
        or where ``/proc`` cannot be read, an empty list)."""
        wanted = set()
        for name in USER_FILES:
            for suffix in ("", *SQLITE_SIDECARS):
                if (identity := _file_identity(self.dir / f"{name}{suffix}")) is not None:
                    wanted.add(identity)
        return _holders(wanted)

    def forget(self) -> list[str]:
        """Delete everything of the user's: pairs, private adapter, ledger, counters, ref cache, last reply.

        What the ledger spent goes to the privacy record first (keyed hashes of the pairs, no text), so
        re-importing the same pairs continues their budget instead of starting it over.

        Takes the training lock (refused while training runs: a ``UsageError`` saying so), wipes the pairs
        inside the database first (so a process holding it open sees an empty memory), then overwrites every
        file's bytes with zeros in place (fsynced) and deletes it, with its SQLite sidecars and any temp
        files of interrupted writes. Why overwrite: a process that still has a file open (a `fedpersona
        client` or `chat` between rounds, whose read snapshot also keeps SQLite from rewriting the old pages)
        would otherwise read the deleted file's text for as long as it runs; now it reads zeros (and reopens
        an empty memory). ``open_elsewhere`` says which processes those were. Returns the names deleted.
        """
        from fedpersona.device.privacy_record import PrivacyRecord

        removed: list[str] = []
        with self.lock():
            others = self.open_elsewhere()
            self._retire_ledger(PrivacyRecord(self.dir))
            meta = self.meta() if self.meta_path.exists() else None
            if meta and meta.get(LEDGER_STARTED):
                atomic_write_json(self.meta_path, {**meta, LEDGER_STARTED: False})
            if self.memory_path.exists():
                try:
                    # with another process's snapshot open a full checkpoint would wait for it: the
                    # overwrite below clears the pages it pins
                    self.memory.forget(checkpoint=not others)
                except UsageError:
                    pass  # a damaged database is deleted below all the same
            self.close_pieces()
            for name in USER_FILES:
                for suffix in ("", *SQLITE_SIDECARS):
                    path = self.dir / f"{name}{suffix}"
                    if path.exists():
                        _overwrite(path)
                        path.unlink()
                        removed.append(path.name)
                for tmp in self.dir.glob(f".{name}.*.tmp"):
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp.name)
            fsync_dir(self.dir)
        return removed
