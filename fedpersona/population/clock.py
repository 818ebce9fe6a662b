"""The simulated clock and the server's round policies: deadline, over-selection, minimum replies.

A real cross-device round (Bonawitz et al. 2019, "Towards Federated Learning at Scale", Sec. 2.2 and 4)
selects among the devices checked in *now*, over-selects because some will drop out, and closes when
the wanted number of updates is in or at a deadline; stragglers are discarded. FedScale (Lai et al.
2022) simulates the same with per-client compute and bandwidth, availability traces and "over-commitment".
This module decides all of that on simulated seconds, given what the simulation really did:

* before a round: :meth:`SimulatedClock.plan_round` (or :meth:`~SimulatedClock.available_users` and
  :meth:`~SimulatedClock.num_to_select`): when the round can start (waiting, in simulated time, until
  enough users are online), who may be sampled, and how many to select;
* optionally, before training: :meth:`~SimulatedClock.fate_before_work`, the outcomes that do not depend on
  the work (memory, offline at the start, a dropout draw), so doomed users need not be trained at all;
* after the replies: :meth:`~SimulatedClock.close_round`: each selected user's duration = download
  (bytes / bandwidth) + compute (work x seconds per unit) + upload (real bytes / bandwidth), its status
  (:class:`Status`), and the round's end: the ``wanted``-th accepted reply, else the deadline (or the
  last outcome when there is none);
* :meth:`~SimulatedClock.advance`: the next round starts at that end plus the server's gap.

Everything is a function of (population seed, round number, inputs): the dropout draws are made for the
whole population from the round's own stream, so a user's fate does not depend on who else was selected.
Evaluation is a measurement, not a protocol step: it is not on the clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from fedpersona.errors import UsageError
from fedpersona.population.model import Population


class Status(IntEnum):
    """What became of a selected user in a round (``RoundOutcome.status``)."""

    OK = 0  # its reply is accepted (in time, among the first ``wanted``)
    LATE = 1  # it finished after the deadline: discarded
    SURPLUS = 2  # it finished in time after the round had its ``wanted`` replies (over-selection): discarded
    DROPPED = 3  # it failed mid-round (the dropout probability): no reply
    OFFLINE = 4  # its availability window closed before its reply was sent: no reply
    DECLINED = 5  # its privacy policy declined the round's request (a reply, without an update)
    UNAVAILABLE = 6  # not online when the round started
    UNFIT = 7  # its device memory cannot hold the model: never trains
    PENDING = 8  # (``fate_before_work`` only) decided by the work it does

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class RoundPolicy:
    """The server's round rules (the settings ``round-deadline``, ``over-selection``, ...).

    Args:
        deadline_s: simulated seconds after the round's start at which it closes (0: no deadline).
        over_selection: select ``ceil(wanted x factor)`` users, keep the first ``wanted`` (>= 1).
        min_replies: accepted replies a round needs to count as complete (Bonawitz et al.'s goal count).
        server_gap_s: simulated seconds between one round's end and the next one's start.

    Raises:
        UsageError: a value out of range, naming the setting.
    """

    deadline_s: float = 0.0
    over_selection: float = 1.0
    min_replies: int = 1
    server_gap_s: float = 0.0

    def __post_init__(self) -> None:
        checks = (("round-deadline", self.deadline_s, 0 <= self.deadline_s < math.inf,
                   "simulated seconds >= 0 (0: no deadline)"),
                  ("over-selection", self.over_selection, 1 <= self.over_selection < math.inf,
                   "a factor >= 1 (1: select exactly the users wanted; 1.3: 30% more)"),
                  ("min-replies", self.min_replies, isinstance(self.min_replies, int) and self.min_replies >= 0,
                   "a whole number >= 0"),
                  ("server-gap", self.server_gap_s, 0 <= self.server_gap_s < math.inf, "simulated seconds >= 0"))
        for name, value, ok, what in checks:
            if not ok:
                raise UsageError(f"{name} {value!r} is invalid: it must be {what}")

    def num_to_select(self, wanted: int, available: int) -> int:
        """How many users to select for ``wanted`` replies: ``ceil(wanted x over_selection)``, at most
        ``available``."""
        return int(min(math.ceil(round(wanted * self.over_selection, 9)), available))


@dataclass(frozen=True)
class RoundPlan:
    """A round before sampling: its simulated ``start_s``, the ``candidates`` to sample from (online
    and fit, ascending user indices), ``num_select`` to pick, and ``waited_s`` spent waiting for them."""

    start_s: float
    candidates: np.ndarray
    num_select: int
    waited_s: float


@dataclass(frozen=True)
class RoundOutcome:
    """A closed round: per selected user (in the order given) its status, outcome time and durations.

    ``finish_s`` is when the server learns the user's outcome (its reply, its decline, when it dropped
    or went offline; the start for unavailable and unfit users), absolute simulated seconds.
    ``unavailable_users`` counts the whole population that could not be selected at the start (offline
    or unfit), not only the selected.
    """

    round: int
    start_s: float
    end_s: float
    users: np.ndarray
    status: np.ndarray
    finish_s: np.ndarray
    download_s: np.ndarray
    compute_s: np.ndarray
    upload_s: np.ndarray
    wanted: int
    complete: bool
    unavailable_users: int

    @property
    def accepted(self) -> np.ndarray:
        """The users whose replies count (status OK), in the order given."""
        return self.users[self.status == Status.OK]

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def count(self, status: Status) -> int:
        return int(np.count_nonzero(self.status == status))

    def counts(self) -> dict[str, int]:
        """Selected users per status label (``ok``, ``late``, ...), zeros included (PENDING left out)."""
        found = np.bincount(self.status, minlength=len(Status))
        return {s.label: int(found[s]) for s in Status if s is not Status.PENDING}

    def row(self) -> dict[str, float | int | bool]:
        """The round's figures for ``metrics.jsonl``."""
        counts = self.counts()
        return {"simulated_start_s": round(self.start_s, 3), "simulated_end_s": round(self.end_s, 3),
                "simulated_round_s": round(self.duration_s, 3), "selected": len(self.users),
                "accepted": counts["ok"], "late_users": counts["late"], "surplus_users": counts["surplus"],
                "dropped_users": counts["dropped"] + counts["offline"], "declined_users": counts["declined"],
                "unavailable_users": self.unavailable_users, "round_complete": self.complete}


