"""What a person watching a run sees: live progress while it runs, a table when it ends; and the run's
log file, which takes everything else.

On a terminal: a progress bar (round r/R, users done in the current phase, running accuracy). Off a
terminal (CI logs, pipes): a line when a phase starts, a heartbeat line while a long one runs, one line
per round. ``QuietReporter`` prints nothing. Both write their lines to the ``fedpersona.progress`` logger
too, so the run's log (``RunLog``) tells the same story next to Flower's and Ray's own records.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


HEARTBEAT = 30.0  # seconds between progress lines of one phase when the output is not a terminal


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _generation(gen: dict[str, Any] | None) -> str:
    """The summary's ``generation`` as one line per decoding: at the user's pole (where judged) and repeated
    3-grams, personalized vs global; "" when there is none."""
    lines = []
    for decoding, models in (gen or {}).items():
        if not isinstance(models, dict) or "personal" not in models or "global" not in models:
            continue
        p, g = models["personal"], models["global"]
        pole = f"at pole {_pct(p.get('pole'))} vs {_pct(g.get('pole'))}, " if "pole" in p else ""
        lines.append(f"{decoding}: {pole}repeated 3-grams {_pct(p.get('rep3'))} vs {_pct(g.get('rep3'))}")
    return "\n".join(lines)


def _reasons(counts: dict[str, int] | None) -> str:
    """``{"non-finite": 2, "bad-weight": 1}`` -> ``"3 (non-finite 2, bad-weight 1)"``; "" for none."""
    total = sum((counts or {}).values())
    return f"{total} ({', '.join(f'{r} {n}' for r, n in counts.items())})" if total else ""


def population_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """End-table rows of a heterogeneous population or a round deadline (issue 25): simulated time and
    why selected users did not count, then personalized accuracy per device tier and privacy group where
    there are several; none for today's uniform population without a deadline."""
    counts = [(key.removesuffix("_users"), summary.get(key) or 0) for key in
              ("unavailable_users", "declined_users", "dropped_users", "late_users", "surplus_users", "unfit_users")]
    if summary.get("population") in (None, "uniform") and not any(n for _, n in counts):
        return []
    rows = []
    if summary.get("simulated_seconds") is not None:
        rows.append(("simulated time", f"{summary['simulated_seconds'] / 3600:.2f} h ({summary['population']})"))
    rows.append(("users not counted (summed over rounds)", ", ".join(f"{k} {n:,}" for k, n in counts)))
    groups = summary.get("accuracy_by_group") or {}
    for kind in ("tier", "privacy"):
        picked = {k.split(":", 1)[1]: v for k, v in groups.items() if k.startswith(kind + ":")}
        if len(picked) > 1:
            rows.append((f"personalized acc by {kind} (rounds trained)", ", ".join(
                f"{name} {_pct(g.get('personalized_accuracy_mean'))} ({g.get('rounds_trained') or 0:.1f})"
                for name, g in picked.items())))
    return rows


NAMED = 4  # users named per reason on a round line (the rest counted)


def _who(row: dict[str, Any]) -> dict[str, list[str]]:
    """Reason -> who was rejected for it (``{phase}_rejected_by`` of the row: users, not node ids)."""
    names: dict[str, list[str]] = {}
    for phase in ("train", "eval"):
        for who, reason in row.get(f"{phase}_rejected_by") or []:
            names.setdefault(str(reason), []).append(str(who))
    return names


