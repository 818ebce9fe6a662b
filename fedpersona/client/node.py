"""``fedpersona client``: this device's Flower SuperNode, bound to the user's state directory.

It starts ``flower-supernode`` (CPU) as a child process that dies with this one, with node config
``state-dir='DIR'`` so the ClientApp works on the user's own data and adapters
(``fedpersona.client.device``), a Runtime API port of its own (several clients can share a machine),
TLS towards the server by default, and optional SuperNode authentication (``--auth-key``).

By default the ClientApp's tasks run in this process (``fedpersona.client.executor``: the model is
loaded once); ``cold=True`` leaves them to Flower, which starts one ``flwr-clientapp`` per message.

Restarts: nothing the device needs lives in this process. A client killed at any moment (power loss,
SIGKILL) is restarted with the same ``--state`` and rejoins: every state file is written atomically,
so it finds its last complete private adapter, ledger and memory; the SuperNode registers again (a
new node id without authentication, the same one with ``--auth-key``) and takes the next message.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedpersona.client.supernode_main import ENV
from fedpersona.errors import UsageError
from fedpersona.io import acquire_pid_lock, release_pid_lock
from fedpersona.processes import child_env, executable, free_port, parse_address, spawn, stop, wait_for_port

_log = logging.getLogger(__name__)
GUARD_FILE = ".client.lock"  # held by the one `fedpersona client` serving a state directory


@dataclass(frozen=True)
class ClientOptions:
    server: str  # HOST:PORT of the SuperLink's Fleet API
    state: Path
    root_certificates: Path | None = None  # CA that signed the server certificate (None: system CAs)
    insecure: bool = False
    auth_key: Path | None = None  # OpenSSH EC private key (ssh-keygen -t ecdsa -b 384)
    runtime_port: int | None = None  # the SuperNode's local Runtime API port (None: a free one)
    user_index: int | None = None
    cold: bool = False
    max_wait_time: float | None = None  # give up after this long without the server (None: never)
    heartbeat_interval: float | None = None  # seconds; None: Flower's default (30 s)
    # the user's privacy policy flags (fedpersona.client.policy.DevicePolicy fields; None: keep the saved value)
    policy: tuple[tuple[str, object], ...] = ()

    def validate(self) -> None:
        parse_address(self.server, "--server")
        if self.insecure and self.root_certificates:
            raise UsageError("--insecure and --root-certificates contradict each other; TLS is on unless --insecure")
        if self.root_certificates and not self.root_certificates.is_file():
            raise UsageError(f"--root-certificates {self.root_certificates}: file not found; pass the CA "
                             "certificate (ca.crt) that signed the server's certificate")
        if self.auth_key:
            if not self.auth_key.is_file():
                raise UsageError(f"--auth-key {self.auth_key}: file not found; create a key pair with "
                                 f"`ssh-keygen -t ecdsa -b 384 -N '' -f {self.auth_key}` and have the operator "
                                 "register the .pub file")
            if self.insecure:
                raise UsageError("--auth-key needs TLS: SuperNode authentication is refused over --insecure")
        if self.heartbeat_interval is not None and not 10 <= self.heartbeat_interval <= 1800:
            raise UsageError(f"--heartbeat-interval {self.heartbeat_interval}: the SuperLink accepts 10 to 1800 seconds")
        if self.runtime_port is not None and not 0 < self.runtime_port < 65536:
            raise UsageError(f"--runtime-port {self.runtime_port}: not a TCP port")
        from fedpersona.client.policy import DevicePolicy

        given = {k: v for k, v in self.policy if v is not None}  # the flags alone, before any state is read
        DevicePolicy(**given).validate("fedpersona client")


def supernode_command(options: ClientOptions, runtime_port: int) -> list[str]:
    """The ``flower-supernode`` command line for these options."""
    state = str(options.state.resolve()).replace("'", "")
    node_config = f"state-dir='{state}'"
    if options.user_index is not None:
        node_config += f" user-index={int(options.user_index)}"
    if options.heartbeat_interval is None:
        launcher = [executable("flower-supernode")]
    else:  # Flower has no flag for it: see fedpersona.client.supernode_main
        launcher = [sys.executable, "-m", "fedpersona.client.supernode_main"]
    command = [*launcher, "--superlink", options.server, "--node-config", node_config,
               "--isolation", "subprocess" if options.cold else "process",
               "--host", "127.0.0.1", "--port", str(runtime_port)]
    if options.insecure:
        command.append("--insecure")
    elif options.root_certificates:
        command += ["--root-certificates", str(options.root_certificates.resolve())]
    if options.auth_key:
        command += ["--auth-supernode-private-key", str(options.auth_key.resolve())]
    if options.max_wait_time is not None:
        command += ["--max-wait-time", str(options.max_wait_time)]
    return command


class StateGuard:
    """An exclusive, non-blocking flock on ``STATE/.client.lock``: one client per state directory.

    Two clients on one directory would be two Flower nodes for one user (double weight, interleaved
    private-adapter updates). The kernel drops the lock when the holder dies, so a crash never
    leaves the directory claimed.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / GUARD_FILE
        self.fd: int | None = None

    def __enter__(self) -> StateGuard:
        fd, holder = acquire_pid_lock(self.path)
        if fd is None:
            raise UsageError(f"--state {self.path.parent}: another `fedpersona client`"
                             f"{f' (pid {holder})' if holder else ''} is serving this state directory; "
                             "stop it first, or use a different --state")
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            release_pid_lock(self.fd)
            self.fd = None


