"""Full disks and read-only places (issue 23, item 3).

Each failure is driven twice where it can be: on a real small file system (a tmpfs of a few KB mounted here
for the test, filled up, or mounted read-only; skipped with the reason where mounting is not permitted,
e.g. in an unprivileged CI container) and by fault injection (the one write call patched to raise the
error), which always runs and tests our handling rather than the disk.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedpersona.io import acquire_pid_lock, release_pid_lock

SECRET = "my very private prompt about my health"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``small_fs(size_kb, name)``: a fresh tmpfs of that size mounted at ``tmp_path/name``; unmounted after."""
    mounted: list[Path] = []

    def mount(size_kb: int, name: str = "fs") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root; the fault-injection variant of this test runs instead")
        target = tmp_path / name
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(target)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()}); the fault-injection "
                        "variant of this test runs instead")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)
    return filler


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)


def lock_is_free(path: Path) -> bool:
    fd, _ = acquire_pid_lock(path)
    if fd is None:
        return False
    release_pid_lock(fd)
    return True


# ---------------------------------------------------------------------------- the pid lock


def test_a_lock_whose_pid_cannot_be_written_is_released_on_a_full_disk(small_fs):
    """The issue's probe: flock succeeded, the pid write raised ENOSPC, the descriptor leaked with the lock,
    and a long-lived client refused every later round. Now the lock is released on that path."""
    fs = small_fs(64)
    filler = fill(fs)
    with pytest.raises(OSError) as raised:
        acquire_pid_lock(fs / ".lock")
    assert raised.value.errno == errno.ENOSPC
    filler.unlink()
    assert lock_is_free(fs / ".lock"), "the failed acquisition kept the lock"


def test_a_lock_whose_pid_cannot_be_written_is_released_fault_injected(tmp_path, monkeypatch):
    from fedpersona import io
    from fedpersona.device.state import DeviceState

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with DeviceState(tmp_path / "state") as state:  # a long-lived process's state object
        monkeypatch.setattr(io.os, "pwrite", full)
        with pytest.raises(OSError):
            with state.lock():
                pass
        monkeypatch.undo()
        assert lock_is_free(state.lock_path)
        with state.lock():  # the next round takes it again
            assert state.locked


def test_releasing_a_lock_on_a_read_only_disk_still_drops_it(tmp_path, monkeypatch):
    from fedpersona import io

    fd, _ = acquire_pid_lock(tmp_path / ".lock")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io.os, "ftruncate", read_only)
    release_pid_lock(fd)
    monkeypatch.undo()
    assert lock_is_free(tmp_path / ".lock")


# ---------------------------------------------------------------------------- feedback on a full disk


def _rows(path: Path, n: int, start: int = 0) -> Path:
    path.write_text("".join(json.dumps({"user_id": "u", "prompt": f"{SECRET} {i}", "chosen": f"good {i}",
                                        "rejected": f"bad {i}"}) + "\n" for i in range(start, start + n)),
                    encoding="utf-8")
    return path


