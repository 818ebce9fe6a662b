"""``fedpersona server``: a SuperLink, one fedpersona run submitted to it, followed to its summary.

The server's state folder (``--state DIR``) holds everything that must survive a restart:

- ``superlink.db``: Flower's database (runs, nodes, registered SuperNode keys);
- ``checkpoints/``: one checkpoint per finished round (``fedpersona.server.checkpoint``);
- ``out/``: ``metrics.jsonl`` (a row per round), ``summary.json`` and ``per_user.json`` at the end;
- ``app/pyproject.toml``: the Flower App submitted (the run configuration lives in it);
- ``flwr/``: FLWR_HOME of the SuperLink and of our ``flwr`` CLI calls; ``logs/``: Flower's logs;
- ``run.json``: the id of the run last submitted (a resumed server stops it if still listed running).

Progress comes from ``metrics.jsonl`` (the ServerApp runs on this machine and appends a row per
round) and, between round lines, from what Flower logs (``RunWatch``): devices connected while the
strategy waits for them, each phase as it starts, replies as they arrive. The run is over when
``summary.json`` appears, or when the Control API reports it finished without one (failed or stopped),
in which case the run's log says why.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from fedpersona.config import RunConfig
from fedpersona.errors import UsageError
from fedpersona.io import atomic_write_json
from fedpersona.server.checkpoint import (LATEST, Checkpoint, discard_checkpoints, has_rounds, load_checkpoint,
                                          read_pointer)
from fedpersona.deploy.control import Control, ControlError, write_app
from fedpersona.display import QuietReporter
from fedpersona.server.resume import Checkpointing, finished_rows, restore_rows
from fedpersona.deploy.superlink import SuperLink, SuperLinkOptions, TLSFiles


class RunFailed(RuntimeError):
    """The run ended without a summary; the message says how it ended and where its log is."""


@dataclass(frozen=True)
class ServerOptions:
    state: Path
    host: str = "0.0.0.0"
    port: int = 9092
    certificates: Path | None = None
    insecure: bool = False
    enable_supernode_auth: bool = False
    auth_keys: tuple[Path, ...] = ()
    out: Path | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    fresh: bool = False
    verbose: bool = False
    poll_interval: float = 1.0
    status_every: float = 15.0

    @property
    def out_dir(self) -> Path:
        return (self.out or self.state / "out").resolve()

    @property
    def checkpoints(self) -> Path:
        return (self.checkpoint_dir or self.state / "checkpoints").resolve()

    def tls(self) -> TLSFiles | None:
        """The TLS files, or None with ``--insecure``; neither or both is a UsageError."""
        if self.insecure and self.certificates:
            raise UsageError("--insecure and --certificates contradict each other; TLS is on unless --insecure")
        if self.insecure:
            return None
        if self.certificates is None:
            raise UsageError("TLS is on by default: pass --certificates DIR (ca.crt, server.pem, server.key; "
                             "docker/certs.sh makes them), or --insecure for a test on a trusted network")
        return TLSFiles.from_dir(self.certificates)

    def validate(self, config: RunConfig) -> TLSFiles | None:
        """The TLS files (None with ``--insecure``); UsageError for any contradiction (see ``check``)."""
        return self.check(config)[0]

    def check(self, config: RunConfig) -> tuple[TLSFiles | None, Checkpoint | None]:
        """(TLS files, the checkpoint ``--resume`` continues: None without it). Raises UsageError on
        contradicting options, a resume with nothing (valid) to continue, or an unfinished or damaged
        earlier run's checkpoint met without --resume or --fresh. Writes nothing; with --resume it reads the
        checkpoints and the model's shared-adapter shapes (the ServerApp's tensor check, ``Checkpointing.verify``)."""
        tls = self.tls()
        if not 0 < self.port < 65536:
            raise UsageError(f"--port {self.port}: not a TCP port")
        if self.auth_keys and not self.enable_supernode_auth:
            raise UsageError("--auth-key registers SuperNode keys, which only matters with --enable-supernode-auth")
        if self.enable_supernode_auth and tls is None:
            raise UsageError("--enable-supernode-auth needs TLS: SuperNodes refuse to authenticate over --insecure")
        if self.resume and self.fresh:
            raise UsageError("--resume and --fresh contradict each other")
        for key in self.auth_keys:
            if not key.is_file():
                raise UsageError(f"--auth-key {key}: file not found; give a SuperNode's public key (.pub)")
        where = f"--checkpoint-dir {self.checkpoints}"
        if self.checkpoints.exists() and not self.checkpoints.is_dir():
            raise UsageError(f"{where}: a file, not a folder; point --checkpoint-dir at a folder")
        if self.resume:
            checkpoint = load_checkpoint(self.checkpoints)  # past damaged rounds to the newest that loads
            if checkpoint is None:
                raise UsageError(f"--resume: {where} holds no checkpoint; start without --resume")
            if checkpoint.round >= config.rounds:
                raise UsageError(f"--resume: {where} is at round {checkpoint.round} of {config.rounds} already; raise "
                                 "--rounds to train further")
            resumed = Checkpointing(config, self.checkpoints, False)
            resumed.check_resumable(checkpoint)  # the ServerApp checks too
            resumed.checkpoint = checkpoint  # and falls back past a round whose tensors do not fit (NaN, shapes):
            resumed.verify(shared_spec(config))  # so the round said and resumed from is the one it will use
            return tls, resumed.checkpoint
        if self.fresh:
            return tls, None
        info, problem = read_pointer(self.checkpoints)
        if problem is not None:
            raise UsageError(f"{self.checkpoints / LATEST}: checkpoint pointer damaged ({problem}); add --resume to "
                             "continue from the newest round that loads, or --fresh to discard the checkpoints and "
                             "start over")
        if info is None and has_rounds(self.checkpoints):
            raise UsageError(f"{where} holds round folders but no {LATEST}; add --resume to continue from the newest "
                             "round that loads, or --fresh to discard them and start over")
        if info is not None and not _finished(info):
            raise UsageError(f"{where} holds round {info['round']} of {info.get('num_rounds')} of an unfinished run; "
                             "add --resume to continue it, or --fresh to discard it and start over")
        return tls, None


def shared_spec(config: RunConfig) -> Any:
    """The run's shared tensors (``TensorSpec``), as the ServerApp makes them from the model: what a resumed
    checkpoint must fit."""
    from fedpersona.server.federation import SharedShapes

    return SharedShapes.of(config).spec


def _finished(info: dict[str, Any]) -> bool:
    """Whether a checkpoint pointer names the last round of its run."""
    total = info.get("num_rounds")
    return isinstance(total, int) and int(info["round"]) >= total


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # being written
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows.append(row)
    return rows


def prepare_out(options: ServerOptions, done: int) -> Path | None:
    """Clear what marks a finished run; keep (resume) or drop (fresh) the finished rounds' rows.

    A new run in the default ``STATE/out`` first moves an earlier run's outputs to
    ``STATE/out-<time>`` (returned), so a second run never erases the first one's results.
    """
    out = options.out_dir
    archived = None
    if not done and options.out is None and (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size:
        stamp = datetime.fromtimestamp((out / "metrics.jsonl").stat().st_mtime).strftime("%Y%m%d-%H%M%S")
        archived = out.with_name(f"out-{stamp}")
        out.rename(archived)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    metrics = out / "metrics.jsonl"
    restore_rows(metrics, finished_rows(metrics, done) if done else [])
    return archived


class _Tail:
    """The complete lines appended to a file since this object was made (a file that does not exist yet is
    read from its start once it appears)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def lines(self) -> list[str]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in complete]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RunWatch:
    """What Flower logs about the run, for the progress display, between the round lines of metrics.jsonl.

    The run's log (the ServerApp's output, streamed by ``flwr log`` into ``STATE/logs/run-ID.log``) says
    how many devices are connected while the strategy waits for ``min-users`` of them, when a round starts
    (``[ROUND r/R]``; rounds count on from the checkpoint when resumed), when a phase's messages go out
    (``configure_train: Sampled k nodes (out of n)``) and when its replies are in (``aggregate_train:
    Received a results and f failures``). The SuperLink's log says when each reply arrives (``Push replies
    from node_id``): the live count of a phase. Every line of the run's log is also copied into the
    server's own log (logger ``serverapp``). Lines Flower words otherwise (another strategy) only go
    unreported."""

    WAITING = re.compile(r"Waiting for nodes to connect: (\d+) connected \(minimum required: (\d+)\)")
    ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")
    SAMPLED = re.compile(r"configure_(train|evaluate): Sampled (\d+) nodes \(out of (\d+)\)")
    RECEIVED = re.compile(r"aggregate_(train|evaluate): Received (\d+) results and (\d+) failures")
    PUSHED = "Push replies from node_id"

    def __init__(self, run_log: Path, superlink_log: Path | None, reporter: Any, *, done: int = 0) -> None:
        self.run_log = _Tail(run_log)
        self.superlink_log = _Tail(superlink_log) if superlink_log is not None else None
        self.reporter = reporter
        self.done = done
        self.copy = logging.getLogger("serverapp")
        self.round = done
        self.phase: str | None = None  # "train" / "evaluate" while one runs
        self.total = 0  # messages sent in the current phase
        self.connected = 0  # nodes Flower last counted
        self.needed: int | None = None  # while Flower waits for nodes: how many it needs
        self.pushed = 0  # replies the SuperLink has received since this watch began
        self._waiting: tuple[str, str] | None = None  # counts of the last waiting line copied to the log
        self._repeats = 0  # identical waiting lines since, not copied
        self.base = 0  # self.pushed when the current phase began

    def poll(self) -> None:
        if self.superlink_log is not None:
            self.pushed += sum(self.PUSHED in line for line in self.superlink_log.lines())
        for raw in self.run_log.lines():
            line = _ANSI.sub("", raw).rstrip()
            if line.strip():
                self._copy(line)
            self.read(line)
        if self.phase is not None and self.superlink_log is not None:
            self.reporter.replies(min(max(self.pushed - self.base, 0), self.total), self.total)

    def _copy(self, line: str) -> None:
        """Copy a line of the run's log into the server's log; Flower's waiting line, which it repeats every
        second while too few devices are connected, once per change of its counts (then how often it came)."""
        match = self.WAITING.search(line)
        state = (match[1], match[2]) if match else None
        if state is not None and state == self._waiting:
            self._repeats += 1
            return
        if self._repeats:
            self.copy.info("(the waiting line above came %d more times)", self._repeats)
            self._repeats = 0
        self._waiting = state
        self.copy.info("%s", line)

    def read(self, line: str) -> None:
        """One line of the run's log."""
        if match := self.WAITING.search(line):
            self.phase, self.needed = None, int(match[2])
            self.reporter.waiting(int(match[1]), self.needed)
        elif match := self.ROUND.search(line):
            self.round = self.done + int(match[1])
        elif match := self.SAMPLED.search(line):
            self.connected = int(match[3])
            if self.needed is not None:  # the wait is over: say how many are there
                self.reporter.waiting(self.connected, self.needed)
                self.needed = None
            self._begin(match[1], int(match[2]))
        elif match := self.RECEIVED.search(line):
            kind, answered = match[1], int(match[2]) + int(match[3])
            self.reporter.replies(answered, max(self.total, answered))
            self.phase = None
            if kind == "train":  # the evaluation of every connected device follows
                self._begin("evaluate", self.connected or self.total)

    def _begin(self, phase: str, total: int) -> None:
        if phase == "evaluate" and self.phase == "evaluate":  # configure_evaluate after our guess: its count
            self.total = total
            return
        self.phase, self.total, self.base = phase, total, self.pushed
        self.reporter.phase(self.round, phase)
        self.reporter.replies(0, total)


