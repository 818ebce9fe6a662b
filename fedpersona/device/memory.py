"""The user's preference memory on their device: an embedded SQLite database, ``memory.sqlite``.

Why SQLite (stdlib ``sqlite3``) rather than a JSONL file: feedback must survive crashes and restarts,
be listable page by page, deletable, and de-duplicated; and a training process must be able to read
it while the user adds feedback from another process. WAL mode gives exactly that: one writer and
any number of readers at once, each reader on a consistent snapshot. ``synchronous=FULL`` makes a
committed pair survive power loss; ``secure_delete`` makes ``forget`` overwrite the deleted text.

Policy on user ids (a device holds ONE user's feedback):

* the device's user id lives in the ``meta`` table; the first ``add``/``import_file`` sets it;
* an import file whose rows name more than one ``user_id`` is refused with a UsageError, unless
  ``as_user`` is given, which files every row under that id;
* a pair (or file) of a user other than the device's is refused; ``forget`` clears the user id, so
  a device can change hands only after its memory is wiped.

Splits: each pair is stored with its split, taken from the pair or assigned on insert with
``assign_split(pair, test_fraction)`` (a stable content hash), so training and evaluation see the
same held-out pairs every run.

Chats (``fedpersona chat``, schema version 2): conversations and their messages live in the same file
(tables ``chats`` and ``chat_messages``), so ``forget`` deletes them with the pairs and nothing of them is
kept anywhere else. Training never reads them: only the pairs a user made with ``/compare`` (source
``chat:<id>``) are feedback. Schema versions are upgraded in place, one step at a time, inside one
transaction (a version 1 memory gains the chat tables, its pairs untouched).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedpersona.data.schema import PreferencePair, UserData, assign_split, iter_pairs_jsonl, validate_row
from fedpersona.errors import UsageError
from fedpersona.io import STORAGE_ERRNOS, StorageError, storage_error

MEMORY_FILE = "memory.sqlite"
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")  # files SQLite keeps beside a database
SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 30.0
_USER_KEY = "user_id"
CHAT_SOURCE = "chat"  # pairs made in a chat are stored with source "chat:<conversation id>"
ROLES = ("user", "assistant")

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS pairs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    chosen      TEXT NOT NULL,
    rejected    TEXT NOT NULL,
    split       TEXT NOT NULL CHECK (split IN ('train', 'test')),
    created_at  TEXT NOT NULL,
    source      TEXT NOT NULL,
    content_key TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS chats (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id     INTEGER NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content     TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    info        TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS chat_messages_by_chat ON chat_messages (chat_id, id);
"""
# what upgrades a memory from version N-1 to N (all statements idempotent: CREATE ... IF NOT EXISTS)
_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2}
_COLUMNS = "id, user_id, prompt, chosen, rejected, split, created_at, source"


@dataclass(frozen=True)
class MemoryRow:
    """One stored pair as ``list`` shows it: the pair plus its id, split, time added and source."""

    id: int
    user_id: str
    prompt: str
    chosen: str
    rejected: str
    split: str
    created_at: str
    source: str

    @property
    def pair(self) -> PreferencePair:
        return PreferencePair(self.user_id, self.prompt, self.chosen, self.rejected, self.split)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "user_id": self.user_id, "prompt": self.prompt, "chosen": self.chosen,
                "rejected": self.rejected, "split": self.split, "created_at": self.created_at,
                "source": self.source}


@dataclass(frozen=True)
class ChatSummary:
    """One stored conversation as ``feedback list --chats`` shows it."""

    id: int
    started_at: str
    updated_at: str
    messages: int
    first_message: str
    pairs: int  # pairs made from it with /compare

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "started_at": self.started_at, "updated_at": self.updated_at,
                "messages": self.messages, "first_message": self.first_message, "pairs": self.pairs}


@dataclass(frozen=True)
class ChatMessage:
    """One message of a stored conversation; ``info``: how an answer was made (method, strength, ...)."""

    id: int
    chat_id: int
    role: str
    content: str
    created_at: str
    info: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "chat_id": self.chat_id, "role": self.role, "content": self.content,
                "created_at": self.created_at, "info": self.info}


