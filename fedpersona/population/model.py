"""A drawn population: every simulated user's device, availability, dropout and privacy policy as arrays.

The spec says how properties are distributed; this draws them for ``(spec, num_users, seed)``. Each
property has its own seeded stream (seed, property name, tier), so the same triple gives the same users
bit for bit, and one property's draws do not move when another is added to the file. Arrays are drawn on
first use (a uniform run touches almost none of them) and cost milliseconds for 10,000 users
(``benchmarks/population_clock.py``). Pairs per user are *not* drawn here: they stay the data's (the
pair file's, or the synthetic scenario's log-normal counts); group users by them with
:func:`quantile_grouping`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fedpersona.errors import UsageError
from fedpersona.population.availability import Availability
from fedpersona.population.distributions import DEVICE_DEFAULTS
from fedpersona.population.presets import load_population_spec
from fedpersona.population.spec import PopulationSpec

MB = 1_000_000  # memory_mb is in MB of 10^6 bytes


@dataclass(frozen=True)
class Grouping:
    """Users in named groups for reports: ``codes[u]`` indexes ``names``; labels read ``kind:name``."""

    kind: str
    names: tuple[str, ...]
    codes: np.ndarray

    def label(self, index: int) -> str:
        return f"{self.kind}:{self.names[index]}"

    def members(self, name: str) -> np.ndarray:
        """The users of group ``name`` (indices, ascending)."""
        return np.flatnonzero(self.codes == self.names.index(name))

    def sizes(self) -> dict[str, int]:
        counts = np.bincount(self.codes, minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, counts, strict=True)}


@dataclass(frozen=True)
class PrivacyAnswer:
    """How each user answers a round's privacy request: ``reason`` ``""`` (trains) or a
    ``fedpersona.protocol`` decline code; ``epsilon`` the pair-level epsilon it trains at (0: no DP,
    nan: declines)."""

    reason: np.ndarray
    epsilon: np.ndarray

    @property
    def declines(self) -> np.ndarray:
        return self.reason != ""


def quantile_grouping(values: np.ndarray, kind: str, classes: int = 4) -> Grouping:
    """Users in ``classes`` quantile classes of ``values`` (``q1`` lowest; ties share a class; a constant
    ``values`` is one class ``all``). For availability (on-fraction) and data volume (pairs per user).

    Args:
        values: one number per user, shape ``(num_users,)``.
        kind: the grouping's name in labels (``"pairs"`` gives ``pairs:q1`` ...).
        classes: how many classes (4: quartiles).

    Returns:
        The grouping.
    """
    values = np.asarray(values, float)
    if not len(values) or np.all(values == values[0]):
        return Grouping(kind, ("all",), np.zeros(len(values), np.int64))
    edges = np.quantile(values, np.arange(1, classes) / classes)
    return Grouping(kind, tuple(f"q{i + 1}" for i in range(classes)), np.searchsorted(edges, values, side="left"))


def quota_labels(shares: list[float], size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` group labels with counts as close to ``shares`` as whole users allow (largest remainders),
    in a seeded random order: a 30% tier is 30% of the users, not a binomial draw around it."""
    exact = np.asarray(shares, float) * size
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: size - int(counts.sum())]] += 1
    return rng.permutation(np.repeat(np.arange(len(shares)), counts))


