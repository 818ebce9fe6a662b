"""What one user's device does in a round, free of Flower: load tensors, train or evaluate, hand back.

The Flower ClientApp (``fedpersona.client.app``) and the on-device runner both call these functions;
the private tensors live in a ``PrivateStore`` (the node's Context.state in simulation, the device's
state directory in deployment) and are never part of what ``train_round`` returns for sending.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from fedpersona.alignment.evaluation import evaluate_user
from fedpersona.alignment.trainer import TrainStats, train_local
from fedpersona.config import RunConfig
from fedpersona.data.schema import UserData
from fedpersona.data.sources import user_data
from fedpersona.model.adapters import Role
from fedpersona.model.resident import ResidentModel, get_resident
from fedpersona.strategies.schemes import get_scheme


class PrivateStore(Protocol):
    """Where a user's private tensors and small counters persist between rounds."""

    def load_private(self) -> dict[str, torch.Tensor] | None: ...

    def save_private(self, tensors: Mapping[str, torch.Tensor], rounds_trained: int) -> None: ...

    def rounds_trained(self) -> int: ...

    def load_ledger(self) -> str | None: ...

    def save_ledger(self, ledger_json: str) -> None: ...


def resident_for(config: RunConfig) -> ResidentModel:
    """This process's resident model for the run's (model, scheme, ranks, seed); built once."""
    scheme = get_scheme(config.scheme)
    key = (config.model, config.scheme, config.shared_rank, config.private_rank, config.seed, config.resolved_device())
    return get_resident(key, config.model, lambda: scheme.layout(config.shared_rank, config.private_rank),
                        seed=config.seed, device=config.resolved_device())


def population_user(config: RunConfig, index: int) -> UserData:
    return user_data(config.data, index, num_users=config.num_users, seed=config.seed,
                     dirichlet_alpha=config.dirichlet_alpha, test_fraction=config.test_fraction,
                     min_pairs=config.min_pairs)


def round_seed(config: RunConfig, user_index: int, server_round: int) -> int:
    """A per-(run, user, round) seed: deterministic, and independent across users and rounds."""
    digest = hashlib.sha256(f"{config.seed}/{user_index}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def prepare(resident: ResidentModel, shared: Mapping[str, torch.Tensor] | None, store: PrivateStore) -> None:
    """Put this user's view into the resident model: the server's shared tensors, the user's private ones."""
    if resident.adapters.names(Role.SHARED):
        if shared is None:
            raise ValueError("the server sent no shared tensors for a scheme that has them")
        resident.adapters.load(shared, Role.SHARED)
    private = store.load_private()
    if private is None:
        resident.adapters.reset(Role.PRIVATE)
    else:
        resident.adapters.load(private, Role.PRIVATE)


@dataclass(frozen=True)
class RoundResult:
    shared: dict[str, torch.Tensor]  # what may be sent: shared tensors only
    num_examples: int
    stats: object  # TrainStats or DPTrainStats
    declined: bool = False  # the user's privacy budget could not afford this round
    epsilon: float | None = None  # pair-level epsilon spent so far (DP only)


def _train_private(config: RunConfig, resident: ResidentModel, user: UserData, seed: int,
                   store: PrivateStore):
    """Pair-level DP-SGD with the user's persistent ledger (saved before anything leaves the device)."""
    from fedpersona.privacy.dp_training import plan_ledger, train_local_dp
    from fedpersona.privacy.ledger import PrivacyLedger

    dp, settings = config.dp_settings, config.train_settings
    saved = store.load_ledger()
    # planned_rounds = all rounds: the worst case (sampled every round), so the budget holds regardless
    ledger = (PrivacyLedger.from_json(saved) if saved is not None
              else plan_ledger(len(user.train), settings, dp, planned_rounds=config.rounds))
    try:
        return train_local_dp(resident, user.train, settings, seed, dp, ledger)
    finally:
        store.save_ledger(ledger.dumps())


def train_round(config: RunConfig, user: UserData, user_index: int, server_round: int,
                shared: Mapping[str, torch.Tensor] | None, store: PrivateStore) -> RoundResult:
    resident = resident_for(config)
    prepare(resident, shared, store)
    seed = round_seed(config, user_index, server_round)
    if config.dp_epsilon > 0:
        stats = _train_private(config, resident, user, seed, store)
        if stats.declined:
            return RoundResult({}, 0, stats, declined=True, epsilon=stats.epsilon)
        epsilon = stats.epsilon
    else:
        stats, epsilon = train_local(resident, user.train, config.train_settings, seed=seed), None
    store.save_private(resident.adapters.tensors(Role.PRIVATE), store.rounds_trained() + 1)
    return RoundResult(resident.adapters.tensors(Role.SHARED), len(user.train), stats, epsilon=epsilon)


def current_epsilon(store: PrivateStore) -> float | None:
    saved = store.load_ledger()
    if saved is None:
        return None
    from fedpersona.privacy.ledger import PrivacyLedger

    return PrivacyLedger.from_json(saved).spent_epsilon()


def evaluate_round(config: RunConfig, user: UserData, shared: Mapping[str, torch.Tensor] | None,
                   store: PrivateStore) -> dict[str, float]:
    resident = resident_for(config)
    prepare(resident, shared, store)
    return evaluate_user(resident, user.test, config.max_length)
