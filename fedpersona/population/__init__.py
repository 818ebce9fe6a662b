"""Heterogeneous simulated populations on a simulated clock (issue 25), free of Flower and torch.

Cross-device federated learning lives on facts a homogeneous simulation leaves out: devices differ in
speed, bandwidth and memory, are online only part of the day, drop out mid-round, and carry their own
privacy policies; the server over-selects and closes rounds at a deadline (Bonawitz et al. 2019,
"Towards Federated Learning at Scale"; FedScale, Lai et al. 2022). This package models them as numpy
arrays over the users and decides each round on simulated seconds, so the simulation's user grid,
recorder and summary can use it at any scale (10,000 users: milliseconds; ``benchmarks/population_clock.py``).

* ``load_population_spec`` / ``Population``: a preset (``uniform``, ``cross-device``,
  ``cross-device-trace``) or TOML file, drawn per user from ``(spec, num_users, seed)``;
* ``SimulatedClock`` / ``RoundPolicy`` / ``Status`` / ``RoundOutcome``: who can be selected when, and what
  became of each selected user (ok, late, surplus, dropped, offline, declined, unavailable, unfit);
* ``time_to_accuracy``, ``group_report``, ``RunTally``: the figures a run reports.
"""

from fedpersona.population.availability import Availability
from fedpersona.population.clock import RoundOutcome, RoundPlan, RoundPolicy, SimulatedClock, Status
from fedpersona.population.model import Grouping, Population, PrivacyAnswer, quantile_grouping
from fedpersona.population.presets import PRESETS, load_population_spec
from fedpersona.population.reports import RunTally, group_report, time_to_accuracy
from fedpersona.population.spec import PopulationSpec, load_population_file, parse_population
from fedpersona.population.traces import load_availability_trace, load_device_profiles

__all__ = [
    "PRESETS",
    "Availability",
    "Grouping",
    "Population",
    "PopulationSpec",
    "PrivacyAnswer",
    "RoundOutcome",
    "RoundPlan",
    "RoundPolicy",
    "RunTally",
    "SimulatedClock",
    "Status",
    "group_report",
    "load_availability_trace",
    "load_device_profiles",
    "load_population_file",
    "load_population_spec",
    "parse_population",
    "quantile_grouping",
    "time_to_accuracy",
]