def set_apart(row: dict[str, Any]) -> str:
    """The round's rejected, declined and failed replies, both phases, for the round line ("" when none):
    each reason with its count and, for rejections, who (``rejected 2 (non-finite 2: user 3, user 7)``);
    then the accepted replies whose influence was bounded (``clipped 1``, ``weight-capped 1``)."""
    parts = []
    names = _who(row)
    for kind in ("rejected", "declined"):
        counts: dict[str, int] = {}
        for phase in ("train", "eval"):
            for reason, n in (row.get(f"{phase}_{kind}_reasons") or {}).items():
                counts[reason] = counts.get(reason, 0) + n
        total = sum(counts.values())
        if not total:
            continue
        items = []
        for reason, n in counts.items():
            shown = names.get(reason, [])[:NAMED] if kind == "rejected" else []
            more = f", +{n - len(shown)} more" if shown and n > len(shown) else ""
            items.append(f"{reason} {n}" + (f": {', '.join(shown)}{more}" if shown else ""))
        parts.append(f"{kind} {total} ({('; ' if kind == 'rejected' and names else ', ').join(items)})")
    failed = int(row.get("train_failures") or 0) + int(row.get("eval_failures") or 0)
    if failed:  # a ClientApp error: the reason is in the client's log, the count belongs on the console
        parts.append(f"failed {failed}")
    for key, label in (("train_clipped", "clipped"), ("train_weight_capped", "weight-capped")):
        if row.get(key):
            parts.append(f"{label} {row[key]}")
    return "  ".join(parts)


PROGRESS = logging.getLogger("fedpersona.progress")  # the progress lines, in the run's log as well


class QuietReporter:
    """Prints nothing; the run's log (if one is open) still gets what a ``ConsoleReporter`` would show."""

    def start(self, num_rounds: int, done: int = 0) -> None: ...

    def waiting(self, connected: int, needed: int) -> None:
        """A line when the count changes: Flower says the same every second while it waits."""
        if getattr(self, "_waited", None) == (connected, needed):
            return
        self._waited = (connected, needed)
        PROGRESS.info("waiting for %d devices: %d connected", needed, connected)

    def phase(self, server_round: int, phase: str) -> None:
        self._waited = None  # a later wait for devices is said again
        PROGRESS.info("round %d: %s", server_round, phase)

    def replies(self, done: int, total: int) -> None: ...

    def round_done(self, row: dict[str, Any]) -> None:
        notes = set_apart(row)
        PROGRESS.info("round %s done: %s trained%s", row.get("round"), row.get("train_replies", 0),
                      f"  {notes}" if notes else "")

    def stop(self) -> None: ...


