"""Seeded user sampling that replays: the same users in round r of every run with the same seed.

Flower's samplers draw from the process-wide ``random`` module, which other code in the server process
may also draw from between rounds (at times that depend on timing), and from ``Grid.get_node_ids()``,
whose order is random in a simulation. So the run seeds ``random`` again before every round's
training configuration, from (run seed, round), and lists nodes in user order (``roster``). A resumed
run then samples exactly the users the uninterrupted run would have.
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
