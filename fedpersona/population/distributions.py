"""Per-user property distributions of a population file, validated against what the property may take.

A population file gives each per-user property either a number (every user of the tier or group gets it)
or a table naming a distribution. The distribution is checked *before* anything is drawn: its support,
after the optional ``min``/``max`` clip, must lie inside the property's range. So a probability drawn
from a log-normal without ``max = 1`` is refused with the fix, instead of producing a 1.7 somewhere
among 10,000 users. Draws are seeded by the caller (``numpy.random.Generator``), one stream per
property and tier, so adding a property to a file does not change the others' values.

Kinds (FedScale models device speed and bandwidth the same way: measured values or a fitted law)::

    seconds_per_pair = 1.5                                          # constant
    seconds_per_pair = { dist = "constant", value = 1.5 }
    on_fraction = { dist = "uniform", low = 0.1, high = 0.5 }
    upload_bytes_per_s = { dist = "lognormal", median = 2.5e6, sigma = 0.5, min = 1e4 }
    start_s = { dist = "normal", mean = 79200, std = 10800 }        # taken modulo the period
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedpersona.errors import UsageError

KINDS: dict[str, tuple[str, ...]] = {
    "constant": ("value",),
    "uniform": ("low", "high"),
    "lognormal": ("median", "sigma"),
    "normal": ("mean", "std"),
}
CLIPS = ("min", "max")


@dataclass(frozen=True)
class Range:
    """What a property may take: ``low`` (excluded when ``low_open``) to ``high``; ``inf`` only if allowed.

    ``unit`` is named in messages (``"s"``, ``"bytes/s"``, ``"MB"``, ``"probability"``).
    """

    low: float
    high: float = math.inf
    low_open: bool = False
    infinite_ok: bool = False
    unit: str = ""

    def admits(self, value: float) -> bool:
        if math.isnan(value) or (math.isinf(value) and not self.infinite_ok):
            return False
        return (value > self.low if self.low_open else value >= self.low) and value <= self.high

    def describe(self) -> str:
        low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        high = "" if math.isinf(self.high) else f" and <= {self.high:g}"
        inf = " (inf allowed)" if self.infinite_ok else ""
        return f"{low}{high}{inf}" + (f" {self.unit}" if self.unit else "")


@dataclass(frozen=True)
class Distribution:
    """One property's law: ``kind`` (see ``KINDS``), its parameters, and an optional clip to [lo, hi]."""

    kind: str
    params: tuple[float, ...]
    clip: tuple[float, float] = (-math.inf, math.inf)

    @classmethod
    def constant(cls, value: float) -> Distribution:
        return cls("constant", (float(value),))

    def support(self) -> tuple[float, float]:
        """The smallest and largest value a draw can take (after the clip)."""
        if self.kind == "constant":
            low = high = self.params[0]
        elif self.kind == "uniform":
            low, high = self.params
        elif self.kind == "lognormal":
            median, sigma = self.params
            low, high = (median, median) if sigma == 0 else (0.0, math.inf)
        else:
            mean, std = self.params
            low, high = (mean, mean) if std == 0 else (-math.inf, math.inf)
        return max(low, self.clip[0]), min(high, self.clip[1])

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` seeded draws (float64), clipped to the distribution's ``min``/``max``.

        Args:
            rng: the caller's generator (one per property and tier).
            size: how many values.

        Returns:
            Array of shape ``(size,)``.
        """
        if self.kind == "constant":
            values = np.full(size, self.params[0])
        elif self.kind == "uniform":
            values = rng.uniform(self.params[0], self.params[1], size)
        elif self.kind == "lognormal":
            median, sigma = self.params
            values = np.exp(rng.normal(math.log(median), sigma, size))
            values = np.maximum(values, np.finfo(float).tiny)  # exp underflow must not make a rate 0
        else:
            values = rng.normal(self.params[0], self.params[1], size)
        lo, hi = self.clip
        return np.clip(values, lo, hi) if (lo > -math.inf or hi < math.inf) else values

    def mean(self) -> float:
        """The law's mean before the clip (for descriptions; constant: the value)."""
        if self.kind == "uniform":
            return (self.params[0] + self.params[1]) / 2
        if self.kind == "lognormal":
            return self.params[0] * math.exp(self.params[1] ** 2 / 2)
        return self.params[0]


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{where}: {key} = {value!r} is not a number; write a number such as 1.5 (or inf)")
    return float(value)


def parse_distribution(value: Any, *, where: str, key: str, allowed: Range) -> Distribution:
    """A property's distribution from a population file's value, checked against ``allowed``.

    Args:
        value: a number (constant) or a table with ``dist`` (``constant``, ``uniform``, ``lognormal``,
            ``normal``), that kind's parameters and optional ``min``/``max``.
        where: the file and section, for messages (``"pop.toml [[tier]] 'slow'"``).
        key: the property's name in the file.
        allowed: the property's range.

    Returns:
        The distribution.

    Raises:
        UsageError: naming ``where``, ``key`` and the fix, for an unknown kind, a missing or unknown
            parameter, a non-number, or a support outside ``allowed``.
    """
    if not isinstance(value, dict):
        number = _number(value, where, key)
        if not allowed.admits(number):
            raise UsageError(f"{where}: {key} = {number:g} is out of range; it must be {allowed.describe()}")
        return Distribution.constant(number)
    kind = value.get("dist")
    if kind not in KINDS:
        raise UsageError(f"{where}: {key} has dist = {kind!r}; use one of {', '.join(KINDS)} "
                         f"(e.g. {key} = {{ dist = \"uniform\", low = 1, high = 2 }}) or a plain number")
    expected = KINDS[kind]
    unknown = sorted(set(value) - {"dist", *expected, *CLIPS})
    missing = [p for p in expected if p not in value]
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"missing {missing[0]!r}"
        raise UsageError(f"{where}: {key} ({kind}): {what}; a {kind} takes {', '.join(expected)} "
                         f"and optionally min, max")
    params = tuple(_number(value[p], where, f"{key}.{p}") for p in expected)
    clip = (_number(value.get("min", -math.inf), where, f"{key}.min"),
            _number(value.get("max", math.inf), where, f"{key}.max"))
    if (kind != "constant" and not all(math.isfinite(p) for p in params)) or clip[0] > clip[1]:
        raise UsageError(f"{where}: {key}: a {kind}'s parameters must be finite numbers, and min <= max")
    if kind == "uniform" and not params[0] <= params[1]:
        raise UsageError(f"{where}: {key}: uniform needs low <= high (got {params[0]:g} > {params[1]:g})")
    if kind in ("lognormal", "normal") and not (0 <= params[1] < math.inf):
        raise UsageError(f"{where}: {key}: {expected[1]} must be a finite number >= 0")
    if kind == "lognormal" and not (0 < params[0] < math.inf):
        raise UsageError(f"{where}: {key}: lognormal median must be a finite number > 0")
    dist = Distribution(kind, params, clip)
    low, high = dist.support()
    # an infinite end of a continuous law's support is a limit, never drawn; a lognormal's 0 is never drawn
    low_ok = (allowed.admits(low) or (low == -math.inf and allowed.low == -math.inf)
              or (low == 0 and kind == "lognormal" and allowed.low == 0))
    high_ok = allowed.admits(high) or (high == math.inf and allowed.high == math.inf)
    if not (low_ok and high_ok) or low > high:
        raise UsageError(f"{where}: {key}: this {kind} can draw values in [{low:g}, {high:g}], but {key} must be "
                         f"{allowed.describe()}; narrow it (parameters, or min = / max = to clip it)")
    return dist


# The per-user properties of a device tier (or a device-profile trace's columns) and their ranges.
# Speed: simulated seconds of local training per unit of work; bandwidth: bytes per second (inf: instant);
# memory: MB (10^6 bytes) the device can give the model (inf: any model fits).
COMPUTE_KEYS = {"seconds_per_pair": "pair", "seconds_per_token": "token"}
DEVICE_RANGES: dict[str, Range] = {
    "seconds_per_pair": Range(0.0, unit="s"),
    "seconds_per_token": Range(0.0, unit="s"),
    "download_bytes_per_s": Range(0.0, low_open=True, infinite_ok=True, unit="bytes/s"),
    "upload_bytes_per_s": Range(0.0, low_open=True, infinite_ok=True, unit="bytes/s"),
    "memory_mb": Range(0.0, low_open=True, infinite_ok=True, unit="MB"),
}
# What a device property is when a tier leaves it out: today's simulated user (instant, unbounded).
DEVICE_DEFAULTS: dict[str, float] = {"seconds_per_pair": 0.0, "seconds_per_token": 0.0,
                                     "download_bytes_per_s": math.inf, "upload_bytes_per_s": math.inf,
                                     "memory_mb": math.inf}
PROBABILITY = Range(0.0, 1.0, unit="(a probability)")
