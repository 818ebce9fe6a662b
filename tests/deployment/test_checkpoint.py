"""Checkpoints and resume, without processes: strategy state round trips, atomic layout, round offsets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from fedpersona.config import RunConfig
from fedpersona.errors import UsageError
from fedpersona.server import checkpoint as ck
from fedpersona.server.federation import resume_point
from fedpersona.server.resume import (finished_rows, offset_rounds, recorder_totals, restore_recorder_totals,
                                      restore_rows)


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
    state = ck.strategy_state(adam_with_state())
    assert set(state) == {"current_arrays", "m_t", "v_t"}  # eta, beta_1, ... are hyperparameters: not state
    momentum = FedAvgM(server_momentum=0.9)
    momentum.momentum_vector = [np.ones(3), np.zeros(2)]
    momentum.current_arrays = shared(1.0)
    assert set(ck.strategy_state(momentum)) == {"momentum_vector", "current_arrays"}
    assert ck.strategy_state(FedAvg()) == {}


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
    assert ck.restore_strategy_state(fresh, loaded.strategy_state)
    np.testing.assert_array_equal(fresh.m_t["a"], strategy.m_t["a"])
    np.testing.assert_array_equal(fresh.v_t["a"], strategy.v_t["a"])
    np.testing.assert_array_equal(fresh.current_arrays["a"], strategy.current_arrays["a"])


def test_arrayrecord_and_list_state_round_trip(tmp_path: Path):
    momentum = FedAvgM(server_momentum=0.9)
    momentum.momentum_vector = [np.ones(3, dtype=np.float32), np.zeros(2, dtype=np.float32)]
    momentum.current_arrays = shared(2.0)
    ck.save_checkpoint(tmp_path, 1, shared(2.0), momentum, config={})
    fresh = FedAvgM(server_momentum=0.9)
    ck.restore_strategy_state(fresh, ck.load_checkpoint(tmp_path).strategy_state)
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


def test_resume_point_refuses_what_cannot_continue(tmp_path: Path):
    config = RunConfig(rounds=3, strategy="FedAdam")
    assert resume_point(config, tmp_path, resume=False) is None
    with pytest.raises(UsageError, match="no checkpoint"):
        resume_point(config, tmp_path, resume=True)
    ck.save_checkpoint(tmp_path, 3, shared(1.0), FedAdam(), config=config.to_flat())
    with pytest.raises(UsageError, match="already at round 3 of 3"):
        resume_point(config, tmp_path, resume=True)
    with pytest.raises(UsageError, match="strategy"):
        resume_point(config.replace(rounds=5, strategy="FedYogi"), tmp_path, resume=True)
    assert resume_point(config.replace(rounds=5), tmp_path, resume=True).round == 3


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
