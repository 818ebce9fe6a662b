"""A Grid that reports replies as they arrive and polls often (a deployment: one node per device).

Flower's grids block in ``send_and_receive`` until every reply is in (the deployment grid sleeps 3 s
between polls). This wrapper pushes, then polls every ``poll_interval`` seconds, telling a callback how
many replies are in, so a progress display can show "users done" live. Replies come back in the order
the messages were sent (not of arrival), so aggregation sums in the same order. Everything else is
delegated. (Simulations use ``fedpersona.server.user_grid`` instead: users are not nodes there.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


ReplyCallback = Callable[[int, int], None]  # (replies received, messages sent)


class DelegatingGrid(Grid):
    """A Grid over ``inner`` that passes every call through (subclasses change what they need)."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run_id: int) -> None:  # pragma: no cover - the simulation sets the inner grid's run
        self.inner.set_run(run_id)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)


class ProgressGrid(DelegatingGrid):
    def __init__(self, inner: Grid, on_reply: ReplyCallback | None = None, poll_interval: float = 0.05) -> None:
        super().__init__(inner)
        self.on_reply = on_reply
        self.poll_interval = poll_interval

    # ---- the one change ---------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(self.push_messages(messages))
        position = {message_id: i for i, message_id in enumerate(sent)}
        replies: list[Message] = []
        if self.on_reply:
            self.on_reply(0, len(sent))

        def arrived(new: list[Message]) -> None:
            replies.extend(new)
            if self.on_reply:
                self.on_reply(len(replies), len(sent))

        pull_until_answered(self.inner, sent, arrived, timeout=timeout, poll_interval=self.poll_interval)
        # in the order sent, not of arrival: aggregation then sums in the same order every run
        return sorted(replies, key=lambda m: position.get(m.metadata.reply_to_message_id, len(sent)))


def pull_until_answered(grid: Grid, message_ids: Iterable[str], arrived: Callable[[list[Message]], None], *,
                        timeout: float | None, poll_interval: float) -> None:
    """Pull replies to ``message_ids`` from ``grid`` until each has one or ``timeout`` seconds pass (None:
    no limit), asking only for those still pending; ``arrived`` gets each non-empty batch as it comes, and
    an empty pull waits ``poll_interval`` seconds before the next."""
    pending = set(message_ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending and (deadline is None or time.monotonic() < deadline):
        new = list(grid.pull_messages(list(pending)))
        if new:
            pending.difference_update(m.metadata.reply_to_message_id for m in new)
            arrived(new)
        else:
            time.sleep(poll_interval)
