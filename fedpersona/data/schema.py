"""The preference-pair schema (the contract in docs/reference/pair-files.md) and JSONL pair files.

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
    """One unit of preference feedback, and the unit of pair-level differential privacy.

    Attributes:
        user_id: whose feedback it is.
        prompt: the prompt, or a conversation in HH-RLHF's ``Human: ... Assistant: ...`` layout.
        chosen: the answer the user preferred.
        rejected: the answer the user did not (different from ``chosen``).
        split: ``"train"``, ``"test"`` or None (a stable hash of the pair decides when the file is loaded).
    """

    user_id: str
    prompt: str
    chosen: str
    rejected: str
    split: str | None = None

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class UserData:
    """One user's pairs, split into a training part and a held-out test part.

    Attributes:
        user_id: the user.
        train: the pairs the user trains on.
        test: the held-out pairs the user is evaluated on.
    """

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


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def decode_line(raw: bytes, where: str) -> str:
    """One line of a text file as UTF-8 (a leading BOM dropped); anything else is one UsageError line."""
    try:
        return raw.decode("utf-8-sig" if where.endswith(":1") else "utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); save the "
                         "file as UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT`") from None


def parse_json(text: str, where: str, hint: str = "") -> object:
    """``json.loads`` whose every failure is one UsageError line: bad syntax, nesting too deep, a number
    too long for Python's int limit, or text with a lone surrogate (not encodable: no valid Unicode)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        at = f"line {err.lineno} column {err.colno}" if err.lineno > 1 else f"column {err.colno}"
        raise UsageError(f"{where}: not valid JSON ({err.msg} at {at}){hint}") from None
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply{hint}") from None
    except ValueError as err:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise UsageError(f"{where}: JSON value out of range ({str(err).split(';')[0]}){hint}") from None
    return check_encodable(value, where, hint)


def check_encodable(value: object, where: str, hint: str = "") -> object:
    """``value`` (decoded JSON) if all its text is valid Unicode, else one UsageError line."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where}: JSON text holds a lone surrogate escape (such as \\ud800), which is no "
                         "character; fix the text") from None
    except (RecursionError, ValueError):
        raise UsageError(f"{where}: JSON nested too deeply or out of range{hint}") from None
    return value


def iter_jsonl_objects(path: Path, hint: str = "") -> Iterator[tuple[str, object]]:
    """Yield ``("FILE:LINE", decoded value)`` for each non-blank line; bad JSON or text that is not UTF-8
    is one UsageError line naming the file and line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(UTF16_BOMS):
                raise UsageError(f"{path}: UTF-16 text; save the file as UTF-8 (e.g. `iconv -f utf-16 -t utf-8 IN > OUT`)")
            where = f"{path}:{number}"
            line = decode_line(raw, where)
            if not line.strip():
                continue
            yield where, parse_json(line, where, hint)


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
    """Write pairs as a JSONL pair file, atomically (a temp file renamed into place).

    Args:
        pairs: the pairs, written in order, one JSON object a line (``split`` left out when None).
        path: the file to write; its folder must exist.
    """
    from fedpersona.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs))