class ConsoleReporter(QuietReporter):
    """Live progress of one run; ``label`` (e.g. "run 2/7 split FedAvg") prefixes every line of it.

    ``unit`` names who replies: "users" in a simulation, "devices" in a deployment. ``replies`` may be called
    as often as one likes with unchanged counts (the deployment server does, once a second): off a terminal
    a line is printed when a phase starts, then at most one every ``HEARTBEAT`` seconds while it runs.
    """

    def __init__(self, console: Console | None = None, label: str = "", unit: str = "users") -> None:
        self.label = label
        self.unit = unit
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.round_task = self.phase_task = None
        self.num_rounds = 0
        self.current = (0, "")
        self.accuracy = ""
        self._last_line = 0.0
        self._announced: tuple[int, str, int] | None = None  # (round, phase, total) whose start line is out
        self._connected: tuple[int, int] | None = None

    def _say(self, text: str) -> None:
        """A line above the live display on a terminal, a plain stderr line elsewhere."""
        line = f"{self.label}  {text}" if self.label else text
        if self.progress is not None:
            self.progress.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def start(self, num_rounds: int, done: int = 0) -> None:
        self.num_rounds = num_rounds
        if self.live:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[acc]}"), console=self.console)
            self.progress.start()
            _LIVE.append(self.progress)
            self.round_task = self.progress.add_task(f"{self.label} rounds".strip(), total=num_rounds,
                                                     completed=done, acc="")
            self.phase_task = self.progress.add_task(f"  {self.unit}", total=1, acc="")

    def waiting(self, connected: int, needed: int) -> None:
        """Devices connected while the server waits for ``needed`` of them: a line when the count changes
        (and one when enough are there)."""
        if self._connected == (connected, needed):
            return
        self._connected = (connected, needed)
        super().waiting(connected, needed)
        unit = self.unit[:-1] if needed == 1 and self.unit.endswith("s") else self.unit
        self._say(f"{connected} {self.unit if connected != 1 else unit} connected" if connected >= needed
                  else f"waiting for {needed} {unit}: {connected} connected")
        if self.progress is not None:
            self.progress.update(self.phase_task, description=f"  waiting for {self.unit}", completed=connected,
                                 total=max(needed, 1))

    def phase(self, server_round: int, phase: str) -> None:
        if phase == "evaluate" and server_round == self.num_rounds:
            phase = "final evaluation"  # the longest phase (every user, the generation check): say so
        if (server_round, phase) != self.current:
            super().phase(server_round, phase)
        self.current = (server_round, phase)
        self._connected = None  # a later wait for devices is said again

    def replies(self, done: int, total: int) -> None:
        server_round, phase = self.current
        if self.progress is not None:
            self.progress.update(self.phase_task, description=f"  round {server_round} {phase}",
                                 completed=done, total=max(total, 1))
            return
        # Off a terminal: a line when a phase starts, then one at most every HEARTBEAT seconds while it runs,
        # so a log shows what a long round is doing (a round line alone comes only when it ends).
        now = time.monotonic()
        starting = self._announced != (server_round, phase, total)
        if starting or (done < total and now - self._last_line >= HEARTBEAT):
            prefix = f"{self.label}  " if self.label else ""
            print(f"{prefix}round {server_round}/{self.num_rounds} {phase}: {done}/{total} {self.unit} replied",
                  file=sys.stderr, flush=True)
            self._last_line = now
            self._announced = (server_round, phase, total)

    def round_done(self, row: dict[str, Any]) -> None:
        super().round_done(row)
        if row.get("personalized_accuracy_mean") is not None:
            self.accuracy = (f"personalized {_pct(row['personalized_accuracy_mean'])}  "
                             f"global {_pct(row['global_accuracy_mean'])}")
        notes = set_apart(row)
        if self.progress is not None:
            self.progress.update(self.round_task, completed=row["round"],
                                 acc=f"{self.accuracy}  {notes}" if notes else self.accuracy)
        else:
            prefix = f"{self.label}  " if self.label else ""
            print(f"{prefix}round {row['round']}/{self.num_rounds}  {self.unit} trained {row.get('train_replies', 0)}"
                  f"  {self.accuracy}{'  ' + notes if notes else ''}  [{row['wall_seconds']:.0f}s]",
                  file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            if self.progress in _LIVE:
                _LIVE.remove(self.progress)
            self.progress = None


_LIVE: list[Progress] = []  # live displays on the terminal now


def stop_live_displays() -> None:
    """Leave the terminal tidy (the last frame drawn, the cursor shown) before a signal ends the process."""
    while _LIVE:
        try:
            _LIVE.pop().stop()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass


# Schemes whose "global" model is not a trained shared model, said where the figure is shown.
GLOBAL_LABELS = {
    "fedsa": "global (shared A, B at its initial zero: the base model; FedSA shares no B)",
    "local": "global (nothing is shared: the base model)",
}


def summary_table(summary: dict[str, Any]) -> Table:
    """The end-of-run table: accuracy of the three models over users, then the cost of the run."""
    table = Table(title=f"fedpersona: {summary['num_users']} users, {summary['rounds']} rounds, "
                        f"scheme {summary['scheme']}, strategy {summary['strategy']}")
    table.add_column("model")
    for column in ("mean acc", "p10 acc", "worst user"):
        table.add_column(column, justify="right")
    global_label = GLOBAL_LABELS.get(summary.get("scheme", ""), "global (base+shared)")
    for model, label in (("personalized", "personalized (base+shared+private)"),
                         ("global", global_label), ("base", "base (no adapters)")):
        table.add_row(label, *(_pct(summary.get(f"{model}_accuracy_{s}")) for s in ("mean", "p10", "min")))
    if summary.get("new_users"):
        table.add_row(f"new users ({summary['new_users']}, personalized after a few-shot fit)",
                      *(_pct(summary.get(f"new_user_accuracy_{s}")) for s in ("mean", "p10", "min")))
    costs = Table(show_header=False, box=None)
    eps = summary.get("epsilon_max")
    for key, value in (
        ("shared parameters", f"{summary['shared_parameters']:,}"),
        ("private parameters per user", f"{summary['private_parameters_per_user']:,}"),
        ("bytes up per client-round", f"{summary['bytes_up_per_client_round']:,.0f}"),
        ("privacy (epsilon max)", "no DP" if eps is None else f"{eps:.2f}" + (
            " (the devices' own claims)" if str(summary.get("epsilon_max_source") or "").startswith("devices") else "")),
        *((("generation win rate (personalized vs global)", _pct(summary["generation_win_rate"])),)
          if summary.get("generation_win_rate") is not None else ()),
        *((("generated text (personalized vs global)", _generation(summary["generation"])),)
          if _generation(summary.get("generation")) else ()),
        *((("rejected replies (dropped before aggregation)", _reasons(summary["rejected_reasons"])),)
          if _reasons(summary.get("rejected_reasons")) else ()),
        *((("bounded replies (kept, influence capped)", f"clipped {summary.get('clipped_replies') or 0}, "
                                                      f"weight-capped {summary.get('weight_capped_replies') or 0}"),)
          if summary.get("clipped_replies") or summary.get("weight_capped_replies") else ()),
        *((("declined replies", _reasons(summary["declined_reasons"])),)
          if _reasons(summary.get("declined_reasons")) else ()),
        *population_rows(summary),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
    ):
        costs.add_row(key, value)
    grid = Table.grid()
    grid.add_row(table)
    grid.add_row(costs)
    return grid


# ---- the run's log: everything the terminal does not show --------------------------------------------------
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_NAME = "fedpersona.log"


class _LogFile(logging.Handler):
    """Records held in memory until the run has passed its input checks (``open``: a run refused at its
    inputs leaves no output folder behind), then written to the file as they come, flushed each time (a
    run stopped by a signal keeps every line)."""

    def __init__(self, path: Path, append: bool) -> None:
        super().__init__(logging.INFO)
        self.path, self.append = path, append
        self.stream: Any = None
        self.opened = False
        self.pending: list[str] = []
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def open(self) -> None:
        with self.lock:
            if self.stream is not None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = self.path.open("a" if self.append else "w", encoding="utf-8")
            self.opened = True
            self.stream.writelines(line + "\n" for line in self.pending)
            self.stream.flush()
            self.pending.clear()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if self.stream is None:
                self.pending.append(text)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)

    def close(self) -> None:
        with self.lock:
            if self.stream is not None:
                self.stream.close()
                self.stream = None
        super().close()


