"""The preference-pair schema (DESIGN.md contract) and JSONL pair files.

One JSON object a line: ``user_id``, ``prompt``, ``chosen``, ``rejected`` (strings) and an optional
``split`` ("train" or "test"). A bad row stops the load with one line naming the file, the line number
and the problem; the CLI turns that into exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedpersona.errors import UsageError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
REQUIRED_FIELDS = ("user_id", "prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One unit of preference feedback, and the unit of pair-level differential privacy."""

    user_id: str
    prompt: str
    chosen: str
    rejected: str
    split: str | None = None

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class UserData:
    """One user's pairs, split into a training part and a held-out test part."""

    user_id: str
    train: list[PreferencePair] = field(default_factory=list)
    test: list[PreferencePair] = field(default_factory=list)

    @property
    def num_pairs(self) -> int:
        return len(self.train) + len(self.test)


def validate_row(obj: object, where: str) -> PreferencePair:
    """Turn one decoded JSON value into a pair, or raise UsageError naming ``where`` and the problem."""
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in REQUIRED_FIELDS:
        if key not in obj:
            raise UsageError(f"{where}: missing field '{key}' (need {', '.join(REQUIRED_FIELDS)})")
        if not isinstance(obj[key], str):
            raise UsageError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    for key in ("prompt", "chosen", "rejected", "user_id"):
        if not obj[key].strip():
            raise UsageError(f"{where}: field '{key}' is empty")
    if obj["chosen"] == obj["rejected"]:
        raise UsageError(f"{where}: 'chosen' and 'rejected' are identical; a pair needs two different responses")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise UsageError(f"{where}: field 'split' must be \"train\" or \"test\", got {split!r}")
    return PreferencePair(obj["user_id"], obj["prompt"], obj["chosen"], obj["rejected"], split)


def iter_jsonl_objects(path: Path, hint: str = "") -> Iterator[tuple[str, object]]:
    """Yield ``("FILE:LINE", decoded value)`` for each non-blank line; bad JSON is one UsageError line."""
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{where}: not valid JSON ({err.msg} at column {err.colno}){hint}") from None


def iter_pairs_jsonl(path: str | Path) -> Iterator[PreferencePair]:
    """Yield the pairs of a JSONL pair file, validating each row (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: pair file not found; pass a JSONL file with one pair per line")
    for where, obj in iter_jsonl_objects(path):
        yield validate_row(obj, where)


def assign_split(pair: PreferencePair, test_fraction: float) -> str:
    """A pair's split: its own ``split`` field, else a stable hash of its content (same answer every run)."""
    if pair.split is not None:
        return pair.split
    digest = hashlib.sha256(f"{pair.user_id}\x00{pair.prompt}\x00{pair.chosen}".encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") / 2**32 < test_fraction else "train"


def group_by_user(
    pairs: Iterable[PreferencePair],
    *,
    test_fraction: float = 0.2,
    min_pairs: int = 4,
    source: str = "pair file",
) -> list[UserData]:
    """Group pairs into per-user train/test data in first-seen user order.

    Users with fewer than ``min_pairs`` pairs, or with no train or no test pair, are skipped with one
    warning that says how many were skipped.
    """
    users: dict[str, UserData] = {}
    for pair in pairs:
        user = users.setdefault(pair.user_id, UserData(pair.user_id))
        (user.test if assign_split(pair, test_fraction) == "test" else user.train).append(pair)
    kept = [u for u in users.values() if u.num_pairs >= min_pairs and u.train and u.test]
    skipped = len(users) - len(kept)
    if skipped:
        log.warning(
            "%s: skipped %d of %d users with fewer than %d pairs or an empty train/test split",
            source, skipped, len(users), min_pairs,
        )
    return kept


def load_users(path: str | Path, *, test_fraction: float = 0.2, min_pairs: int = 4) -> list[UserData]:
    """Load a JSONL pair file into per-user data; raises UsageError on the first bad row."""
    users = group_by_user(iter_pairs_jsonl(path), test_fraction=test_fraction, min_pairs=min_pairs, source=str(path))
    if not users:
        raise UsageError(f"{path}: no user has at least {min_pairs} pairs with both a train and a test pair")
    return users


def write_pairs_jsonl(pairs: Iterable[PreferencePair], path: str | Path) -> None:
    """Write pairs as JSONL atomically (a temp file renamed into place)."""
    from fedpersona.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs))