def follow(control: Control, link: SuperLink, run_id: int, options: ServerOptions, reporter: Any,
           *, done: int, watch: RunWatch | None = None) -> dict[str, Any]:
    """Report rounds as ``metrics.jsonl`` grows (and, with ``watch``, what happens between them); return
    ``summary.json`` when it appears."""
    out = options.out_dir
    last = done
    next_status = time.monotonic() + options.status_every
    while True:
        if watch is not None:
            watch.poll()
        for row in _read_rows(out / "metrics.jsonl"):
            if row["round"] > last:
                last = row["round"]
                reporter.round_done(row)
        summary_path = out / "summary.json"
        if summary_path.exists():
            return json.loads(summary_path.read_text(encoding="utf-8"))
        if not link.alive():
            raise RunFailed(f"the SuperLink exited during run {run_id}; see {link.options.log_path}")
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + options.status_every
            try:
                status = control.run_status(run_id)
            except (ControlError, OSError):
                status = "unknown"
            if status.startswith("finished"):
                time.sleep(2 * options.poll_interval)  # the summary may be landing right now
                if summary_path.exists():
                    continue
                raise RunFailed(f"run {run_id} ended {status} without a summary; its log: "
                                f"{options.state / 'logs' / f'run-{run_id}.log'}")
        time.sleep(options.poll_interval)