def _per_user(value: float | Sequence[float] | np.ndarray, size: int, name: str) -> np.ndarray:
    array = np.broadcast_to(np.asarray(value, float), (size,))
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{name} must be finite numbers >= 0, one per selected user (or one for all)")
    return array


class SimulatedClock:
    """Simulated time and round decisions for one run (see the module docstring).

    Args:
        population: the users.
        policy: deadline, over-selection, minimum replies, server gap.
        model_bytes: what training needs on a device (bytes); users whose memory is smaller never train.
        start_s: the simulated time of the run's start (0: midnight of day 0 for a diurnal population).
    """

    def __init__(self, population: Population, policy: RoundPolicy | None = None, *, model_bytes: float = 0.0,
                 start_s: float = 0.0) -> None:
        self.population = population
        self.policy = policy or RoundPolicy()
        self.eligible = population.fits(model_bytes)
        self.now = float(start_s)
        self._draws: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def unfit_users(self) -> int:
        """Users whose device can never hold the model (counted once for the run)."""
        return int(np.count_nonzero(~self.eligible))

    def available_users(self, t: float | None = None) -> np.ndarray:
        """The users that may be selected at simulated time ``t`` (default: now): online and fit,
        ascending indices (the order Flower's seeded samplers expect)."""
        online = self.population.availability.online(self.now if t is None else t)
        return np.flatnonzero(online & self.eligible)

    def num_to_select(self, wanted: int, available: int) -> int:
        """``policy.num_to_select``: ``ceil(wanted x over_selection)``, at most ``available``."""
        return self.policy.num_to_select(wanted, available)

    def next_start(self, need: int, t: float | None = None) -> float:
        """The earliest simulated time ``>= t`` (default: now) with at least ``need`` selectable users;
        ``inf`` if the population never has that many online at once."""
        return self.population.availability.next_time_with(need, self.now if t is None else t, self.eligible)

    def plan_round(self, wanted: int, need: int | None = None) -> RoundPlan:
        """When the next round starts and whom it samples from.

        Args:
            wanted: replies the round wants (k).
            need: selectable users the round waits for (default ``min(policy.min_replies, wanted)``, at
                least 1); the clock moves on, in simulated time, until that many are online.

        Returns:
            The plan; select ``num_select`` of ``candidates`` (over-selection applied, capped by them).

        Raises:
            UsageError: the population never has ``need`` users online at once.
        """
        need = max(1, min(self.policy.min_replies, wanted) if need is None else need)
        start = self.next_start(need)
        if math.isinf(start):
            raise UsageError(f"population {self.population.spec.name}: never {need} users online (and able to hold "
                             f"the model) at once among {self.population.num_users}; use more users, fewer "
                             "min-replies, or a population with more availability")
        candidates = self.available_users(start)
        return RoundPlan(start, candidates, self.num_to_select(wanted, len(candidates)), start - self.now)

    def _round_draws(self, round_number: int) -> tuple[np.ndarray, np.ndarray]:
        if self._draws is None or self._draws[0] != round_number:
            rng = self.population.rng("clock.dropout", int(round_number))
            n = self.population.num_users
            self._draws = (round_number, rng.random(n), rng.random(n))
        return self._draws[1], self._draws[2]

    def fate_before_work(self, round_number: int, start_s: float, selected: Sequence[int] | np.ndarray) -> np.ndarray:
        """The statuses decided before any work: UNFIT, UNAVAILABLE, DROPPED; PENDING for the rest.
        ``close_round`` decides these users the same way, so they need not be trained.

        Args:
            round_number: the round (seeds the dropout draws).
            start_s: the round's simulated start.
            selected: user indices.

        Returns:
            Int8 array of ``Status`` values, one per selected user.
        """
        users = np.asarray(selected, np.int64)
        fail, _ = self._round_draws(round_number)
        status = np.full(len(users), Status.PENDING, np.int8)
        status[fail[users] < self.population.dropout_probability[users]] = Status.DROPPED
        status[~self.population.availability.online(start_s, users)] = Status.UNAVAILABLE
        status[~self.eligible[users]] = Status.UNFIT
        return status

    def close_round(self, round_number: int, start_s: float, selected: Sequence[int] | np.ndarray, *,
                    work: float | Sequence[float] | np.ndarray, bytes_down: float | Sequence[float] | np.ndarray,
                    bytes_up: float | Sequence[float] | np.ndarray, declined: Sequence[bool] | np.ndarray | None = None,
                    wanted: int | None = None) -> RoundOutcome:
        """Decide a round from what was really done (pure: the clock's ``now`` does not move; ``advance``).

        Args:
            round_number: the round (seeds the dropout draws).
            start_s: its simulated start (``plan_round().start_s``).
            selected: the selected users (indices, no repeats), in the strategy's order.
            work: per selected user (or one for all), the work it trained, in ``population.compute_unit``
                (pairs or tokens, all epochs counted); for users that will not train (``fate_before_work``)
                the planned work, or 0 (it only places the moment a dropout is noticed).
            bytes_down: bytes each user downloads (the round's message).
            bytes_up: bytes each user's reply uploads (its real size).
            declined: per selected user, whether its policy declined (a decline replies right after the download).
            wanted: the replies the round keeps (k): the first ``wanted`` in-time finishers are OK, later
                ones SURPLUS. Default: every selected user (no over-selection).

        Returns:
            The outcome; ``end_s`` is the ``wanted``-th accepted reply's time when there are that many,
            else the last outcome's time capped at the deadline.

        Raises:
            ValueError: bad indices or repeats, negative or non-finite work or bytes (the caller's bug).
        """
        pop, policy = self.population, self.policy
        users = np.asarray(selected, np.int64)
        n = len(users)
        if n and (users.min() < 0 or users.max() >= pop.num_users or len(np.unique(users)) != n):
            raise ValueError("selected must be distinct user indices in [0, num_users)")
        wanted = n if wanted is None else int(wanted)
        if wanted < 0:
            raise ValueError(f"wanted must be >= 0, got {wanted}")
        start = float(start_s)
        down = _per_user(bytes_down, n, "bytes_down") / pop.download_bytes_per_s[users]
        compute = _per_user(work, n, "work") * pop.seconds_per_unit[users]
        up = _per_user(bytes_up, n, "bytes_up") / pop.upload_bytes_per_s[users]
        said_no = np.zeros(n, bool) if declined is None else np.asarray(declined, bool)
        reply = start + np.where(said_no, down, down + compute + up)
        status = self.fate_before_work(round_number, start, users)
        finish = np.where(status == Status.PENDING, reply, start)
        _, when = self._round_draws(round_number)
        dropped = status == Status.DROPPED
        finish[dropped] = start + when[users[dropped]] * (reply[dropped] - start)
        pending = status == Status.PENDING
        until = pop.availability.online_until(start, users)
        offline = pending & (reply > until)
        status[offline], finish[offline] = Status.OFFLINE, until[offline]
        status[pending & ~offline & said_no] = Status.DECLINED
        replied = pending & ~offline & ~said_no
        deadline = start + policy.deadline_s if policy.deadline_s > 0 else math.inf
        status[replied & (reply > deadline)] = Status.LATE
        in_time = np.flatnonzero(replied & (reply <= deadline))
        order = in_time[np.argsort(reply[in_time], kind="stable")]
        status[order[:wanted]], status[order[wanted:]] = Status.OK, Status.SURPLUS
        if 0 < wanted <= len(order):
            end = float(reply[order[wanted - 1]])
        else:
            end = min(float(finish.max()) if n else start, deadline)
        unavailable = pop.num_users - int(np.count_nonzero(pop.availability.online(start) & self.eligible))
        return RoundOutcome(int(round_number), start, max(end, start), users, status, finish, down, compute, up,
                            wanted, int(min(wanted, len(order))) >= policy.min_replies, unavailable)

    def advance(self, outcome: RoundOutcome) -> float:
        """Move the clock past ``outcome``: the next round may start at its end plus the server gap.

        Returns:
            The new ``now`` (simulated seconds).
        """
        self.now = max(self.now, outcome.end_s) + self.policy.server_gap_s
        return self.now
