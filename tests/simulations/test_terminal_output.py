"""What `fedpersona simulate` prints on the terminal (real subprocesses): only progress, results and what the
user can act on; the rest in OUT/fedpersona.log, named at the end; SIGTERM ends a run with one line."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

SMALL = ["--set", "max-steps=1", "--set", "gen-prompts=0", "--set", "max-test-pairs=4"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _descendants(pid: int) -> set[int]:
    """Live processes below ``pid`` (Ray's head processes, workers, ...)."""
    return {child.pid for child in psutil.Process(pid).children(recursive=True)}


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie has ended; only its parent's wait is missing)."""
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_a_default_run_prints_no_library_warning_and_names_its_log(tmp_path: Path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "fedpersona.cli", "simulate", "--users", "2", "--rounds", "1", *SMALL,
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=_env(),
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    noisy = [line for line in done.stderr.splitlines()
             if any(word in line.lower() for word in ("warning", "deprecated", "terminate called", "traceback"))]
    assert not noisy, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("round 1/1 train: 0/2 users replied"), done.stderr
    assert lines[-1] == f"log: {out / 'fedpersona.log'}", done.stderr
    assert "results:" in done.stdout and "personalized" in done.stdout
    log = (out / "fedpersona.log").read_text()
    assert "[ROUND 1/1]" in log and "Ray started" in log  # Flower's and Ray's records went there instead


def test_sigterm_mid_run_stops_with_one_line_and_exit_143(tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fedpersona.cli", "simulate", "--users", "2", "--rounds", "4",
                             *SMALL, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), stdin=subprocess.DEVNULL)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stderr:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while not any(line.startswith("round 1/4  users trained") for line in seen):
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "\n".join(seen)
            seen.append(line)
        below = _descendants(proc.pid)
        assert below, "Ray's processes run under the command"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        while (line := lines.get(timeout=10)) is not None:
            seen.append(line)
        after = seen[seen.index(next(s for s in seen if s.startswith("round 1/4  users trained"))) + 1:]
        stopped = [line for line in after if line.startswith("fedpersona: stopped")]
        assert stopped == [f"fedpersona: stopped (SIGTERM); partial outputs in {out} (log: {out / 'fedpersona.log'})"], \
            "\n".join(seen)
        text = "\n".join(seen)
        for word in ("terminate called", "Traceback", "SIGTERM received", "ERROR"):
            assert word not in text, text
        assert [line for line in after if not line.startswith("round ")] == stopped, text  # nothing else
        assert (out / "metrics.jsonl").read_text().strip(), "the finished round stays"
        assert "stopped by SIGTERM" in (out / "fedpersona.log").read_text()
        deadline = time.monotonic() + 30  # Ray's processes follow their driver
        while _alive(below) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(below), f"left running: {_alive(below)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pid in _alive(below):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