def content_key(pair: PreferencePair) -> str:
    """What makes two pairs duplicates: the same prompt, chosen and rejected text (JSON keeps it unambiguous)."""
    return hashlib.sha256(json.dumps([pair.prompt, pair.chosen, pair.rejected]).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _nearly_full(folder: Path, least: int = 1 << 20) -> bool:
    """Whether the file system holding ``folder`` has less than ``least`` bytes free for us (1 MiB: a few
    SQLite pages and WAL frames)."""
    import os

    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < least


class PreferenceMemory:
    """The device's preference pairs in one SQLite file; safe to use from several processes at once.

    Each instance holds one connection (usable from any thread; calls are serialized by a lock).
    Close it with ``close()`` or use it as a context manager.
    """

    def __init__(self, path: str | Path, *, test_fraction: float = 0.2) -> None:
        if not 0.0 <= test_fraction <= 1.0:
            raise UsageError(f"test fraction must be between 0 and 1, got {test_fraction}")
        self.path = Path(path)
        self.test_fraction = test_fraction
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._open()

    @classmethod
    def in_dir(cls, state_dir: str | Path, *, test_fraction: float = 0.2) -> PreferenceMemory:
        """The memory of the device state directory ``state_dir`` (``state_dir/memory.sqlite``)."""
        return cls(Path(state_dir) / MEMORY_FILE, test_fraction=test_fraction)

    # ------------------------------------------------------------------ connection
    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise (storage_error(err, self.path.parent, "preference memory") or err) from None
        conn: sqlite3.Connection | None = None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly what we say.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.DatabaseError(f"could not switch to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                conn.close()
                raise UsageError(f"{self.path}: preference memory has schema version {version}, newer than "
                                 f"this fedpersona understands ({SCHEMA_VERSION}); upgrade fedpersona")
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # read again under the write lock: another process may have upgraded it meanwhile
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    for step in range(version + 1, SCHEMA_VERSION + 1):
                        for statement in _MIGRATIONS[step].split(";"):
                            if statement.strip():
                                conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except sqlite3.DatabaseError as err:
            if conn is not None:
                conn.close()
            raise self.damaged(err) from None
        self._conn = conn

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self.path}: preference memory is closed")
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> PreferenceMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def damaged(self, err: sqlite3.DatabaseError) -> UsageError:
        """The one line for an error SQLite raised on the memory, by what it means for the user: a busy lock
        (retry), a file system that refuses the write (no space left, read-only, no permission: a
        ``StorageError`` saying so; the memory is intact and nothing was changed), a disk I/O error, and
        only for a file SQLite finds corrupt: damaged (restore, salvage, or forget)."""
        name = str(getattr(err, "sqlite_errorname", "") or "")
        text = str(err)
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or (isinstance(err, sqlite3.OperationalError)
                                                                  and "locked" in text):
            return UsageError(f"{self.path}: preference memory is busy (another process held it for "
                              f"{BUSY_TIMEOUT_S:.0f} s); retry when it has finished")
        import errno

        if name == "SQLITE_FULL" or "disk is full" in text:
            return StorageError(f"{self.path}: preference memory: "
                                + STORAGE_ERRNOS[errno.ENOSPC].format(path=self.path.parent)
                                + "; the memory is intact and nothing was changed")
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")) or "readonly" in text:
            return StorageError(f"{self.path}: preference memory cannot be written ({text}): the folder is "
                                "read-only, or you may not write there; use a writable --state (or fix the "
                                "permissions); nothing was changed")
        if (name.startswith("SQLITE_IOERR") or "disk I/O error" in text) and _nearly_full(self.path.parent):
            # SQLite reports a WAL write that found no space as an I/O error: the free space says which it was
            return StorageError(f"{self.path}: preference memory: "
                                + STORAGE_ERRNOS[errno.ENOSPC].format(path=self.path.parent)
                                + f" ({text}); the memory is intact and nothing was changed")
        if name.startswith("SQLITE_IOERR") or "disk I/O error" in text:
            return StorageError(f"{self.path}: preference memory: the disk reported an I/O error ({text}); check "
                                "that it has free space and is healthy, then retry; the memory was not changed")
        return UsageError(f"{self.path}: preference memory is damaged ({err}); restore it from a backup, "
                          f"salvage its pairs with `sqlite3 {self.path} .recover`, or run "
                          "`fedpersona feedback forget` to start an empty one")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock; SQLite's errors become one UsageError naming the file."""
        with self._lock:
            try:
                yield self.conn
            except sqlite3.DatabaseError as err:
                raise self.damaged(err) from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlocks)."""
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every SELECT inside sees the same snapshot, even while another process writes."""
        with self._db() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def check(self) -> None:
        """Read every page (``PRAGMA quick_check``): damage is a UsageError now, not in the middle of a round.

        Costs one pass over the file (milliseconds for the thousands of pairs a device holds).
        """
        with self._db() as conn:
            found = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
        if found != ["ok"]:
            raise self.damaged(sqlite3.DatabaseError(found[0] + (f" (+{len(found) - 1} more)" if len(found) > 1 else "")))

    # ------------------------------------------------------------------ user id
    def user_id(self) -> str | None:
        """The device's user id, or None before the first pair is stored (and after ``forget``)."""
        with self._db() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (_USER_KEY,)).fetchone()
            return None if row is None else str(row[0])

    def _claim(self, conn: sqlite3.Connection, user_id: str, where: str) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_USER_KEY,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (_USER_KEY, user_id))
        elif row[0] != user_id:
            raise UsageError(
                f"{where}: this device's preference memory belongs to user {row[0]!r}, not {user_id!r}; "
                f"pass --as-user {row[0]} to file the pairs under this device's user, "
                "or run `fedpersona feedback forget` first")

    # ------------------------------------------------------------------ writes
    def _insert(self, conn: sqlite3.Connection, pair: PreferencePair, source: str,
                created_at: str) -> tuple[int, bool]:
        """Insert one pair; (its id, True) if new, (the stored copy's id, False) if a duplicate."""
        key = content_key(pair)
        split = assign_split(pair, self.test_fraction)
        cursor = conn.execute(
            "INSERT INTO pairs (user_id, prompt, chosen, rejected, split, created_at, source, content_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (content_key) DO NOTHING",
            (pair.user_id, pair.prompt, pair.chosen, pair.rejected, split, created_at, source, key))
        if cursor.rowcount == 1:
            assert cursor.lastrowid is not None
            return int(cursor.lastrowid), True
        row = conn.execute("SELECT id FROM pairs WHERE content_key = ?", (key,)).fetchone()
        return int(row[0]), False

    def add(self, pair: PreferencePair, *, source: str = "add") -> int:
        """Store one pair (validated like a file row) and return its id; a duplicate returns the stored id.

        Use ``contains`` first if the caller needs to tell "added" from "already there".
        """
        pair = validate_row(pair.to_json(), "feedback")
        self.check()  # never write new feedback into a damaged file
        with self._write() as conn:
            self._claim(conn, pair.user_id, "feedback")
            return self._insert(conn, pair, source, _now())[0]

    def import_file(self, path: str | Path, *, as_user: str | None = None,
                    source: str | None = None) -> tuple[int, int]:
        """Import a JSONL pair file; returns (added, duplicates).

        The whole file is validated before anything is written, and all rows go in ONE transaction:
        a bad row (UsageError naming file:line) or a refused user id imports nothing.
        """
        path = Path(path)
        return self.import_pairs(list(iter_pairs_jsonl(path)), str(path), as_user=as_user,
                                 source=source or f"import:{path.name}")

    def import_pairs(self, pairs: list[PreferencePair], where: str, *, as_user: str | None = None,
                     source: str | None = None) -> tuple[int, int]:
        """Import pairs read elsewhere (another dataset format: ``fedpersona.data.formats.load_format``) in ONE
        transaction, as ``import_file`` does.

        Args:
            pairs: the pairs, already validated by their loader.
            where: the file they came from (messages, the device's claim on its user id).
            as_user: file every pair under this user id (a dataset row names its own, or one per pole).
            source: the provenance stored with each pair (default ``import:<where's name>``).

        Returns:
            ``(added, duplicates)``.

        Raises:
            UsageError: rows of several users without ``as_user``, an empty ``as_user``, or a user id this
                device does not hold.
        """
        path = Path(where)
        if as_user is not None:
            if not as_user.strip():
                raise UsageError("--as-user: the user id must not be empty")
            pairs = [replace(p, user_id=as_user) for p in pairs]
        users = list(dict.fromkeys(p.user_id for p in pairs))
        if len(users) > 1:
            shown = ", ".join(repr(u) for u in users[:3]) + (", ..." if len(users) > 3 else "")
            raise UsageError(
                f"{path}: rows belong to {len(users)} users ({shown}) but a device holds one user's feedback; "
                "pass --as-user NAME to import all rows as one user, or split the file by user_id")
        if not pairs:
            return 0, 0
        added = 0
        created_at = _now()
        self.check()
        with self._write() as conn:
            self._claim(conn, users[0], str(path))
            for pair in pairs:
                added += self._insert(conn, pair, source or f"import:{path.name}", created_at)[1]
        return added, len(pairs) - added

    def remove(self, pair_id: int) -> bool:
        """Delete one pair by id; False if there was none."""
        with self._write() as conn:
            return conn.execute("DELETE FROM pairs WHERE id = ?", (pair_id,)).rowcount == 1

    def forget(self, *, checkpoint: bool = True) -> int:
        """Delete every pair, every chat and the device's user id; returns how many pairs were deleted.

        ``secure_delete`` zeroes the freed pages and the WAL is checkpointed and truncated, so the text
        does not linger in the file (best effort while another process holds a read snapshot: the old pages
        it pins stay until it ends; ``DeviceState.forget`` overwrites the files for that case).

        Args:
            checkpoint: checkpoint and truncate the WAL (a TRUNCATE checkpoint waits up to the busy timeout
                for readers; pass False when another process is known to hold the memory open).
        """
        with self._write() as conn:
            deleted = conn.execute("DELETE FROM pairs").rowcount
            conn.execute("DELETE FROM chat_messages")
            conn.execute("DELETE FROM chats")
            conn.execute("DELETE FROM meta")
            conn.execute("DELETE FROM sqlite_sequence WHERE name IN ('pairs', 'chats', 'chat_messages')")
        if checkpoint:
            self._checkpoint()
        return int(deleted)

    def _checkpoint(self) -> None:
        """Move the WAL into the file and truncate it, so deleted text does not linger in the WAL."""
        with self._db() as conn:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                pass  # a reader still holds an old snapshot; its pages go at a later checkpoint

    # ------------------------------------------------------------------ chats
    def start_chat(self) -> int:
        """A new, empty conversation; returns its id."""
        now = _now()
        self.check()
        with self._write() as conn:
            cursor = conn.execute("INSERT INTO chats (started_at, updated_at) VALUES (?, ?)", (now, now))
            assert cursor.lastrowid is not None
            return int(cursor.lastrowid)

    def add_message(self, chat_id: int, role: str, content: str, info: dict[str, Any] | None = None) -> int:
        """Append a message to conversation ``chat_id``; returns its id. A conversation that no longer
        exists (forgotten meanwhile, e.g. by `feedback forget` in another process) is a UsageError."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        now = _now()
        with self._write() as conn:
            if conn.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (now, chat_id)).rowcount != 1:
                raise UsageError(f"{self.path}: conversation #{chat_id} no longer exists (forgotten)")
            cursor = conn.execute(
                "INSERT INTO chat_messages (chat_id, role, content, created_at, info) VALUES (?, ?, ?, ?, ?)",
                (chat_id, role, content, now, json.dumps(info or {}, ensure_ascii=False)))
            assert cursor.lastrowid is not None
            return int(cursor.lastrowid)

    def update_message(self, message_id: int, content: str, info: dict[str, Any] | None = None) -> bool:
        """Replace a stored message's text (and info); False if it no longer exists."""
        with self._write() as conn:
            return conn.execute("UPDATE chat_messages SET content = ?, info = ? WHERE id = ?",
                                (content, json.dumps(info or {}, ensure_ascii=False), message_id)).rowcount == 1

    def chats(self, limit: int | None = 50, offset: int = 0) -> builtins.list[ChatSummary]:
        """A page of conversations, oldest first: id, times, message count, first message, pairs made."""
        if limit is not None and limit < 0:
            raise UsageError(f"--limit must be 0 or more, got {limit}")
        if offset < 0:
            raise UsageError(f"--offset must be 0 or more, got {offset}")
        with self._read() as conn:
            rows = conn.execute(
                "SELECT c.id, c.started_at, c.updated_at, "
                "(SELECT COUNT(*) FROM chat_messages m WHERE m.chat_id = c.id) AS messages, "
                "COALESCE((SELECT content FROM chat_messages m WHERE m.chat_id = c.id AND m.role = 'user' "
                "ORDER BY m.id LIMIT 1), '') AS first_message, "
                "(SELECT COUNT(*) FROM pairs p WHERE p.source = ? || ':' || c.id) AS pairs "
                "FROM chats c ORDER BY c.id LIMIT ? OFFSET ?",
                (CHAT_SOURCE, -1 if limit is None else limit, offset)).fetchall()
        return [ChatSummary(**dict(r)) for r in rows]

    def chat_messages(self, chat_id: int) -> builtins.list[ChatMessage] | None:
        """The messages of conversation ``chat_id`` in order; None if there is no such conversation."""
        with self._read() as conn:
            if conn.execute("SELECT 1 FROM chats WHERE id = ?", (chat_id,)).fetchone() is None:
                return None
            rows = conn.execute("SELECT id, chat_id, role, content, created_at, info FROM chat_messages "
                                "WHERE chat_id = ? ORDER BY id", (chat_id,)).fetchall()
        return [ChatMessage(r["id"], r["chat_id"], r["role"], r["content"], r["created_at"], json.loads(r["info"]))
                for r in rows]

    def last_chat(self) -> int | None:
        """The id of the most recently updated conversation, None if there is none."""
        with self._db() as conn:
            row = conn.execute("SELECT id FROM chats ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
            return None if row is None else int(row[0])

    def remove_chat(self, chat_id: int) -> bool:
        """Delete one conversation and its messages (pairs made from it stay: they are feedback); False if
        there was none."""
        with self._write() as conn:
            conn.execute("DELETE FROM chat_messages WHERE chat_id = ?", (chat_id,))
            removed = conn.execute("DELETE FROM chats WHERE id = ?", (chat_id,)).rowcount == 1
        self._checkpoint()
        return removed

    def forget_chats(self) -> int:
        """Delete every conversation (the pairs stay); returns how many were deleted."""
        with self._write() as conn:
            conn.execute("DELETE FROM chat_messages")
            deleted = conn.execute("DELETE FROM chats").rowcount
        self._checkpoint()
        return int(deleted)

    def chat_stats(self) -> dict[str, int]:
        """``chats`` (conversations), ``chat_messages``, ``chat_pairs`` (pairs made with /compare)."""
        with self._read() as conn:
            chats = conn.execute("SELECT COUNT(*) FROM chats").fetchone()[0]
            messages = conn.execute("SELECT COUNT(*) FROM chat_messages").fetchone()[0]
            pairs = conn.execute("SELECT COUNT(*) FROM pairs WHERE source LIKE ?", (f"{CHAT_SOURCE}:%",)).fetchone()[0]
        return {"chats": int(chats), "chat_messages": int(messages), "chat_pairs": int(pairs)}

    # ------------------------------------------------------------------ reads
    def count(self) -> int:
        with self._db() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM pairs").fetchone()[0])

    def contains(self, pair: PreferencePair) -> int | None:
        """The id of the stored pair with the same prompt/chosen/rejected, or None."""
        with self._db() as conn:
            row = conn.execute("SELECT id FROM pairs WHERE content_key = ?", (content_key(pair),)).fetchone()
            return None if row is None else int(row[0])

    def get(self, pair_id: int) -> MemoryRow | None:
        with self._db() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM pairs WHERE id = ?", (pair_id,)).fetchone()
            return None if row is None else MemoryRow(**dict(row))

    def list(self, limit: int | None = 50, offset: int = 0, *, newest_first: bool = False) -> builtins.list[MemoryRow]:
        """A page of stored pairs in insertion order (or newest first); ``limit=None`` for all."""
        if limit is not None and limit < 0:
            raise UsageError(f"--limit must be 0 or more, got {limit}")
        if offset < 0:
            raise UsageError(f"--offset must be 0 or more, got {offset}")
        order = "DESC" if newest_first else "ASC"
        with self._db() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM pairs ORDER BY id {order} LIMIT ? OFFSET ?",
                                     (-1 if limit is None else limit, offset)).fetchall()
        return [MemoryRow(**dict(r)) for r in rows]

    def stats(self) -> dict[str, Any]:
        """Counts for ``feedback stats``: pairs, train, test, users, user_id, first_added, last_added."""
        with self._read() as conn:
            pairs, train, test, users, first, last = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(split = 'train'), 0), COALESCE(SUM(split = 'test'), 0), "
                "COUNT(DISTINCT user_id), MIN(created_at), MAX(created_at) FROM pairs").fetchone()
            owner = conn.execute("SELECT value FROM meta WHERE key = ?", (_USER_KEY,)).fetchone()
        return {"pairs": int(pairs), "train": int(train), "test": int(test), "users": int(users),
                "user_id": None if owner is None else str(owner[0]),
                "first_added": first, "last_added": last}

    def user_data(self, user_id: str | None = None) -> UserData:
        """What training and evaluation read: the user's pairs (one snapshot) in their stored splits.

        ``user_id`` defaults to the device's user; an empty memory gives an empty UserData (user_id
        "" if none is known), and the caller decides whether that is an error.
        """
        with self._read() as conn:
            if user_id is None:
                owner = conn.execute("SELECT value FROM meta WHERE key = ?", (_USER_KEY,)).fetchone()
                user_id = "" if owner is None else str(owner[0])
            rows = conn.execute(f"SELECT {_COLUMNS} FROM pairs WHERE user_id = ? ORDER BY id",
                                (user_id,)).fetchall()
        data = UserData(user_id)
        for row in rows:
            pair = PreferencePair(row["user_id"], row["prompt"], row["chosen"], row["rejected"], row["split"])
            (data.test if pair.split == "test" else data.train).append(pair)
        return data
