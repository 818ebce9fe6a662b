"""Availability follows the trace file exactly, and the diurnal model its formula; checked by brute force
over the raw JSON lists (not the package's merged, flattened arrays)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedpersona.population import Availability, Population, load_availability_trace

DATA = Path(__file__).resolve().parents[2] / "fedpersona" / "population" / "data"
TRACE_FILE = DATA / "synthetic-day.json"


def raw_trace() -> tuple[float, list[list[tuple[float, float]]]]:
    data = json.loads(TRACE_FILE.read_text())
    return float(data["period_s"]), [list(zip(d["active"], d["inactive"], strict=True)) for d in data["devices"]]


def brute_online(windows: list[tuple[float, float]], t: float, period: float) -> bool:
    x = t % period
    return any(on <= x < off for on, off in windows)


def brute_until(windows: list[tuple[float, float]], t: float, period: float) -> float:
    """Walk forward window by window, across periods, while the next window starts where this one ends."""
    if not brute_online(windows, t, period):
        return t
    x = t % period
    end = t - x + next(off for on, off in windows if on <= x < off)
    for _ in range(2 * len(windows) + 2):
        at = end % period
        following = [off for on, off in windows if on == at]
        if not following:
            return end
        end = end - at + following[0]
    return math.inf  # windows cover the whole period


def probe_times(windows_by_device, period: float, rng) -> list[float]:
    edges = sorted({v for ws in windows_by_device for w in ws for v in w})
    near = [e + d for e in edges for d in (-1.0, -1e-3, 0.0, 1e-3, 1.0)]
    spread = list(rng.uniform(0, 3 * period, 300))
    return [t + k * period for t in near for k in (0, 2) if t >= 0] + spread


def test_trace_availability_follows_the_file_exactly():
    period, windows = raw_trace()
    users = 3 * len(windows) + 5  # users replay devices in order: user u is device u mod 48
    pop = Population.load("cross-device-trace", users, seed=0)
    device = np.arange(users) % len(windows)
    rng = np.random.default_rng(0)
    for t in probe_times(windows, period, rng):
        got = pop.availability.online(t)
        want = np.array([brute_online(windows[d], t, period) for d in device])
        np.testing.assert_array_equal(got, want, err_msg=f"t={t}")


def test_online_until_ends_at_the_window_end_and_joins_across_midnight():
    period, windows = raw_trace()
    trace = load_availability_trace(TRACE_FILE)
    avail = Availability.from_trace(trace, np.arange(len(windows)))
    rng = np.random.default_rng(1)
    for t in probe_times(windows, period, rng)[::7]:
        got = avail.online_until(t, np.arange(len(windows)))
        want = [brute_until(windows[d], t, period) for d in range(len(windows))]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"t={t}")
    night = next(d for d, ws in enumerate(windows) if ws[0][0] == 0 and ws[-1][1] == period)
    evening_start = windows[night][-1][0]
    assert avail.online_until(evening_start + 10, np.array([night]))[0] == period + windows[night][0][1]


def brute_next(avail: Availability, count: int, t: float) -> float:
    """Count online users at t and at every window start in the coming period; the first time enough are."""
    base = t - t % avail.period_s
    starts = sorted({t} | {c for s in avail.starts for c in (base + s, base + avail.period_s + s) if c >= t})
    # (base + s) % period can round a hair below s: count just after each candidate
    return next((c for c in starts if avail.online(c + 1e-4).sum() >= count), math.inf)


@pytest.mark.parametrize("kind", ["trace", "diurnal"])
def test_next_time_with_matches_brute_force(kind):
    pop = Population.load("cross-device-trace" if kind == "trace" else "cross-device", 150, seed=2)
    avail = pop.availability
    rng = np.random.default_rng(3)
    for t in rng.uniform(0, 2 * avail.period_s, 25):
        for count in (1, 10, 25, 40, 60, 150):
            got = avail.next_time_with(count, t)
            want = brute_next(avail, count, t)
            if math.isinf(want):
                assert math.isinf(got), (t, count)
            else:
                assert got == pytest.approx(want, abs=1e-3), (t, count)  # t + delay may step a hair past
                assert avail.online(got).sum() >= count
    assert math.isinf(avail.next_time_with(151, 0.0))


def test_diurnal_windows_follow_the_formula():
    rng = np.random.default_rng(4)
    start = np.r_[rng.uniform(-1e5, 2e5, 300), 0.0, 86000.0, 5.0, 70000.0]
    share = np.r_[rng.uniform(0, 1, 300), 1.0, 0.0, 0.5, 0.3]
    avail = Availability.diurnal(start, share, 86400.0)
    np.testing.assert_allclose(avail.on_fraction(), share, atol=1e-12)
    a, length = np.mod(start, 86400.0), share * 86400.0
    edges = np.r_[a[:20], a[:20] + length[:20]]
    for t in np.r_[rng.uniform(0, 3e5, 200), edges - 0.01, edges + 0.01, edges + 86400.01]:
        want = np.mod(t - a, 86400.0) < length
        np.testing.assert_array_equal(avail.online(t), want, err_msg=f"t={t}")
        until = avail.online_until(t, np.arange(len(start)))
        partial = want & (length < 86400.0)
        expected = t - np.mod(t - a, 86400.0) + length
        np.testing.assert_allclose(until[partial], expected[partial], rtol=0, atol=1e-6)
        assert np.all(np.isinf(until[want & (length >= 86400.0)])) and np.all(until[~want] == t)
