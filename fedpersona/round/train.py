"""One user's training round, free of Flower: put its tensors in, train, hand back what may be sent.

The Flower ClientApp (``fedpersona.client``) and the device runner call ``train_round`` (one user) or
``train_cohort_rounds`` (the users of one simulation message); the private tensors live in a
``PrivateStore`` and are never part of what a ``RoundResult`` carries for sending.

Strategy requests (message config keys the server's strategy adds, see ``RoundOptions``):

* ``proximal-mu`` (FedProx): the proximal term ``mu/2 ||w - w_t||^2`` on the shared tensors;
* ``train-loss-key`` (set by ``fedpersona.strategies.registry`` for strategies that weight users by their
  loss, e.g. QFedAvg): the reply then carries, under that key, the user's mean loss on its training
  pairs *before* local training (q-FFL's F_k(w_t), with the user's own private part). It is a raw,
  data-dependent number, so it is sent only when asked for, and never with DP on.

New users (index >= ``num_users``) decline every training round (``new-user``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedpersona.alignment.batching import encode_pairs
from fedpersona.alignment.trainer import (
    Progress,
    TrainSettings,
    TrainStats,
    inference_chunks,
    pair_losses,
    reference_logps,
    train_local,
)
from fedpersona.config import RunConfig
from fedpersona.data.schema import PreferencePair, UserData
from fedpersona.model.adapters import Role
from fedpersona.model.resident import ResidentModel
from fedpersona.protocol import PROXIMAL_MU_KEY, TRAIN_LOSS_KEY
from fedpersona.round.resident import resident_for
from fedpersona.round.stores import PrivateStore
from fedpersona.round.users import is_new_user, round_seed
from fedpersona.strategies.proximal import proximal_term
from fedpersona.strategies.schemes import Scheme, get_scheme


@dataclass(frozen=True)
class RoundOptions:
    """What the strategy asked of this round, from the message config's non-RunConfig keys."""

    server_round: int = 0
    proximal_mu: float = 0.0
    train_loss_key: str | None = None

    @classmethod
    def from_extras(cls, extras: Mapping[str, Any] | None, server_round: int | None = None) -> RoundOptions:
        extras = extras or {}
        key = extras.get(TRAIN_LOSS_KEY)
        return cls(server_round=int(extras.get("server-round", 0) if server_round is None else server_round),
                   proximal_mu=float(extras.get(PROXIMAL_MU_KEY, 0.0) or 0.0),
                   train_loss_key=str(key) if key else None)


def prepare(resident: ResidentModel, shared: Mapping[str, torch.Tensor] | None, store: PrivateStore,
            init: Callable[[], None] | None = None) -> bool:
    """Put this user's view into the resident model: the server's shared tensors, the user's private ones
    (initial values if it has none yet, then ``init``: a scheme's own starting point for training).
    Returns whether the user had private tensors of its own."""
    if resident.adapters.names(Role.SHARED):
        if shared is None:
            raise ValueError("the server sent no shared tensors for a scheme that has them")
        resident.adapters.load(shared, Role.SHARED)
    private = store.load_private()
    if private is None:
        resident.adapters.reset(Role.PRIVATE)
        if init is not None:
            init()
        return False
    resident.adapters.load(private, Role.PRIVATE)
    return True


@dataclass(frozen=True)
class RoundResult:
    shared: dict[str, torch.Tensor]  # what may be sent: shared tensors only
    num_examples: int  # the aggregation weight: pair count, under pair-level DP its released noised value
    stats: object  # TrainStats or DPTrainStats
    declined: bool = False  # the user's privacy budget could not afford this round, or a new user
    epsilon: float | None = None  # pair-level epsilon spent so far (DP only)
    metrics: dict[str, float] = field(default_factory=dict)  # values a strategy asked for (see module doc)
    reason: str = ""  # declined: a fedpersona.protocol.DECLINE_REASONS code
    detail: str = ""  # declined: one line for the operator (never data)


def declined_result(reason: str, detail: str = "", epsilon: float | None = None) -> RoundResult:
    """A round this user does not train: nothing to send but the reason."""
    return RoundResult({}, 0, TrainStats(0, 0, math.nan), declined=True, epsilon=epsilon, reason=reason,
                       detail=detail)


