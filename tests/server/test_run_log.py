"""The run's log takes what the terminal does not show; the deployment server reads Flower's logs to say
what it is waiting for and which phase a round is in (no processes started here)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from fedpersona.display import ConsoleReporter, RunLog
from fedpersona.deploy.server import RunWatch


def test_warnings_and_library_records_go_to_the_log_not_the_terminal(tmp_path: Path, capsys):
    path = tmp_path / "out" / "fedpersona.log"
    with RunLog(path) as log:
        warnings.warn("a library's deprecation notice", FutureWarning, stacklevel=1)
        logging.getLogger("flwr").warning("DEPRECATED FEATURE: run_simulation")
        logging.getLogger("some.library").info("an INFO record")
        logging.getLogger("fedpersona.data").warning("3 pairs skipped: empty answer")  # the user can act on it
        logging.getLogger("fedpersona.strategies.validation").warning("reply from node 7 rejected")
        assert not path.parent.exists(), "nothing on disk before the run has passed its input checks"
        log.commit()
        logging.getLogger("fedpersona.progress").info("round 1: train")
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["fedpersona: warning: 3 pairs skipped: empty answer"], err
    text = path.read_text()
    for expected in ("FutureWarning: a library's deprecation notice", "DEPRECATED FEATURE", "an INFO record",
                     "3 pairs skipped", "reply from node 7 rejected", "round 1: train"):
        assert expected in text, expected
    assert log.committed and RunLog.active is None
    assert not any(isinstance(h, logging.Handler) and getattr(h, "path", None) == path
                   for h in logging.getLogger().handlers), "the log's handler is removed afterwards"


def test_a_run_refused_at_its_inputs_leaves_no_log(tmp_path: Path):
    path = tmp_path / "out" / "fedpersona.log"
    try:
        with RunLog(path):
            logging.getLogger("fedpersona").info("checking the inputs")
            raise ValueError("bad input")
    except ValueError:
        pass
    assert not (tmp_path / "out").exists()


def test_verbose_echoes_the_log_on_the_terminal(tmp_path: Path, capsys):
    with RunLog(tmp_path / "fedpersona.log", verbose=True) as log:
        log.commit()
        logging.getLogger("some.library").info("an INFO record")
    assert "INFO some.library: an INFO record" in capsys.readouterr().err


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def waiting(self, connected: int, needed: int) -> None:
        self.calls.append(("waiting", connected, needed))

    def phase(self, server_round: int, phase: str) -> None:
        self.calls.append(("phase", server_round, phase))

    def replies(self, done: int, total: int) -> None:
        if not self.calls or self.calls[-1] != ("replies", done, total):
            self.calls.append(("replies", done, total))


def test_the_server_follows_connections_phases_and_replies_from_flowers_logs(tmp_path: Path):
    run_log, superlink = tmp_path / "run-1.log", tmp_path / "superlink.log"
    superlink.write_text("INFO :      [Fleet.PushMessages] Push replies from node_id=1\n")  # an earlier run's
    reporter = Recorder()
    watch = RunWatch(run_log, superlink, reporter, done=2)  # resumed after round 2: Flower counts from 1

    def append(path: Path, *lines: str) -> None:
        with path.open("a") as handle:
            handle.writelines(f"\x1b[92mINFO \x1b[0m:      {line}\n" for line in lines)

    append(run_log, "[ROUND 1/3]", "Waiting for nodes to connect: 0 connected (minimum required: 2).",
           "Waiting for nodes to connect: 1 connected (minimum required: 2).")
    watch.poll()
    append(run_log, "configure_train: Sampled 2 nodes (out of 2)")
    watch.poll()
    append(superlink, "[Fleet.PushMessages] Push replies from node_id=5")
    watch.poll()
    append(superlink, "[Fleet.PushMessages] Push replies from node_id=6")
    append(run_log, "aggregate_train: Received 1 results and 1 failures")
    watch.poll()
    append(superlink, "[Fleet.PushMessages] Push replies from node_id=5")
    watch.poll()
    assert reporter.calls == [
        ("waiting", 0, 2), ("waiting", 1, 2), ("waiting", 2, 2),
        ("phase", 3, "train"), ("replies", 0, 2), ("replies", 1, 2), ("replies", 2, 2),
        ("phase", 3, "evaluate"), ("replies", 0, 2), ("replies", 1, 2),
    ]


def test_off_a_terminal_the_wait_for_devices_is_said_when_the_count_changes(capsys):
    from rich.console import Console

    reporter = ConsoleReporter(Console(file=None, force_terminal=False), unit="devices")
    reporter.live = False
    reporter.start(5)
    for connected in (0, 0, 1, 1, 1, 2):
        reporter.waiting(connected, 2)
    reporter.phase(1, "train")
    reporter.replies(0, 2)
    reporter.replies(0, 2)  # the server repeats the count every second: no new line within the heartbeat
    reporter.waiting(0, 1)
    assert capsys.readouterr().err.splitlines() == [
        "waiting for 2 devices: 0 connected", "waiting for 2 devices: 1 connected", "2 devices connected",
        "round 1/5 train: 0/2 devices replied", "waiting for 1 device: 0 connected"]
