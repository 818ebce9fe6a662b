"""What a device shows its own user about the task it is running, and never sends.

A device tells the server codes only (``fedpersona.protocol``: a decline's or a failure's reason), because
anything it derives from its data or its file system would let a server learn it by asking for rounds
that fail. The person at the device should still read the whole story: that the memory holds 3 pairs and
a round needs 4, which state file is damaged, which step of training is running. This module carries that
story from the ClientApp's device mode to whoever watches the task, without going through the reply:

* ``note(text)``: the full reason of a decline or a failure: logged (``STATE/logs/fedpersona.log`` under
  ``fedpersona client``; Flower's log in ``--cold`` mode) and handed to the task's watcher;
* ``progress(phase, done, total)``: the round's phases while it runs (reference log-probs, training step k
  of K, evaluation), for the watcher only (``progress_callback()`` hands the trainer a callable);
* ``TaskWatch`` / ``watching(watch)``: ``fedpersona client`` (``fedpersona.deploy.node.reporting``) wraps
  each ClientApp call in one, and prints what it collects.

A context variable carries the watcher, so concurrent tasks (threads) never see each other's, and code that
runs without one (a simulation, a test calling the ClientApp) just logs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

log = logging.getLogger(__name__)  # "fedpersona.client.watch": what the device keeps for its user

Progress = Callable[[str, int, int], None]  # (phase, done, total): fedpersona.alignment.trainer.Progress


@dataclass
class TaskWatch:
    """What one ClientApp task told its device's user.

    Attributes:
        on_progress: called with (phase, done, total) as the round advances (phases: ``reference``, ``train``,
            ``evaluate``; ``done`` and ``total`` count chunks of pairs, optimizer steps, or 0/1).
        notes: the full reasons noted during the task (declines, failures), oldest first.
    """

    on_progress: Progress | None = None
    notes: list[str] = field(default_factory=list)

    def progress(self, phase: str, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(phase, done, total)


_CURRENT: ContextVar[TaskWatch | None] = ContextVar("fedpersona_task_watch", default=None)


@contextmanager
def watching(watch: TaskWatch) -> Iterator[TaskWatch]:
    """Make ``watch`` the current task's watcher inside the block (this thread and context only).

    Args:
        watch: the watcher that collects notes and progress.

    Returns:
        A context manager yielding ``watch``.
    """
    token = _CURRENT.set(watch)
    try:
        yield watch
    finally:
        _CURRENT.reset(token)


def note(text: str, *, level: int = logging.INFO, exc_info: BaseException | None = None) -> None:
    """Keep the full reason of a decline or failure on the device: its log, and the task's watcher.

    Args:
        text: one line for the device's user (it may name paths and counts: it never leaves the device).
        level: the log record's level.
        exc_info: the exception behind it, whose traceback goes to the log.
    """
    log.log(level, "%s", text, exc_info=exc_info)
    watch = _CURRENT.get()
    if watch is not None:
        watch.notes.append(text)


def progress(phase: str, done: int, total: int) -> None:
    """Tell the task's watcher, if any, where the round is (``TaskWatch.on_progress``)."""
    watch = _CURRENT.get()
    if watch is not None:
        watch.progress(phase, done, total)


def progress_callback() -> Progress | None:
    """The current task's progress callable for the trainer, None when nobody watches (no cost then)."""
    watch = _CURRENT.get()
    return watch.progress if watch is not None and watch.on_progress is not None else None
