"""Which simulated node holds which user, so that a seeded run samples the same users every time.

Flower's simulation gives its nodes random 64-bit ids at every start and ``Grid.get_node_ids()`` returns
them as a set, so ``random.sample`` over them picks different *users* with the same seed: seeded runs
differed by ~0.01 in personalized accuracy. Before the first round the server asks every node, with one
``query`` message, for its user index (its Flower partition id: a simulation detail, not user data), and
lists node ids in user order from then on. Real deployments are not asked: devices join and leave, and
their sampling is not meant to replay.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpersona.client.app import ROSTER_KEY  # the query's ConfigRecord name; the reply's MetricRecord too


def roster_query(grid: Grid, expected: int, timeout: float, poll: float = 0.05) -> dict[int, int]:
    """``node id -> user index`` for every node that answers within ``timeout`` seconds.

    Waits first until ``expected`` nodes are listed: the simulation may start the ServerApp before it
    has registered its nodes (a roster taken then was empty, and sampling random again)."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(poll)
    content = RecordDict({ROSTER_KEY: ConfigRecord({"ask": "user-index"})})
    messages = [Message(content=content, dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids]
    order: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=max(deadline - time.monotonic(), 1.0)):
        if reply.has_error() or "user-index" not in reply.content.metric_records.get(ROSTER_KEY, {}):
            continue
        order[reply.metadata.src_node_id] = int(reply.content.metric_records[ROSTER_KEY]["user-index"])
    return order


def in_user_order(node_ids: Iterable[int], order: Mapping[int, int]) -> list[int]:
    """Node ids sorted by user index; nodes the roster does not know go last, by id."""
    known = len(order)
    return sorted(node_ids, key=lambda node: (order.get(node, known), node))