def _train_private(config: RunConfig, resident: ResidentModel, pairs: Sequence[PreferencePair],
                   settings: TrainSettings, seed: int, store: PrivateStore, planned_rounds: int,
                   release_count: bool = True, progress: Progress | None = None):
    """Pair-level DP-SGD on the user's persistent ledger (calibrated for ``planned_rounds`` rounds, with
    the released pair count when ``release_count``, if it has none yet), saved before anything leaves
    the device. Saved only when training completed: a round that fails before its update exists
    released nothing, so it must not drain the budget (a crash after the save over-counts, never under)."""
    from fedpersona.privacy.dp_training import plan_ledger, train_local_dp
    from fedpersona.privacy.ledger import PrivacyLedger

    saved = store.load_ledger()
    ledger = (PrivacyLedger.from_json(saved) if saved is not None
              else plan_ledger(len(pairs), settings, config.dp_settings, planned_rounds=planned_rounds,
                               release_count=release_count, seed=seed))
    stats = train_local_dp(resident, pairs, settings, seed, config.dp_settings, ledger, progress=progress)
    store.save_ledger(ledger.dumps())
    return stats


@torch.no_grad()
def pretraining_loss(resident: ResidentModel, pairs: Sequence[PreferencePair], settings: TrainSettings,
                     batch_size: int = 64) -> float:
    """Mean loss of the current model (global shared + the user's private part) on ``pairs``."""
    encoded = encode_pairs(resident.prompt_format, pairs, settings.max_length)
    ref = reference_logps(resident, encoded)
    resident.model.eval()
    total, start = 0.0, 0
    for chunk in inference_chunks(resident, encoded, batch_size):
        losses = pair_losses(resident, chunk, ref[start : start + len(chunk)], settings)
        total, start = total + float(losses.sum()), start + len(chunk)
    return total / max(len(encoded), 1)


def _private_init(config: RunConfig, resident: ResidentModel, scheme: Scheme, user_index: int) -> Callable[[], None] | None:
    """The scheme's own starting point for a user's private tensors (None: the layout's initial values)."""
    if scheme.init_private is None:
        return None
    return lambda: scheme.init_private(resident.adapters, round_seed(config, user_index, 0), config)


def train_round(config: RunConfig, user: UserData, user_index: int, server_round: int,
                shared: Mapping[str, torch.Tensor] | None, store: PrivateStore,
                extras: Mapping[str, Any] | None = None, progress: Progress | None = None) -> RoundResult:
    """One user's training round: shared and private tensors in, train (DP-SGD under pair-level DP), the
    private tensors stored, what may be sent returned.

    Args:
        config: the run's settings.
        user: the user's pairs (``train`` is trained on).
        user_index: the user's index (its seed; new users decline).
        server_round: the round (the seed).
        shared: the server's shared tensors (None for schemes without any).
        store: where the user's private tensors and ledger live.
        extras: the strategy's requests (``RoundOptions``).
        progress: hears the round's phases (``fedpersona.alignment.trainer.Progress``), e.g. a device's
            terminal; None: nobody watches.

    Returns:
        The ``RoundResult``: shared tensors and weight, or a decline with its code.
    """
    options = RoundOptions.from_extras(extras, server_round)
    if is_new_user(config, user_index):  # held out of training until the final evaluation
        return declined_result("new-user")
    resident = resident_for(config)
    scheme = get_scheme(config.scheme)
    prepare(resident, shared, store, _private_init(config, resident, scheme, user_index))
    seed = round_seed(config, user_index, server_round)
    metrics: dict[str, float] = {}
    if options.train_loss_key:
        if config.dp_epsilon > 0:
            raise ValueError("the strategy asks for each user's training loss, which DP-SGD does not protect")
        metrics[options.train_loss_key] = pretraining_loss(resident, user.train, config.train_settings)
    shared_params = [resident.adapters.params[n] for n in resident.adapters.names(Role.SHARED)]
    with proximal_term(shared_params, options.proximal_mu):
        if config.dp_epsilon > 0:
            # calibrated for the rounds the user is likely to be sampled for; past its budget it declines
            stats = _train_private(config, resident, user.train, config.train_settings, seed, store,
                                   config.dp_rounds_planned, progress=progress)
            if stats.declined:
                return RoundResult({}, 0, stats, declined=True, epsilon=stats.epsilon, reason="budget-spent",
                                   detail=f"epsilon spent {stats.epsilon:.2f}; another round would pass the target")
            epsilon, weight = stats.epsilon, stats.aggregation_weight  # the released (noised) pair count, or 1
        else:
            stats, epsilon = train_local(resident, user.train, config.train_settings, seed=seed,
                                         progress=progress), None
            weight = len(user.train)
    return _finish_round(config, scheme, resident, shared, store, resident.adapters.tensors(Role.PRIVATE),
                         resident.adapters.tensors(Role.SHARED), stats, epsilon, weight, metrics)