def _stop_stale_run(control: Control, state: Path) -> None:
    """A server killed mid-run leaves its run listed as running in the database: stop it."""
    try:
        previous = json.loads((state / "run.json").read_text(encoding="utf-8"))
        run_id = int(previous["run_id"])
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return
    try:
        if not control.run_status(run_id).startswith("finished"):
            control.stop_run(run_id)
    except (ControlError, OSError):
        pass


def run_server(config: RunConfig, options: ServerOptions, *, reporter: Any = None,
               say: Any = print) -> dict[str, Any]:
    """Start the SuperLink, submit the run, follow it; returns the run's summary."""
    reporter = reporter or QuietReporter()
    tls, checkpoint = options.check(config)
    state = options.state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    from fedpersona.display import RunLog

    if RunLog.active is not None:  # the options are sound: the server's log is written from here on
        RunLog.active.commit()
        RunLog.active.note("fedpersona server: state %s, run configuration %s", state, config.to_flat())
    done = checkpoint.round if checkpoint else 0
    if not options.resume:  # --fresh, or an earlier run that finished: its checkpoints only, never a user's files
        removed, kept = discard_checkpoints(options.checkpoints)
        if removed:
            say(f"the earlier run's checkpoints ({removed} round folder{'s' if removed > 1 else ''}) removed from "
                f"{options.checkpoints}"
                + (f"; {len(kept)} other entries there kept as they were" if kept else ""))
    archived = prepare_out(options, done)
    if archived:
        say(f"the earlier run's outputs moved to {archived}")
    run_config = {**config.to_flat(), "out-dir": str(options.out_dir), "checkpoint-dir": str(options.checkpoints),
                  "resume": bool(options.resume), "deployment": True}
    app_dir = write_app(state / "app", run_config)
    link_options = SuperLinkOptions(state=state, host=options.host, port=options.port, tls=tls,
                                    enable_supernode_auth=options.enable_supernode_auth)
    control = Control(home=link_options.flwr_home, address=link_options.local_address,
                      root_certificates=tls.ca if tls else None, insecure=tls is None)
    control.write_config()
    log_stream = None
    log_file: IO[bytes] | None = None
    with SuperLink(link_options, echo=options.verbose) as link:
        say(f"SuperLink listening on {options.host}:{options.port} ({'TLS' if tls else 'INSECURE, no TLS'}"
            f"{', SuperNode authentication on' if options.enable_supernode_auth else ''}); state in {state}")
        for key in options.auth_keys:
            say(f"SuperNode key {key}: {control.register_node(key)}")
        if options.resume:
            _stop_stale_run(control, state)
        try:
            run_id = control.submit(app_dir)
        except ControlError as err:
            hint = ("; this machine reaches the SuperLink at 127.0.0.1, so the server certificate must name "
                    "127.0.0.1 (docker/certs.sh certificates do)"
                    if any(w in str(err).lower() for w in ("certificate", "ssl", "tls")) else "")
            raise RunFailed(f"{err}{hint}") from None
        atomic_write_json(state / "run.json", {"run_id": run_id, "resume_from_round": done,
                                               "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        say(f"run {run_id} submitted: {config.rounds} rounds"
            f"{f' (resuming after round {done})' if done else ''}, waiting for {config.min_users} clients; "
            f"outputs in {options.out_dir}")
        log_path = state / "logs" / f"run-{run_id}.log"
        if RunLog.active is not None:
            RunLog.active.note("the run's own log (the ServerApp's output, copied below as `serverapp`): %s; "
                               "the SuperLink's: %s", log_path, link_options.log_path)
        try:
            log_file = log_path.open("ab")
            watch = RunWatch(log_path, None if options.verbose else link_options.log_path, reporter, done=done)
            log_stream = control.stream_logs(run_id, log_file)
            reporter.start(config.rounds, done)
            try:
                return follow(control, link, run_id, options, reporter, done=done, watch=watch)
            finally:
                reporter.stop()
        finally:
            if log_stream is not None:
                log_stream.terminate()
                try:
                    log_stream.wait(timeout=5)
                except Exception:  # noqa: BLE001
                    log_stream.kill()
            if log_file is not None:
                log_file.close()
