"""Continuing a run from a checkpoint: round numbering, recorder totals, the per-round save hook.

Flower's ``Strategy.start`` always counts rounds from 1. A resumed run starts it for the remaining
rounds only and shifts the round number every strategy hook sees by the rounds already done, so the
strategy (FedProx's schedule, our recorder's "evaluate every k rounds and at the last") and
``metrics.jsonl`` see the true round numbers: 1..k before the crash, k+1..R after it, none repeated.

The checkpoint is written from ``start``'s ``evaluate_fn`` hook, which Flower calls after each round
has been trained, aggregated and evaluated, with that round's aggregated arrays.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from fedpersona.io import atomic_write_text
from fedpersona.server.checkpoint import save_checkpoint

_HOOKS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")


def offset_rounds(strategy: Any, done: int) -> Any:
    """Make ``strategy`` (in place) see round ``r + done`` where ``start`` says ``r``."""
    if done <= 0:
        return strategy
    base = type(strategy)

    def shifted(name: str) -> Callable[..., Any]:
        def hook(self: Any, server_round: int, *args: Any, **kwargs: Any) -> Any:
            return getattr(super(Resumed, self), name)(server_round + done, *args, **kwargs)

        hook.__name__ = name
        return hook

    Resumed = type(base.__name__, (base,), {name: shifted(name) for name in _HOOKS})
    Resumed.__qualname__ = base.__qualname__
    strategy.__class__ = Resumed
    return strategy


# Recorder attributes that carry totals across rounds (the summary is computed from them).
_RECORDER_TOTALS = ("bytes_up", "epsilons", "last_eval", "last_epsilon", "rejected_reasons", "declined_reasons")
_BY_REASON = ("rejected_reasons", "declined_reasons")  # keyed by reason code; the other dicts by user index


def recorder_totals(recorder: Any) -> dict[str, Any]:
    """The recorder's running totals as JSON (int dict keys become strings)."""
    out: dict[str, Any] = {}
    for name in _RECORDER_TOTALS:
        value = getattr(recorder, name, None)
        if isinstance(value, dict):
            out[name] = {str(k): v for k, v in value.items()}
        elif isinstance(value, list):
            out[name] = list(value)
    return out


def restore_recorder_totals(recorder: Any, totals: dict[str, Any]) -> None:
    """Put totals saved by ``recorder_totals`` back, so the summary covers the whole run."""
    for name, value in totals.items():
        current = getattr(recorder, name, None)
        if isinstance(current, dict) and isinstance(value, dict):
            current.update({(k if name in _BY_REASON else int(k)): v for k, v in value.items()})
        elif isinstance(current, list) and isinstance(value, list):
            current[:0] = value


def finished_rows(metrics_path: Path, done: int) -> list[str]:
    """The lines of ``metrics.jsonl`` for rounds 1..done (a torn last line from a crash is dropped)."""
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int) and row["round"] <= done:
            kept.append(json.dumps(row))
    return kept


def restore_rows(metrics_path: Path, rows: list[str]) -> None:
    """Rewrite ``metrics.jsonl`` with the finished rounds' rows (atomically); new rows append after."""
    atomic_write_text(metrics_path, "".join(f"{row}\n" for row in rows))


def checkpoint_hook(directory: str | Path, strategy: Any, recorder: Any, *, done: int, num_rounds: int,
                    config: dict[str, Any]) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """``evaluate_fn`` for ``Strategy.start`` that checkpoints every finished round."""

    def hook(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:  # round 0 is the initial model: nothing finished yet
            save_checkpoint(directory, server_round + done, arrays, strategy, config=config,
                            recorder=recorder_totals(recorder), num_rounds=num_rounds)
        return None

    return hook
