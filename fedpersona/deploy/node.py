"""``fedpersona client``: this device's Flower SuperNode, bound to the user's state directory.

It starts ``flower-supernode`` (CPU) as a child process that dies with this one, with node config
``state-dir='DIR'`` so the ClientApp works on the user's own data and adapters
(``fedpersona.client.device``), a Runtime API port of its own (several clients can share a machine),
TLS towards the server by default, and optional SuperNode authentication (``--auth-key``).

By default the ClientApp's tasks run in this process (``fedpersona.deploy.executor``: the model is
loaded once); ``cold=True`` leaves them to Flower, which starts one ``flwr-clientapp`` per message.

What the terminal shows: the device's own lines (its policy, connected to the server, each round's
phases while it runs: reference log-probs, training step k of K, evaluation; each round trained,
evaluated or declined and why, a task that failed, with the whole reason although the server is told a
code only; a stop line on Ctrl-C saying what was cut short). Flower's SuperNode writes its output to
``STATE/logs/supernode.log`` (``--log``), and this process's records (fedpersona's, Flower's runtime
client, library warnings) go to ``STATE/logs/fedpersona.log``; both are named when the client starts
(``--verbose`` shows them on the terminal as well).

Restarts: nothing the device needs lives in this process. A client killed at any moment (power loss,
SIGKILL) is restarted with the same ``--state`` and rejoins: every state file is written atomically,
so it finds its last complete private adapter, ledger and memory; the SuperNode registers again (a
new node id without authentication, the same one with ``--auth-key``) and takes the next message.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fedpersona.deploy.supernode_main import ENV
from fedpersona.errors import UsageError
from fedpersona.io import acquire_pid_lock, release_pid_lock
from fedpersona.deploy.processes import child_env, executable, free_port, parse_address, spawn, stop, wait_for_port

_log = logging.getLogger(__name__)
GUARD_FILE = ".client.lock"  # held by the one `fedpersona client` serving a state directory
LOG_DIR = "logs"  # STATE/logs: the client's log files (nothing of the user's data goes in them)
NODE_LOG = "supernode.log"  # Flower's SuperNode output (default of --log)


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
    # the user's privacy policy flags (fedpersona.device.policy.DevicePolicy fields; None: keep the saved value)
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
        from fedpersona.device.policy import DevicePolicy

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
    else:  # Flower has no flag for it: see fedpersona.deploy.supernode_main
        launcher = [sys.executable, "-m", "fedpersona.deploy.supernode_main"]
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
    from fedpersona.device.state import DeviceState
    from fedpersona.device.policy import DevicePolicy, policy_for

    if not options.state.is_dir():
        raise UsageError(f"--state {options.state}: no device state here; import feedback first with "
                         f"`fedpersona feedback import FILE --state {options.state}`")
    with DeviceState(options.state, create=False) as state:
        state.check_files()
        given = {k: v for k, v in options.policy if v is not None}  # the flags, saved below once all is well
        policy = dataclasses.replace(DevicePolicy.load(state.dir) or DevicePolicy(), **given)
        # a device whose policy admits rounds without DP may have trained without a ledger; a DP round is
        # then declined ("ledger-missing", client.device.train_on_device), as it is for a running device
        problem = (state.ledger_problem() if policy.require_dp else None) or readiness_problem(state)
        if problem:
            raise UsageError(problem)
        return policy_for(state.dir, **dict(options.policy))


def signal_warnings(state_dir: Path) -> list[str]:
    """How the state's model encodes the stored pairs at the default max-length (pairs that carry no
    signal, text it cannot read; ``fedpersona.model.signal``), as warning lines; none before the state
    is bound to a model or when its tokenizer cannot be loaded here."""
    from fedpersona.device.state import DeviceState
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


def node_log_path(options: ClientOptions, given: Path | None = None) -> Path:
    """Where Flower's SuperNode writes: ``--log`` if given, else ``STATE/logs/supernode.log``."""
    return given if given is not None else options.state / LOG_DIR / NODE_LOG


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_client(options: ClientOptions, *, node_log: Path | None = None, verbose: bool = False,
               say: Callable[[str], None] = _stderr, ready: Callable[[Path], None] | None = None,
               stopping: threading.Event | None = None) -> int:
    """Serve this device until the SuperNode ends or we are stopped (SIGINT/SIGTERM).

    Returns 0 when stopped by a signal, else the SuperNode's exit status (it exits when it gives up
    reaching the server after ``max_wait_time``, or on a fatal error such as a refused auth key).

    ``say`` shows the device's own lines (connected, each round's outcome); the SuperNode writes to
    ``node_log`` (default ``STATE/logs/supernode.log``), shown through ``say``'s stream too when ``verbose``.
    ``ready(node_log)`` is called once the inputs are sound, before anything is written (the caller's own
    log file is created then: bad input leaves no file behind). ``stopping`` is set when a signal stops
    the device, and when it ends otherwise: what tasks cut short log after it is shutdown noise (the
    caller keeps it off the terminal; its log keeps it).

    With ``auth_key`` the node has a fixed identity, and a device restarted right after a crash is
    refused while the SuperLink still counts its previous self as online (until that one's heartbeat
    lapses, at most twice the heartbeat interval); so a refusal is retried for that long, plus a margin.
    """
    from fedpersona.deploy.tls_probe import tls_problem

    options.validate()
    policy = check_device(options)
    host, port = parse_address(options.server, "--server")
    if (problem := tls_problem(host, port, insecure=options.insecure, root_certificates=options.root_certificates)):
        raise UsageError(problem)  # the SuperNode would retry it forever without a word
    node_log = node_log_path(options, node_log)
    node_log.parent.mkdir(parents=True, exist_ok=True)
    if ready is not None:
        ready(node_log)
    print(f"fedpersona: device policy: {policy.describe()} ({options.state / 'policy.json'})", file=sys.stderr,
          flush=True)
    for line in signal_warnings(options.state):
        print(f"fedpersona: warning: {line}", file=sys.stderr, flush=True)
    interrupted = threading.Event()
    stop_event = threading.Event()
    stopping = stopping if stopping is not None else threading.Event()
    activity = Activity()

    def on_signal(signum: int, _frame: object) -> None:
        if not stopping.is_set():
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            say(f"stopping ({name}): {activity.describe()}")
        stopping.set()
        interrupted.set()
        stop_event.set()
        raise KeyboardInterrupt  # interrupts a running task too: every state write is atomic

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code: int | None = None
    retry_until = time.monotonic() + 2 * (options.heartbeat_interval or 30.0) + 30.0
    handle = node_log.open("ab")
    watch = NodeWatch(node_log, handle.tell(), options, say, echo=verbose)
    watch.start()
    try:
        with StateGuard(options.state.resolve()):
            say(f"connecting to the server at {options.server} ...")
            while True:
                started = time.monotonic()
                code = _serve_once(options, handle, stop_event, say, activity)
                if interrupted.is_set():
                    return 0
                refused = options.auth_key is not None and code not in (0, None)
                if not refused or time.monotonic() - started > 120 or time.monotonic() > retry_until:
                    break
                say(f"the server refused this device for now (its previous session may still count as online); "
                    f"retrying in {AUTH_RETRY_SECONDS:.0f} s")
                time.sleep(AUTH_RETRY_SECONDS)
                stop_event = threading.Event()
    except KeyboardInterrupt:
        return 0
    finally:
        stopping.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _join_tasks(5.0)  # tasks cut short by the stop end here, while the log is still open
        watch.finish()
        handle.close()
    return 1 if code is None else abs(code)