def _assert_no_space_line(code: int, err: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "no space left" in lines[0] and "damaged" not in lines[0] and "forget" not in lines[0], lines[0]


def _pairs(cli, state: Path) -> int:
    code, out, _ = cli("feedback", "stats", "--state", str(state), "--json")
    assert code == 0
    return json.loads(out)["pairs"]


def test_feedback_on_a_full_disk_says_no_space_and_keeps_the_memory(small_fs, tmp_path, cli):
    fs = small_fs(512)
    state = fs / "state"
    code, _, err = cli("feedback", "import", str(_rows(tmp_path / "a.jsonl", 5)), "--state", str(state), "--no-check")
    assert code == 0, err
    filler = fill(fs)
    code, _, err = cli("feedback", "add", "--state", str(state), "-p", "x" * 20_000, "-c", "a", "-r", "b")
    _assert_no_space_line(code, err)
    code, _, err = cli("feedback", "import", str(_rows(tmp_path / "b.jsonl", 200, 5)), "--state", str(state),
                       "--no-check")
    _assert_no_space_line(code, err)
    filler.unlink()
    assert _pairs(cli, state) == 5  # intact: nothing half-imported, nothing "damaged"


def test_feedback_on_a_full_disk_says_no_space_fault_injected(tmp_path, cli, monkeypatch):
    from fedpersona.device.memory import PreferenceMemory

    state = tmp_path / "state"
    assert cli("feedback", "import", str(_rows(tmp_path / "a.jsonl", 3)), "--state", str(state), "--no-check")[0] == 0

    def full(*args, **kwargs):
        err = sqlite3.OperationalError("database or disk is full")
        err.sqlite_errorname = "SQLITE_FULL"
        raise err

    monkeypatch.setattr(PreferenceMemory, "_insert", full)
    code, _, err = cli("feedback", "add", "--state", str(state), "-p", "p", "-c", "a", "-r", "b")
    _assert_no_space_line(code, err)
    monkeypatch.undo()
    assert _pairs(cli, state) == 3


def test_feedback_in_a_read_only_place_says_read_only(small_fs, tmp_path, cli):
    fs = small_fs(512)
    state = fs / "state"
    assert cli("feedback", "import", str(_rows(tmp_path / "a.jsonl", 3)), "--state", str(state), "--no-check")[0] == 0
    remount_read_only(fs)
    for argv in (("feedback", "add", "--state", str(state), "-p", "p", "-c", "a", "-r", "b"),
                 ("feedback", "forget", "--state", str(state), "--yes"),
                 ("feedback", "add", "--state", str(fs / "new-state"), "-p", "p", "-c", "a", "-r", "b")):
        code, _, err = cli(*argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (argv, err)
        assert "read-only" in lines[0] and "damaged" not in lines[0], lines[0]


# ---------------------------------------------------------------------------- export


def _export_fails_cleanly(cli, trained: Path, out: Path, expect: str) -> None:
    parent = next(p for p in out.parents if p.exists())
    before = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else None
    code, _, err = cli("export", "--state", str(trained), "--out", str(out))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert expect in lines[0], lines[0]
    assert not out.exists(), "the failed export left its folder behind"
    if before is not None:
        assert sorted(p.name for p in parent.iterdir()) == before, "the failed export left something behind"


def test_export_under_a_file(trained, tmp_path, cli):
    (tmp_path / "notes.txt").write_text("a file")
    _export_fails_cleanly(cli, trained, tmp_path / "notes.txt" / "export", "is a file, not a folder")


def test_export_to_a_read_only_place(trained, small_fs, cli):
    fs = small_fs(64)
    remount_read_only(fs)
    _export_fails_cleanly(cli, trained, fs / "export", "read-only")


def test_export_to_a_full_disk(trained, small_fs, cli):
    fs = small_fs(16)  # less than one adapter file
    _export_fails_cleanly(cli, trained, fs / "exports" / "mine", "no space left")


def test_export_to_a_full_disk_fault_injected(trained, tmp_path, cli, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else "")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    _export_fails_cleanly(cli, trained, tmp_path / "exports" / "mine", "no space left")


# ---------------------------------------------------------------------------- forget while another process reads

HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN")
rows = conn.execute("SELECT prompt FROM pairs").fetchall()
print(len(rows), flush=True)
sys.stdin.readline()
"""


def _readable_through(pid: int, name: str) -> bytes:
    """What process ``pid`` can still read through its descriptors on files named ``name*``."""
    data = b""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if Path(target.removesuffix(" (deleted)")).name.startswith(name):
            with open(fd, "rb") as handle:
                data += handle.read()
    return data


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to look at the other process's files")
def test_forget_while_another_process_holds_the_memory_open(tmp_path, cli):
    state = tmp_path / "state"
    assert cli("feedback", "import", str(_rows(tmp_path / "a.jsonl", 20)), "--state", str(state), "--no-check")[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(state / "memory.sqlite")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "20"  # it reads the pairs, inside an open snapshot
        assert SECRET.encode() in _readable_through(holder.pid, "memory.sqlite")
        code, out, err = cli("feedback", "forget", "--state", str(state), "--yes")
        assert code == 0 and "forgot 20 pairs" in out, err
        assert str(holder.pid) in err, "the user is not told that another process had the memory open"
        assert not (state / "memory.sqlite").exists()
        left = _readable_through(holder.pid, "memory.sqlite")
        assert SECRET.encode() not in left, "the other process can still read the forgotten pairs"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# ---------------------------------------------------------------------------- a device round on a full disk


def test_a_device_round_on_a_full_disk_fails_with_a_code_before_paying(small_fs, tmp_path, split_resident):
    """The real ClientApp on a state whose disk is full: an error reply ``storage-unwritable`` (no path, no
    text), and the ledger exactly as it was: the round did not pay for an update it could not store."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpersona.client import device as device_module
    from fedpersona.client.app import app as client_app
    from fedpersona.config import SIMULATION_ONLY, RunConfig
    from fedpersona.data.synthetic import PreferenceSimulator
    from fedpersona.device.state import DeviceState
    from fedpersona.model.adapters import Role

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    fs = small_fs(8192)
    state = fs / "state"
    user = PreferenceSimulator("conflicting", 3, 0).user_data(0)
    with DeviceState(state) as st:
        for pair in [*user.train[:12], *user.test[:4]]:
            st.memory.add(pair)
    tiny = RunConfig(max_steps=2, epochs=1, max_length=40, batch_size=4, rounds=3, fraction_train=1.0)
    flat = {k: v for k, v in tiny.to_flat().items() if k.replace("-", "_") not in SIMULATION_ONLY}
    split_resident.adapters.reset(Role.SHARED)
    shared = split_resident.adapters.tensors(Role.SHARED)

    def send(server_round: int) -> Message:
        config = ConfigRecord({**flat, "dp-epsilon": 8.0, "server-round": server_round})
        msg = Message(content=RecordDict({"arrays": ArrayRecord(shared), "config": config}), dst_node_id=7,
                      message_type=MessageType.TRAIN)
        context = Context(run_id=1, node_id=7, node_config={"state-dir": str(state)}, state=RecordDict(),
                          run_config={})
        return client_app(msg, context)

    try:
        assert not send(1).has_error()
        ledger = (state / "ledger.json").read_bytes()
        filler = fill(fs)
        reply = send(2)
        assert reply.has_error() and reply.error.reason == "storage-unwritable", reply.error
        assert (state / "ledger.json").read_bytes() == ledger
        filler.unlink()
        assert not send(3).has_error()  # space again: the next round trains (no lock left behind)
    finally:
        for opened in device_module._OPEN.values():
            opened.close()
        device_module._OPEN.clear()