class _Forward(logging.Handler):
    """Hands records to another handler (which formats them its own way)."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(logging.INFO)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


class _NotOnTheTerminal(logging.Filter):
    """What the terminal handler leaves to the log: per-reply rejections (the round line counts them with
    their reasons) and the progress lines (the reporter prints those itself)."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(self.prefixes)


_CHATTY = ("alembic",)  # INFO records that say nothing about the run (Flower's database set-up)


class RunLog:
    """The run's log file, with everything the terminal does not show.

    Inside ``with RunLog(path)``: Python logging at INFO from every library (fedpersona, Flower, Ray's driver
    once ``adopt("ray")`` is called, ...) and every warning (``logging.captureWarnings``, each shown once per
    place) go to ``path``. The terminal keeps the progress lines and fedpersona's own warnings
    (``fedpersona: warning: ...``); Flower's console output is turned down to CRITICAL. With ``verbose``,
    libraries keep their console output and every record of the log is echoed on stderr as well.

    ``commit()`` creates the file (with what was logged so far); a run that ends before (bad input) leaves
    none. ``RunLog.active`` is the open one, for code that starts libraries late (Ray) and for the signal
    handler that stops a run.
    """

    active: ClassVar[RunLog | None] = None
    last: ClassVar[RunLog | None] = None  # the latest one, open or closed (its path for a failure's line)

    def __init__(self, path: str | Path, *, verbose: bool = False, append: bool = False) -> None:
        self.path = Path(path)
        self.verbose = verbose
        self._file = _LogFile(self.path, append)
        self._undo: list[Any] = []

    @property
    def committed(self) -> bool:
        """Whether the file was created (it stays, and is named at the end, once it was)."""
        return self._file.opened

    def commit(self) -> None:
        self._file.open()

    def __enter__(self) -> RunLog:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.INFO)
        root.addHandler(self._file)
        self._undo.append(lambda: (root.removeHandler(self._file), root.setLevel(level)))
        for name in _CHATTY:
            chatty = logging.getLogger(name)
            self._undo.append(lambda lg=chatty, lv=chatty.level: lg.setLevel(lv))
            chatty.setLevel(logging.WARNING)
        if self.verbose:
            echo = logging.StreamHandler(sys.stderr)
            echo.setLevel(logging.INFO)
            echo.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            echo.addFilter(_NotOnTheTerminal("fedpersona.progress", "flwr"))  # flwr: its own console shows it
            root.addHandler(echo)
            self._undo.append(lambda: root.removeHandler(echo))
        else:
            terminal = logging.StreamHandler(sys.stderr)
            terminal.setLevel(logging.WARNING)
            terminal.setFormatter(logging.Formatter("fedpersona: warning: %(message)s"))
            terminal.addFilter(_NotOnTheTerminal("fedpersona.progress", "fedpersona.strategies.validation"))
            ours = logging.getLogger("fedpersona")
            ours.addHandler(terminal)
            self._undo.append(lambda: ours.removeHandler(terminal))
            self._quiet_flower()
        logging.captureWarnings(True)
        caught = warnings.catch_warnings()
        caught.__enter__()
        warnings.simplefilter("default")  # each warning once per place, into the log (not the terminal)
        for category in (ResourceWarning, ImportWarning):  # ignored by Python's defaults too: unclosed files
            warnings.simplefilter("ignore", category)
        self._undo.append(lambda: (caught.__exit__(None, None, None), logging.captureWarnings(False)))
        RunLog.active = RunLog.last = self
        logging.getLogger("fedpersona.log").info("fedpersona %s; log of this run: %s", _version(), self.path)
        return self

    def _quiet_flower(self) -> None:
        """Flower's console handler (stderr, INFO and up) shows only CRITICAL; its records reach the log
        through the root logger (the ``flwr`` logger propagates)."""
        try:
            from flwr.common.logger import FLOWER_LOGGER
        except ImportError:  # pragma: no cover - flwr is a dependency
            return
        for handler in FLOWER_LOGGER.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                level = handler.level
                handler.setLevel(logging.CRITICAL)
                self._undo.append(lambda h=handler, lv=level: h.setLevel(lv))

    def adopt(self, name: str) -> None:
        """Route a library logger that does not propagate (Ray's ``ray``) into the log; unless verbose, its
        own console handlers show only CRITICAL."""
        logger = logging.getLogger(name)
        if any(isinstance(h, _Forward) and h.target is self._file for h in logger.handlers):
            return
        if not logger.propagate:
            # a handler of its own: Ray's setup overwrites the formatter of every handler of its logger
            forward = _Forward(self._file)
            logger.addHandler(forward)
            self._undo.append(lambda: logger.removeHandler(forward))
        level = logger.level
        logger.setLevel(logging.INFO)
        self._undo.append(lambda: logger.setLevel(level))
        if not self.verbose:
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) \
                        and not isinstance(handler, logging.FileHandler):
                    old = handler.level
                    handler.setLevel(logging.CRITICAL)
                    self._undo.append(lambda h=handler, lv=old: h.setLevel(lv))

    def note(self, text: str, *args: Any) -> None:
        """A line in the log only (never the terminal, unless verbose)."""
        logging.getLogger("fedpersona.log").info(text, *args)

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is not None:  # the terminal got one line; the log keeps the whole story
            quiet = issubclass(kind, (SystemExit, KeyboardInterrupt))
            logging.getLogger("fedpersona.log").info("the run ended with %s: %s", kind.__name__, error,
                                                      exc_info=None if quiet else (kind, error, trace))
        RunLog.active = None
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._file.close()


def _version() -> str:
    from fedpersona._version import __version__

    return __version__
