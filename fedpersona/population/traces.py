"""Trace files: measured (or, here, synthetic) per-device availability and hardware, read exactly.

No pip package ships device or availability traces, and FedScale's are large downloads under their own
terms, so the project defines two small documented formats and ships a synthetic example of each
(``fedpersona/population/data/``, made by :func:`synthetic_availability_trace` and
:func:`synthetic_device_profiles`; nothing copied from anyone's measurements). Users of a simulation are
mapped to trace devices in order (user ``u`` gets device ``u mod n``) or by a seeded draw.

**Availability trace** (JSON), modelled on FedScale's client behaviour trace (per client an ``active`` and
an ``inactive`` list: the device comes online at ``active[i]`` and goes offline at ``inactive[i]``)::

    {"format": "fedpersona-availability/1",
     "period_s": 86400,                       # the trace repeats with this period (simulated seconds)
     "description": "optional text",
     "devices": [{"id": "d0", "active": [0, 30000], "inactive": [3600, 36000]}, ...]}

Times are simulated seconds from the start of a period, ``0 <= active[i] < inactive[i] <= active[i+1]``,
``inactive[-1] <= period_s``; a device is online on ``[active[i], inactive[i])``. A device with empty lists
is never online. Windows that touch (``inactive[i] == active[i+1]``, or the last ending at ``period_s``
while the first starts at 0) are one window: a round running across the join is not cut.

**Device profiles** (CSV with a header; lines starting with ``#`` are comments), one row per device::

    tier,seconds_per_pair,download_bytes_per_s,upload_bytes_per_s,memory_mb
    fast,0.42,1.4e7,2.6e6,8000

``seconds_per_pair`` (or ``seconds_per_token``, one of the two), the two bandwidths and ``memory_mb`` are
required (units as in a population file; ``inf`` allowed for bandwidth and memory); ``tier`` is an
optional group name (default ``trace``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpersona.errors import UsageError
from fedpersona.io import atomic_write_json, atomic_write_text
from fedpersona.population.distributions import COMPUTE_KEYS, DEVICE_RANGES

TRACE_FORMAT = "fedpersona-availability/1"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


@dataclass(frozen=True)
class AvailabilityTrace:
    """On-windows of trace devices over one period, flattened: device ``d``'s windows are
    ``starts[offsets[d]:offsets[d+1]]`` to ``ends[...]`` (seconds, sorted, touching windows merged)."""

    period_s: float
    starts: np.ndarray
    ends: np.ndarray
    offsets: np.ndarray

    @property
    def num_devices(self) -> int:
        return len(self.offsets) - 1


@dataclass(frozen=True)
class DeviceProfiles:
    """Device rows of a profile trace: ``tier`` names (one per row), the compute unit (``pair`` or
    ``token``) and per-row arrays of the device properties (keys of ``DEVICE_RANGES`` present)."""

    tier: tuple[str, ...]
    compute_unit: str
    values: dict[str, np.ndarray]

    @property
    def num_devices(self) -> int:
        return len(self.tier)


def merge_windows(active: list[float], inactive: list[float]) -> tuple[list[float], list[float]]:
    """Touching windows joined: ``[0, 5) + [5, 9)`` is ``[0, 9)`` (the lists are validated already)."""
    starts: list[float] = []
    ends: list[float] = []
    for start, end in zip(active, inactive, strict=True):
        if ends and start == ends[-1]:
            ends[-1] = end
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: {what} not found; check the path (relative paths are relative to the "
                         "population file)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read the {what} ({err.__class__.__name__}); save it as UTF-8 text") from None


def load_availability_trace(path: str | Path) -> AvailabilityTrace:
    """Read and validate an availability trace (format in the module docstring).

    Args:
        path: the JSON file.

    Returns:
        The trace, windows merged where they touch.

    Raises:
        UsageError: naming the file, the device index and key, and the fix.
    """
    path = Path(path)
    try:
        data = json.loads(_read(path, "availability trace"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err}); an availability trace is one JSON object") from None
    if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
        raise UsageError(f"{path}: not an availability trace: it must be a JSON object with "
                         f"\"format\": \"{TRACE_FORMAT}\", \"period_s\" and \"devices\"")
    unknown = sorted(set(data) - {"format", "period_s", "description", "devices"})
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r}; known: format, period_s, description, devices")
    period = data.get("period_s")
    if isinstance(period, bool) or not isinstance(period, (int, float)) or not (0 < period < math.inf):
        raise UsageError(f"{path}: period_s = {period!r}; it must be a number of seconds > 0 (86400: one day)")
    devices = data.get("devices")
    if not isinstance(devices, list) or not devices:
        raise UsageError(f"{path}: \"devices\" must be a non-empty list of {{\"active\": [...], \"inactive\": [...]}}")
    starts: list[float] = []
    ends: list[float] = []
    offsets = [0]
    for d, device in enumerate(devices):
        where = f"{path}: devices[{d}]"
        if not isinstance(device, dict) or set(device) - {"id", "active", "inactive"}:
            raise UsageError(f"{where}: must be an object with \"active\" and \"inactive\" lists "
                             "(and an optional \"id\")")
        active, inactive = device.get("active"), device.get("inactive")
        if not isinstance(active, list) or not isinstance(inactive, list) or len(active) != len(inactive):
            raise UsageError(f"{where}: \"active\" and \"inactive\" must be lists of the same length")
        previous = 0.0
        for i, (on, off) in enumerate(zip(active, inactive, strict=True)):
            for key, value in (("active", on), ("inactive", off)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise UsageError(f"{where}: {key}[{i}] = {value!r} is not a finite number of seconds")
            if not previous <= on < off <= period:
                raise UsageError(f"{where}: window {i} [{on:g}, {off:g}) is not inside [{previous:g}, {period:g}]; "
                                 "windows must be sorted, not overlap, and end by period_s")
            previous = off
        merged_on, merged_off = merge_windows([float(v) for v in active], [float(v) for v in inactive])
        starts += merged_on
        ends += merged_off
        offsets.append(len(starts))
    return AvailabilityTrace(float(period), np.asarray(starts, float), np.asarray(ends, float),
                             np.asarray(offsets, np.int64))


def _cell(value: str, where: str, column: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{where}: column {column} = {value!r} is not a number") from None
    allowed = DEVICE_RANGES[column]
    if not allowed.admits(number):
        raise UsageError(f"{where}: column {column} = {value!r} is out of range; it must be {allowed.describe()}")
    return number


def load_device_profiles(path: str | Path) -> DeviceProfiles:
    """Read and validate a device-profile CSV (format in the module docstring).

    Args:
        path: the CSV file.

    Returns:
        The rows' tiers and property arrays.

    Raises:
        UsageError: naming the file, line and column, and the fix.
    """
    path = Path(path)
    lines = [line for line in _read(path, "device profile file").splitlines() if not line.lstrip().startswith("#")]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if not rows:
        raise UsageError(f"{path}: empty; a device profile file is CSV with a header row")
    header = [c.strip() for c in rows[0]]
    units = [k for k in COMPUTE_KEYS if k in header]
    known = {"tier", *DEVICE_RANGES}
    required = ("download_bytes_per_s", "upload_bytes_per_s", "memory_mb")
    if (len(units) != 1 or set(header) - known or any(k not in header for k in required)
            or len(set(header)) != len(header)):
        raise UsageError(f"{path}: header {','.join(header)!r} is not a device profile header; it needs "
                         f"seconds_per_pair or seconds_per_token (one), {', '.join(required)} and optionally tier")
    tiers: list[str] = []
    columns: dict[str, list[float]] = {k: [] for k in header if k != "tier"}
    for number, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        where = f"{path}: data row {number - 1}"
        if len(row) != len(header):
            raise UsageError(f"{where}: {len(row)} cells, the header has {len(header)}")
        cells = dict(zip(header, (c.strip() for c in row), strict=True))
        tier = cells.pop("tier", "trace") or "trace"
        if not NAME.match(tier):
            raise UsageError(f"{where}: tier {tier!r} must be a short name of letters, digits and _.+-")
        tiers.append(tier)
        for column, value in cells.items():
            columns[column].append(_cell(value, where, column))
    if not tiers:
        raise UsageError(f"{path}: no device rows under the header")
    return DeviceProfiles(tuple(tiers), COMPUTE_KEYS[units[0]],
                          {k: np.asarray(v, float) for k, v in columns.items()})


# ---- the shipped synthetic traces -----------------------------------------------------------------------
def synthetic_availability_trace(num_devices: int = 48, seed: int = 25) -> dict:
    """A small synthetic availability trace (a JSON-ready dict in the documented format), of three
    made-up habits: night chargers (one long window around 23:00-07:00), daytime checkers (three to
    six short windows of 10-40 minutes between 08:00 and 22:00), and evening users (one or two windows
    of one to three hours from 18:00-20:00, and a short one at 23:00). Whole minutes, one day; seeded, so
    the shipped file is re-made exactly (``python -m fedpersona.population.traces``).
    """
    rng = np.random.default_rng(seed)
    day, minute = 86400, 60
    devices = []
    for d in range(num_devices):
        habit = ("night", "daytime", "evening")[d % 3]
        windows: list[tuple[int, int]] = []
        if habit == "night":
            start = int(rng.integers(21 * 60, 25 * 60)) * minute % day  # 21:00 to 01:00
            end = start + int(rng.integers(5 * 60, 9 * 60)) * minute
            windows = [(start, end)] if end <= day else [(0, end - day), (start, day)]  # across midnight
        elif habit == "daytime":
            times = np.sort(rng.choice(np.arange(8 * 60, 22 * 60, 45), size=int(rng.integers(3, 7)), replace=False))
            windows = [(int(t) * minute, (int(t) + int(rng.integers(10, 41))) * minute) for t in times]
        else:
            start = int(rng.integers(18 * 60, 20 * 60))
            windows = [(start * minute, (start + int(rng.integers(60, 181))) * minute)]
            if rng.random() < 0.5:
                windows.append((23 * 60 * minute, (23 * 60 + int(rng.integers(10, 60))) * minute))  # a late look
        windows.sort()
        devices.append({"id": f"{habit}-{d}", "active": [w[0] for w in windows], "inactive": [w[1] for w in windows]})
    return {"format": TRACE_FORMAT, "period_s": day,
            "description": "synthetic: night chargers, daytime checkers and evening users (fedpersona)",
            "devices": devices}


def synthetic_device_profiles(num_devices: int = 30, seed: int = 25) -> str:
    """A small synthetic device-profile CSV (documented format): three made-up phone classes with spread
    in speed, bandwidth and memory; seeded, re-made exactly (``python -m fedpersona.population.traces``)."""
    rng = np.random.default_rng(seed)
    classes = {"fast": (0.5, 1.2e7, 2.5e6, 8000), "mid": (1.5, 5e6, 1.0e6, 4000), "slow": (5.0, 1.2e6, 2.5e5, 2000)}
    out = ["# synthetic device profiles (fedpersona): seconds per trained pair, bytes/s, MB",
           "tier,seconds_per_pair,download_bytes_per_s,upload_bytes_per_s,memory_mb"]
    for d in range(num_devices):
        tier = ("fast", "mid", "mid", "slow", "slow")[d % 5]
        speed, down, up, memory = classes[tier]
        jitter = np.exp(rng.normal(0.0, 0.25, 3))
        out.append(f"{tier},{speed * jitter[0]:.3f},{down * jitter[1]:.4g},{up * jitter[2]:.4g},{memory}")
    return "\n".join(out) + "\n"


def write_shipped_traces(folder: str | Path) -> None:
    """(Re)write the shipped synthetic traces into ``folder`` (atomically)."""
    folder = Path(folder)
    atomic_write_json(folder / "synthetic-day.json", synthetic_availability_trace())
    atomic_write_text(folder / "synthetic-devices.csv", synthetic_device_profiles())


if __name__ == "__main__":  # pragma: no cover - re-makes the shipped files
    write_shipped_traces(Path(__file__).parent / "data")
