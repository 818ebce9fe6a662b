"""Damaged checkpoints (issue 12, kind 3): resume falls back to the newest round that loads, in one
warning line naming the damaged file; with none, one UsageError line saying what to do. Replacing an
earlier run's checkpoints removes only what fedpersona wrote, never a user's files.

Unit level (no processes): every damage is cheap to make and to load. The real CLI and a real server
process are exercised in tests/deployment/test_checkpoint.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedpersona.config import RunConfig
from fedpersona.errors import UsageError
from fedpersona.server import checkpoint as ck
from fedpersona.deploy import server as launch
from fedpersona.server.resume import Checkpointing
from fedpersona.server.strategy_state import restore_strategy_state
from fedpersona.strategies.validation import TensorSpec

LOGGER = "fedpersona.server.checkpoint"


def shared(value: float) -> ArrayRecord:
    return ArrayRecord({"a": Array(np.full((2, 3), value, dtype=np.float32)),
                        "b": Array(np.full(4, -value, dtype=np.float32))})


def adam() -> FedAdam:
    strategy = FedAdam()
    strategy.m_t = {"a": np.full((2, 3), 0.5, dtype=np.float32)}
    strategy.v_t = {"a": np.full((2, 3), 0.25, dtype=np.float32)}
    return strategy


def two_rounds(folder: Path, num_rounds: int = 3) -> Path:
    for server_round in (1, 2):
        ck.save_checkpoint(folder, server_round, shared(server_round), adam(), config={"strategy": "FedAdam"},
                           num_rounds=num_rounds)
    return folder


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): what a load must leave as it was."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def relayout(path: Path) -> None:
    """A valid safetensors file whose layout names a tensor it does not hold."""
    from safetensors.numpy import save_file

    save_file({"m_t/a": np.zeros(1, dtype=np.float32)}, str(path),
              metadata={"layout": json.dumps({"m_t": {"kind": "dict", "keys": ["a", "missing"]}})})


R2 = "round-00002"
# name -> (damage, the damaged path as the message names it (relative), the round resumed from)
DAMAGES: dict[str, tuple[Callable[[Path], None], str, int]] = {
    # the five
    "truncated shared.safetensors": (lambda d: truncate(d / R2 / "shared.safetensors", 60),
                                     f"{R2}/shared.safetensors", 1),
    "garbage strategy.safetensors": (lambda d: (d / R2 / "strategy.safetensors").write_bytes(b"\x8f\x00garbage" * 40),
                                     f"{R2}/strategy.safetensors", 1),
    "truncated state.json": (lambda d: truncate(d / R2 / "state.json", 25), f"{R2}/state.json", 1),
    "non-UTF-8 latest.json": (lambda d: (d / "latest.json").write_bytes(b'{"round": 2, "dir": "\xff\xfe"}'),
                              "latest.json", 2),
    "deleted round folder": (lambda d: shutil.rmtree(d / R2), R2, 1),
    # our own
    "zero-byte shared.safetensors": (lambda d: (d / R2 / "shared.safetensors").write_bytes(b""),
                                     f"{R2}/shared.safetensors", 1),
    "missing strategy.safetensors": (lambda d: (d / R2 / "strategy.safetensors").unlink(),
                                     f"{R2}/strategy.safetensors", 1),
    "state.json a JSON list": (lambda d: (d / R2 / "state.json").write_text("[1, 2]"), f"{R2}/state.json", 1),
    "state.json of another round": (lambda d: (d / R2 / "state.json").write_text('{"round": 7}'),
                                    f"{R2}/state.json", 1),
    "state.json config not an object": (lambda d: (d / R2 / "state.json").write_text('{"round": 2, "config": [1]}'),
                                        f"{R2}/state.json", 1),
    "strategy layout naming a missing tensor": (lambda d: relayout(d / R2 / "strategy.safetensors"),
                                                f"{R2}/strategy.safetensors", 1),
    "zero-byte latest.json": (lambda d: (d / "latest.json").write_bytes(b""), "latest.json", 2),
    "latest.json valid JSON but a list": (lambda d: (d / "latest.json").write_text("[2]"), "latest.json", 2),
    "latest.json naming a folder outside": (
        lambda d: (d / "latest.json").write_text('{"round": 2, "dir": "../elsewhere"}'), "latest.json", 2),
    "latest.json naming a round never written": (
        lambda d: (d / "latest.json").write_text('{"round": 5, "dir": "round-00005"}'), "round-00005", 2),
    "latest.json deleted": (lambda d: (d / "latest.json").unlink(), "latest.json", 2),
}


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_resume_falls_back_to_the_newest_round_that_loads(tmp_path: Path, caplog, name: str):
    damage, damaged, expected = DAMAGES[name]
    folder = two_rounds(tmp_path / "checkpoints")
    damage(folder)
    before = snapshot(folder)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        checkpoint = ck.load_checkpoint(folder)
    assert checkpoint.round == expected and checkpoint.path == folder / f"round-{expected:05d}"
    np.testing.assert_array_equal(checkpoint.arrays["a"].numpy(), np.full((2, 3), expected))
    assert set(checkpoint.strategy_state) == {"m_t", "v_t"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"{folder / damaged} cannot be resumed (" in warnings[0]
    assert f"resuming from round {expected} ({folder / f'round-{expected:05d}'}) instead" in warnings[0]
    assert snapshot(folder) == before  # a load writes and deletes nothing, the damaged files included
    # the server's and the simulation's resume go through the same loader
    assert Checkpointing(RunConfig(rounds=4, strategy="FedAdam"), folder, True).checkpoint.round == expected


@pytest.mark.parametrize("name", sorted(n for n in DAMAGES if DAMAGES[n][2] == 1))
def test_without_a_round_that_loads_resume_is_refused_in_one_line(tmp_path: Path, name: str):
    damage, damaged, _ = DAMAGES[name]
    folder = two_rounds(tmp_path / "checkpoints")
    shutil.rmtree(folder / "round-00001")  # the fallback is gone too
    damage(folder)
    before = snapshot(folder)
    with pytest.raises(UsageError) as caught:
        ck.load_checkpoint(folder)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{folder / damaged}: checkpoint cannot be resumed (")
    assert f"no earlier round under {folder} loads; start afresh" in message and "restore" in message
    error = caught.value  # nothing chained: the CLI's one line is the whole story
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert snapshot(folder) == before


def test_a_damaged_pointer_and_every_round_damaged_is_refused(tmp_path: Path):
    folder = two_rounds(tmp_path)
    (folder / "latest.json").write_bytes(b"\xff\xfe")
    for server_round in (1, 2):
        truncate(folder / f"round-{server_round:05d}" / "state.json", 10)
    with pytest.raises(UsageError, match=r"latest.json: checkpoint cannot be resumed \(not UTF-8 text\) and no round "
                                         r"under .* loads; start afresh"):
        ck.load_checkpoint(folder)
    with pytest.raises(UsageError, match=r"latest.json: checkpoint pointer damaged \(not UTF-8 text\)"):
        ck.latest_info(folder)


def test_the_newest_of_several_earlier_rounds_that_loads(tmp_path: Path, caplog, monkeypatch):
    monkeypatch.setattr(ck, "KEEP", 4)
    for server_round in range(1, 5):
        ck.save_checkpoint(tmp_path, server_round, shared(server_round), FedAvg(), config={})
    truncate(tmp_path / "round-00004" / "shared.safetensors", 30)
    (tmp_path / "round-00003" / "state.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ck.load_checkpoint(tmp_path).round == 2
    assert len(caplog.records) == 1 and "round-00004/shared.safetensors" in caplog.records[0].getMessage()


def test_a_newer_folder_the_pointer_does_not_name_is_not_resumed(tmp_path: Path, monkeypatch):
    """A round folder beyond latest.json was never committed: a damaged pointed round falls back below it."""
    monkeypatch.setattr(ck, "KEEP", 3)
    folder = two_rounds(tmp_path)
    ck.save_checkpoint(folder, 3, shared(3), adam(), config={})
    (folder / "latest.json").write_text(json.dumps({"round": 2, "dir": "round-00002"}))
    truncate(folder / "round-00002" / "state.json", 5)
    assert ck.load_checkpoint(folder).round == 1


def test_tensor_checks_skip_an_earlier_round_that_does_not_load(tmp_path: Path, caplog, monkeypatch):
    """sound_checkpoint (NaN, foreign shapes) passes over an earlier round with a damaged file too."""
    monkeypatch.setattr(ck, "KEEP", 3)
    spec = TensorSpec.of(shared(1.0))
    for server_round in (1, 2, 3):
        ck.save_checkpoint(tmp_path, server_round, shared(np.nan if server_round == 3 else server_round), FedAvg(),
                           config={})
    truncate(tmp_path / "round-00002" / "shared.safetensors", 40)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ck.sound_checkpoint(tmp_path, ck.load_checkpoint(tmp_path), spec).round == 1
    assert len(caplog.records) == 1 and "round-00003 cannot be resumed" in caplog.records[0].getMessage()
    shutil.rmtree(tmp_path / "round-00001")
    with pytest.raises(UsageError, match=r"round-00003: checkpoint cannot be resumed .*non-finite.*no earlier round "
                                         r"under .* passes the checks; start afresh"):
        ck.sound_checkpoint(tmp_path, ck.load_checkpoint(tmp_path), spec)


def test_keyboard_interrupt_is_never_swallowed(tmp_path: Path, monkeypatch):
    folder = two_rounds(tmp_path)
    import safetensors

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors, "safe_open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.load_checkpoint(folder)


def test_another_strategys_state_is_refused_in_one_line(tmp_path: Path):
    two_rounds(tmp_path)
    state = ck.load_checkpoint(tmp_path).strategy_state
    with pytest.raises(UsageError, match="strategy state 'm_t.x' does not fit a FedAvg"):
        restore_strategy_state(FedAvg(), {"m_t.x": state["m_t"]})


# ------------------------------------------------------------------------------------ only our files

def user_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "mine").mkdir()
    (folder / "mine" / "data.csv").write_text("1,2\n")
    (folder / "round-notes").mkdir()  # looks a bit like ours, is not


def test_discard_removes_only_what_fedpersona_wrote(tmp_path: Path):
    folder = tmp_path / "checkpoints"
    user_files(folder)
    two_rounds(folder)
    (folder / ".round-00003.abc.tmp").mkdir()  # an interrupted write
    (folder / ".round-00003.abc.tmp" / "shared.safetensors").write_bytes(b"x")
    (folder / ".latest.json.xyz.tmp").write_text("{")
    (folder / "round-00001" / "README").write_text("a user's note inside a round folder")
    elsewhere = tmp_path / "elsewhere"
    user_files(elsewhere)
    (folder / "round-00009").symlink_to(elsewhere, target_is_directory=True)  # not ours: a link
    removed, kept = ck.discard_checkpoints(folder)
    assert removed == 1  # round-00002; round-00001 keeps the user's README
    assert kept == ["mine", "notes.txt", "round-00001", "round-00009", "round-notes"]
    assert [p.name for p in (folder / "round-00001").iterdir()] == ["README"]
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "mine" / "data.csv").exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["mine", "notes.txt", "round-notes"]
    assert ck.discard_checkpoints(tmp_path / "absent") == (0, [])


def test_pruning_and_rewriting_a_round_keep_a_users_files(tmp_path: Path):
    ck.save_checkpoint(tmp_path, 1, shared(1), FedAvg(), config={})
    (tmp_path / "round-00001" / "mine.txt").write_text("keep")
    for server_round in (2, 3):
        ck.save_checkpoint(tmp_path, server_round, shared(server_round), FedAvg(), config={})
    assert [p.name for p in (tmp_path / "round-00001").iterdir()] == ["mine.txt"]
    (tmp_path / "round-00003" / "mine.txt").write_text("keep too")
    ck.save_checkpoint(tmp_path, 3, shared(3), FedAvg(), config={})  # a round re-run after a crash
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("round-00003.kept-")]
    assert len(aside) == 1 and (aside[0] / "mine.txt").read_text() == "keep too"
    assert ck.load_checkpoint(tmp_path).round == 3


class _Started(Exception):
    """Raised where the real SuperLink would start: everything before it is the launch code under test."""


class _NoSuperLink:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        raise _Started

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.parametrize("fresh,num_rounds", [(False, 2), (True, 3)])
def test_a_new_server_run_keeps_the_users_files_in_checkpoint_dir(tmp_path: Path, monkeypatch, fresh, num_rounds):
    """``fedpersona server --checkpoint-dir DIR`` after a finished run (or with --fresh after an unfinished
    one) removes that run's rounds and pointer, and nothing else in DIR."""
    monkeypatch.setattr(launch, "SuperLink", _NoSuperLink)
    folder = tmp_path / "mine"
    user_files(folder)
    two_rounds(folder, num_rounds=num_rounds)
    said: list[str] = []
    options = launch.ServerOptions(state=tmp_path / "state", insecure=True, checkpoint_dir=folder, fresh=fresh)
    with pytest.raises(_Started):
        launch.run_server(RunConfig(rounds=2), options, say=said.append)
    assert sorted(p.name for p in folder.iterdir()) == ["mine", "notes.txt", "round-notes"]
    assert (folder / "mine" / "data.csv").read_text() == "1,2\n"
    assert said == [f"the earlier run's checkpoints (2 round folders) removed from {folder.resolve()}; "
                    "3 other entries there kept as they were"]


