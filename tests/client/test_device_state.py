"""DeviceState: round trips, atomic writes under simulated and real crashes, the lock, forget, the ref cache."""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fedpersona.device import state as ds
from fedpersona.device.state import DeviceState
from fedpersona.device.ref_cache import RefLogpCache, ref_key
from fedpersona.data.schema import PreferencePair
from fedpersona.errors import UsageError

REPO = Path(__file__).resolve().parents[2]


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {"layer.0.lora_A": torch.full((4, 8), value), "layer.0.lora_B": torch.full((8, 4), -value)}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def state(tmp_path: Path):
    with DeviceState(tmp_path / "state") as st:
        yield st


# ---------------------------------------------------------------------------- round trips


def test_private_round_trip_and_counters(state: DeviceState) -> None:
    assert state.load_private() is None
    assert state.rounds_trained() == 0
    base = torch.randn(6, 5, requires_grad=True)
    saved = {"a": base * 2, "view": base.detach()[:, 1], "bf16": torch.randn(3, 3).to(torch.bfloat16)}
    state.save_private(saved, 3, server_round=7)
    loaded = state.load_private()
    assert loaded is not None and set(loaded) == {"a", "view", "bf16"}
    for name, tensor in saved.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor.detach())
    assert state.rounds_trained() == 3
    counters = json.loads(state.counters_path.read_text())
    assert (counters["rounds_trained"], counters["last_round"]) == (3, 7)
    state.save_private(tensors(1.0), 4)  # no server round: last_round kept
    assert state.counters()["last_round"] == 7
    assert DeviceState(state.dir).rounds_trained() == 4  # a fresh process sees the same


def test_empty_private_adapter_is_not_none(state: DeviceState) -> None:
    state.save_private({}, 1)
    assert state.load_private() == {}
    assert state.rounds_trained() == 1


def test_implements_private_store_protocol(state: DeviceState) -> None:
    from fedpersona.round.stores import PrivateStore

    for name in ("load_private", "save_private", "rounds_trained"):
        wanted = [p for p in inspect.signature(getattr(PrivateStore, name)).parameters if p != "self"]
        have = list(inspect.signature(getattr(state, name)).parameters)
        assert have[:len(wanted)] == wanted, name
    store: PrivateStore = state
    store.save_private(tensors(2.0), store.rounds_trained() + 1)
    assert store.rounds_trained() == 1


def test_shared_round_trip(state: DeviceState) -> None:
    assert state.load_shared() is None
    state.save_shared(tensors(0.5), server_round=12)
    loaded = state.load_shared()
    assert loaded is not None and all(torch.equal(loaded[k], v) for k, v in tensors(0.5).items())
    assert ds._read_metadata(state.shared_path, "shared")["server_round"] == "12"
    assert state.load_private() is None  # shared and private never mix


def test_ledger_round_trip_and_damage(state: DeviceState) -> None:
    assert state.load_ledger() == {}
    ledger = {"accountant": "rdp", "history": [[1.1, 0.01, 30]], "epsilon": 1.25, "note": "ü"}
    state.save_ledger(ledger)
    assert state.load_ledger() == ledger
    state.ledger_path.write_text('{"epsilon": 1.2', encoding="utf-8")
    with pytest.raises(UsageError, match=rf"{state.ledger_path}: privacy ledger is not valid JSON"):
        state.load_ledger()  # never silently reset to {} (that would under-count privacy spending)
    state.ledger_path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UsageError, match="must be a JSON object"):
        state.load_ledger()


def test_damaged_private_adapter_names_file(state: DeviceState) -> None:
    state.private_path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(UsageError, match=rf"{state.private_path}: private adapter is unreadable"):
        state.load_private()
    with pytest.raises(UsageError):
        state.rounds_trained()


def test_bind_model_and_scheme(state: DeviceState) -> None:
    meta = state.bind("embedded-tiny", "shared-private")
    assert (meta["model_id"], meta["scheme"]) == ("embedded-tiny", "shared-private")
    assert state.bind("embedded-tiny", "shared-private") == meta  # unchanged on re-bind
    state.save_shared(tensors(1.0))
    state.save_private(tensors(1.0), 1)
    with pytest.raises(UsageError, match="private adapter for model 'embedded-tiny'"):
        state.bind("other-model", "shared-private")
    state.private_path.unlink()
    assert state.bind("other-model", "fedavg")["model_id"] == "other-model"
    assert not state.shared_path.exists()  # the old shared adapter fits only the old model


