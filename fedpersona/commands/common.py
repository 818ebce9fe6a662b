"""What every command shares: the run configuration from files, ``--set`` and flags; a clean stop on
SIGTERM/SIGINT; the closing ``log: PATH`` line.

Commands import these helpers; ``fedpersona.cli`` only assembles the commands (no command imports the
CLI module, so the two never import each other).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from fedpersona.errors import UsageError


def config_from(config_file: Optional[Path], settings: list[str], flags: dict[str, Any]):
    """Defaults < --config TOML < --set key=value < explicit flags; validated once, here. Under DP, the
    settings none of these set take the DP defaults (``RunConfig.with_dp_defaults``)."""
    from fedpersona.config import RunConfig

    table = RunConfig.read_toml(config_file) if config_file else {}
    explicit = set(table)
    config = RunConfig.from_flat(table, source=str(config_file)) if config_file else RunConfig()
    pairs = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected key=value (any setting of fedpersona/config.py)")
        pairs[key.strip()] = value.strip()
    config = RunConfig.from_flat(pairs, config, source="--set") if pairs else config
    given = {k: v for k, v in flags.items() if v is not None}
    config = RunConfig.from_flat(given, config, source="command line") if given else config
    return config.with_dp_defaults(explicit | set(pairs) | set(given))


def checked_config(config_file: Optional[Path], settings: list[str], flags: dict[str, Any]):
    """``config_from`` and the model it names (``model.loading.check_model``): a bad setting or ``--model``
    is one line and exit 2 in a second or two, before a command imports Flower, Ray or transformers."""
    from fedpersona.model.loading import check_model

    cfg = config_from(config_file, settings, flags)
    check_model(cfg.model)
    return cfg


STOP_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as a shell reports it
_STOP: dict[str, Any] = {"out": None}


def _stop_now(signum: int, frame: object) -> None:
    """One line, the run's log closed with a note, and out at once with 143 (SIGTERM) or 130 (SIGINT).

    ``os._exit``: no interpreter shutdown while Ray's, gRPC's and torch's native threads still run (their
    C++ destructors abort with "terminate called without an active exception"). The Ray processes this
    run started are killed first (``launcher.kill_ray``); what the run wrote so far (metrics.jsonl's
    finished rounds, the log) stays."""
    display = sys.modules.get("fedpersona.display")  # not imported yet: no display, no log
    name = signal.Signals(signum).name
    out, log = _STOP["out"], display.RunLog.active if display is not None else None
    where = ""
    if out is not None and Path(out).is_dir():
        where = f"; partial outputs in {out}" + (f" (log: {log.path})" if log is not None and log.committed else "")
    try:
        if display is not None:
            display.stop_live_displays()  # its last frame, the cursor shown again
        print(f"fedpersona: stopped ({name}){where}", file=sys.stderr, flush=True)
        if log is not None:
            log.note("stopped by %s", name)
        sys.stdout.flush()
        if (launcher := sys.modules.get("fedpersona.simulations.launcher")) is not None:
            launcher.kill_ray()  # Ray's processes of this run, none left behind
    finally:
        os._exit(STOP_CODES.get(signum, 128 + signum))


def stop_cleanly(out: Path | None) -> None:
    """For commands that run a simulation: SIGTERM and SIGINT end the run with one line (``_stop_now``).
    ``main`` puts the previous handlers back when the command returns."""
    _STOP["out"] = out
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_CODES:
            signal.signal(sig, _stop_now)


def say_log(log: Any) -> None:
    """The run's last line: where its log is (stderr: stdout keeps the results, --json stays parseable)."""
    if log is not None and log.committed:
        sys.stdout.flush()
        print(f"log: {log.path}", file=sys.stderr, flush=True)


def with_format(data: str | None, data_format: str | None) -> str | None:
    """``--data PATH --format F`` as the one data spec ``F:PATH`` (``--format pairs``/``None``: the path).

    Raises:
        UsageError: ``--format`` without ``--data``.
    """
    if not data_format or data_format == "pairs":
        return data
    if data is None:
        raise UsageError(f"--format {data_format}: give the file with --data")
    return f"{data_format}:{data}"
