"""What a heterogeneous run reports: simulated time, time-to-accuracy, per-reason counts, per-group means.

Wall time says how fast this machine simulated; simulated time says how long the federation would take
on the population's devices. Time-to-accuracy is FedScale's headline measure (Lai et al. 2022): the
simulated time until the mean personalized accuracy first reaches a level. Per-group means answer
the question heterogeneity raises for personalization: do the users on slow phones, rarely online or
with strict privacy get a worse private head? These helpers are pure: the recorder feeds them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fedpersona.population.clock import RoundOutcome, Status
from fedpersona.population.model import Grouping


def time_to_accuracy(points: Iterable[tuple[float, float]], levels: Sequence[float]) -> dict[float, float | None]:
    """The first simulated time at which the accuracy reached each level (FedScale's time-to-accuracy).

    Args:
        points: ``(simulated_seconds, accuracy)`` per evaluation, in any order (NaN accuracies skipped).
        levels: accuracy levels (e.g. ``[0.6, 0.7, 0.8]``).

    Returns:
        ``{level: seconds or None}`` (None: never reached); for ``summary.json`` turn the keys into
        strings (``f"{level:g}"``).
    """
    ordered = sorted((float(t), float(a)) for t, a in points if not math.isnan(float(a)))
    out: dict[float, float | None] = {}
    for level in levels:
        out[level] = next((t for t, a in ordered if a >= level), None)
    return out


def group_report(groupings: Iterable[Grouping],
                 columns: Mapping[str, np.ndarray]) -> dict[str, dict[str, float | int | None]]:
    """Per-group means of per-user columns, keyed ``kind:name`` (e.g. ``tier:slow``), for
    ``summary.json``'s ``accuracy_by_group``.

    Args:
        groupings: the groupings (``Population.groups().values()``, ``quantile_grouping(pairs, "pairs")``).
        columns: output name -> one value per user, shape ``(num_users,)`` (NaN: not measured, left out
            of the mean), e.g. ``{"personalized_accuracy_mean": ..., "rounds_trained": ...}``.

    Returns:
        ``{label: {"users": n, name: mean or None (no measured user), ...}}``, empty groups left out.
    """
    report: dict[str, dict[str, float | int | None]] = {}
    for grouping in groupings:
        for index, name in enumerate(grouping.names):
            members = grouping.codes == index
            if not members.any():
                continue
            row: dict[str, float | int | None] = {"users": int(members.sum())}
            for column, values in columns.items():
                picked = np.asarray(values, float)[members]
                picked = picked[~np.isnan(picked)]
                row[column] = round(float(picked.mean()), 6) if picked.size else None
            report[f"{grouping.kind}:{name}"] = row
    return report


class RunTally:
    """Totals over a run's rounds: simulated time, per-reason counts, rounds each user trained.

    Args:
        num_users: the population's size.
        start_s: the run's simulated start.
        unfit_users: users whose device cannot hold the model (``SimulatedClock.unfit_users``).
    """

    def __init__(self, num_users: int, start_s: float = 0.0, unfit_users: int = 0) -> None:
        self.start_s = float(start_s)
        self.end_s = float(start_s)
        self.unfit_users = int(unfit_users)
        self.rounds_trained = np.zeros(num_users, np.int64)
        self.totals = {s.label: 0 for s in Status if s is not Status.PENDING}
        self.unavailable = 0
        self.rounds = 0
        self.incomplete_rounds = 0

    def add(self, outcome: RoundOutcome) -> None:
        """Count one closed round."""
        np.add.at(self.rounds_trained, outcome.accepted, 1)
        for label, count in outcome.counts().items():
            self.totals[label] += count
        self.unavailable += outcome.unavailable_users
        self.end_s = max(self.end_s, outcome.end_s)
        self.rounds += 1
        self.incomplete_rounds += not outcome.complete

    def summary(self) -> dict[str, float | int]:
        """The summary keys of issue 25 (totals over the run): ``simulated_seconds`` and the per-reason
        counts. ``unavailable_users`` sums, over rounds, the users that could not be selected at the
        round's start; ``dropped_users`` includes those whose window closed mid-round; ``surplus_users``
        (over-selected replies not needed) is not counted as late."""
        t = self.totals
        return {"simulated_seconds": round(self.end_s - self.start_s, 3), "unavailable_users": self.unavailable,
                "declined_users": t["declined"], "dropped_users": t["dropped"] + t["offline"],
                "late_users": t["late"], "surplus_users": t["surplus"], "unfit_users": self.unfit_users,
                "incomplete_rounds": self.incomplete_rounds}
