"""Checkpoints and resume: strategy state round trips, atomic layout, round offsets (without processes);
damaged checkpoints through the real ``fedpersona server`` command (the end of this file; the damage
cases one by one are unit tests in tests/server/test_checkpoint_damage.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from fedpersona.config import RunConfig
from fedpersona.errors import UsageError
from fedpersona.server import checkpoint as ck
from fedpersona.server.resume import Checkpointing
from fedpersona.server.resume import (finished_rows, offset_rounds, recorder_totals, restore_recorder_totals,
                                      restore_rows)
from fedpersona.server.strategy_state import restore_strategy_state, strategy_state


def shared(value: float) -> ArrayRecord:
    return ArrayRecord({"layer.lora_A.shared.weight": Array(np.full((2, 3), value, dtype=np.float32)),
                        "layer.lora_B.shared.weight": Array(np.full((3, 2), -value, dtype=np.float32))})


def adam_with_state() -> FedAdam:
    strategy = FedAdam()
    strategy.current_arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    strategy.m_t = {"a": np.full((2, 3), 0.5, dtype=np.float32)}
    strategy.v_t = {"a": np.full((2, 3), 0.25, dtype=np.float32)}
    return strategy


def test_strategy_state_finds_array_attributes_only():
    state = strategy_state(adam_with_state())
    assert set(state) == {"current_arrays", "m_t", "v_t"}  # eta, beta_1, ... are hyperparameters: not state
    momentum = FedAvgM(server_momentum=0.9)
    momentum.momentum_vector = [np.ones(3), np.zeros(2)]
    momentum.current_arrays = shared(1.0)
    assert set(strategy_state(momentum)) == {"momentum_vector", "current_arrays"}
    assert strategy_state(FedAvg()) == {}


def test_save_and_load_round_trip(tmp_path: Path):
    strategy = adam_with_state()
    folder = ck.save_checkpoint(tmp_path, 3, shared(1.5), strategy, config={"strategy": "FedAdam"},
                                recorder={"bytes_up": [10, 20]}, num_rounds=5)
    assert folder.name == "round-00003" and sorted(p.name for p in folder.iterdir()) == [
        "shared.safetensors", "state.json", "strategy.safetensors"]
    assert json.loads((tmp_path / "latest.json").read_text())["round"] == 3

    loaded = ck.load_checkpoint(tmp_path)
    assert loaded.round == 3 and loaded.config == {"strategy": "FedAdam"} and loaded.recorder == {"bytes_up": [10, 20]}
    assert list(loaded.arrays.keys()) == list(shared(1.5).keys())
    np.testing.assert_array_equal(loaded.arrays["layer.lora_A.shared.weight"].numpy(), np.full((2, 3), 1.5))

    fresh = FedAdam()
    assert restore_strategy_state(fresh, loaded.strategy_state)
    np.testing.assert_array_equal(fresh.m_t["a"], strategy.m_t["a"])
    np.testing.assert_array_equal(fresh.v_t["a"], strategy.v_t["a"])
    np.testing.assert_array_equal(fresh.current_arrays["a"], strategy.current_arrays["a"])


def test_arrayrecord_and_list_state_round_trip(tmp_path: Path):
    momentum = FedAvgM(server_momentum=0.9)
    momentum.momentum_vector = [np.ones(3, dtype=np.float32), np.zeros(2, dtype=np.float32)]
    momentum.current_arrays = shared(2.0)
    ck.save_checkpoint(tmp_path, 1, shared(2.0), momentum, config={})
    fresh = FedAvgM(server_momentum=0.9)
    restore_strategy_state(fresh, ck.load_checkpoint(tmp_path).strategy_state)
    assert isinstance(fresh.current_arrays, ArrayRecord)
    assert list(fresh.current_arrays.keys()) == list(shared(2.0).keys())
    assert [v.tolist() for v in fresh.momentum_vector] == [[1, 1, 1], [0, 0]]


def test_only_recent_rounds_are_kept_and_no_temp_folders_remain(tmp_path: Path):
    for server_round in range(1, 5):
        ck.save_checkpoint(tmp_path, server_round, shared(server_round), FedAvg(), config={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "round-00003", "round-00004"]
    assert ck.load_checkpoint(tmp_path).round == 4


def test_a_crash_before_the_pointer_moves_keeps_the_previous_round(tmp_path: Path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, shared(1.0), FedAvg(), config={})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "atomic_write_json", crash)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, 2, shared(2.0), FedAvg(), config={})
    assert ck.load_checkpoint(tmp_path).round == 1  # latest.json still names round 1, which is complete
    assert not list(tmp_path.glob(".round-*"))


def test_no_checkpoint_and_damaged_pointer(tmp_path: Path):
    assert ck.load_checkpoint(tmp_path) is None and ck.latest_info(tmp_path / "absent") is None
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(UsageError, match="latest.json"):
        ck.latest_info(tmp_path)


def test_checkpointing_refuses_what_cannot_continue(tmp_path: Path):
    config = RunConfig(rounds=3, strategy="FedAdam")
    assert Checkpointing(config, tmp_path, False).checkpoint is None
    with pytest.raises(UsageError, match="no checkpoint"):
        Checkpointing(config, tmp_path, True).checkpoint
    ck.save_checkpoint(tmp_path, 3, shared(1.0), FedAdam(), config=config.to_flat())
    with pytest.raises(UsageError, match="already at round 3 of 3"):
        Checkpointing(config, tmp_path, True).checkpoint
    with pytest.raises(UsageError, match="strategy"):
        Checkpointing(config.replace(rounds=5, strategy="FedYogi"), tmp_path, True).checkpoint
    assert Checkpointing(config.replace(rounds=5), tmp_path, True).checkpoint.round == 3


def test_offset_rounds_shifts_every_hook():
    seen = []

    class Probe(FedAvg):
        def configure_train(self, server_round, *args):
            seen.append(("configure_train", server_round))
            return []

        def aggregate_evaluate(self, server_round, replies):
            seen.append(("aggregate_evaluate", server_round))

    probe = offset_rounds(Probe(), 4)
    probe.configure_train(1, None, None, None)
    probe.aggregate_evaluate(2, [])
    assert seen == [("configure_train", 5), ("aggregate_evaluate", 6)]
    assert type(probe).__name__ == "Probe" and isinstance(probe, FedAvg)
    assert offset_rounds(FedAvg(), 0).__class__ is FedAvg


def test_metrics_rows_of_finished_rounds_survive(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"round": 1, "x": 1}\n{"round": 2, "x": 2}\n{"round": 3, "x"')  # torn last line
    kept = finished_rows(metrics, 2)
    restore_rows(metrics, kept)
    assert [json.loads(line)["round"] for line in metrics.read_text().splitlines()] == [1, 2]
    assert finished_rows(tmp_path / "absent.jsonl", 5) == []


def test_recorder_totals_round_trip():
    class Recorder:
        def __init__(self):
            self.bytes_up, self.epsilons, self.last_eval, self.last_epsilon = [], [], {}, {}

    old = Recorder()
    old.bytes_up, old.last_eval, old.last_epsilon = [5, 6], {7: {"personalized": 0.5}}, {7: 1.5}
    totals = json.loads(json.dumps(recorder_totals(old)))  # through JSON, as in state.json
    new = Recorder()
    new.bytes_up.append(9)
    restore_recorder_totals(new, totals)
    assert new.bytes_up == [5, 6, 9] and new.last_eval == {7: {"personalized": 0.5}} and new.last_epsilon == {7: 1.5}


# ------------------------------------------------------------------ damaged checkpoints, real command and processes

def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _server(state: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedpersona.cli", "server", "--state", str(state), "--insecure",
                           "--port", "1", "--rounds", "3", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=state.parent)


def test_server_cli_refuses_damaged_checkpoints_in_one_line_and_touches_nothing(tmp_path: Path, h):
    """Every round damaged: ``--resume`` exits 2 with one line naming the damaged file and what to do, before
    anything starts; without --resume or --fresh a damaged pointer is refused the same way."""
    state = tmp_path / "server"
    checkpoints = state / "checkpoints"
    for server_round in (1, 2):
        ck.save_checkpoint(checkpoints, server_round, shared(server_round), FedAdam(), config={}, num_rounds=3)
    (checkpoints / "notes.txt").write_text("a user's file")
    (checkpoints / "latest.json").write_bytes(b"\xff\xfe not UTF-8")  # the pointer, and every round, damaged
    (checkpoints / "round-00002" / "state.json").write_text('{"round": 2, "conf')
    (checkpoints / "round-00001" / "shared.safetensors").write_bytes(b"")
    before = _tree(state)
    resumed = _server(state, "--resume", env=h.child_env())
    assert resumed.returncode == 2, resumed.stderr
    lines = resumed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in resumed.stderr, resumed.stderr
    assert lines[0] == (f"fedpersona: error: {checkpoints / 'latest.json'}: checkpoint cannot be resumed (not UTF-8 "
                        f"text) and no round under {checkpoints} loads; start afresh (without --resume; fedpersona "
                        "server: --fresh), or restore the folder from a backup")
    plain = _server(state, env=h.child_env())
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert "latest.json: checkpoint pointer damaged (not UTF-8 text); add --resume" in plain.stderr
    assert "--fresh to discard the checkpoints" in plain.stderr
    assert _tree(state) == before  # nothing written, nothing deleted


@pytest.mark.e2e
def test_server_resumes_a_damaged_checkpoint_from_the_newest_round_that_loads(tmp_path: Path, procs, h):
    """``fedpersona server --resume`` with round 2's shared.safetensors truncated: the server says so in one
    line, submits the run resuming after round 1, and its ServerApp starts the 2 remaining rounds from round 1.
    (No device joins: a resumed run training to its end is test_deployment's kill-and-resume test.)"""
    from flwr.serverapp.strategy import FedAvg

    from fedpersona.round.resident import resident_for
    from fedpersona.model.adapters import Role

    config = RunConfig(rounds=3)  # the server's run below: same model, scheme and ranks, so its shapes
    tensors = ArrayRecord(resident_for(config, keep=False).adapters.tensors(Role.SHARED))
    state = tmp_path / "server"
    checkpoints = state / "checkpoints"
    for server_round in (1, 2):
        ck.save_checkpoint(checkpoints, server_round, tensors, FedAvg(), config=config.to_flat(), num_rounds=3)
    damaged = checkpoints / "round-00002" / "shared.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    (checkpoints / "notes.txt").write_text("a user's file")
    before = _tree(checkpoints)
    port = h.free_port()
    log = tmp_path / "server.log"
    server = procs.fedpersona("server", "--state", str(state), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                              "--rounds", "3", "--scheme", "split", "--min-users", "2", "--resume", log=log)
    run_logs = state / "logs"
    h.wait_for(lambda: any("Number of rounds: 2" in p.read_text(errors="replace") for p in run_logs.glob("run-*.log")),
               timeout=180, what="the ServerApp to start the remaining rounds", alive=[server],
               logs=[log, *run_logs.glob("*.log")])
    warning = (f"checkpoint {damaged} cannot be resumed (truncated or not a safetensors file; SafetensorError: "
               "Error while deserializing header:")
    fallback = f"; resuming from round 1 ({checkpoints / 'round-00001'}) instead"
    said = [line for line in log.read_text().splitlines() if "cannot be resumed" in line]
    assert len(said) == 1 and said[0].removeprefix("fedpersona: warning: ").startswith(warning), said
    assert said[0].endswith(fallback), said
    assert "submitted: 3 rounds (resuming after round 1)" in log.read_text()
    assert json.loads((state / "run.json").read_text())["resume_from_round"] == 1
    run_log = next(run_logs.glob("run-*.log")).read_text(errors="replace")
    assert warning in run_log and fallback in run_log  # the ServerApp chose the same round, and said so
    assert "Traceback" not in log.read_text() + run_log
    assert _tree(checkpoints) == before  # the damaged round stays for inspection until round 2 is saved anew