def _finish_round(config: RunConfig, scheme: Scheme, resident: ResidentModel,
                  shared: Mapping[str, torch.Tensor] | None, store: PrivateStore,
                  private: dict[str, torch.Tensor], sent: dict[str, torch.Tensor], stats: Any,
                  epsilon: float | None, weight: int, metrics: dict[str, float]) -> RoundResult:
    """A trained user's round from its new tensors: the scheme shapes what is sent, a NaN/Inf result is
    declined (nothing kept), else the private tensors are stored before anything leaves."""
    if scheme.shape_update is not None and shared is not None:
        sent = scheme.shape_update(resident.adapters, shared, sent)  # e.g. PAL's responsibility weighting
    if (bad := first_non_finite(private, sent)) is not None:
        # Kept, a NaN private adapter would poison every later round and answer; the (DP) ledger keeps
        # the round's spending all the same (over-counting is the safe side).
        return declined_result("diverged", f"{bad} holds NaN or Inf after {stats.steps} steps at lr "
                                           f"{config.lr:g}; lower the learning rate", epsilon=epsilon)
    store.save_private(private, store.rounds_trained() + 1)
    return RoundResult(sent, weight, stats, epsilon=epsilon, metrics=metrics)


def batching_refusal(config: RunConfig, extras: Mapping[str, Any] | None = None) -> str | None:
    """Why a cohort's users cannot be trained in one forward/backward (None: they can; the result equals
    training them one after another, ``fedpersona.alignment.stacked``)."""
    options = RoundOptions.from_extras(extras)
    if not config.cohort_batching:
        return "cohort-batching is off"
    if options.train_loss_key:
        return "the strategy asks for each user's loss before training"
    if get_scheme(config.scheme).shape_update is not None:
        return f"scheme {config.scheme} shapes each update after training"
    from fedpersona.alignment.stacked import stacking_supported

    return stacking_supported(resident_for(config), config.train_settings, dp=config.dp_epsilon > 0)


def train_cohort_rounds(config: RunConfig, users: Sequence[tuple[int, UserData, PrivateStore]],
                        server_round: int, shared: Mapping[str, torch.Tensor] | None,
                        extras: Mapping[str, Any] | None = None) -> list[RoundResult | Exception]:
    """``train_round`` for each ``(index, data, store)`` of a cohort, in order; each entry the user's result
    or the exception its round raised (one user's failure does not fail the others).

    Where ``batching_refusal`` allows, the cohort's training users run in one forward/backward per step
    (``fedpersona.alignment.stacked.train_stacked``: the same tensors as one after another, to float
    tolerance; also for a single user, whose step its fused LoRA forward makes cheaper than PEFT's); else
    one after another."""
    trainees = [i for i, (index, _, _) in enumerate(users) if not is_new_user(config, index)]
    if not trainees or batching_refusal(config, extras) is not None:
        out: list[RoundResult | Exception] = []
        for index, data, store in users:
            try:
                out.append(train_round(config, data, index, server_round, shared, store, extras))
            except Exception as err:  # noqa: BLE001 - reported as this user's failure
                out.append(err)
        return out
    from fedpersona.alignment.stacked import StackedJob, train_stacked

    resident = resident_for(config)
    scheme = get_scheme(config.scheme)
    jobs = []
    for i in trainees:
        index, data, store = users[i]
        prepare(resident, shared, store, _private_init(config, resident, scheme, index))
        jobs.append(StackedJob(pairs=data.train, seed=round_seed(config, index, server_round),
                              shared=resident.adapters.tensors(Role.SHARED),
                              private=resident.adapters.tensors(Role.PRIVATE)))
    options = RoundOptions.from_extras(extras, server_round)
    trained = dict(zip(trainees, train_stacked(resident, jobs, config.train_settings, proximal_mu=options.proximal_mu),
                       strict=True))
    results: list[RoundResult | Exception] = []
    for i, (index, data, store) in enumerate(users):
        if i not in trained:  # a new user: train_round declines it, as one after another
            results.append(train_round(config, data, index, server_round, shared, store, extras))
            continue
        done = trained[i]
        results.append(_finish_round(config, scheme, resident, shared, store, done.private, done.shared,
                                     done.stats, None, len(data.train), {}))
    return results


def first_non_finite(*groups: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or Inf, None if all are finite."""
    for tensors in groups:
        for name, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                return name
    return None


def current_epsilon(store: PrivateStore) -> float | None:
    saved = store.load_ledger()
    if saved is None:
        return None
    from fedpersona.privacy.ledger import PrivacyLedger

    return PrivacyLedger.from_json(saved).spent_epsilon()
