"""The device's reference log-prob cache (``ref_logps.sqlite`` in the state folder).

The base model is frozen, so a pair's reference log-probs never change; this SQLite file keeps them
across restarts. Transactions make writes atomic; a damaged file only costs a recomputation, so reads
tolerate damage (a warning, treated as empty) and a write replaces a damaged file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedpersona.device.memory import SQLITE_SIDECARS
from fedpersona.data.schema import PreferencePair

log = logging.getLogger(__name__)



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
        for suffix in ("", *SQLITE_SIDECARS):
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