def _join_tasks(timeout: float) -> None:
    """Wait up to ``timeout`` seconds for the executor's task threads (``task-ID``) to end; with the
    SuperNode gone their Runtime API calls fail at once."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name.startswith("task-") and thread is not threading.current_thread():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


def _serve_once(options: ClientOptions, log: IO[bytes] | None, stop_event: threading.Event,
                say: Callable[[str], None] = _stderr, activity: Activity | None = None) -> int | None:
    """One SuperNode process, served until it exits or ``stop_event``; returns its exit status."""
    port = options.runtime_port or free_port()
    env = child_env({ENV: str(options.heartbeat_interval)} if options.heartbeat_interval else None)
    node = spawn(supernode_command(options, port), log=log, env=env)
    try:
        if options.cold:  # Flower starts a flwr-clientapp per message; we just wait
            node.wait()
        else:
            # import the ClientApp (torch, transformers) while the SuperNode boots in its own process
            from fedpersona.deploy import executor
            from fedpersona.client.app import app as client_app

            wait_for_port("127.0.0.1", port, timeout=120, process=node, what="flower-supernode")
            threading.Thread(target=_stop_when_exits, args=(node, stop_event), daemon=True).start()
            executor.serve(f"127.0.0.1:{port}", stop=stop_event, client_app=reporting(client_app, say, activity))
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


# ---- what the terminal shows ----------------------------------------------------------------------------
class Activity:
    """What this device is doing now (a task's round and phase), for the stop line on Ctrl-C."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._task: str | None = None
        self._phase = ""

    def start(self, where: str, kind: str) -> None:
        with self._lock:
            self._task, self._phase = where, {"train": "training", "evaluate": "evaluating"}.get(kind, kind)

    def phase(self, text: str) -> None:
        with self._lock:
            self._phase = text

    def finish(self) -> None:
        with self._lock:
            self._task = None

    def describe(self) -> str:
        """``round 3 was training (step 2 of 8): it stops here, nothing of it is sent`` or ``no round was
        running``."""
        with self._lock:
            if self._task is None:
                return "no round was running"
            return f"{self._task} was {self._phase}: it stops here, and nothing of it is sent"


class PhaseLines:
    """The terminal's lines of a round's phases (``fedpersona.client.watch`` progress): the start of the
    reference log-probs and of the evaluation, and training step k of K (the first, the last, and one
    every ``every`` seconds between)."""

    def __init__(self, where: str, say: Callable[[str], None], activity: Activity | None = None,
                 every: float = 5.0) -> None:
        self.where, self.say, self.activity, self.every = where, say, activity, every
        self.last = -math.inf

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase == "train":
            text = f"training step {done} of {total}"
            if self.activity is not None:
                self.activity.phase(text)
            if done == 0 or (done < total and done != 1 and now - self.last < self.every):
                return
        elif phase == "reference":
            text = f"computing reference log-probs of {total} pairs (once per pair)"
            if self.activity is not None:
                self.activity.phase(f"computing reference log-probs ({done} of {total} pairs)")
            if done != 0:
                return
        elif phase == "evaluate":
            text = "evaluating on your held-out pairs"
            if self.activity is not None:
                self.activity.phase("evaluating")
            if done != 0:
                return
        else:
            return
        self.last = now
        self.say(f"{self.where}: {text}")


def reporting(client_app: Any, say: Callable[[str], None], activity: Activity | None = None) -> Callable[..., Any]:
    """``client_app`` as the executor calls it, plus the device's own lines: the round's phases while it runs
    (``PhaseLines``) and one line per task on what the device did with the round (trained, evaluated,
    declined and why, failed and why). The lines are the user's own: they may say what the server never
    learns (the true pair count under DP, the reason behind a code: ``fedpersona.client.watch``)."""
    from fedpersona.client.watch import TaskWatch, watching

    def run(message: Any, context: Any) -> Any:
        kind = str(message.metadata.message_type).split(".", 1)[0]
        config = message.content.config_records.get("config")
        server_round = config.get("server-round") if config is not None else None
        where = f"round {server_round}" if isinstance(server_round, int) else f"run {message.metadata.run_id}"
        watch = TaskWatch(on_progress=PhaseLines(where, say, activity))
        started = time.monotonic()
        if activity is not None:
            activity.start(where, kind)
        try:
            with watching(watch):
                reply = client_app(message=message, context=context)
        except Exception as err:
            say(f"{where}: {kind} failed on this device: {_first_line(err)} (details in the log)")
            raise
        finally:
            if activity is not None:
                activity.finish()
        if message.metadata.message_type == SECURE_TRAIN:  # a secure-aggregation stage (fedpersona.client.secure)
            from fedpersona.client.secure import describe_secure_reply

            say(f"{where}: {describe_secure_reply(message, reply, watch.notes)}  [{time.monotonic() - started:.0f} s]")
            return reply
        say(f"{where}: {describe_reply(kind, reply, context, watch.notes)}  [{time.monotonic() - started:.0f} s]")
        return reply

    return run


SECURE_TRAIN = "train.secure_aggregation"  # fedpersona.protocol.SECURE_AGGREGATION_ACTION's message type


def describe_reply(kind: str, reply: Any, context: Any = None, notes: list[str] | tuple[str, ...] = ()) -> str:
    """One line on a ClientApp reply: ``trained on your 17 training pairs (2 steps, epsilon 0.41 spent)``,
    ``declined to train: ... (epsilon-above-policy)``, ``evaluated: personalized 0.750, ...``; ``notes``:
    what the device noted on the task (``fedpersona.client.watch``: the reason behind the code sent)."""
    from fedpersona.protocol import DECLINED, METRICS, REASON, STATUS

    if reply.has_error():
        return notes[-1] if notes else f"{kind} failed on this device (the server is told: {reply.error.reason})"
    content = reply.content
    metrics = content.metric_records.get(METRICS) or {}
    status = content.config_records.get(STATUS)
    verb = {"train": "train", "evaluate": "evaluate"}.get(kind, f"answer the {kind} message")
    if metrics.get(DECLINED):
        reason = str(status.get(REASON, "")) if status is not None else ""
        if reason == "evaluation-private":
            return "evaluated nothing for the server: your policy keeps the accuracies on this device " \
                   "(--share-evaluation sends them)"
        return f"declined to {verb}: {notes[-1] if notes else reason} (the server is told only the code)"
    epsilon = metrics.get("epsilon")
    spent = f"epsilon {float(epsilon):.2f} spent so far" if epsilon is not None else "no DP"
    if kind == "train":
        pairs = _train_pairs(context)
        steps = metrics.get("train-steps")
        what = f"your {pairs} training pairs" if pairs is not None else "your training pairs"
        return f"trained on {what} ({f'{int(steps)} steps, ' if steps is not None else ''}{spent})"
    if kind == "evaluate":
        accuracies = [f"{name[4:]} {float(value):.3f}" for name, value in metrics.items()
                      if name.startswith("acc-") and isinstance(value, (int, float))]
        return f"evaluated on {int(metrics.get('num-examples', 0))} held-out pairs" + (
            f": {', '.join(accuracies)} (sent to the server)" if accuracies else "")
    return f"answered the server's {kind} message"


def _train_pairs(context: Any) -> int | None:
    try:
        from fedpersona.client.device import device_for

        state = device_for(context.node_config)
        return None if state is None else int(state.memory.stats()["train"])
    except Exception:  # noqa: BLE001 - a count for a status line; the reply went out all the same
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NODE_ID = re.compile(r"SuperNode ID: (\S+)")
_ROUND = re.compile(r"\[RUN (\d+), ROUND (\d+)\]")
_RECEIVING = re.compile(r"Receiving: (\w+)")


class NodeWatch(threading.Thread):
    """Follows the SuperNode's log from ``start``: says when the device is connected to the server (again),
    when the server does not answer, and with ``--cold`` each task received (the outcome is in Flower's
    log then); with ``echo`` every line goes to the terminal too (``--verbose``)."""

    def __init__(self, path: Path, start: int, options: ClientOptions, say: Callable[[str], None],
                 echo: bool = False) -> None:
        super().__init__(daemon=True, name="supernode-log")
        self.path, self.start_at, self.options, self.say, self.echo = path, start, options, say, echo
        self.done = threading.Event()
        self.connected: bool | None = None  # None: not yet; False: was, lost
        self.waiting_said = False
        self.round: str | None = None

    def run(self) -> None:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.start_at)
                pending = b""
                while True:
                    finishing = self.done.is_set()
                    chunk = handle.read()
                    if chunk:
                        pending += chunk
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            self.line(line.decode("utf-8", errors="replace").rstrip("\r"))
                    elif finishing:
                        return
                    else:
                        self.done.wait(0.25)
        except Exception as err:  # noqa: BLE001 - the device serves on without these lines
            _log.info("stopped following %s: %s", self.path, err)

    def line(self, raw: str) -> None:
        if self.echo:
            print(raw, file=sys.stderr, flush=True)
        text = _ANSI.sub("", raw)
        if (found := _NODE_ID.search(text)) is not None:
            again = " again" if self.connected is False else ""
            self.say(f"connected{again} to the server at {self.options.server} (node {found.group(1)}); "
                     "waiting for rounds")
            self.connected, self.waiting_said = True, False
        elif "Connection attempt failed" in text and not self.waiting_said:
            lost = self.connected is True
            self.connected = False if lost else self.connected
            limit = (f" for up to {self.options.max_wait_time:g} s" if self.options.max_wait_time is not None
                     else " until it answers")
            self.say(f"{'lost the server' if lost else 'the server'} at {self.options.server}"
                     f"{'' if lost else ' does not answer yet'}; retrying{limit}")
            self.waiting_said = True
        elif self.options.cold:
            if (found := _ROUND.search(text)) is not None:
                self.round = found.group(2)
            elif (found := _RECEIVING.search(text)) is not None:
                self.say(f"round {self.round or '?'}: {found.group(1)} task received (--cold: Flower runs it "
                         f"in a process of its own; its outcome is in {self.path})")

    def finish(self) -> None:
        """Read what is left, then stop."""
        self.done.set()
        self.join(timeout=5)
