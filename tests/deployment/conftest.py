"""Real processes on 127.0.0.1: a ``fedpersona server`` (SuperLink) and ``fedpersona client``s (SuperNodes).

Every process a test starts is registered with ``procs`` and ended in teardown, whatever happened:
its process group first (SIGTERM, then SIGKILL), then any process still naming the test's own temp
folder on its command line (a SuperNode or ServerApp whose parent was killed). Nothing else is
touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CERTS_SH = REPO / "docker" / "certs.sh"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FEDPERSONA_CACHE", str(Path.home() / ".cache" / "fedpersona"))
    # 2 cores shared by a server and three clients: one compute thread each
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


class Procs:
    """Start ``python -m fedpersona.cli ...`` processes and always end them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[subprocess.Popen[bytes]] = []

    def fedpersona(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        handle = log.open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "fedpersona.cli", *args], stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(),
                                cwd=self.root, start_new_session=True)
        handle.close()
        self.started.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the one process (not its group): what a crash or `kill -9 PID` does."""
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        for pid in leftovers(self.root):  # grandchildren whose parent died first
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def leftovers(marker: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``marker`` (our temp folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(marker) in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """Build the embedded base model once, here, before server and clients all want it at once."""
    from fedpersona.model.loading import resolve_model_path

    os.environ.setdefault("FEDPERSONA_CACHE", child_env()["FEDPERSONA_CACHE"])
    return resolve_model_path("embedded")


@pytest.fixture
def procs(tmp_path: Path, embedded_model: str) -> Iterator[Procs]:
    manager = Procs(tmp_path)
    try:
        yield manager
    finally:
        manager.cleanup()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for 127.0.0.1/localhost, made by docker/certs.sh."""
    out = tmp_path_factory.mktemp("certs") / "tls"
    subprocess.run(["bash", str(CERTS_SH), str(out)], check=True, capture_output=True, timeout=60)
    return out


@pytest.fixture
def make_device(tmp_path: Path) -> Callable[[int], Path]:
    """``make_device(i)``: a state folder whose preference memory holds synthetic user i's pairs.

    At most 16 training and 8 test pairs: enough for two rounds, and cheap on a 2-core machine.
    """
    from fedpersona.device.state import DeviceState
    from fedpersona.data.synthetic import PreferenceSimulator

    simulator = PreferenceSimulator("conflicting", 3, 0)

    def make(i: int) -> Path:
        user = simulator.user_data(i)
        pairs = tmp_path / f"feedback-{i}.jsonl"
        pairs.write_text("".join(json.dumps({"user_id": p.user_id, "prompt": p.prompt, "chosen": p.chosen,
                                             "rejected": p.rejected, "split": p.split}) + "\n"
                                 for p in [*user.train[:16], *user.test[:8]]), encoding="utf-8")
        state = tmp_path / f"device-{i}"
        with DeviceState(state) as device:
            device.memory.import_file(pairs)
        return state

    return make


def wait_for(condition: Callable[[], object], *, timeout: float, what: str,
             alive: list[subprocess.Popen[bytes]] = (), logs: list[Path] = ()) -> object:
    """Poll ``condition`` until truthy; fail with the logs' tails if it times out or a process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        dead = [p for p in alive if p.poll() is not None]
        if dead:
            pytest.fail(f"while waiting for {what}: process {dead[0].args[3:5]} exited "
                        f"{dead[0].returncode}\n{tails(logs)}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails(logs)}")


def tails(logs: list[Path], lines: int = 25) -> str:
    out = []
    for log in logs:
        try:
            text = log.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            continue
        out.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(out)


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def h():
    """The helpers above, for test modules (conftest is not importable under --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(wait_for=wait_for, tails=tails, port_open=port_open, free_port=free_port,
                                 leftovers=leftovers, child_env=child_env)
