"""When each simulated user is online: periodic on-windows, vectorized over 10,000+ users.

Cross-device devices train only while idle, charging and on Wi-Fi, which follows the day (Bonawitz et al.
2019, "Towards Federated Learning at Scale", Sec. 2 and Fig. 7: participation peaks at night), and FedScale
replays measured per-device active/inactive intervals. Both become one representation here: *profiles*,
each a sorted list of on-windows ``[start, end)`` within one period (seconds), and a profile per user. The
parametric diurnal model gives every user its own profile (one window a day from a start time and an
on-fraction, split in two where it crosses midnight); a trace gives one profile per trace device, shared
by the users mapped to it; "always" is today's behaviour. Point queries ("who is online at t", "until when")
are one ``searchsorted`` over all windows; "when are at least m users online" is one sweep over the
window edges of the coming period. Nothing here depends on how many users were selected, so a round's
answer never depends on other rounds.
"""

from __future__ import annotations

import math

import numpy as np

from fedpersona.population.traces import AvailabilityTrace

DAY_S = 86400.0


class Availability:
    """Per-user periodic on-windows (see the module docstring).

    Args:
        period_s: the period in simulated seconds (86400: a day).
        starts, ends: every profile's windows, flattened (seconds in ``[0, period_s]``, sorted within a
            profile, touching windows merged).
        offsets: profile ``p``'s windows are ``starts[offsets[p]:offsets[p+1]]``; shape ``(profiles + 1,)``.
        profile_of_user: each user's profile, shape ``(num_users,)``.
        kind: ``"always"``, ``"diurnal"`` or ``"trace"`` (for descriptions; "always" takes fast paths).
    """

    def __init__(self, period_s: float, starts: np.ndarray, ends: np.ndarray, offsets: np.ndarray,
                 profile_of_user: np.ndarray, kind: str) -> None:
        self.period_s = float(period_s)
        self.starts = np.asarray(starts, float)
        self.ends = np.asarray(ends, float)
        self.offsets = np.asarray(offsets, np.int64)
        self.profile_of_user = np.asarray(profile_of_user, np.int64)
        self.kind = kind
        num_profiles = len(self.offsets) - 1
        self._window_profile = np.repeat(np.arange(num_profiles), np.diff(self.offsets))
        self._stride = 2.0 * self.period_s  # profile p's keys lie in [p*stride, p*stride + period)
        self._keys = self._window_profile * self._stride + self.starts
        nonempty = np.diff(self.offsets) > 0
        first = np.minimum(self.offsets[:-1], max(len(self.starts) - 1, 0))
        self._first_start = np.where(nonempty, self.starts[first] if len(self.starts) else 0.0, np.nan)
        self._first_end = np.where(nonempty, self.ends[first] if len(self.ends) else 0.0, np.nan)

    # ---- constructors ------------------------------------------------------------------------------
    @classmethod
    def always_on(cls, num_users: int) -> Availability:
        """Every user online at every time (today's simulation)."""
        return cls(DAY_S, np.zeros(1), np.full(1, DAY_S), np.array([0, 1]), np.zeros(num_users, np.int64), "always")

    @classmethod
    def diurnal(cls, start_s: np.ndarray, on_fraction: np.ndarray, period_s: float = DAY_S) -> Availability:
        """One window a period per user: online from ``start_s`` (mod the period) for ``on_fraction`` of it.

        Args:
            start_s: each user's window start, seconds (any real; taken modulo ``period_s``), shape ``(N,)``.
            on_fraction: each user's share of the period online, in [0, 1], shape ``(N,)``.
            period_s: the period (seconds).

        Returns:
            The availability (one profile per user).
        """
        period = float(period_s)
        start = np.mod(np.asarray(start_s, float), period)
        start = np.where(start >= period, 0.0, start)  # mod of a tiny negative rounds up to the period
        length = np.clip(np.asarray(on_fraction, float), 0.0, 1.0) * period
        none, full = length <= 0, length >= period
        wrap = ~none & ~full & (start + length > period)
        single = ~none & ~full & ~wrap
        counts = np.where(none, 0, np.where(wrap, 2, 1))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        first = offsets[:-1]
        starts, ends = np.zeros(offsets[-1]), np.zeros(offsets[-1])
        starts[first[single]], ends[first[single]] = start[single], start[single] + length[single]
        starts[first[full]], ends[first[full]] = 0.0, period
        starts[first[wrap]], ends[first[wrap]] = 0.0, start[wrap] + length[wrap] - period
        starts[first[wrap] + 1], ends[first[wrap] + 1] = start[wrap], period
        return cls(period, starts, ends, offsets, np.arange(len(start)), "diurnal")

    @classmethod
    def from_trace(cls, trace: AvailabilityTrace, device_of_user: np.ndarray) -> Availability:
        """Users replay trace devices: user ``u`` is online exactly when device ``device_of_user[u]`` is."""
        return cls(trace.period_s, trace.starts, trace.ends, trace.offsets, device_of_user, "trace")

    # ---- queries -----------------------------------------------------------------------------------
    @property
    def num_users(self) -> int:
        return len(self.profile_of_user)

    def _locate(self, x: float, profiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For time-of-period ``x``: whether each profile is inside a window, and that window's index."""
        if not len(self.starts):
            return np.zeros(len(profiles), bool), np.zeros(len(profiles), np.int64)
        index = np.searchsorted(self._keys, profiles * self._stride + x, side="right") - 1
        safe = np.maximum(index, 0)
        inside = (index >= self.offsets[profiles]) & (x < self.ends[safe])
        return inside, safe

    def online(self, t: float, users: np.ndarray | None = None) -> np.ndarray:
        """Whether each user is online at simulated time ``t`` (seconds).

        Args:
            t: simulated seconds since the run's start (the period starts at 0).
            users: user indices (default: all).

        Returns:
            Bool array, one per user asked about.
        """
        count = self.num_users if users is None else len(users)
        if self.kind == "always":
            return np.ones(count, bool)
        profiles = self.profile_of_user if users is None else self.profile_of_user[users]
        return self._locate(float(t) % self.period_s, profiles)[0]

    def online_until(self, t: float, users: np.ndarray) -> np.ndarray:
        """When each user's current online stretch ends (simulated seconds; ``inf``: never; ``t`` for a user
        offline at ``t``). Touching windows, also across the period's end, are one stretch.

        Args:
            t: simulated seconds.
            users: user indices.

        Returns:
            Float array, shape ``(len(users),)``.
        """
        users = np.asarray(users, np.int64)
        if self.kind == "always":
            return np.full(len(users), math.inf)
        t = float(t)
        x = t % self.period_s
        profiles = self.profile_of_user[users]
        inside, index = self._locate(x, profiles)
        end = self.ends[index] if len(self.ends) else np.zeros(len(users))
        until = t - x + end
        wraps = inside & (end >= self.period_s) & (self._first_start[profiles] == 0)
        until = np.where(wraps, until + np.nan_to_num(self._first_end[profiles]), until)
        until = np.where(wraps & (index == self.offsets[profiles]), math.inf, until)  # [0, period): always
        return np.where(inside, until, t)

    def on_fraction(self) -> np.ndarray:
        """Each user's share of the period online, in [0, 1], shape ``(num_users,)``."""
        per_profile = np.bincount(self._window_profile, weights=self.ends - self.starts,
                                  minlength=len(self.offsets) - 1) / self.period_s
        return per_profile[self.profile_of_user]

    def windows(self, user: int) -> list[tuple[float, float]]:
        """User ``user``'s on-windows within one period, ``[(start, end), ...]`` in seconds."""
        p = self.profile_of_user[user]
        lo, hi = self.offsets[p], self.offsets[p + 1]
        return [(float(s), float(e)) for s, e in zip(self.starts[lo:hi], self.ends[lo:hi], strict=True)]

    def next_time_with(self, count: int, t: float, eligible: np.ndarray | None = None) -> float:
        """The earliest simulated time ``>= t`` at which at least ``count`` users (of ``eligible``) are
        online; ``inf`` if that never happens (the windows repeat, so one period decides).

        Args:
            count: users needed online at once.
            t: simulated seconds to search from.
            eligible: bool mask of users that count (default: all).

        Returns:
            Simulated seconds (``t`` itself when enough are online already), or ``inf``.
        """
        t = float(t)
        mask = np.ones(self.num_users, bool) if eligible is None else np.asarray(eligible, bool)
        if count <= 0:
            return t
        if self.kind == "always":
            return t if int(mask.sum()) >= count else math.inf
        weight = np.bincount(self.profile_of_user[mask], minlength=len(self.offsets) - 1)
        x = t % self.period_s
        inside = self._locate(x, np.arange(len(weight)))[0]
        current = int(weight[inside].sum())
        if current >= count:
            return t
        window_weight = weight[self._window_profile]
        keep = window_weight > 0
        to_start = np.mod(self.starts[keep] - x, self.period_s)
        to_end = np.mod(self.ends[keep] - x, self.period_s)
        to_start[to_start <= 0] = self.period_s  # a window starting now is counted already
        to_end[to_end <= 0] = self.period_s
        delays = np.concatenate([to_start, to_end])
        changes = np.concatenate([window_weight[keep], -window_weight[keep]])
        order = np.argsort(delays, kind="stable")
        delays, online = delays[order], current + np.cumsum(changes[order])
        settled = np.r_[delays[1:] != delays[:-1], True]  # all changes at one instant applied
        hits = np.flatnonzero(settled & (online >= count))
        if not hits.size:
            return math.inf
        found = t + float(delays[hits[0]])
        for _ in range(4):  # t + delay can round a hair below the window's start: step onto it
            if int(self.online(found)[mask].sum()) >= count:
                return found
            found = float(np.nextafter(found, math.inf)) + 1e-9 * max(1.0, abs(found))
        return found
