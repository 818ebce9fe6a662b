"""A simulated user's data and seeds: who user ``index`` of a run is, and the per-(user, round) seed.

Users ``0 .. num_users-1`` train; users from ``num_users`` on are *new users* (cold start), held out of
training until the final evaluation. Seeds derive from (run seed, user, round) only, so a user trains the
same way whichever worker, cohort or process serves it.
"""

from __future__ import annotations

import hashlib

from fedpersona.config import RunConfig
from fedpersona.data.schema import UserData
from fedpersona.data.sources import subset_user, user_data


def is_new_user(config: RunConfig, index: int) -> bool:
    """New (cold-start) users come after the ``num_users`` users who take part in training."""
    return index >= config.num_users


def population_user(config: RunConfig, index: int) -> UserData:
    """User ``index`` of the run's population: ``num_users`` training users, then ``new_users`` new ones."""
    user = user_data(config.data, index, num_users=config.num_users + config.new_users, seed=config.seed,
                     dirichlet_alpha=config.dirichlet_alpha, test_fraction=config.test_fraction,
                     min_pairs=config.min_pairs)
    return subset_user(user, config.max_train_pairs, config.max_test_pairs, config.seed)


def round_seed(config: RunConfig, user_index: int, server_round: int) -> int:
    """A per-(run, user, round) seed: deterministic, and independent across users and rounds."""
    digest = hashlib.sha256(f"{config.seed}/{user_index}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
