"""Simulated users are not Flower nodes: a Grid that shows the strategy one node per *user* and sends
each batch of users (a cohort) to one of a small pool of real simulation nodes.

One Flower node per simulated user does not reach a population study: Flower's simulation engine sweeps
every node every 0.1 s and each node's lookup walks the whole message store (nodes x messages per
sweep: 0.05 s at 100 nodes, 4.2 s at 1,000 with a message each; ``benchmarks/flower_engine_sweep.py``), and
a node's ``Context`` travels to the Ray actor and back with every call. So a simulation starts a pool of
about one node per actor slot, and this grid

* lists ``num_users`` *virtual* node ids, user ``u`` as ``USER_NODE_BASE + u``, in user order: Flower's
  seeded samplers (``random.sample`` over the listed ids) then pick the same users in every run, and
  strategies, the reply screen and the recorder work unchanged, one reply per user;
* packs the messages of one call that share their content (Flower strategies send one ``RecordDict``
  to every sampled node) into cohorts of at most ``cohort_size`` users, each one message to a pool node
  naming its users in a ``fedpersona.cohort`` ConfigRecord (plus where the users' private state lives);
* unpacks each cohort reply (``user-<u>.<kind>`` records, ``fedpersona.protocol.cohort_key``) into one
  reply per user, in the order the strategy's messages were given (aggregation sums in the same order
  every run), a failed cohort into an error reply for each of its users.

Reply waiting pulls only the cohort messages still pending (a handful per round), and reports users
done to ``on_reply`` for the progress display. Real deployments do not use this grid: there a node is a
device and its user (``fedpersona.server.progress_grid``).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedpersona.protocol import (ARRAYS, COHORT, COHORT_ERROR, METRICS, PER_USER_RECORDS, PER_USER_REPLY_RECORDS,
                                 STATUS, cohort_key)
from fedpersona.server.progress_grid import DelegatingGrid, ReplyCallback, pull_until_answered

USER_NODE_BASE = 1 << 40  # virtual node id of user 0 (far above nothing: Flower's SuperLink is node 1)


def user_of(node_id: int) -> int:
    """The user index behind a virtual node id (ValueError for an id this grid did not list)."""
    user = int(node_id) - USER_NODE_BASE
    if user < 0:
        raise ValueError(f"node {node_id} is not a simulated user's virtual node")
    return user


class UserGrid(DelegatingGrid):
    """Users as virtual nodes over a pool of simulation nodes (see the module docstring).

    ``num_users``: the population (training users, then new users). ``store``: the folder of the users'
    private state (``fedpersona.round.user_store``), named in every cohort message. ``pool_size``: how
    many simulation nodes to wait for before the first round (they register as the engine starts).
    """

    def __init__(self, inner: Grid, *, num_users: int, cohort_size: int, store: str, pool_size: int = 1,
                 on_reply: ReplyCallback | None = None, poll_interval: float = 0.05,
                 start_timeout: float = 120.0, rounds: Any = None) -> None:
        super().__init__(inner)
        self.rounds = rounds  # fedpersona.server.population_rounds.PopulationRounds: sampling and the clock
        self.num_users = num_users
        self.cohort_size = cohort_size
        self.store = store
        self.pool_size = pool_size
        self.on_reply = on_reply
        self.poll_interval = poll_interval
        self.start_timeout = start_timeout

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("a UserGrid sends and receives in one call (send_and_receive): a cohort's "
                                  "reply is split into the users' replies there")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    # ---- users as nodes ---------------------------------------------------------------------
    def get_node_ids(self) -> list[int]:
        self._wait_for_pool()
        candidates = self.rounds.candidates() if self.rounds is not None else None
        if candidates is not None:  # a training round's sampling: the users online and fit now, in user order
            return [USER_NODE_BASE + int(u) for u in candidates]
        return [USER_NODE_BASE + u for u in range(self.num_users)]

    def _wait_for_pool(self) -> list[int]:
        """The simulation nodes registered now, after waiting (up to ``start_timeout`` seconds) until there
        are ``pool_size`` of them; RuntimeError if none registers. Listed afresh at every call (a handful)."""
        deadline = time.monotonic() + self.start_timeout
        while len(pool := sorted(self.inner.get_node_ids())) < self.pool_size and time.monotonic() < deadline:
            time.sleep(self.poll_interval)
        if not pool:
            raise RuntimeError(f"no simulation node registered within {self.start_timeout:.0f} s")
        return pool

    def cohorts(self, messages: Sequence[Message], workers: int = 1) -> list[list[Message]]:
        """``messages`` (one per user) grouped into cohorts: same message type and the same content object,
        users in the order given, at most ``cohort_size`` each and small enough that ``workers`` workers
        all get one (10 users on 2 workers: cohorts of 5)."""
        groups: dict[tuple[str, int], list[Message]] = {}
        for msg in messages:
            groups.setdefault((msg.metadata.message_type, shared_content(msg.content)), []).append(msg)
        out = []
        for group in groups.values():
            size = min(self.cohort_size, math.ceil(len(group) / max(workers, 1)))
            out.extend(group[i : i + size] for i in range(0, len(group), size))
        return out

    def _cohort_message(self, cohort: list[Message], node: int) -> Message:
        first = cohort[0]
        users = [user_of(m.metadata.dst_node_id) for m in cohort]
        content = RecordDict({key: record for key, record in first.content.items() if key not in PER_USER_RECORDS})
        for msg, user in zip(cohort, users, strict=True):  # records addressed to one user (secure aggregation)
            for key in PER_USER_RECORDS:
                if key in msg.content:
                    content[cohort_key(user, key)] = msg.content[key]
        content[COHORT] = ConfigRecord({"users": users, "store": self.store})
        return Message(content, node, first.metadata.message_type, ttl=first.metadata.ttl,
                       group_id=first.metadata.group_id)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self.rounds is not None and messages:
            return self._population_round(messages, timeout)
        return self._exchange(messages, timeout)

    def _population_round(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """A round with the population model: a training round is decided on the simulated clock first
        (``PopulationRounds.decide``: only users whose reply counts are trained, declines answered as a
        device would); an evaluation round records the rounds each user trained."""
        if any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            replies = self._exchange(messages, timeout)
            self.rounds.note_evaluation(replies)
            return replies
        for msg in messages:  # an id to reply to, also for replies made here
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        decision = self.rounds.decide(messages)
        replies = [*self._exchange(decision.send, timeout), *decision.answered] if decision.send else decision.answered
        self.rounds.finish(decision.outcome)
        order = {msg.metadata.message_id: i for i, msg in enumerate(messages)}
        return sorted(replies, key=lambda m: order.get(m.metadata.reply_to_message_id, len(order)))

    def _exchange(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Send ``messages`` as cohorts to the pool and return one reply per message, in their order."""
        for msg in messages:  # an id to reply to (Flower's grids assign it when they push)
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        pool = self._wait_for_pool()
        cohorts = self.cohorts(messages, len(pool))
        outgoing = [self._cohort_message(c, pool[i % len(pool)]) for i, c in enumerate(cohorts)]
        sent = list(self.inner.push_messages(outgoing))
        pending = {message_id: cohort for message_id, cohort in zip(sent, cohorts, strict=True)}
        replies: list[Message] = []
        if self.on_reply:
            self.on_reply(0, len(messages))

        def arrived(new: list[Message]) -> None:
            for reply in new:
                cohort = pending.pop(reply.metadata.reply_to_message_id, None)
                if cohort is not None:
                    replies.extend(split_reply(reply, cohort))
            if self.on_reply:
                self.on_reply(len(replies), len(messages))

        pull_until_answered(self.inner, sent, arrived, timeout=timeout, poll_interval=self.poll_interval)
        order = {msg.metadata.message_id: i for i, msg in enumerate(messages)}
        return sorted(replies, key=lambda m: order.get(m.metadata.reply_to_message_id, len(order)))


