"""Reading rows of a dataset file, and the checks every format loader shares.

A dataset file is one of:

* JSON lines (``.jsonl`` or any other name): one JSON object a line, blank lines skipped; a row is
  located as ``FILE:LINE``;
* a JSON array of objects (the first non-blank character is ``[``, as ``pandas.to_json(orient="records")``
  writes): a row is located as ``FILE: row N`` (1-based);
* Parquet (``.parquet``), read with pyarrow when it is installed: a row is located as ``FILE: row N``.

Every problem raises :class:`~fedpersona.errors.UsageError` with one line that names the location, the
problem and how to fix it. Data quirks that are not format errors (an empty or duplicated response) are
skipped and counted by :class:`SkipLog`, which logs one warning per file.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpersona.data.schema import check_encodable, iter_jsonl_objects, parse_json
from fedpersona.errors import UsageError

log = logging.getLogger("fedpersona.data.formats")


@dataclass(frozen=True)
class Row:
    """One decoded record of a dataset file and where it came from (``FILE:LINE`` or ``FILE: row N``)."""

    where: str
    data: Any


def _first_char(path: Path) -> str:
    with path.open("rb") as handle:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM is not content
            if stripped:
                return chr(stripped[0]) if stripped[0] < 128 else ""  # JSON starts with an ASCII character
    return ""


def _iter_jsonl(path: Path) -> Iterator[Row]:
    for where, obj in iter_jsonl_objects(path, "; each line must be one JSON object"):
        yield Row(where, obj)


def _iter_json_array(path: Path) -> Iterator[Row]:
    try:
        with path.open("r", encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                         "save the file as UTF-8") from None
    hint = "; expected a JSON array of objects or one JSON object per line"
    try:
        items = check_encodable(json.loads(text), str(path), hint)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}){hint}") from None
    except (RecursionError, ValueError):
        items = parse_json(text, str(path), hint)  # raises its one line for depth or number range
    if not isinstance(items, list):  # pragma: no cover - the first character was "["
        raise UsageError(f"{path}: expected a JSON array of objects")
    for index, obj in enumerate(items, start=1):
        yield Row(f"{path}: row {index}", obj)


def _iter_parquet(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq  # type: ignore[import-not-found]
    except ImportError:
        raise UsageError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert the file to JSON lines "
            "first, e.g. pandas.read_parquet(p).to_json(out, orient='records', lines=True)"
        ) from None
    index = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for obj in batch.to_pylist():
            index += 1
            yield Row(f"{path}: row {index}", obj)


def iter_rows(path: str | Path) -> Iterator[Row]:
    """Yield the records of a JSONL, JSON-array or Parquet file, each with its location."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: file not found; pass a local dataset file (nothing is downloaded)")
    if path.suffix.lower() == ".parquet":
        yield from _iter_parquet(path)
    elif _first_char(path) == "[":
        yield from _iter_json_array(path)
    else:
        yield from _iter_jsonl(path)


def first_row(path: str | Path) -> Row:
    """The first record of a file (for format detection); UsageError when the file has none."""
    for row in iter_rows(path):
        return row
    raise UsageError(f"{path}: the file has no rows")


def require_object(row: Row, hint: str) -> dict[str, Any]:
    """The row as a dict, or UsageError saying what a row of this format looks like."""
    if not isinstance(row.data, dict):
        raise UsageError(f"{row.where}: expected a JSON object, got {type(row.data).__name__} ({hint})")
    return row.data


def require_field(obj: dict[str, Any], key: str, where: str, hint: str) -> Any:
    """``obj[key]``, or UsageError naming the missing field and what the format needs."""
    if key not in obj:
        raise UsageError(f"{where}: missing field '{key}' ({hint})")
    return obj[key]


def require_str(obj: dict[str, Any], key: str, where: str, hint: str) -> str:
    """``obj[key]`` as a string (present and of type str), else UsageError."""
    value = require_field(obj, key, where, hint)
    if not isinstance(value, str):
        raise UsageError(f"{where}: field '{key}' must be a string, got {type(value).__name__} ({hint})")
    return value


def is_number(value: object) -> bool:
    """A finite int or float (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def id_string(value: object, key: str, where: str) -> str:
    """A user id given as a non-empty string or an integer, as a string."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise UsageError(
        f"{where}: field '{key}' must be a non-empty string or an integer user id, got {value!r}"
    )


def check_split(obj: dict[str, Any], where: str) -> str | None:
    """An optional ``split`` field: "train", "test" or absent/null."""
    split = obj.get("split")
    if split is None or split in ("train", "test"):
        return split
    raise UsageError(f"{where}: field 'split' must be \"train\" or \"test\", got {split!r}")


@dataclass
class SkipLog:
    """Counts skipped rows or pairs by reason and logs one warning for the whole file."""

    source: str
    reasons: Counter[str] = field(default_factory=Counter)
    first_where: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.reasons[reason] += 1
        self.first_where.setdefault(reason, where)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def report(self) -> None:
        if not self.reasons:
            return
        parts = ", ".join(f"{n} {reason} (first at {self.first_where[reason]})" for reason, n in self.reasons.items())
        log.warning("%s: skipped %d: %s", self.source, self.total, parts)

    def summary(self) -> str:
        """The reasons as one short phrase, for a "no usable pairs" error."""
        if not self.reasons:
            return "no rows produced a pair"
        return "; ".join(f"{n} {reason}" for reason, n in self.reasons.items())


def usable_text(text: str | None) -> bool:
    """A response or prompt that can go into a pair: a string with some non-space character."""
    return isinstance(text, str) and bool(text.strip())


def no_pairs_error(path: str | Path, fmt: str, skipped: SkipLog) -> UsageError:
    """The error for a file that parsed but produced no pair."""
    return UsageError(f"{path}: no usable preference pairs in this {fmt} file ({skipped.summary()})")
