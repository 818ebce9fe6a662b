"""PreferenceMemory: durable, de-duplicated, one user per device, atomic imports, concurrent readers."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedpersona.device.memory import MEMORY_FILE, PreferenceMemory
from fedpersona.data.schema import PreferencePair, UserData, assign_split
from fedpersona.errors import UsageError

REPO = Path(__file__).resolve().parents[2]


def pair(i: int, user: str = "alice", split: str | None = None) -> PreferencePair:
    return PreferencePair(user, f"prompt {i}", f"good answer {i}", f"bad answer {i}", split)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def memory(tmp_path: Path):
    with PreferenceMemory(tmp_path / MEMORY_FILE) as mem:
        yield mem


def test_add_returns_ids_and_ignores_duplicates(memory: PreferenceMemory) -> None:
    assert memory.user_id() is None
    assert memory.add(pair(1)) == 1
    assert memory.add(pair(2)) == 2
    # same prompt/chosen/rejected: ignored, the stored copy's id comes back (even with another split)
    assert memory.add(pair(1, split="test")) == 1
    assert memory.count() == 2
    assert memory.user_id() == "alice"
    assert memory.contains(pair(2)) == 2
    assert memory.contains(pair(3)) is None


def test_add_validates_like_a_file_row(memory: PreferenceMemory) -> None:
    with pytest.raises(UsageError, match="identical"):
        memory.add(PreferencePair("alice", "p", "same", "same"))
    with pytest.raises(UsageError, match="'prompt' is empty"):
        memory.add(PreferencePair("alice", "  ", "a", "b"))
    assert memory.count() == 0
    assert memory.user_id() is None


def test_content_round_trips_and_persists(tmp_path: Path) -> None:
    odd = PreferencePair("ünï", "line1\nline2 \"quoted\" 🙂", "chosen\ttab", "rejected ' apostrophe", "test")
    with PreferenceMemory(tmp_path / MEMORY_FILE) as mem:
        pid = mem.add(odd, source="cli")
    with PreferenceMemory.in_dir(tmp_path) as mem:  # reopened: the pair survived
        row = mem.get(pid)
        assert row is not None
        assert row.pair == odd
        assert row.source == "cli"
        assert row.created_at.endswith("+00:00")
        assert row.to_json()["prompt"] == odd.prompt
        assert mem.user_id() == "ünï"


def test_split_kept_or_assigned_on_insert(tmp_path: Path) -> None:
    with PreferenceMemory(tmp_path / "a.sqlite", test_fraction=0.0) as mem:
        mem.add(pair(1))
        mem.add(pair(2, split="test"))
        assert [r.split for r in mem.list()] == ["train", "test"]
    with PreferenceMemory(tmp_path / "b.sqlite", test_fraction=1.0) as mem:
        mem.add(pair(1))
        mem.add(pair(2, split="train"))
        assert [r.split for r in mem.list()] == ["test", "train"]
    with PreferenceMemory(tmp_path / "c.sqlite", test_fraction=0.3) as mem:
        for i in range(40):
            mem.add(pair(i))
        assert [r.split for r in mem.list(limit=None)] == [assign_split(pair(i), 0.3) for i in range(40)]
        assert {r.split for r in mem.list(limit=None)} == {"train", "test"}
    with pytest.raises(UsageError, match="between 0 and 1"):
        PreferenceMemory(tmp_path / "d.sqlite", test_fraction=1.5)


def test_import_counts_added_and_duplicates(memory: PreferenceMemory, tmp_path: Path) -> None:
    memory.add(pair(0))
    rows = [pair(i).to_json() for i in range(5)] + [pair(3).to_json()]  # 0: stored already, 3: twice in file
    added, duplicates = memory.import_file(write_jsonl(tmp_path / "f.jsonl", rows))
    assert (added, duplicates) == (4, 2)
    assert memory.count() == 5
    assert [r.prompt for r in memory.list()] == [f"prompt {i}" for i in range(5)]
    assert {r.source for r in memory.list()[1:]} == {"import:f.jsonl"}
    # importing it again adds nothing
    assert memory.import_file(tmp_path / "f.jsonl") == (0, 6)
    assert memory.import_file(write_jsonl(tmp_path / "empty.jsonl", ["", "  "])) == (0, 0)


@pytest.mark.parametrize(
    ("bad", "message"),
    [("{not json", "not valid JSON"),
     (json.dumps({"user_id": "alice", "prompt": "p", "chosen": "a"}), "missing field 'rejected'"),
     (json.dumps({"user_id": "alice", "prompt": "p", "chosen": "a", "rejected": "b", "split": "dev"}), "split")],
)
def test_malformed_file_imports_nothing_and_names_file_line(memory: PreferenceMemory, tmp_path: Path,
                                                            bad: str, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [pair(1).to_json(), "", pair(2).to_json(), bad, pair(4).to_json()])
    with pytest.raises(UsageError) as err:
        memory.import_file(path)
    assert f"{path}:4:" in str(err.value)
    assert message in str(err.value)
    assert memory.count() == 0
    assert memory.user_id() is None  # not even the user id was claimed


def test_missing_file_is_usage_error(memory: PreferenceMemory, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        memory.import_file(tmp_path / "nope.jsonl")


def test_multi_user_file_refused_unless_as_user(memory: PreferenceMemory, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "two.jsonl", [pair(1, "alice").to_json(), pair(2, "bob").to_json()])
    with pytest.raises(UsageError, match=r"2 users \('alice', 'bob'\).*--as-user"):
        memory.import_file(path)
    assert memory.count() == 0
    assert memory.import_file(path, as_user="carol") == (2, 0)
    assert {r.user_id for r in memory.list()} == {"carol"}
    assert memory.user_id() == "carol"
    with pytest.raises(UsageError, match="must not be empty"):
        memory.import_file(path, as_user=" ")


def test_other_users_pairs_refused_atomically(memory: PreferenceMemory, tmp_path: Path) -> None:
    memory.add(pair(1, "alice"))
    with pytest.raises(UsageError, match="belongs to user 'alice', not 'bob'"):
        memory.add(pair(2, "bob"))
    path = write_jsonl(tmp_path / "bob.jsonl", [pair(i, "bob").to_json() for i in range(3, 6)])
    with pytest.raises(UsageError, match=rf"{path}: .*belongs to user 'alice'"):
        memory.import_file(path)
    assert memory.count() == 1
    assert memory.import_file(path, as_user="alice") == (3, 0)
    assert memory.count() == 4


def test_list_pages_and_order(memory: PreferenceMemory) -> None:
    for i in range(7):
        memory.add(pair(i))
    assert [r.id for r in memory.list(limit=3)] == [1, 2, 3]
    assert [r.id for r in memory.list(limit=3, offset=5)] == [6, 7]
    assert [r.id for r in memory.list(limit=2, newest_first=True)] == [7, 6]
    assert len(memory.list(limit=None)) == 7
    assert memory.list(limit=0) == []
    with pytest.raises(UsageError):
        memory.list(limit=-1)
    with pytest.raises(UsageError):
        memory.list(offset=-1)


def test_stats_exact(tmp_path: Path) -> None:
    with PreferenceMemory(tmp_path / MEMORY_FILE, test_fraction=0.0) as mem:
        empty = mem.stats()
        assert empty == {"pairs": 0, "train": 0, "test": 0, "users": 0, "user_id": None,
                         "first_added": None, "last_added": None}
        for i in range(5):
            mem.add(pair(i))
        mem.add(pair(5, split="test"))
        mem.add(pair(6, split="test"))
        stats = mem.stats()
        assert {k: stats[k] for k in ("pairs", "train", "test", "users", "user_id")} == {
            "pairs": 7, "train": 5, "test": 2, "users": 1, "user_id": "alice"}
        assert stats["first_added"] is not None and stats["first_added"] <= stats["last_added"]
        json.dumps(stats)  # printable as JSON by the CLI


def test_user_data_is_what_training_reads(memory: PreferenceMemory) -> None:
    assert memory.user_data() == UserData("")
    memory.add(pair(1, split="train"))
    memory.add(pair(2, split="test"))
    memory.add(pair(3, split="train"))
    data = memory.user_data()
    assert data.user_id == "alice"
    assert data.train == [pair(1, split="train"), pair(3, split="train")]
    assert data.test == [pair(2, split="test")]
    assert memory.user_data("bob") == UserData("bob")


def test_remove_one(memory: PreferenceMemory) -> None:
    memory.add(pair(1))
    memory.add(pair(2))
    assert memory.remove(1) is True
    assert memory.remove(1) is False
    assert [r.id for r in memory.list()] == [2]


def test_forget_deletes_pairs_user_and_text(tmp_path: Path) -> None:
    marker = "SECRET-MARKER-7f3a"
    path = tmp_path / MEMORY_FILE
    with PreferenceMemory(path) as mem:
        for i in range(20):
            mem.add(PreferencePair("alice", f"{marker} prompt {i}", f"yes {i}", f"no {i}"))
        assert mem.forget() == 20
        assert mem.count() == 0
        assert mem.user_id() is None
        assert mem.stats()["pairs"] == 0
        # the device can now take another user, and ids start again
        assert mem.add(pair(1, "bob")) == 1
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(MEMORY_FILE))
    assert marker.encode() not in on_disk  # secure_delete + checkpoint: the text is gone from the files


def test_wal_mode_and_reader_snapshot(tmp_path: Path) -> None:
    path = tmp_path / MEMORY_FILE
    with PreferenceMemory(path) as writer, PreferenceMemory(path) as reader:
        assert writer.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        writer.add(pair(1))
        reader.conn.execute("BEGIN")  # a training process in the middle of reading
        assert reader.conn.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 1
        writer.add(pair(2))  # does not wait for the reader
        assert reader.conn.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 1  # its snapshot
        reader.conn.execute("COMMIT")
        assert reader.count() == 2


def test_training_reads_while_another_process_adds(tmp_path: Path) -> None:
    path = tmp_path / MEMORY_FILE
    total = 60
    script = textwrap.dedent(f"""
        from fedpersona.device.memory import PreferenceMemory
        from fedpersona.data.schema import PreferencePair
        with PreferenceMemory({str(path)!r}) as mem:
            for i in range({total}):
                mem.add(PreferencePair("alice", f"prompt {{i}}", f"good {{i}}", f"bad {{i}}"))
    """)
    with PreferenceMemory(path) as reader:
        writer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True)
        seen = []
        while writer.poll() is None:
            data = reader.user_data("alice")
            seen.append(data.num_pairs)
            stats = reader.stats()
            assert stats["train"] + stats["test"] == stats["pairs"]
        _, err = writer.communicate()
        assert writer.returncode == 0, err
        assert seen == sorted(seen)  # never went backwards, never failed with "database is locked"
        assert len(set(seen)) >= 2  # the reads really overlapped the writes
        assert reader.user_data().num_pairs == total


def test_damaged_database_is_usage_error(tmp_path: Path) -> None:
    path = tmp_path / MEMORY_FILE
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UsageError, match=rf"{path}: preference memory is damaged"):
        PreferenceMemory(path)


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / MEMORY_FILE
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(UsageError, match="schema version 99"):
        PreferenceMemory(path)
