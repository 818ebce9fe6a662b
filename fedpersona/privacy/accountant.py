"""Privacy accounting for Poisson-subsampled Gaussian mechanisms (DP-SGD), over a history of phases.

DP-SGD (Abadi et al., 2016, "Deep Learning with Differential Privacy", arXiv 1607.00133) releases, at
every step, a sum of clipped per-record gradients plus Gaussian noise of std ``noise * C``, over a batch
drawn by Poisson sampling with rate ``q``. Its cumulative (epsilon, delta) is computed here by Opacus's
accountants:

- ``"rdp"``: Renyi DP (Mironov, 2017, "Renyi Differential Privacy", arXiv 1702.07476) with the sampled
  Gaussian mechanism's RDP (Mironov, Talwar, Zhang, 2019, arXiv 1908.10530). An upper bound; fast.
- ``"prv"``: numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz, 2021,
  "Numerical Composition of Differential Privacy", arXiv 2106.02848). Tighter; the returned value is
  the upper end of its error interval, so it is still a guarantee.

A *history* is a list of ``(noise_multiplier, sample_rate, steps)`` phases, composed in sequence
(Opacus accountants keep the same list). Phases with equal (noise, rate) are merged first: composition
is commutative, and merging makes a history split over rounds give exactly the value of one phase.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from fedpersona.errors import UsageError

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
Phase = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


# ---- validation (one clear line each) --------------------------------------------------------------
def check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise UsageError(f"accountant {accountant!r} is unknown; choose one of {', '.join(ACCOUNTANTS)}")
    return accountant


def check_noise(noise: float) -> float:
    if not _is_number(noise) or not (math.isfinite(noise) and noise > 0):
        raise UsageError(f"noise multiplier {noise!r} is invalid: it must be a finite number > 0")
    return float(noise)


def check_rate(rate: float) -> float:
    if not _is_number(rate) or not (0.0 < rate <= 1.0):
        raise UsageError(f"sample rate {rate!r} is invalid: it must be in (0, 1] (expected batch / pairs)")
    return float(rate)


MAX_DELTA = 0.01  # above it (epsilon, delta)-DP may leak a whole record with that probability: no guarantee


def check_delta(delta: float) -> float:
    """``delta`` as a float if it is in (0, ``MAX_DELTA``]; UsageError otherwise (a larger delta states
    a guarantee that allows publishing some records outright, and the epsilon printed beside it misleads)."""
    if not _is_number(delta) or not (0.0 < delta < 1.0):
        raise UsageError(f"delta {delta!r} is invalid: it must be in (0, {MAX_DELTA:g}], and well below "
                         "1/number of pairs (e.g. 1e-5)")
    if delta > MAX_DELTA:
        raise UsageError(f"delta {delta!r} is too large to mean anything: (epsilon, delta)-DP lets a record leak "
                         f"outright with probability delta; use at most {MAX_DELTA:g}, well below 1/number of "
                         "pairs (e.g. 1e-5)")
    return float(delta)


def check_steps(steps: int, minimum: int = 0) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < minimum:
        raise UsageError(f"steps {steps!r} is invalid: it must be a whole number >= {minimum}")
    return int(steps)


def check_epsilon(epsilon: float) -> float:
    if not _is_number(epsilon) or not (math.isfinite(epsilon) and epsilon > 0):
        raise UsageError(f"target epsilon {epsilon!r} is invalid: it must be a finite number > 0")
    return float(epsilon)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


# ---- public functions --------------------------------------------------------------------------------
def sample_rate_for(expected_batch: int, num_records: int) -> float:
    """Poisson sampling rate ``q = expected_batch / n`` (1 when the batch would hold every record)."""
    if num_records < 1 or expected_batch < 1:
        raise UsageError(f"cannot sample {expected_batch} of {num_records} records: both must be >= 1")
    return min(1.0, expected_batch / num_records)


def merge_history(history: Iterable[Sequence[float]]) -> list[Phase]:
    """Validated phases, equal (noise, rate) merged (first-seen order), zero-step phases dropped."""
    merged: dict[tuple[float, float], int] = {}
    for entry in history:
        if len(entry) != 3:
            raise UsageError(f"history entry {entry!r} is invalid: expected (noise_multiplier, sample_rate, steps)")
        noise, rate, steps = check_noise(entry[0]), check_rate(entry[1]), check_steps(entry[2])
        if steps:
            merged[(noise, rate)] = merged.get((noise, rate), 0) + steps
    return [(noise, rate, steps) for (noise, rate), steps in merged.items()]


def epsilon_of_history(history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent, at ``delta``, by a sequence of DP-SGD phases ``(noise, rate, steps)``; 0 if empty."""
    check_accountant(accountant)
    delta = check_delta(delta)
    phases = merge_history(history)
    if not phases:
        return 0.0
    acc = _make(accountant)
    acc.history = phases
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore"):
        # "optimal order is the largest alpha" (RDP) and log(0) at q=1 (PRV) are expected and harmless.
        warnings.simplefilter("ignore")
        # the RDP-to-(epsilon, delta) conversion goes below 0 for a large delta (0.5: -0.69); epsilon is >= 0
        return max(0.0, float(acc.get_epsilon(delta=delta)))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` DP-SGD steps with one noise multiplier and sample rate."""
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp", tolerance: float = 0.01, prior: Sequence[Phase] = ()) -> float:
    """The smallest noise multiplier (binary search, Opacus ``get_noise_multiplier``) whose epsilon after
    ``steps`` steps at ``sample_rate`` is at most ``target_epsilon`` (and within ``tolerance`` of it).

    ``prior``: phases already spent or committed (e.g. a released pair count); the returned noise makes
    ``prior`` followed by the ``steps`` steps reach at most ``target_epsilon`` together."""
    check_accountant(accountant)
    target_epsilon, delta = check_epsilon(target_epsilon), check_delta(delta)
    sample_rate, steps = check_rate(sample_rate), check_steps(steps, minimum=1)
    return _calibrated(target_epsilon, delta, sample_rate, steps, accountant, tolerance, tuple(merge_history(prior)))


@functools.lru_cache(maxsize=4096)  # a pure function of its arguments, and each search costs seconds
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                tolerance: float, prior: tuple[Phase, ...]) -> float:
    try:
        if not prior:  # Opacus's own search: the reference values in the notes come from it
            from opacus.accountants.utils import get_noise_multiplier

            with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore"):
                warnings.simplefilter("ignore")
                return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                                  sample_rate=sample_rate, steps=steps, accountant=accountant,
                                                  epsilon_tolerance=tolerance))
        return _search_noise(target_epsilon, delta, sample_rate, steps, accountant, tolerance, list(prior))
    except ValueError as err:  # "The privacy budget is too low."
        raise UsageError(f"target epsilon {target_epsilon} at delta {delta:g} cannot be reached with {steps} steps "
                         f"at sample rate {sample_rate:g} ({err}); raise epsilon or take fewer steps") from None


def _search_noise(target: float, delta: float, rate: float, steps: int, accountant: str, tolerance: float,
                  prior: list[Phase]) -> float:
    """Opacus's bisection (double the upper end until it fits, then halve the bracket) over ``prior + steps``."""
    def eps(noise: float) -> float:
        return epsilon_of_history([*prior, (noise, rate, steps)], delta, accountant)

    if epsilon_of_history(prior, delta, accountant) >= target:
        raise ValueError("the prior phases alone spend the target")
    low, high = 0.0, 10.0
    while (spent := eps(high)) > target:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError("The privacy budget is too low.")
    while target - spent > tolerance and high - low > 1e-9:
        mid = (low + high) / 2
        if (at_mid := eps(mid)) > target:
            low = mid
        else:
            high, spent = mid, at_mid
    return high


def _make(accountant: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if accountant == "rdp" else PRVAccountant()
