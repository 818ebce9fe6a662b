"""Named populations (``--population uniform``), shipped as ordinary population files.

A preset is a file in ``fedpersona/population/data/`` written in the documented format, so it is also
the example to copy: ``uniform`` (today's homogeneous simulation, the default), ``cross-device`` (three
phone tiers, diurnal availability, ~20% dropout, mixed privacy policies) and ``cross-device-trace`` (the
same, with hardware and availability replayed from the shipped synthetic traces).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedpersona.errors import UsageError
from fedpersona.population.spec import PopulationSpec, load_population_file, parse_population

DATA_DIR = Path(__file__).parent / "data"
PRESETS: dict[str, str] = {
    "uniform": "today's simulation: always online, instant, no dropout, no per-user privacy demands",
    "cross-device": "three phone tiers, evening-heavy diurnal availability, ~20% dropout, mixed privacy policies",
    "cross-device-trace": "as cross-device, with hardware and availability from the shipped synthetic traces",
}
DEFAULT_PRESET = "uniform"


def preset_path(name: str) -> Path:
    """The file behind preset ``name`` (UsageError for an unknown name, listing the presets)."""
    if name not in PRESETS:
        raise UsageError(f"population {name!r}: no such preset; use one of {', '.join(PRESETS)} or a .toml file")
    return DATA_DIR / f"{name}.toml"


def load_population_spec(population: str | Path | Mapping[str, Any] | None = None) -> PopulationSpec:
    """The population a run asks for: a preset name, a population file, or an inline table.

    Args:
        population: ``None`` or ``""`` (the ``uniform`` preset), a preset name (``PRESETS``), the path of a
            TOML file, or a parsed table (a run config's ``[population]`` section; trace paths relative to
            the current folder).

    Returns:
        The validated spec; its ``source`` names the preset or file.

    Raises:
        UsageError: an unknown preset, a missing file, or a bad file (naming file, key and fix).
    """
    if population is None or population == "":
        population = DEFAULT_PRESET
    if isinstance(population, Mapping):
        return parse_population(population, source="[population]", base_dir=Path.cwd())
    text = str(population)
    if text in PRESETS:
        return replace(load_population_file(preset_path(text)), source=f"preset {text}")
    path = Path(text).expanduser()
    if path.suffix != ".toml" and not path.exists():
        raise UsageError(f"population {text!r}: neither a preset ({', '.join(PRESETS)}) nor an existing file; "
                         "give a preset name or the path of a population .toml file")
    return load_population_file(path)

