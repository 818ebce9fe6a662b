"""The population file: who the simulated users are, as a validated spec (nothing drawn yet).

A simulation's users differ in more than their data: device speed and bandwidth, memory, when they are
online, how often they drop out, and what privacy they demand (Bonawitz et al. 2019; FedScale, Lai et al.
2022). A population file states these as per-user distributions; :class:`fedpersona.population.Population`
draws them for ``(spec, num_users, seed)``. Every key is checked here, so a bad file is one ``UsageError``
naming the file, the key and the fix, before any round runs. The format (TOML; every section optional,
an empty file is today's homogeneous population)::

    name = "my-phones"                 # shown in reports
    description = "free text"

    [[tier]]                           # device tiers (or [devices] file = "profiles.csv", not both)
    name = "slow"                      # group name in reports
    share = 0.3                        # share of the users (shares sum to 1; assigned exactly, shuffled)
    seconds_per_pair = { dist = "lognormal", median = 5.0, sigma = 0.3 }   # or seconds_per_token
    download_bytes_per_s = 1.25e6      # bytes/s, inf: instant
    upload_bytes_per_s = 2.5e5
    memory_mb = 2000                   # MB (10^6 bytes) the device can give the model; inf: any

    [availability]
    model = "diurnal"                  # "always" (default), "diurnal" or "trace"
    period_s = 86400
    start_s = { dist = "normal", mean = 79200, std = 10800 }   # the daily window opens (mod period)
    on_fraction = { dist = "uniform", low = 0.1, high = 0.5 }  # share of the period online
    # model = "trace": file = "synthetic-day.json", assign = "in-order" | "random"

    [dropout]
    probability = 0.2                  # per selected user and round: fails mid-round, never replies

    [[privacy]]                        # device privacy policies (fedpersona.client.policy's fields)
    name = "strict"
    share = 0.2
    require_dp = true                  # pair-level DP required (default false)
    max_epsilon = 1.0                  # largest epsilon accepted; omit or inf: no cap

Values are numbers or distributions (:mod:`fedpersona.population.distributions`). Trace paths are
relative to the population file. Defaults where a file is silent: one tier ``all`` (0 s per pair,
infinite bandwidth and memory), always online, no dropout, one privacy group ``no-demands``.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpersona.errors import UsageError
from fedpersona.population.distributions import (COMPUTE_KEYS, DEVICE_DEFAULTS, DEVICE_RANGES, PROBABILITY,
                                                 Distribution, Range, parse_distribution)
from fedpersona.population.traces import (NAME, AvailabilityTrace, DeviceProfiles, load_availability_trace,
                                          load_device_profiles)

DAY_S = 86400.0
ASSIGN = ("in-order", "random")
SECTIONS = ("name", "description", "tier", "devices", "availability", "dropout", "privacy")
MODELS = {"always": (), "diurnal": ("period_s", "start_s", "on_fraction"), "trace": ("file", "assign")}
SHARE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class TierSpec:
    """A device tier: its name, share of the users and one distribution per device property
    (``DEVICE_RANGES`` keys of the population's compute unit; unset ones at ``DEVICE_DEFAULTS``)."""

    name: str
    share: float
    properties: dict[str, Distribution]


@dataclass(frozen=True)
class PrivacyGroupSpec:
    """A privacy group: the device policy its users carry (``max_epsilon`` ``inf``: no cap)."""

    name: str
    share: float
    require_dp: bool = False
    max_epsilon: float = math.inf


@dataclass(frozen=True, eq=False)
class AvailabilitySpec:
    """How users come and go: ``model`` with its parameters (diurnal) or parsed trace (trace)."""

    model: str = "always"
    period_s: float = DAY_S
    start_s: Distribution | None = None
    on_fraction: Distribution | None = None
    trace: AvailabilityTrace | None = None
    trace_file: str = ""
    assign: str = "in-order"


@dataclass(frozen=True, eq=False)
class PopulationSpec:
    """A validated population file (see the module docstring); draw users with ``Population``."""

    name: str = "uniform"
    description: str = ""
    source: str = "defaults"
    compute_unit: str = "pair"
    tiers: tuple[TierSpec, ...] = ()
    devices: DeviceProfiles | None = None
    devices_file: str = ""
    device_assign: str = "in-order"
    availability: AvailabilitySpec = field(default_factory=AvailabilitySpec)
    dropout: Distribution = field(default_factory=lambda: Distribution.constant(0.0))
    privacy: tuple[PrivacyGroupSpec, ...] = ()


def _table(data: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{where}: {key} must be a table ([{key}] with keys {', '.join(allowed)})")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise UsageError(f"{where} [{key}]: unknown key {unknown[0]!r}; known: {', '.join(allowed)}")
    return value


def _array(data: Mapping[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UsageError(f"{where}: {key} must be an array of tables: write each as [[{key}]]")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise UsageError(f"{where}: name = {value!r}; give a short name of letters, digits and _.+- (used in reports)")
    return value


def _shares(items: list[dict[str, Any]], where: str, key: str) -> list[float]:
    if len(items) == 1 and "share" not in items[0]:
        return [1.0]
    shares = []
    for i, item in enumerate(items):
        share = item.get("share")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not (0 < share <= 1):
            raise UsageError(f"{where} [[{key}]] #{i + 1}: share = {share!r}; give each a share in (0, 1]")
        shares.append(float(share))
    if abs(sum(shares) - 1.0) > SHARE_TOLERANCE:
        raise UsageError(f"{where} [[{key}]]: shares sum to {sum(shares):g}, not 1; adjust them")
    names = [item.get("name") for item in items]
    if len(set(names)) != len(names):
        raise UsageError(f"{where} [[{key}]]: names must differ (got {', '.join(map(str, names))})")
    return shares


def _assign(value: Any, where: str) -> str:
    if value not in ASSIGN:
        raise UsageError(f"{where}: assign = {value!r}; use \"in-order\" (user u gets row u mod n) or \"random\"")
    return value


def _path(value: Any, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: file = {value!r}; give the path of the file (relative to this file)")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _tiers(data: Mapping[str, Any], where: str) -> tuple[str, tuple[TierSpec, ...]]:
    items = _array(data, "tier", where)
    if not items:
        return "pair", ()
    units = {COMPUTE_KEYS[k] for item in items for k in COMPUTE_KEYS if k in item}
    if len(units) > 1 or any(all(k in item for k in COMPUTE_KEYS) for item in items):
        raise UsageError(f"{where} [[tier]]: use seconds_per_pair in every tier or seconds_per_token in every "
                         "tier, not both (a run times one kind of work)")
    unit = units.pop() if units else "pair"
    compute_key = next(k for k, v in COMPUTE_KEYS.items() if v == unit)
    keys = (compute_key, "download_bytes_per_s", "upload_bytes_per_s", "memory_mb")
    shares = _shares(items, where, "tier")
    tiers = []
    for i, item in enumerate(items):
        here = f"{where} [[tier]] #{i + 1}"
        name = _name(item.get("name"), here)
        here = f"{where} [[tier]] '{name}'"
        unknown = sorted(set(item) - {"name", "share", *keys})
        if unknown:
            raise UsageError(f"{here}: unknown key {unknown[0]!r}; known: name, share, {', '.join(keys)}")
        properties = {k: parse_distribution(item.get(k, DEVICE_DEFAULTS[k]), where=here, key=k,
                                            allowed=DEVICE_RANGES[k]) for k in keys}
        tiers.append(TierSpec(name, shares[i], properties))
    return unit, tuple(tiers)


def _availability(data: Mapping[str, Any], where: str, base: Path) -> AvailabilitySpec:
    section = _table(data, "availability", where, ("model", *sorted({k for v in MODELS.values() for k in v})))
    model = section.get("model", "always")
    if model not in MODELS:
        raise UsageError(f"{where} [availability]: model = {model!r}; use one of {', '.join(MODELS)}")
    here = f"{where} [availability] ({model})"
    extra = sorted(set(section) - {"model", *MODELS[model]})
    if extra:
        raise UsageError(f"{here}: key {extra[0]!r} does not apply; a {model} model takes "
                         f"{', '.join(MODELS[model]) or 'no other keys'}")
    if model == "always":
        return AvailabilitySpec()
    if model == "trace":
        path = _path(section.get("file"), base, here)
        return AvailabilitySpec("trace", trace=load_availability_trace(path), trace_file=str(path),
                                assign=_assign(section.get("assign", "in-order"), here))
    period = section.get("period_s", DAY_S)
    if isinstance(period, bool) or not isinstance(period, (int, float)) or not (0 < period < math.inf):
        raise UsageError(f"{here}: period_s = {period!r}; give the period in seconds (> 0; 86400: a day)")
    missing = [k for k in ("start_s", "on_fraction") if k not in section]
    if missing:
        raise UsageError(f"{here}: {missing[0]} is missing; a diurnal model needs start_s (seconds into the "
                         "period the window opens) and on_fraction (share of the period online, 0..1)")
    return AvailabilitySpec(
        "diurnal", period_s=float(period),
        start_s=parse_distribution(section["start_s"], where=here, key="start_s", allowed=Range(-math.inf, unit="s")),
        on_fraction=parse_distribution(section["on_fraction"], where=here, key="on_fraction", allowed=PROBABILITY))


def _privacy(data: Mapping[str, Any], where: str) -> tuple[PrivacyGroupSpec, ...]:
    items = _array(data, "privacy", where)
    shares = _shares(items, where, "privacy") if items else []
    groups = []
    for i, item in enumerate(items):
        name = _name(item.get("name"), f"{where} [[privacy]] #{i + 1}")
        here = f"{where} [[privacy]] '{name}'"
        unknown = sorted(set(item) - {"name", "share", "require_dp", "max_epsilon"})
        if unknown:
            raise UsageError(f"{here}: unknown key {unknown[0]!r}; known: name, share, require_dp, max_epsilon")
        require = item.get("require_dp", False)
        if not isinstance(require, bool):
            raise UsageError(f"{here}: require_dp = {require!r}; write true or false")
        epsilon = parse_distribution(item.get("max_epsilon", math.inf), where=here, key="max_epsilon",
                                     allowed=Range(0.0, low_open=True, infinite_ok=True))
        if epsilon.kind != "constant":
            raise UsageError(f"{here}: max_epsilon must be one number for the group (or inf); make more groups")
        groups.append(PrivacyGroupSpec(name, shares[i], require, epsilon.params[0]))
    return tuple(groups)


def parse_population(data: Mapping[str, Any], *, source: str, base_dir: str | Path = ".") -> PopulationSpec:
    """A population spec from a parsed TOML document (a file, or a ``[population]`` table of a run config).

    Args:
        data: the document's top-level table.
        source: where it came from, named in every message (a path or ``preset NAME``).
        base_dir: the folder trace paths are relative to.

    Returns:
        The validated spec (trace files already read and checked).

    Raises:
        UsageError: naming ``source``, the section and key, and the fix.
    """
    base = Path(base_dir)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise UsageError(f"{source}: unknown key {unknown[0]!r}; a population file has {', '.join(SECTIONS)}")
    stem = Path(source).stem
    name = _name(data.get("name", stem if NAME.match(stem) else "population"), source)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UsageError(f"{source}: description must be text")
    unit, tiers = _tiers(data, source)
    devices, devices_file, device_assign = None, "", "in-order"
    if "devices" in data:
        section = _table(data, "devices", source, ("file", "assign"))
        if tiers:
            raise UsageError(f"{source}: [[tier]] and [devices] both set; device properties come from one of them")
        path = _path(section.get("file"), base, f"{source} [devices]")
        devices, devices_file = load_device_profiles(path), str(path)
        device_assign = _assign(section.get("assign", "in-order"), f"{source} [devices]")
        unit = devices.compute_unit
    dropout_section = _table(data, "dropout", source, ("probability",))
    dropout = parse_distribution(dropout_section.get("probability", 0.0), where=f"{source} [dropout]",
                                 key="probability", allowed=PROBABILITY)
    return PopulationSpec(name=name, description=description, source=source, compute_unit=unit, tiers=tiers,
                          devices=devices, devices_file=devices_file, device_assign=device_assign,
                          availability=_availability(data, source, base), dropout=dropout,
                          privacy=_privacy(data, source))


def load_population_file(path: str | Path) -> PopulationSpec:
    """Read and validate a population TOML file.

    Args:
        path: the file.

    Returns:
        The spec.

    Raises:
        UsageError: a missing or unreadable file, bad TOML (with its line and column), or a bad key.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"population file {path}: not found; give a preset name or an existing .toml file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"population file {path}: cannot read it ({err.__class__.__name__}); "
                         "save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"population file {path}: not valid TOML ({err}); fix the syntax there") from None
    return parse_population(data, source=str(path), base_dir=path.parent)
