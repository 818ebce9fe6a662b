"""Where a user's pairs come from: the synthetic simulator or a data file, by one spec string.

* ``synthetic:<scenario>`` generates users on demand (nothing held in memory but what is asked for);
* ``PATH`` loads a fedpersona pair file once per process and indexes its users in file order;
* ``FORMAT:PATH`` loads a file in a dataset format (``hh-rlhf:dialogues.jsonl``,
  ``'personalllm(num_users=50):data.jsonl'``, a plug-in ``mymod:load_mine:file.jsonl``;
  ``fedpersona.data.formats``), grouped into users the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import re
from pathlib import Path

from fedpersona.data.schema import UserData, group_by_user
from fedpersona.data.synthetic import SCENARIOS, PreferenceSimulator

SYNTHETIC_PREFIX = "synthetic:"


@functools.cache
def simulator(scenario: str, num_users: int, seed: int, dirichlet_alpha: float = -1.0) -> PreferenceSimulator:
    base = SCENARIOS[scenario]
    if dirichlet_alpha >= 0:
        base = dataclasses.replace(base, dirichlet_alpha=dirichlet_alpha)
    return PreferenceSimulator(base, num_users=num_users, seed=seed)


_FORMAT_PREFIX = re.compile(r"^(?P<fmt>(?:[A-Za-z_][\w.]*:)?[A-Za-z_][\w.-]*(?:\([^()]*\))?):(?P<path>.+)$", re.S)


def parse_data_spec(spec: str) -> tuple[str | None, str]:
    """``(format spec or None, path)`` of a file data spec (not ``synthetic:``).

    A spec that names an existing file is that file (pair-file format); else ``FORMAT:PATH`` where FORMAT
    is a registered format or ``package.module:NAME``, either with ``(key=value, ...)`` options.

    Args:
        spec: the ``data`` setting.

    Returns:
        The format spec (None: the fedpersona pair file) and the path.
    """
    if Path(spec).is_file():
        return None, spec
    match = _FORMAT_PREFIX.match(spec)
    if match is None:
        return None, spec
    fmt, path = match.group("fmt"), match.group("path")
    from fedpersona.data.formats import AUTO, FORMATS

    name = fmt.split("(", 1)[0]
    return (fmt, path) if (":" in name or name in FORMATS or name == AUTO) else (None, spec)


def load_data_pairs(spec: str) -> list:
    """The pairs of a file data spec (``parse_data_spec``), loaded and validated.

    Raises:
        UsageError: a missing file, an unknown format or a bad row (one line).
    """
    from fedpersona.data.formats import load_format

    fmt, path = parse_data_spec(spec)
    return load_format(path, fmt or "pairs")


@functools.cache
def file_users(spec: str, test_fraction: float, min_pairs: int) -> tuple[UserData, ...]:
    """The users of a file data spec, in first-seen order (``group_by_user``); cached per process.

    Raises:
        UsageError: no user has ``min_pairs`` pairs with a train and a test pair, or a load error.
    """
    from fedpersona.errors import UsageError

    users = group_by_user(load_data_pairs(spec), test_fraction=test_fraction, min_pairs=min_pairs, source=spec)
    if not users:
        raise UsageError(f"{spec}: no user has at least {min_pairs} pairs with both a train and a test pair")
    return tuple(users)


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
