"""What a person watching a run sees: live progress while it runs, a table when it ends.

On a terminal: a progress bar (round r/R, users done in the current phase, running accuracy). Off a
terminal (CI logs, pipes): one plain line per round. ``QuietReporter`` prints nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


HEARTBEAT = 30.0  # seconds between progress lines of one phase when the output is not a terminal


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _reasons(counts: dict[str, int] | None) -> str:
    """``{"non-finite": 2, "bad-weight": 1}`` -> ``"3 (non-finite 2, bad-weight 1)"``; "" for none."""
    total = sum((counts or {}).values())
    return f"{total} ({', '.join(f'{r} {n}' for r, n in counts.items())})" if total else ""


def set_apart(row: dict[str, Any]) -> str:
    """The round's rejected, declined and failed replies, both phases, for the round line ("" when none)."""
    parts = []
    for kind in ("rejected", "declined"):
        counts: dict[str, int] = {}
        for phase in ("train", "eval"):
            for reason, n in (row.get(f"{phase}_{kind}_reasons") or {}).items():
                counts[reason] = counts.get(reason, 0) + n
        if text := _reasons(counts):
            parts.append(f"{kind} {text}")
    failed = int(row.get("train_failures") or 0) + int(row.get("eval_failures") or 0)
    if failed:  # a ClientApp error: the reason is in the client's log, the count belongs on the console
        parts.append(f"failed {failed}")
    return "  ".join(parts)


class QuietReporter:
    def start(self, num_rounds: int) -> None: ...

    def phase(self, server_round: int, phase: str) -> None: ...

    def replies(self, done: int, total: int) -> None: ...

    def round_done(self, row: dict[str, Any]) -> None: ...

    def stop(self) -> None: ...


class ConsoleReporter(QuietReporter):
    """Live progress of one run; ``label`` (e.g. "run 2/7 split FedAvg") prefixes every line of it."""

    def __init__(self, console: Console | None = None, label: str = "") -> None:
        self.label = label
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.round_task = self.phase_task = None
        self.num_rounds = 0
        self.current = (0, "")
        self.accuracy = ""
        self._last_line = 0.0

    def start(self, num_rounds: int) -> None:
        self.num_rounds = num_rounds
        if self.live:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[acc]}"), console=self.console)
            self.progress.start()
            self.round_task = self.progress.add_task(f"{self.label} rounds".strip(), total=num_rounds, acc="")
            self.phase_task = self.progress.add_task("  users", total=1, acc="")

    def phase(self, server_round: int, phase: str) -> None:
        if phase == "evaluate" and server_round == self.num_rounds:
            phase = "final evaluation"  # the longest phase (every user, the generation check): say so
        self.current = (server_round, phase)

    def replies(self, done: int, total: int) -> None:
        server_round, phase = self.current
        if self.progress is not None:
            self.progress.update(self.phase_task, description=f"  round {server_round} {phase}",
                                 completed=done, total=max(total, 1))
            return
        # Off a terminal: a line when a phase starts, then one at most every HEARTBEAT seconds while it runs,
        # so a log shows what a long round is doing (a round line alone comes only when it ends).
        now = time.monotonic()
        if done == 0 or (done < total and now - self._last_line >= HEARTBEAT):
            prefix = f"{self.label}  " if self.label else ""
            print(f"{prefix}round {server_round}/{self.num_rounds} {phase}: {done}/{total} users replied",
                  file=sys.stderr, flush=True)
            self._last_line = now

    def round_done(self, row: dict[str, Any]) -> None:
        if row.get("personalized_accuracy_mean") is not None:
            self.accuracy = (f"personalized {_pct(row['personalized_accuracy_mean'])}  "
                             f"global {_pct(row['global_accuracy_mean'])}")
        notes = set_apart(row)
        if self.progress is not None:
            self.progress.update(self.round_task, completed=row["round"],
                                 acc=f"{self.accuracy}  {notes}" if notes else self.accuracy)
        else:
            prefix = f"{self.label}  " if self.label else ""
            print(f"{prefix}round {row['round']}/{self.num_rounds}  users trained {row.get('train_replies', 0)}"
                  f"  {self.accuracy}{'  ' + notes if notes else ''}  [{row['wall_seconds']:.0f}s]",
                  file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


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
        ("privacy (epsilon max)", "no DP" if eps is None else f"{eps:.2f}"),
        *((("generation win rate (personalized vs global)", _pct(summary["generation_win_rate"])),)
          if summary.get("generation_win_rate") is not None else ()),
        *((("rejected replies (dropped before aggregation)", _reasons(summary["rejected_reasons"])),)
          if _reasons(summary.get("rejected_reasons")) else ()),
        *((("declined replies", _reasons(summary["declined_reasons"])),)
          if _reasons(summary.get("declined_reasons")) else ()),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
    ):
        costs.add_row(key, value)
    grid = Table.grid()
    grid.add_row(table)
    grid.add_row(costs)
    return grid