def test_without_resume_or_fresh_a_damaged_or_pointerless_checkpoint_is_refused(tmp_path: Path, monkeypatch):
    folder = two_rounds(tmp_path / "checkpoints")
    # --resume checks the tensors against the model's shared tensors, as the ServerApp does (tested with the real
    # model in tests/server/test_server_reports.py); these toy rounds carry their own spec
    monkeypatch.setattr(launch, "shared_spec", lambda config: TensorSpec.of(shared(1)))
    (folder / "latest.json").write_bytes(b"\xff")
    options = launch.ServerOptions(state=tmp_path, insecure=True, checkpoint_dir=folder)
    with pytest.raises(UsageError, match=r"latest.json: checkpoint pointer damaged \(not UTF-8 text\); add --resume "
                                         r"to continue from the newest round that loads, or --fresh"):
        options.validate(RunConfig(rounds=3))
    (folder / "latest.json").unlink()
    with pytest.raises(UsageError, match="holds round folders but no latest.json; add --resume"):
        options.validate(RunConfig(rounds=3))
    resumed = launch.ServerOptions(state=tmp_path, insecure=True, checkpoint_dir=folder, resume=True)
    assert resumed.check(RunConfig(rounds=3, strategy="FedAdam"))[1].round == 2
    fresh = launch.ServerOptions(state=tmp_path, insecure=True, checkpoint_dir=folder, fresh=True)
    assert fresh.check(RunConfig(rounds=3)) == (None, None)
