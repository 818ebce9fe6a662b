"""Child processes for the deployment commands: started in their own group, dying with their parent.

Why: ``fedpersona server`` and ``fedpersona client`` each own a Flower process (SuperLink, SuperNode)
that in turn owns others (SuperExec, ServerApp). If the fedpersona process is killed, even with
SIGKILL, nothing of it may keep running: a stray SuperNode would keep training on the user's
state directory, a stray SuperLink would keep the port. On Linux the child gets
``PR_SET_PDEATHSIG`` (the kernel sends it SIGTERM when we die); Flower's own children watch their
parent's pid and follow. ``stop`` ends the whole process group, politely first.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from fedpersona.errors import UsageError

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Start a new process group and ask the kernel for SIGTERM when the parent dies (Linux)."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


def executable(name: str) -> str:
    """A console script of the running environment (next to ``sys.executable``), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UsageError(f"{name}: not found next to {sys.executable} nor on PATH; install flwr 1.42 "
                         "(`pip install 'flwr[simulation]>=1.41,<1.43'`) in this environment")
    return found


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with the running interpreter's bin folder first on PATH.

    Flower's processes start further processes by name (``flower-superexec``, ``flwr-serverapp``,
    ``flwr-clientapp``); they must come from the same environment that has fedpersona installed.
    """
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def spawn(command: Sequence[str], *, log: IO[bytes] | None = None, env: Mapping[str, str] | None = None,
          cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group, bound to our lifetime; output to ``log`` (or ours)."""
    return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT if log else None,
                            stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None,
                            cwd=cwd, preexec_fn=_die_with_parent)


def stop(process: subprocess.Popen[bytes] | None, *, grace: float = 10.0) -> int | None:
    """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it. Returns the exit code."""
    if process is None:
        return None
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        pgid = None
    if process.poll() is None and pgid is not None:
        _signal_group(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    if pgid is not None:
        _signal_group(pgid, signal.SIGKILL)  # stragglers in the group (SuperExec, ServerApp, ...)
    try:
        return process.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, *, timeout: float, process: subprocess.Popen[bytes] | None = None,
                  what: str = "process") -> None:
    """Block until ``host:port`` accepts connections; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before listening on {host}:{port}")
        if port_open(host, port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


def parse_address(text: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); anything else is a UsageError naming ``option``."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{option} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    return host, int(port)
