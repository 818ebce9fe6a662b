"""Continuing a run from a checkpoint: one ``Checkpointing`` object that ``run_federation`` calls at three
points (open it before anything heavy, ``resume_into`` the strategy and recorder, ``hook`` for every
finished round), and the pieces it is made of: round numbering, recorder totals, the per-round save hook.

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

from fedpersona.errors import UsageError
from fedpersona.io import atomic_write_text
from fedpersona.protocol import RUN_LINEAGE
from fedpersona.server.checkpoint import (
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
    sound_checkpoint,
)
from fedpersona.server.strategy_state import restore_strategy_state

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
_RECORDER_TOTALS = ("bytes_up", "epsilons", "last_eval", "last_epsilon", "rejected_reasons", "declined_reasons",
                    "bounded_replies", "update_norm_medians")
# keyed by reason code (or kind); the other dicts by user index
_BY_REASON = ("rejected_reasons", "declined_reasons", "bounded_replies")


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


class Checkpointing:
    """Checkpoints of one run: every finished round saved to ``directory``, and on ``resume`` the run
    continued after the newest sound round (strategy state, recorder totals, ``metrics.jsonl`` rows, round
    numbers). Without a directory it does nothing (``done`` is 0, ``hook`` None).

    Args:
        config: the run configuration (a resumed checkpoint must match its model, scheme, strategy, ranks).
        directory: the checkpoint folder, or None.
        resume: continue from the newest round that loads.
        out_dir: the run's output folder: its ``metrics.jsonl`` rows of the finished rounds are read here,
            before a recorder starts the file afresh, and written back by ``resume_into``.

    Raises:
        UsageError: ``resume`` without a directory or a checkpoint, a checkpoint already at the last round, or
            one made with another model, scheme, strategy or adapter ranks (one line, before anything heavy).
    """

    def __init__(self, config: Any, directory: str | Path | None, resume: bool,
                 out_dir: str | Path | None = None) -> None:
        self.config = config
        self.directory = Path(directory) if directory else None
        self.metrics = Path(out_dir) / "metrics.jsonl" if out_dir else None
        self.checkpoint: Checkpoint | None = None
        self._rows: list[str] = []
        if resume:
            if self.directory is None:
                raise UsageError("resume=true needs checkpoint-dir (the folder the interrupted run saved its rounds to)")
            self.checkpoint = load_checkpoint(self.directory)
            if self.checkpoint is None:
                raise UsageError(f"checkpoint-dir {self.directory}: no checkpoint to resume from; start without --resume")
            self.check_resumable(self.checkpoint)
            if self.metrics is not None:
                self._rows = finished_rows(self.metrics, self.done)

    def check_resumable(self, checkpoint: Checkpoint) -> None:
        """UsageError unless this run can continue ``checkpoint``: rounds left, same model, scheme, strategy
        and adapter ranks."""
        if checkpoint.round >= self.config.rounds:
            raise UsageError(f"checkpoint-dir {self.directory}: already at round {checkpoint.round} of "
                             f"{self.config.rounds}; raise --rounds to continue training")
        saved, flat = checkpoint.config, self.config.to_flat()
        for key in ("model", "scheme", "strategy", "shared-rank", "private-rank"):
            if key in saved and saved[key] != flat[key]:
                raise UsageError(f"checkpoint-dir {self.directory}: was made with {key}={saved[key]!r}, not "
                                 f"{flat[key]!r}; resume with the same {key}, or start afresh")

    @property
    def done(self) -> int:
        """Rounds already finished (0 for a fresh run)."""
        return self.checkpoint.round if self.checkpoint else 0

    def verify(self, spec: Any) -> None:
        """Fall back past a checkpoint whose tensors do not fit the run's shared tensors ``spec`` (NaN,
        foreign shapes) to the newest earlier round that does (one warning line); UsageError when none does."""
        if self.checkpoint is not None:
            self.checkpoint = sound_checkpoint(self.directory, self.checkpoint, spec)

    def lineage(self) -> str:
        """One id for a run and all its resumptions (``fedpersona.protocol.RUN_LINEAGE``): a device answers a
        round of the same lineage it already answered with its stored reply instead of training it again."""
        import uuid

        saved = self.checkpoint.config.get(RUN_LINEAGE) if self.checkpoint is not None else None
        return str(saved) if saved else uuid.uuid4().hex

    def resume_into(self, strategy: Any, recorder: Any) -> ArrayRecord | None:
        """Continue the checkpointed run in ``strategy`` and ``recorder`` (their state, the finished rounds'
        ``metrics.jsonl`` rows, round numbers shifted past the finished rounds); returns the arrays to start
        from, None for a fresh run. Call after every other wrapper of the strategy (the shift must see the
        true rounds) and after the recorder started its file."""
        if self.checkpoint is None:
            return None
        if self.metrics is not None:
            restore_rows(self.metrics, self._rows)
        restore_recorder_totals(recorder, self.checkpoint.recorder)
        restore_strategy_state(strategy, self.checkpoint.strategy_state)
        offset_rounds(strategy, self.done)
        return self.checkpoint.arrays

    def hook(self, strategy: Any, recorder: Any, message_config: dict[str, Any]
             ) -> Callable[[int, ArrayRecord], MetricRecord | None] | None:
        """``Strategy.start``'s ``evaluate_fn`` saving every finished round, or None without a directory."""
        if self.directory is None:
            return None
        return checkpoint_hook(self.directory, strategy, recorder, done=self.done, num_rounds=self.config.rounds,
                               config=dict(message_config))
