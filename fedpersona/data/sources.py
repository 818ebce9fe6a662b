"""Where a user's pairs come from: the synthetic simulator or a JSONL pair file, by one spec string.

``synthetic:<scenario>`` generates users on demand (nothing held in memory but what is asked for);
a path loads the file once per process and indexes its users in file order.
"""

from __future__ import annotations

import dataclasses
import functools
import random

from fedpersona.data.schema import UserData, load_users
from fedpersona.data.synthetic import SCENARIOS, PreferenceSimulator

SYNTHETIC_PREFIX = "synthetic:"


@functools.cache
def simulator(scenario: str, num_users: int, seed: int, dirichlet_alpha: float = -1.0) -> PreferenceSimulator:
    base = SCENARIOS[scenario]
    if dirichlet_alpha >= 0:
        base = dataclasses.replace(base, dirichlet_alpha=dirichlet_alpha)
    return PreferenceSimulator(base, num_users=num_users, seed=seed)


@functools.cache
def file_users(path: str, test_fraction: float, min_pairs: int) -> tuple[UserData, ...]:
    return tuple(load_users(path, test_fraction=test_fraction, min_pairs=min_pairs))


@functools.lru_cache(maxsize=4096)
def user_data(spec: str, index: int, *, num_users: int, seed: int, dirichlet_alpha: float = -1.0,
              test_fraction: float = 0.2, min_pairs: int = 4) -> UserData:
    """User ``index`` of the population described by ``spec``."""
    if spec.startswith(SYNTHETIC_PREFIX):
        return simulator(spec[len(SYNTHETIC_PREFIX):], num_users, seed, dirichlet_alpha).user_data(index)
    return file_users(spec, test_fraction, min_pairs)[index]


def count_users(spec: str, *, num_users: int, test_fraction: float = 0.2, min_pairs: int = 4) -> int:
    """How many users the population has (``num_users`` for synthetic data, the file's count otherwise)."""
    if spec.startswith(SYNTHETIC_PREFIX):
        return num_users
    return len(file_users(spec, test_fraction, min_pairs))


def subset_user(user: UserData, max_train: int, max_test: int, seed: int) -> UserData:
    """At most ``max_train`` training and ``max_test`` test pairs of ``user`` (0: all), drawn without
    replacement by a seeded shuffle of (seed, user id) and kept in their original order: a smaller, fixed
    workload per user for slow hardware, the same on every process."""
    def pick(pairs: list, limit: int, part: str) -> list:
        if not limit or len(pairs) <= limit:
            return pairs
        keep = sorted(random.Random(f"{seed}/{user.user_id}/{part}").sample(range(len(pairs)), limit))
        return [pairs[i] for i in keep]

    return dataclasses.replace(user, train=pick(user.train, max_train, "train"), test=pick(user.test, max_test, "test"))
