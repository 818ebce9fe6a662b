"""The pair-file contract (docs/reference/pair-files.md): validation messages, per-user grouping, the stable split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedpersona.data.schema import (
    PreferencePair,
    assign_split,
    group_by_user,
    iter_pairs_jsonl,
    load_users,
    validate_row,
    write_pairs_jsonl,
)
from fedpersona.errors import UsageError

GOOD = {"user_id": "u1", "prompt": "p", "chosen": "yes", "rejected": "no"}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(UsageError) as info:
        list(iter_pairs_jsonl(path))
    message = str(info.value)
    assert "\n" not in message, "a usage error is one line"
    return message


def test_valid_file_loads_with_split(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(GOOD), "", json.dumps({**GOOD, "split": "test"})])
    pairs = list(iter_pairs_jsonl(path))
    assert pairs == [PreferencePair("u1", "p", "yes", "no"), PreferencePair("u1", "p", "yes", "no", "test")]
    assert pairs[0].to_json() == GOOD


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"user_id": "u1", "prompt": ', "not valid JSON"),
        ('["u1", "p", "yes", "no"]', "expected a JSON object, got list"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "rejected"}), "missing field 'rejected'"),
        (json.dumps({**GOOD, "prompt": 3}), "field 'prompt' must be a string, got int"),
        (json.dumps({**GOOD, "user_id": None}), "field 'user_id' must be a string, got NoneType"),
        (json.dumps({**GOOD, "chosen": "   "}), "field 'chosen' is empty"),
        (json.dumps({**GOOD, "rejected": "yes"}), "'chosen' and 'rejected' are identical"),
        (json.dumps({**GOOD, "split": "validation"}), "field 'split' must be \"train\" or \"test\""),
    ],
)
def test_bad_row_names_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(GOOD), bad_line, json.dumps(GOOD)])
    message = load_error(path)
    assert message.startswith(f"{path}:2: ")
    assert expected in message


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in message and "not found" in message


def test_validate_row_uses_the_given_location() -> None:
    with pytest.raises(UsageError, match=r"^here:7: missing field 'user_id'"):
        validate_row({"prompt": "p"}, "here:7")


def pairs_for(user: str, n: int, split_every: int = 0) -> list[PreferencePair]:
    return [
        PreferencePair(user, f"prompt {i}", f"good {i}", f"bad {i}",
                       ("test" if split_every and i % split_every == 0 else "train"))
        for i in range(n)
    ]


def test_users_with_too_few_pairs_are_skipped_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    pairs = pairs_for("big", 6, split_every=3) + pairs_for("small", 2, split_every=2) + pairs_for("notest", 5)
    with caplog.at_level(logging.WARNING, logger="fedpersona.data.schema"):
        users = group_by_user(pairs, min_pairs=4, source="demo.jsonl")
    assert [u.user_id for u in users] == ["big"]
    assert (len(users[0].train), len(users[0].test)) == (4, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["demo.jsonl: skipped 2 of 3 users with fewer than 4 pairs or an empty train/test split"]


def test_no_warning_when_every_user_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedpersona.data.schema"):
        users = group_by_user(pairs_for("a", 4, split_every=2), min_pairs=4)
    assert len(users) == 1 and not caplog.records


def test_load_users_without_usable_users_fails(tmp_path: Path) -> None:
    path = tmp_path / "few.jsonl"
    write_pairs_jsonl(pairs_for("a", 2, split_every=2), path)
    with pytest.raises(UsageError, match="no user has at least 4 pairs"):
        load_users(path)


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    pairs = pairs_for("a", 4, split_every=2) + pairs_for("b", 4, split_every=2)
    path = tmp_path / "out" / "pairs.jsonl"
    write_pairs_jsonl(pairs, path)
    assert list(iter_pairs_jsonl(path)) == pairs
    assert [u.user_id for u in load_users(path, min_pairs=4)] == ["a", "b"]


def test_assign_split_is_deterministic_and_honours_the_split_field() -> None:
    pairs = [PreferencePair(f"u{i % 7}", f"prompt {i}", f"c {i}", f"r {i}") for i in range(1000)]
    first = [assign_split(p, 0.2) for p in pairs]
    assert first == [assign_split(p, 0.2) for p in pairs]
    assert first == [assign_split(PreferencePair(p.user_id, p.prompt, p.chosen, "other"), 0.2) for p in pairs]
    assert 150 <= first.count("test") <= 250
    assert {assign_split(p, 0.0) for p in pairs} == {"train"}
    assert {assign_split(p, 1.0) for p in pairs} == {"test"}
    explicit = PreferencePair("u", "p", "c", "r", split="test")
    assert assign_split(explicit, 0.0) == "test"
