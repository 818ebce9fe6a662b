"""Deployment commands: ``fedpersona server`` (a SuperLink and one run on it) and ``fedpersona client`` (this
device's SuperNode, bound to the user's state folder).

Commands of this group are added by ``register``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedpersona.config import setting_help


def register(app: typer.Typer) -> None:
    """Add this group's commands to the ``fedpersona`` app."""
    app.command("server")(server)
    app.command("client")(client)


# ---- `fedpersona server` and `fedpersona client` (deployment: a SuperLink and SuperNodes) ------------------
def server(
    state: Annotated[Path, typer.Option("--state", help="Server state folder: database, checkpoints, outputs, logs.")] = Path("server-state"),
    certificates: Annotated[Optional[Path], typer.Option("--certificates", help="Folder with ca.crt, server.pem, server.key (TLS; docker/certs.sh makes them).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (tests on a trusted network only).")] = False,
    host: Annotated[str, typer.Option("--host", help="Address the SuperLink listens on (Fleet, Control and Runtime API).")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port", help="Port of the SuperLink's API.")] = 9092,
    enable_supernode_auth: Annotated[bool, typer.Option("--enable-supernode-auth", help="Only registered SuperNodes may connect.")] = False,
    auth_key: Annotated[list[Path], typer.Option("--auth-key", help="A SuperNode public key (.pub) to register; repeatable.")] = [],
    rounds: Annotated[Optional[int], typer.Option("--rounds", "-r", help="Federated rounds.")] = None,
    min_users: Annotated[Optional[int], typer.Option("--min-users", help="Clients needed before a round starts (and per round).")] = None,
    fraction: Annotated[Optional[float], typer.Option("--fraction", help="Fraction of connected clients trained per round.")] = None,
    round_timeout: Annotated[Optional[float], typer.Option("--round-timeout", help="Seconds a round waits for replies.")] = None,
    scheme: Annotated[Optional[str], typer.Option(help=setting_help("scheme"))] = None,
    strategy: Annotated[Optional[str], typer.Option(help=setting_help("strategy"))] = None,
    model: Annotated[Optional[str], typer.Option(help="'embedded', an HF model id or a local folder (same on every device).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialisation and sampling.")] = None,
    dp: Annotated[bool, typer.Option("--dp/--no-dp", help="Ask for pair-level DP-SGD on every device (default: on; devices require it unless their policy says otherwise).")] = True,
    target_epsilon: Annotated[float, typer.Option(help="Per-user pair-level epsilon over the run (with --dp).")] = 8.0,
    secure_aggregation: Annotated[bool, typer.Option("--secure-aggregation", help=setting_help("secure_aggregation"))] = False,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file of settings.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Any setting key=value (`fedpersona settings` lists them).")] = [],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Outputs (default STATE/out): metrics.jsonl, summary.json.")] = None,
    checkpoint_dir: Annotated[Optional[Path], typer.Option("--checkpoint-dir", help="Per-round checkpoints (default STATE/checkpoints).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run from its last finished round.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard an earlier run's checkpoint and start over.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show the server's log (STATE/logs/fedpersona.log: the ServerApp's and Flower's records) and the SuperLink's own output on the terminal too.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print summary.json to stdout instead of the table.")] = False,
) -> None:
    """Run a Flower SuperLink (TLS, persistent state) and one fedpersona run on it; print its summary.

    The terminal shows what happens (devices connected, each round's training and evaluation as they go,
    a line per round); everything else goes to STATE/logs/fedpersona.log, named at the end."""
    import json
    import signal

    from fedpersona.commands.common import checked_config, say_log

    flags = {"rounds": rounds, "min-users": min_users, "fraction-train": fraction, "round-timeout": round_timeout,
             "scheme": scheme, "strategy": strategy,
             "model": model, "seed": seed, "dp-epsilon": target_epsilon if dp else None,
             "secure-aggregation": True if secure_aggregation else None}
    cfg = checked_config(config, set_, flags)  # settings and model: one line before the SuperLink starts
    _refuse_simulation_only(cfg)
    from rich.console import Console

    from fedpersona.display import LOG_NAME, PROGRESS, ConsoleReporter, QuietReporter, RunLog, summary_table
    from fedpersona.deploy.server import RunFailed, ServerOptions, run_server
    options = ServerOptions(state=state, host=host, port=port, certificates=certificates, insecure=insecure,
                            enable_supernode_auth=enable_supernode_auth, auth_keys=tuple(auth_key), out=out,
                            checkpoint_dir=checkpoint_dir, resume=resume, fresh=fresh, verbose=verbose)
    signal.signal(signal.SIGTERM, _interrupt)  # e.g. `docker stop`: clean up the SuperLink like Ctrl-C
    signal.signal(signal.SIGINT, _interrupt)

    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr, flush=True)
        PROGRESS.info("%s", text)  # the log's copy (never echoed twice)

    log = RunLog(state.resolve() / "logs" / LOG_NAME, verbose=verbose, append=True)
    try:
        with log:
            summary = run_server(cfg, options, say=say,
                                 reporter=QuietReporter() if quiet else ConsoleReporter(unit="devices"))
    except RunFailed as failure:
        print(f"fedpersona: run failed: {failure}" + (f" (log: {log.path})" if log.committed else ""),
              file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as stop:
        number = getattr(stop, "signum", signal.SIGINT)
        where = f"; partial outputs in {options.out_dir} (log: {log.path})" if log.committed else ""
        print(f"fedpersona: stopped ({signal.Signals(number).name}); continue later with --resume{where}",
              file=sys.stderr)
        raise typer.Exit(128 + number) from None
    from fedpersona.server.federation import check_clients_answered

    check_clients_answered(summary, options.out_dir)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        Console().print(summary_table(summary))
        Console().print(f"results: {options.out_dir}/summary.json, metrics.jsonl, per_user.json")
    say_log(log)


def client(
    server_address: Annotated[str, typer.Option("--server", help="The SuperLink's HOST:PORT.")],
    state: Annotated[Path, typer.Option("--state", help="This user's state folder (preference memory, private adapter).")],
    root_certificates: Annotated[Optional[Path], typer.Option("--root-certificates", help="CA certificate that signed the server's (default: system CAs).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (tests on a trusted network only).")] = False,
    auth_key: Annotated[Optional[Path], typer.Option("--auth-key", help="This device's private key (ssh-keygen -t ecdsa -b 384); the server registers its .pub.")] = None,
    runtime_port: Annotated[Optional[int], typer.Option("--runtime-port", help="Local port of the SuperNode's Runtime API (default: a free one).")] = None,
    user_index: Annotated[Optional[int], typer.Option("--user-index", help="The index the server reports this user under (default: from the user id).")] = None,
    cold: Annotated[bool, typer.Option("--cold", help="Let Flower start a process per message (slower; no in-process executor).")] = False,
    max_wait_time: Annotated[Optional[float], typer.Option("--max-wait-time", help="Give up after this many seconds without the server (default: never).")] = None,
    heartbeat_interval: Annotated[Optional[float], typer.Option("--heartbeat-interval", help="Seconds between heartbeats; the server notices a dead device after twice this (Flower's default 30; 10 to 1800).")] = None,
    max_epsilon: Annotated[Optional[float], typer.Option("--max-epsilon", help="Policy: the largest pair-level epsilon you accept over this state's life (default 8; saved in STATE/policy.json).")] = None,
    max_delta: Annotated[Optional[float], typer.Option("--max-delta", help="Policy: the largest delta you accept (default 1e-5).")] = None,
    min_noise_multiplier: Annotated[Optional[float], typer.Option("--min-noise-multiplier", help="Policy: the smallest DP-SGD noise multiplier you accept (default 0: any within --max-epsilon).")] = None,
    require_dp: Annotated[Optional[bool], typer.Option("--require-dp/--allow-no-dp", help="Policy: train only rounds with pair-level DP (default: required).")] = None,
    share_evaluation: Annotated[Optional[bool], typer.Option("--share-evaluation/--keep-evaluation", help="Policy: send held-out accuracies to the server under DP (default: kept on the device).")] = None,
    pin_model: Annotated[Optional[str], typer.Option("--model", help="Policy: train only with this model id (default: the first round's, then bound).")] = None,
    require_secure_aggregation: Annotated[Optional[bool], typer.Option("--require-secure-aggregation/--allow-plain-aggregation", help="Policy: train only rounds under secure aggregation, where the server learns the users' sum and never this device's update (default: plain rounds allowed).")] = None,
    log: Annotated[Optional[Path], typer.Option("--log", help="Where Flower's SuperNode writes its output (default: STATE/logs/supernode.log).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show this device's log (STATE/logs/fedpersona.log: fedpersona's and Flower's records, library warnings) and the SuperNode's output on the terminal too.")] = False,
) -> None:
    """Join a federation from this device: a Flower SuperNode training on the user's own --state.

    The device keeps its own privacy policy (STATE/policy.json; the policy flags change it): by default it
    trains only rounds with pair-level DP at epsilon <= 8 and delta <= 1e-5 over the state's whole life, and
    keeps its held-out accuracies to itself; rounds asking for less privacy are declined with a reason.

    The terminal shows the device's own lines (connected, each round trained, evaluated or declined and
    why); Flower's output goes to STATE/logs/supernode.log and this process's records to
    STATE/logs/fedpersona.log, both named when it starts."""
    import logging
    import threading

    from fedpersona.commands.common import say_log
    from fedpersona.deploy.node import ClientOptions, run_client
    from fedpersona.display import LOG_NAME, PROGRESS, RunLog

    options = ClientOptions(server=server_address, state=state, root_certificates=root_certificates, insecure=insecure,
                            auth_key=auth_key, runtime_port=runtime_port, user_index=user_index, cold=cold,
                            max_wait_time=max_wait_time, heartbeat_interval=heartbeat_interval,
                            policy=(("max_epsilon", max_epsilon), ("max_delta", max_delta),
                                    ("min_noise_multiplier", min_noise_multiplier), ("require_dp", require_dp),
                                    ("share_evaluation", share_evaluation), ("model", pin_model),
                                    ("require_secure_aggregation", require_secure_aggregation)))
    run_log = RunLog(state.resolve() / "logs" / LOG_NAME, verbose=verbose, append=True)
    node_log: list[Path] = []
    stopping = threading.Event()

    def ready(path: Path) -> None:  # the inputs are sound: the log files are created, and named now
        run_log.commit()
        node_log.append(path)
        _one_line_warnings(stopping)
        print(f"fedpersona: logs: {run_log.path} (this device), {path} (Flower's SuperNode)"
              + ("" if verbose else "; --verbose shows them here"), file=sys.stderr, flush=True)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        PROGRESS.info("%s", text)  # the log's copy (never echoed twice)

    httpx = logging.getLogger("httpx")  # a record per Runtime API call (twice a second) otherwise
    httpx_level = httpx.level
    httpx.setLevel(logging.WARNING)
    try:
        with run_log:
            code = run_client(options, node_log=log, verbose=verbose, say=say, ready=ready, stopping=stopping)
    finally:
        httpx.setLevel(httpx_level)
    if code != 0:
        where = node_log[0] if node_log else log
        print(f"fedpersona: the SuperNode exited with status {code}; see {where} (Flower's exit "
              "codes: https://flower.ai/docs/framework/1.41/en/ref-exit-codes.html)"
              + (f"; with --auth-key: is {auth_key}.pub registered on the server?" if auth_key else ""),
              file=sys.stderr)
        say_log(run_log)
        raise typer.Exit(1)
    say_log(run_log)


def _one_line_warnings(stopping) -> None:
    """The terminal's ``fedpersona: warning:`` lines without tracebacks (a failed task's is in the log), and
    none once the device is ``stopping`` (tasks cut short by the stop: in the log only). A task's own
    failure record (``fedpersona.client.watch.note``) stays in the log too: the task's line on the terminal
    already says it (``fedpersona.deploy.node.reporting``)."""
    import logging

    class OneLine(logging.Formatter):
        def __init__(self, inner: logging.Formatter | None) -> None:
            super().__init__()
            self.inner = inner or logging.Formatter()

        def format(self, record: logging.LogRecord) -> str:
            if record.exc_info or record.exc_text:
                record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
            return self.inner.format(record).splitlines()[0]

    for handler in logging.getLogger("fedpersona").handlers:
        if type(handler) is logging.StreamHandler and not isinstance(handler.formatter, OneLine):
            handler.setFormatter(OneLine(handler.formatter))
            handler.addFilter(lambda record: not stopping.is_set() and record.name != "fedpersona.client.watch")


def _refuse_simulation_only(config) -> None:
    """Settings no device would accept (seeded noise, simulated attacks) stop the server before it starts;
    the other simulation-only settings (data, workload caps, ...) are simply not sent to devices."""
    from fedpersona.config import RunConfig
    from fedpersona.errors import UsageError

    defaults = RunConfig()
    for key in ("dp_reproducible", "attack", "attack_users"):
        if getattr(config, key) != getattr(defaults, key):
            raise UsageError(f"{key.replace('_', '-')}={getattr(config, key)!r}: a simulation-only setting; every "
                             "device would decline the rounds (fedpersona simulate takes it)")


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT: unwinds like Ctrl-C (the SuperLink is stopped on the way out), exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Stopped(signum)