def test_state_dir_checks(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no device state here"):
        DeviceState(tmp_path / "missing", create=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        DeviceState(tmp_path / "file")
    st = DeviceState(tmp_path / "new" / "state")
    assert stat.S_IMODE(st.dir.stat().st_mode) == 0o700


# ---------------------------------------------------------------------------- atomicity


def test_crash_at_rename_keeps_old_state(state: DeviceState, monkeypatch: pytest.MonkeyPatch) -> None:
    state.save_private(tensors(1.0), 1)
    state.save_shared(tensors(5.0))
    state.save_ledger({"epsilon": 0.5})

    def crash(*args: object) -> None:
        raise OSError("simulated power loss at rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        state.save_private(tensors(2.0), 2)
    with pytest.raises(OSError, match="simulated"):
        state.save_shared(tensors(6.0))
    with pytest.raises(OSError, match="simulated"):
        state.save_ledger({"epsilon": 9.9})
    monkeypatch.undo()

    fresh = DeviceState(state.dir)  # what the next process sees
    private = fresh.load_private()
    assert private is not None and all(torch.equal(private[k], v) for k, v in tensors(1.0).items())
    assert fresh.rounds_trained() == 1
    shared = fresh.load_shared()
    assert shared is not None and torch.equal(shared["layer.0.lora_A"], tensors(5.0)["layer.0.lora_A"])
    assert fresh.load_ledger() == {"epsilon": 0.5}
    assert leftovers(state.dir) == []


def test_crash_mid_write_keeps_old_state(state: DeviceState, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    state.save_private(tensors(1.0), 1)

    def half_write(data: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"trunc")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        state.save_private(tensors(2.0), 2)
    monkeypatch.undo()
    private = state.load_private()
    assert private is not None and torch.equal(private["layer.0.lora_A"], tensors(1.0)["layer.0.lora_A"])
    assert state.rounds_trained() == 1
    assert leftovers(state.dir) == []


KILL_LOOP = textwrap.dedent("""
    import sys, torch
    from fedpersona.device.state import DeviceState
    state = DeviceState(sys.argv[1])
    k = state.rounds_trained()
    while True:
        k += 1
        state.save_private({"big": torch.full((256, 1024), float(k)), "small": torch.full((3,), float(k))}, k)
        print(k, flush=True)
""")


def test_killed_process_leaves_old_or_new_adapter(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    rng = random.Random(0)
    last = 0
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", KILL_LOOP, str(state_dir)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        written = [int(proc.stdout.readline()) for _ in range(3)]
        assert written[0] == last + 1
        time.sleep(rng.uniform(0.0, 0.02))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        st = DeviceState(state_dir)
        private = st.load_private()
        assert private is not None
        value = float(private["big"][0, 0])
        assert value >= written[-1]  # at least the last acknowledged version
        assert torch.equal(private["big"], torch.full((256, 1024), value))
        assert torch.equal(private["small"], torch.full((3,), value))
        assert st.rounds_trained() == int(value)  # counter and tensors replaced together
        last = int(value)


# ---------------------------------------------------------------------------- lock


def test_lock_refuses_second_trainer(tmp_path: Path) -> None:
    first, second = DeviceState(tmp_path), DeviceState(tmp_path)
    with first.lock():
        with first.lock():  # re-entrant for its holder
            assert first.locked
        assert first.locked
        with pytest.raises(UsageError, match=rf"--state {tmp_path}: another fedpersona process \(pid {os.getpid()}\)"):
            with second.lock():
                pass
    assert not first.locked
    with second.lock():
        assert second.locked


def test_lock_held_by_other_process_and_freed_when_it_dies(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import time
        from fedpersona.device.state import DeviceState
        with DeviceState({str(tmp_path)!r}).lock():
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=rf"\(pid {proc.pid}\) is training"):
            with DeviceState(tmp_path).lock():
                pass
        with pytest.raises(UsageError, match="another fedpersona process"):
            DeviceState(tmp_path).forget()  # no forgetting under a running training
    finally:
        proc.kill()
        proc.wait()
    with DeviceState(tmp_path).lock():  # the kernel dropped the dead holder's lock
        pass


# ---------------------------------------------------------------------------- forget and files


def fill(state: DeviceState) -> None:
    state.memory.add(PreferencePair("alice", "my secret prompt", "yes", "no"))
    state.memory.add(PreferencePair("alice", "another prompt", "yes", "no"))
    state.save_private(tensors(1.0), 2, server_round=2)
    state.save_shared(tensors(3.0))
    state.save_ledger({"epsilon": 1.0})
    state.ref_cache.put_many({"k": (-1.0, -2.0)})
    state.bind("embedded-tiny", "shared-private")
    (state.dir / f".{ds.PRIVATE_FILE}.crash123.tmp").write_bytes(b"half an adapter")


def test_forget_leaves_nothing_of_the_user(state: DeviceState) -> None:
    fill(state)
    removed = state.forget()
    assert {ds.MEMORY_FILE, ds.PRIVATE_FILE, ds.LEDGER_FILE, ds.REF_CACHE_FILE, ds.COUNTERS_FILE,
            f".{ds.PRIVATE_FILE}.crash123.tmp"} <= set(removed)
    remaining = {p.name for p in state.dir.iterdir()}
    # none of them holds user data; the privacy record holds what the ledger spent and keyed hashes of the pairs
    assert remaining <= {ds.SHARED_FILE, ds.META_FILE, ds.LOCK_FILE, ds.RECORD_FILE}
    assert not any(b"secret" in p.read_bytes() for p in state.dir.iterdir())
    fresh = DeviceState(state.dir)
    assert fresh.memory.count() == 0 and fresh.memory.user_id() is None
    assert fresh.load_private() is None and fresh.rounds_trained() == 0
    assert fresh.load_ledger() == {} and len(fresh.ref_cache) == 0
    assert fresh.counters()["rounds_trained"] == 0
    fresh.memory.add(PreferencePair("bob", "p", "a", "b"))  # usable again, by a new user
    assert fresh.memory.user_id() == "bob"


def test_forget_wipes_rows_seen_by_open_connection(state: DeviceState) -> None:
    fill(state)
    other = DeviceState(state.dir)
    assert other.memory.count() == 2  # e.g. a `feedback list` holding the database open
    state.forget()
    assert other.memory.count() == 0
    other.close()


def test_files_listing(state: DeviceState) -> None:
    fill(state)
    listing = {f.name: f for f in state.files()}
    assert {ds.MEMORY_FILE, ds.PRIVATE_FILE, ds.SHARED_FILE, ds.LEDGER_FILE, ds.REF_CACHE_FILE,
            ds.COUNTERS_FILE, ds.META_FILE} <= set(listing)
    assert listing[ds.PRIVATE_FILE].purpose == "your private adapter"
    assert listing[ds.PRIVATE_FILE].size == state.private_path.stat().st_size > 0
    assert listing[f".{ds.PRIVATE_FILE}.crash123.tmp"].purpose == "temporary file of an interrupted write"
    assert all(f.path.parent == state.dir for f in listing.values())


def test_memory_uses_state_test_fraction(tmp_path: Path) -> None:
    with DeviceState(tmp_path, test_fraction=1.0) as st:
        st.memory.add(PreferencePair("alice", "p", "a", "b"))
        assert st.memory.stats()["test"] == 1
        assert st.memory.path == tmp_path / ds.MEMORY_FILE


# ---------------------------------------------------------------------------- reference log-prob cache


def test_ref_key_covers_model_and_text_only() -> None:
    p = PreferencePair("alice", "prompt", "chosen", "rejected")
    assert ref_key("m", p) == ref_key("m", PreferencePair("bob", "prompt", "chosen", "rejected", "test"))
    assert len({ref_key("m", p), ref_key("m2", p), ref_key("m", PreferencePair("alice", "prompt", "chosen", "rejected!")),
                ref_key("m", PreferencePair("alice", "prompt chosen", "", "rejected"))}) == 4
    assert len(ref_key("m", p)) == 64


def test_ref_cache_round_trip_and_chunking(tmp_path: Path) -> None:
    cache = RefLogpCache(tmp_path / ds.REF_CACHE_FILE)
    assert cache.get("nope") is None and len(cache) == 0
    entries = {f"key{i}": (-float(i), -float(i) - 0.5) for i in range(1200)}
    cache.put_many(entries)
    cache.put_many({"key0": (-7.0, -8.0)})  # overwrite
    cache.close()
    reopened = RefLogpCache(tmp_path / ds.REF_CACHE_FILE)
    got = reopened.get_many(list(entries) + ["missing"])
    assert len(got) == 1200 and "missing" not in got
    assert got["key0"] == (-7.0, -8.0)
    assert got["key1199"] == (-1199.0, -1199.5)
    assert len(reopened) == 1200


def test_ref_cache_tolerates_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / ds.REF_CACHE_FILE
    path.write_bytes(b"not a database at all" * 200)
    cache = RefLogpCache(path)
    assert cache.get_many(["a", "b"]) == {}  # a miss, not a crash
    assert len(cache) == 0
    assert "unreadable" in caplog.text
    cache.put_many({"a": (-1.0, -2.0)})  # recreated
    assert cache.get("a") == (-1.0, -2.0)
    assert RefLogpCache(path).get("a") == (-1.0, -2.0)
