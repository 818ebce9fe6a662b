"""A deployment's round deadline and over-selection, on the wall clock (``fedpersona server``).

A simulation decides deadlines on simulated seconds (``fedpersona.server.population_rounds``); real devices
take real time. Here a training round is what Bonawitz et al. (2019, "Towards Federated Learning at
Scale", Sec. 2.2) describe: the server selects ``ceil(k x over-selection)`` of the connected devices for
the ``k`` the strategy sampled (``WallClockRounds.select``), and the round closes as soon as ``k`` devices
have sent an update, or at ``round-deadline`` seconds after the messages went out, whichever comes first
(``DeadlineGrid``). A device that has not replied when the round closes is *late* (closed by the deadline
or ``round-timeout``) or *surplus* (the round had its ``k`` updates); its reply, when it comes, is never
pulled, and updates beyond the ``k`` th in the same pull are set aside as surplus. Evaluation rounds are
not cut (they measure; ``round-timeout`` bounds them as before).

Without a deadline or over-selection the grid behaves as ``ProgressGrid`` (it only counts), so a
deployment that sets neither runs as before.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedpersona.config import RunConfig
from fedpersona.population import time_to_accuracy
from fedpersona.protocol import decline_reason
from fedpersona.server.population_rounds import ACCURACY_LEVELS, round_policy
from fedpersona.server.progress_grid import ProgressGrid, ReplyCallback


class WallClockRounds:
    """Over-selection and the per-round counts of a deployment (see the module docstring).

    Args:
        config: the run configuration (``round-deadline`` in wall-clock seconds, ``over-selection``,
            ``min-replies``, ``seed``).
    """

    def __init__(self, config: RunConfig) -> None:
        self.policy = round_policy(config)
        self.seed = config.seed
        self.round = 0
        self.wanted: dict[int, int] = {}  # round -> updates the round keeps (the strategy's sample)
        self.figures: dict[int, dict[str, Any]] = {}  # round -> its row's figures
        self.prior_rows: list[Mapping[str, Any]] = []  # a resumed run's finished rounds (metrics.jsonl)
        self.totals = {"late_users": 0, "surplus_users": 0, "declined_users": 0, "dropped_users": 0,
                       "incomplete_rounds": 0}

    @property
    def active(self) -> bool:
        """Whether training rounds are cut (a deadline or over-selection)."""
        return self.policy.deadline_s > 0 or self.policy.over_selection > 1

    # ---- sampling (fedpersona.server.sampling.population_sampling) ------------------------------------
    def begin(self, server_round: int) -> None:
        self.round = int(server_round)

    def end(self) -> None:
        pass

    def candidates(self) -> None:
        return None  # every connected device may be sampled

    def select(self, server_round: int, messages: list[Message], grid: Grid) -> list[Message]:
        """The strategy's messages plus ``ceil(k x over-selection) - k`` more connected devices (a seeded
        draw among the others), each sent the strategy's message content."""
        self.wanted[server_round] = len(messages)
        if not messages or self.policy.over_selection <= 1:
            return messages
        chosen = {int(m.metadata.dst_node_id) for m in messages}
        others = sorted(int(n) for n in grid.get_node_ids() if int(n) not in chosen)
        extra = self.policy.num_to_select(len(messages), len(messages) + len(others)) - len(messages)
        if extra <= 0:
            return messages
        rng = np.random.default_rng([self.seed % 2**63, zlib.crc32(b"over-selection"), int(server_round)])
        picked = rng.choice(np.asarray(others, np.int64), size=extra, replace=False)
        first = messages[0].metadata
        return messages + [Message(content=messages[i % len(messages)].content, dst_node_id=int(node),
                                   message_type=first.message_type, ttl=first.ttl, group_id=first.group_id)
                           for i, node in enumerate(picked)]

    # ---- a training round ------------------------------------------------------------------------------
    def closed(self, server_round: int, *, sent: int, updates: int, declined: int, failed: int, late: int,
               surplus: int, seconds: float) -> None:
        """Count a closed training round."""
        complete = updates >= min(self.policy.min_replies, self.wanted.get(server_round, sent))
        figures = {"selected": sent, "accepted": updates, "late_users": late, "surplus_users": surplus,
                   "declined_users": declined, "dropped_users": failed, "round_complete": complete,
                   "round_seconds": round(seconds, 3)}
        self.figures[server_round] = figures
        for key in ("late_users", "surplus_users", "declined_users", "dropped_users"):
            self.totals[key] += figures[key]
        self.totals["incomplete_rounds"] += not complete

    def row(self, server_round: int) -> dict[str, Any]:
        return dict(self.figures.get(server_round, {}))

    def note_evaluation(self, replies: Iterable[Message]) -> None:
        pass

    def resume_from(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Continue the totals of a resumed run from its finished rounds' rows."""
        self.prior_rows = list(rows)
        for row in self.prior_rows:
            for key in ("late_users", "surplus_users", "declined_users", "dropped_users"):
                self.totals[key] += int(row.get(key, 0))
            self.totals["incomplete_rounds"] += "round_complete" in row and not row["round_complete"]

    def summary(self, rows: Sequence[Mapping[str, Any]], per_user: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
        """The issue-25 summary keys for a deployment: counts of the wall-clock rounds; no simulated clock
        (``simulated_seconds`` null), time-to-accuracy in wall-clock seconds since the run's start, one
        group (``all``: devices bring no population groups)."""
        rows = [*self.prior_rows, *rows]
        points = [(float(r["wall_seconds"]), float(r["personalized_accuracy_mean"])) for r in rows
                  if r.get("personalized_accuracy_mean") is not None and "wall_seconds" in r]
        accuracies = [(e.get("personalized"), e.get("global")) for e in per_user.values()]

        def mean(values: list[float | None]) -> float | None:
            kept = [v for v in values if v is not None and not math.isnan(v)]
            return round(float(np.mean(kept)), 6) if kept else None

        return {"population": None, "clock": "wall", "simulated_seconds": None, "unavailable_users": 0,
                **self.totals, "unfit_users": 0,
                "time_to_accuracy": {f"{level:g}": t for level, t in time_to_accuracy(points, ACCURACY_LEVELS).items()},
                "round_deadline_s": self.policy.deadline_s, "over_selection": self.policy.over_selection,
                "min_replies": self.policy.min_replies,
                "accuracy_by_group": ({"all": {"users": len(accuracies),
                                               "personalized_accuracy_mean": mean([a for a, _ in accuracies]),
                                               "global_accuracy_mean": mean([g for _, g in accuracies]),
                                               "rounds_trained": None}} if accuracies else {})}


class DeadlineGrid(ProgressGrid):
    """``ProgressGrid`` whose training rounds close at the deadline or at the ``k`` th update (module docstring).

    Args:
        inner: Flower's deployment grid.
        rounds: the run's ``WallClockRounds`` (over-selection, the counts).
        on_reply: progress callback ``(replies in, messages sent)``.
        poll_interval: seconds between pulls that brought nothing.
    """

    def __init__(self, inner: Grid, rounds: WallClockRounds, on_reply: ReplyCallback | None = None,
                 poll_interval: float = 0.05) -> None:
        super().__init__(inner, on_reply=on_reply, poll_interval=poll_interval)
        self.rounds = rounds

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return super().send_and_receive(messages, timeout=timeout)
        started = time.monotonic()
        server_round = self.rounds.round
        wanted = self.rounds.wanted.get(server_round, len(messages)) if self.rounds.active else len(messages)
        policy = self.rounds.policy
        close_at = min(started + policy.deadline_s if policy.deadline_s > 0 else math.inf,
                       started + timeout if timeout is not None else math.inf)
        sent = list(self.push_messages(messages))
        position = {message_id: i for i, message_id in enumerate(sent)}
        pending, kept, updates, surplus_updates = set(sent), [], 0, 0
        if self.on_reply:
            self.on_reply(0, len(sent))
        while pending and updates < wanted and time.monotonic() < close_at:
            new = list(self.inner.pull_messages(list(pending)))
            if not new:
                time.sleep(self.poll_interval)
                continue
            pending.difference_update(m.metadata.reply_to_message_id for m in new)
            for reply in new:
                is_update = not reply.has_error() and decline_reason(reply.content) is None
                if is_update and updates >= wanted:
                    surplus_updates += 1  # keep the first k updates (over-selection)
                    continue
                updates += is_update
                kept.append(reply)
            if self.on_reply:
                self.on_reply(len(kept), len(sent))
        by_wanted = updates >= wanted
        declined = sum(1 for m in kept if not m.has_error() and decline_reason(m.content) is not None)
        self.rounds.closed(server_round, sent=len(sent), updates=updates, declined=declined,
                           failed=sum(1 for m in kept if m.has_error()),
                           late=0 if by_wanted else len(pending), surplus=surplus_updates + (len(pending) if by_wanted else 0),
                           seconds=time.monotonic() - started)
        return sorted(kept, key=lambda m: position.get(m.metadata.reply_to_message_id, len(sent)))
