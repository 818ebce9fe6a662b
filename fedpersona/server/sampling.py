"""Seeded user sampling that replays: the same users in round r of every run with the same seed.

Flower's samplers draw from the process-wide ``random`` module, which other code in the server process
may also draw from between rounds (at times that depend on timing), and from ``Grid.get_node_ids()``,
whose order is random in a simulation. So the run seeds ``random`` again before every round's
training configuration, from (run seed, round), and lists nodes in user order (``roster``). A resumed
run then samples exactly the users the uninterrupted run would have.

With a population model (issue 25) or a deployment's over-selection, ``population_sampling`` puts the
round's plan around the strategy's own sampling: who may be selected now, and how many more to select.
"""

from __future__ import annotations

import random
from typing import Any


def round_seed_sampling(strategy: Any, seed: int) -> Any:
    """Make ``strategy`` (in place) seed ``random`` from ``(seed, round)`` before sampling each round."""
    base = type(strategy)

    class Seeded(base):  # type: ignore[misc, valid-type]
        def configure_train(self, server_round: int, arrays, config, grid):
            random.seed(f"{seed}/train/{server_round}")
            return super().configure_train(server_round, arrays, config, grid)

    Seeded.__name__, Seeded.__qualname__, Seeded.__module__ = base.__name__, base.__qualname__, base.__module__
    strategy.__class__ = Seeded
    return strategy


def population_sampling(strategy: Any, rounds: Any) -> Any:
    """Make ``strategy`` (in place) sample each training round through ``rounds`` (the population's
    ``fedpersona.server.population_rounds.PopulationRounds``, or a deployment's wall-clock rounds): before
    the strategy samples, ``rounds.begin(round)`` plans the round (the grid then lists only the users that
    may be selected); afterwards ``rounds.select`` tops the selection up (over-selection). Works for any
    strategy that samples from ``grid.get_node_ids()``, as Flower's do."""
    base = type(strategy)

    class Selecting(base):  # type: ignore[misc, valid-type]
        def configure_train(self, server_round: int, arrays, config, grid):
            rounds.begin(server_round)
            try:
                messages = list(super().configure_train(server_round, arrays, config, grid))
            finally:
                rounds.end()
            return rounds.select(server_round, messages, grid)

    Selecting.__name__, Selecting.__qualname__, Selecting.__module__ = base.__name__, base.__qualname__, base.__module__
    strategy.__class__ = Selecting
    return strategy
