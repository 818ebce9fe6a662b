"""What a device tells the server when its task fails: a code, never the exception's text.

Flower's own runner answers a ClientApp exception with ``"<class 'X'>:<'text'>"``; our executor did the
same. On a real device that text is derived from the user's data and file system: "sample rate 0.25"
(with the batch size, the exact pair count), the state folder's path (often the user's name), a damaged
file's name. A server chooses its messages, so it could provoke such failures at will. So in device mode
(``state-dir`` in the node config) every exception of the ClientApp, wherever it is raised (message
parsing, a mod, the state files, the model, training, evaluation), becomes an error reply whose reason
is one ``fedpersona.protocol.FAILURE_REASONS`` code, and the full text goes to the device's log and
terminal (``fedpersona.client.watch.note``).

How the code is chosen (``failure_code``): a ``DeviceFailure`` carries its own (raised by the device code
where the phase is known: ``failing_as``); a write the file system refused (no space left, a quota, a
read-only place) is ``storage-unwritable`` wherever it happened; anything else is the task's default,
``train-failed`` or ``evaluate-failed`` (``unsupported-message`` for a message type the app does not
serve).

A simulation (no ``state-dir``) is the researcher's own process: there exceptions keep their text
(``fedpersona.client.cohort``), and nothing here applies.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedpersona.client.watch import note
from fedpersona.errors import UsageError
from fedpersona.io import STORAGE_ERRNOS, StorageError, as_os_error
from fedpersona.protocol import failure_reason

STATE_DIR_KEY = "state-dir"  # node config of a real device (fedpersona.client.device)
_SQLITE_STORAGE = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")


class DeviceFailure(UsageError):
    """A device task's failure with its ``FAILURE_REASONS`` code; ``str()`` is the full text for the device's
    user (one line, as every ``UsageError``), never sent.

    Args:
        code: a ``fedpersona.protocol.FAILURE_REASONS`` code.
        text: one line for the device's user.

    Raises:
        ValueError: ``code`` is not a known code.
    """

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = failure_reason(code)


@contextmanager
def failing_as(code: str) -> Iterator[None]:
    """Inside the block, an exception that is no ``DeviceFailure`` yet becomes one with ``code`` (a refused
    write stays ``storage-unwritable``): the device code marks its phases with it (state files, model).

    Args:
        code: the ``FAILURE_REASONS`` code of the block's failures.

    Raises:
        DeviceFailure: from any exception raised in the block (chained to it).
    """
    failure_reason(code)
    try:
        yield
    except DeviceFailure:
        raise
    except Exception as err:
        raise DeviceFailure(storage_code(err) or code, str(err) or type(err).__name__) from err


def storage_code(err: BaseException) -> str | None:
    """``storage-unwritable`` when ``err`` (or an exception it was raised from) is a write the file system
    refused: ENOSPC, EDQUOT, EROFS, EACCES, EPERM, or SQLite's full / read-only / cannot-open; else None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if (os_error := as_os_error(current)) is not None and os_error.errno in STORAGE_ERRNOS:
            return "storage-unwritable"  # an OSError, or a writer's wrapper of one (safetensors)
        if isinstance(current, sqlite3.Error) and getattr(current, "sqlite_errorname", "").startswith(_SQLITE_STORAGE):
            return "storage-unwritable"
        if isinstance(current, StorageError):
            return "storage-unwritable"
        current = current.__cause__ or current.__context__
    return None


def failure_code(err: BaseException, default: str) -> str:
    """The ``FAILURE_REASONS`` code ``err`` is reported under.

    Args:
        err: the exception the task raised.
        default: the task's code for anything unrecognised (``train-failed``, ``evaluate-failed``).

    Returns:
        The code.
    """
    if isinstance(err, DeviceFailure):
        return err.code
    return storage_code(err) or default


def task_code(message: Message) -> str:
    """The default failure code of a message's task: by its type (``train``, ``evaluate``, else unsupported)."""
    category = str(message.metadata.message_type).split(".", 1)[0]
    return {"train": "train-failed", "evaluate": "evaluate-failed"}.get(category, "unsupported-message")


def failure_reply(message: Message, code: str) -> Message:
    """The error reply a device sends for a failed task: Flower's ClientApp-exception code and ``code``."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=failure_reason(code)),
                   reply_to=message)


def is_device(context: Context) -> bool:
    """Whether the ClientApp runs on a real device (``fedpersona client``: ``state-dir`` in the node config)."""
    return bool(context.node_config.get(STATE_DIR_KEY))


class DeviceClientApp(ClientApp):
    """Flower's ClientApp that, on a real device, answers every exception with a code (module doc).

    Everything Flower's ``__call__`` runs is inside the guard: the message-type dispatch, every mod, the
    registered train/evaluate functions. ``KeyboardInterrupt`` and ``SystemExit`` pass (the device stops).
    """

    def __call__(self, message: Message, context: Context) -> Message:  # noqa: D102 - Flower's
        if not is_device(context):
            return super().__call__(message, context)
        try:
            return super().__call__(message, context)
        except Exception as err:  # noqa: BLE001 - the server gets a code; the device keeps the text
            code = failure_code(err, task_code(message))
            note(f"{message.metadata.message_type} failed on this device: {_one_line(err)} (the server is told "
                 f"only: {code})", level=logging.ERROR, exc_info=err)
            return failure_reply(message, code)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:2000] if text else type(err).__name__