def check_device(options: ClientOptions):
    """Refuse to start a device that cannot take part (no state directory, too little feedback, a damaged
    state file, a missing ledger where budget was spent); returns its privacy policy (saved with the
    user's flags applied)."""
    from fedpersona.client.device import readiness_problem
    from fedpersona.client.device_state import DeviceState
    from fedpersona.client.policy import policy_for

    if not options.state.is_dir():
        raise UsageError(f"--state {options.state}: no device state here; import feedback first with "
                         f"`fedpersona feedback import FILE --state {options.state}`")
    with DeviceState(options.state, create=False) as state:
        state.check_files()
        problem = state.ledger_problem() or readiness_problem(state)
        if problem:
            raise UsageError(problem)
        return policy_for(state.dir, **dict(options.policy))


def signal_warnings(state_dir: Path) -> list[str]:
    """How the state's model encodes the stored pairs at the default max-length (pairs that carry no
    signal, text it cannot read; ``fedpersona.model.signal``), as warning lines; none before the state
    is bound to a model or when its tokenizer cannot be loaded here."""
    from fedpersona.client.device_state import DeviceState
    from fedpersona.model.signal import check_data

    with DeviceState(state_dir, create=False) as state:
        model = (state.meta() or {}).get("model_id")
        if not model:
            return []
        user = state.memory.user_data()
    try:
        report = check_data([*user.train, *user.test], str(model))
    except UsageError:
        return []
    return report.warnings("the server's --set max-length={n}")


AUTH_RETRY_SECONDS = 10.0  # flwr exits with status 1 for every error, so any early exit is retried


def run_client(options: ClientOptions, *, log: IO[bytes] | None = None) -> int:
    """Serve this device until the SuperNode ends or we are stopped (SIGINT/SIGTERM).

    Returns 0 when stopped by a signal, else the SuperNode's exit status (it exits when it gives up
    reaching the server after ``max_wait_time``, or on a fatal error such as a refused auth key).

    With ``auth_key`` the node has a fixed identity, and a device restarted right after a crash is
    refused while the SuperLink still counts its previous self as online (until that one's heartbeat
    lapses, at most twice the heartbeat interval); so a refusal is retried for that long, plus a margin.
    """
    from fedpersona.client.tls_probe import tls_problem

    options.validate()
    policy = check_device(options)
    host, port = parse_address(options.server, "--server")
    if (problem := tls_problem(host, port, insecure=options.insecure, root_certificates=options.root_certificates)):
        raise UsageError(problem)  # the SuperNode would retry it forever without a word
    print(f"fedpersona: device policy: {policy.describe()} ({options.state / 'policy.json'})", file=sys.stderr,
          flush=True)
    for line in signal_warnings(options.state):
        print(f"fedpersona: warning: {line}", file=sys.stderr, flush=True)
    interrupted = threading.Event()
    stop_event = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        interrupted.set()
        stop_event.set()
        raise KeyboardInterrupt  # interrupts a running task too: every state write is atomic

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code: int | None = None
    retry_until = time.monotonic() + 2 * (options.heartbeat_interval or 30.0) + 30.0
    try:
        with StateGuard(options.state.resolve()):
            while True:
                started = time.monotonic()
                code = _serve_once(options, log, stop_event)
                if interrupted.is_set():
                    return 0
                refused = options.auth_key is not None and code not in (0, None)
                if not refused or time.monotonic() - started > 120 or time.monotonic() > retry_until:
                    break
                _log.warning("the SuperLink refused this device for now (its previous session may still count as "
                             "online); retrying in %.0f s", AUTH_RETRY_SECONDS)
                time.sleep(AUTH_RETRY_SECONDS)
                stop_event = threading.Event()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if code is None else abs(code)


def _serve_once(options: ClientOptions, log: IO[bytes] | None, stop_event: threading.Event) -> int | None:
    """One SuperNode process, served until it exits or ``stop_event``; returns its exit status."""
    port = options.runtime_port or free_port()
    env = child_env({ENV: str(options.heartbeat_interval)} if options.heartbeat_interval else None)
    node = spawn(supernode_command(options, port), log=log, env=env)
    try:
        if options.cold:  # Flower starts a flwr-clientapp per message; we just wait
            node.wait()
        else:
            # import the ClientApp (torch, transformers) while the SuperNode boots in its own process
            import fedpersona.client.app  # noqa: F401
            from fedpersona.client import executor

            wait_for_port("127.0.0.1", port, timeout=120, process=node, what="flower-supernode")
            threading.Thread(target=_stop_when_exits, args=(node, stop_event), daemon=True).start()
            executor.serve(f"127.0.0.1:{port}", stop=stop_event)
    except RuntimeError as err:  # the SuperNode exited before listening: its status says why
        if node.poll() is None:
            raise
        _log.debug("%s", err)
    finally:
        stop_event.set()
        code = stop(node)
    return code


def _stop_when_exits(node: subprocess.Popen[bytes], stop_event: threading.Event) -> None:
    node.wait()
    stop_event.set()