class Population:
    """The users of a simulation as arrays (see the module docstring).

    Args:
        spec: the validated population (``load_population_spec``).
        num_users: how many users (>= 1).
        seed: the run's seed.

    Raises:
        UsageError: ``num_users`` < 1.
    """

    def __init__(self, spec: PopulationSpec, num_users: int, seed: int) -> None:
        if int(num_users) < 1:
            raise UsageError(f"population {spec.name}: num-users {num_users} must be >= 1")
        self.spec = spec
        self.num_users = int(num_users)
        self.seed = int(seed)

    @classmethod
    def load(cls, population: str | Path | Mapping[str, Any] | None, num_users: int, seed: int) -> Population:
        """``Population(load_population_spec(population), num_users, seed)``: a preset, file or table."""
        return cls(load_population_spec(population), num_users, seed)

    def rng(self, *labels: str | int) -> np.random.Generator:
        """The seeded stream for ``labels`` (e.g. ``("dropout", round)``): same seed and labels, same draws."""
        words = [self.seed % 2**63] + [zlib.crc32(x.encode()) if isinstance(x, str) else int(x) for x in labels]
        return np.random.default_rng(words)

    # ---- devices -----------------------------------------------------------------------------------
    @property
    def compute_unit(self) -> str:
        """What ``seconds_per_unit`` is per: ``"pair"`` (trained preference pairs) or ``"token"``."""
        return self.spec.compute_unit

    @cached_property
    def _devices(self) -> tuple[tuple[str, ...], np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
        key = "seconds_per_pair" if self.compute_unit == "pair" else "seconds_per_token"
        names = (key, "download_bytes_per_s", "upload_bytes_per_s", "memory_mb")
        if self.spec.devices is not None:
            rows = self.spec.devices
            index = (np.arange(self.num_users) % rows.num_devices if self.spec.device_assign == "in-order" else
                     self.rng("devices.assign").integers(rows.num_devices, size=self.num_users))
            tiers = tuple(dict.fromkeys(rows.tier))
            codes = np.asarray([tiers.index(t) for t in rows.tier], np.int64)[index]
            return tiers, codes, {k: rows.values[k][index] for k in names}, index
        tiers = self.spec.tiers or ()
        if not tiers:
            return ("all",), np.zeros(self.num_users, np.int64), {
                k: np.full(self.num_users, DEVICE_DEFAULTS[k]) for k in names}, None
        codes = quota_labels([t.share for t in tiers], self.num_users, self.rng("tier"))
        values = {k: np.empty(self.num_users) for k in names}
        for i, tier in enumerate(tiers):
            users = np.flatnonzero(codes == i)
            for k in names:
                values[k][users] = tier.properties[k].draw(self.rng(k, tier.name), len(users))
        return tuple(t.name for t in tiers), codes, values, None

    @property
    def tier_names(self) -> tuple[str, ...]:
        return self._devices[0]

    @property
    def tier(self) -> np.ndarray:
        """Each user's tier (index into ``tier_names``), shape ``(num_users,)``."""
        return self._devices[1]

    @property
    def device_row(self) -> np.ndarray | None:
        """Each user's row of the device-profile trace (None without one)."""
        return self._devices[3]

    @property
    def seconds_per_unit(self) -> np.ndarray:
        """Simulated seconds of local training per pair (or token, ``compute_unit``), shape ``(num_users,)``."""
        return self._devices[2]["seconds_per_pair" if self.compute_unit == "pair" else "seconds_per_token"]

    @property
    def download_bytes_per_s(self) -> np.ndarray:
        return self._devices[2]["download_bytes_per_s"]

    @property
    def upload_bytes_per_s(self) -> np.ndarray:
        return self._devices[2]["upload_bytes_per_s"]

    @property
    def memory_mb(self) -> np.ndarray:
        return self._devices[2]["memory_mb"]

    def fits(self, model_bytes: float) -> np.ndarray:
        """Which users' devices can hold a model needing ``model_bytes`` bytes (the others never train).

        Args:
            model_bytes: what training needs on the device, bytes (0: everything fits).

        Returns:
            Bool array, shape ``(num_users,)``; ``(~fits).sum()`` is the count to report.
        """
        return self.memory_mb * MB >= float(model_bytes)

    # ---- availability, dropout, privacy --------------------------------------------------------------
    @cached_property
    def availability(self) -> Availability:
        """When each user is online (``Availability``)."""
        spec = self.spec.availability
        if spec.model == "always":
            return Availability.always_on(self.num_users)
        if spec.model == "trace":
            trace = spec.trace
            index = (np.arange(self.num_users) % trace.num_devices if spec.assign == "in-order" else
                     self.rng("availability.assign").integers(trace.num_devices, size=self.num_users))
            return Availability.from_trace(trace, index)
        start = spec.start_s.draw(self.rng("availability.start_s"), self.num_users)
        on = spec.on_fraction.draw(self.rng("availability.on_fraction"), self.num_users)
        return Availability.diurnal(start, on, spec.period_s)

    @cached_property
    def on_fraction(self) -> np.ndarray:
        """Each user's share of the period online, shape ``(num_users,)``."""
        return self.availability.on_fraction()

    @cached_property
    def dropout_probability(self) -> np.ndarray:
        """Each user's chance, per round it is selected in, of failing before its reply (shape ``(N,)``)."""
        return self.spec.dropout.draw(self.rng("dropout.probability"), self.num_users)

    @cached_property
    def _privacy(self) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
        groups = self.spec.privacy
        if not groups:
            return ("no-demands",), np.zeros(self.num_users, np.int64), np.zeros(self.num_users, bool), \
                np.full(self.num_users, math.inf)
        codes = quota_labels([g.share for g in groups], self.num_users, self.rng("privacy"))
        require = np.asarray([g.require_dp for g in groups])[codes]
        epsilon = np.asarray([g.max_epsilon for g in groups], float)[codes]
        return tuple(g.name for g in groups), codes, require, epsilon

    @property
    def privacy_names(self) -> tuple[str, ...]:
        return self._privacy[0]

    @property
    def privacy_group(self) -> np.ndarray:
        """Each user's privacy group (index into ``privacy_names``)."""
        return self._privacy[1]

    @property
    def require_dp(self) -> np.ndarray:
        """Whether each user's device policy requires pair-level DP (``DevicePolicy.require_dp``)."""
        return self._privacy[2]

    @property
    def max_epsilon(self) -> np.ndarray:
        """Each user's largest accepted epsilon (``inf``: no cap; ``DevicePolicy.max_epsilon``)."""
        return self._privacy[3]

    def answer_request(self, dp_epsilon: float, *, cap_epsilon: bool = False) -> PrivacyAnswer:
        """How every user's policy answers a round asking for pair-level epsilon ``dp_epsilon`` (0: no DP),
        by the rules of ``fedpersona.client.policy.DevicePolicy.check_train``: ``dp-required`` when the
        round has no DP and the user requires it; ``epsilon-above-policy`` when it asks for more than the
        user's ``max_epsilon`` (unless ``cap_epsilon``: then the user trains at its own ``max_epsilon``).

        Args:
            dp_epsilon: the round's pair-level epsilon (0: no DP).
            cap_epsilon: train stricter users at their own epsilon instead of declining.

        Returns:
            The per-user answer.
        """
        dp = dp_epsilon > 0
        required = self.require_dp & (not dp)
        above = np.zeros(self.num_users, bool) if (not dp or cap_epsilon) else dp_epsilon > self.max_epsilon
        reason = np.where(required, "dp-required", np.where(above, "epsilon-above-policy", ""))
        epsilon = np.minimum(dp_epsilon, self.max_epsilon) if dp else np.zeros(self.num_users)
        return PrivacyAnswer(reason, np.where(reason == "", epsilon, np.nan))

    # ---- reporting ---------------------------------------------------------------------------------
    def groups(self) -> dict[str, Grouping]:
        """The report groups: ``tier``, ``availability`` (quartiles of on-fraction) and ``privacy``."""
        return {"tier": Grouping("tier", self.tier_names, self.tier),
                "availability": quantile_grouping(self.on_fraction, "availability"),
                "privacy": Grouping("privacy", self.privacy_names, self.privacy_group)}

    @property
    def is_uniform(self) -> bool:
        """True when every user is today's simulated user (always online, instant, unbounded, never
        drops, no privacy demands): the clock's rounds then take 0 s and accept every reply."""
        spec = self.spec
        return (spec.availability.model == "always" and not spec.privacy and spec.devices is None
                and spec.dropout.support() == (0.0, 0.0)
                and all(d.support() == (DEVICE_DEFAULTS[k],) * 2 for t in spec.tiers for k, d in t.properties.items()))

    def user_row(self, user: int) -> dict[str, Any]:
        """One user's properties for a per-user table (names, not indices)."""
        return {"tier": self.tier_names[self.tier[user]], "on_fraction": round(float(self.on_fraction[user]), 4),
                "privacy": self.privacy_names[self.privacy_group[user]],
                "seconds_per_" + self.compute_unit: float(self.seconds_per_unit[user]),
                "dropout_probability": round(float(self.dropout_probability[user]), 4)}

    def describe(self) -> str:
        """One line for people: the population's name, users, tiers, availability, dropout and privacy."""
        def shares(names: tuple[str, ...], codes: np.ndarray) -> str:
            counts = np.bincount(codes, minlength=len(names))
            return " / ".join(f"{n} {c / self.num_users:.0%}" for n, c in zip(names, counts, strict=True))

        model = self.spec.availability.model
        online = ("always online" if model == "always" else
                  f"{model} availability (mean {self.on_fraction.mean():.0%} online)")
        return (f"population {self.spec.name} ({self.spec.source}): {self.num_users} users; tiers "
                f"{shares(self.tier_names, self.tier)}; {online}; dropout mean {self.dropout_probability.mean():.0%}; "
                f"privacy {shares(self.privacy_names, self.privacy_group)}")