def shared_content(content: RecordDict) -> object:
    """What makes messages packable into one cohort: their content object, or, for messages that carry
    records addressed to one user (``fedpersona.protocol.PER_USER_RECORDS``: secure aggregation's requests),
    the identity of every other record (the global tensors and config sent to all)."""
    if not any(key in content for key in PER_USER_RECORDS):
        return id(content)
    return tuple(sorted((key, id(record)) for key, record in content.items() if key not in PER_USER_RECORDS))


def split_reply(reply: Message, cohort: Sequence[Message]) -> list[Message]:
    """One reply per user of ``cohort`` from the cohort's ``reply``: the user's records under their plain
    names (``arrays``, ``metrics``, ``status``), or an error reply (the cohort failed, the user's part
    failed, or the reply holds nothing for the user)."""
    out = []
    for msg in cohort:
        user = user_of(msg.metadata.dst_node_id)
        if reply.has_error():
            out.append(Message(Error(reply.error.code, reply.error.reason), reply_to=msg))
            continue
        content = reply.content
        failed = content.config_records.get(cohort_key(user, COHORT_ERROR))
        records = {kind: content[cohort_key(user, kind)] for kind in (ARRAYS, METRICS, STATUS, *PER_USER_REPLY_RECORDS)
                   if cohort_key(user, kind) in content}
        if failed is not None or not records:
            reason = str(failed.get("reason", "")) if failed is not None else "the cohort reply has no part for it"
            out.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"user {user}: {reason}"), reply_to=msg))
            continue
        out.append(Message(RecordDict(records), reply_to=msg))
    return out
