"""What one user's device does in a round, free of Flower: load tensors, train or evaluate, hand back.

The Flower ClientApp (``fedpersona.client.app``) and the on-device runner both call these functions;
the private tensors live in a ``PrivateStore`` (the node's Context.state in simulation, the device's
state directory in deployment) and are never part of what ``train_round`` returns for sending.

Strategy requests (message config keys the server's strategy adds, see ``RoundOptions``):

* ``proximal-mu`` (FedProx): the proximal term ``mu/2 ||w - w_t||^2`` on the shared tensors;
* ``train-loss-key`` (set by ``fedpersona.strategies.registry`` for strategies that weight users by their
  loss, e.g. QFedAvg): the reply then carries, under that key, the user's mean DPO loss on its training
  pairs *before* local training (q-FFL's F_k(w_t), with the user's own private part). It is a raw,
  data-dependent number, so it is sent only when asked for, and never with DP on.

Users with index >= ``num_users`` are *new users* (cold start): they decline every training round and at
the final evaluation fit only their personal part (the scheme's ``personal_fit``) on their first
``new_user_shots`` training pairs. The final evaluation also reports the private parameter count and,
for synthetic data, a generation check: the personalized model's win rate over the global one on the
user's held-out prompts, scored with the user's hidden utility.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedpersona.alignment.batching import encode_pairs
from fedpersona.alignment.evaluation import evaluate_user
from fedpersona.alignment.trainer import (
    TrainSettings,
    TrainStats,
    inference_chunks,
    pair_losses,
    reference_logps,
    train_local,
)
from fedpersona.config import RunConfig
from fedpersona.data.schema import PreferencePair, UserData
from fedpersona.data.sources import subset_user, user_data
from fedpersona.model.adapters import AdapterState, Role
from fedpersona.model.resident import ResidentModel, get_resident
from fedpersona.strategies.proximal import proximal_term
from fedpersona.strategies.registry import TRAIN_LOSS_KEY
from fedpersona.strategies.schemes import Scheme, get_scheme

PROXIMAL_MU_KEY = "proximal-mu"  # message config: FedProx's mu


class PrivateStore(Protocol):
    """Where a user's private tensors and small counters persist between rounds."""

    def load_private(self) -> dict[str, torch.Tensor] | None: ...

    def save_private(self, tensors: Mapping[str, torch.Tensor], rounds_trained: int) -> None: ...

    def rounds_trained(self) -> int: ...

    def load_ledger(self) -> str | None: ...

    def save_ledger(self, ledger_json: str) -> None: ...


class MemoryStore:
    """A ``PrivateStore`` in this process's memory (benchmarks and tests: one per simulated user)."""

    def __init__(self) -> None:
        self.private: dict[str, torch.Tensor] | None = None
        self.ledger: str | None = None
        self.rounds = 0

    def load_private(self) -> dict[str, torch.Tensor] | None:
        return None if self.private is None else {k: v.clone() for k, v in self.private.items()}

    def save_private(self, tensors: Mapping[str, torch.Tensor], rounds_trained: int) -> None:
        self.private, self.rounds = {k: v.clone() for k, v in tensors.items()}, rounds_trained

    def rounds_trained(self) -> int:
        return self.rounds

    def load_ledger(self) -> str | None:
        return self.ledger

    def save_ledger(self, ledger_json: str) -> None:
        self.ledger = ledger_json


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


_SETUP_LOCK = threading.Lock()
_SCHEME_READY = "_fedpersona_scheme_ready"  # attribute marking a resident model whose scheme setup ran


def resident_for(config: RunConfig, *, keep: bool = True) -> ResidentModel:
    """This process's resident model for the run's (model, scheme, ranks, seed); built once. With
    ``keep=False`` a model built here is not kept (see ``get_resident``)."""
    scheme = get_scheme(config.scheme)
    prototypes = config.pal_prototypes if scheme.setup is not None else 0
    key = (config.model, config.scheme, config.shared_rank, config.private_rank, prototypes, config.seed,
           config.resolved_device(), config.chat_template, config.lora_target_modules, config.gradient_checkpointing)
    resident = get_resident(key, config.model, lambda: scheme.layout(config), seed=config.seed,
                            device=config.resolved_device(), chat_template=config.chat_template,
                            target_modules=config.lora_target_modules,
                            gradient_checkpointing=config.gradient_checkpointing, keep=keep)
    resident.max_tokens_per_batch = config.max_tokens_per_batch
    if scheme.setup is not None and not getattr(resident, _SCHEME_READY, False):
        with _SETUP_LOCK:
            if not getattr(resident, _SCHEME_READY, False):
                scheme.setup(resident.model, resident.layout)  # e.g. PAL's private mixture weights
                resident.adapters = AdapterState(resident.model, resident.layout.policy)
                setattr(resident, _SCHEME_READY, True)
    return resident


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
                   release_count: bool = True):
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
    stats = train_local_dp(resident, pairs, settings, seed, config.dp_settings, ledger)
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
                extras: Mapping[str, Any] | None = None) -> RoundResult:
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
                                   config.dp_rounds_planned)
            if stats.declined:
                return RoundResult({}, 0, stats, declined=True, epsilon=stats.epsilon, reason="budget-spent",
                                   detail=f"epsilon spent {stats.epsilon:.2f}; another round would pass the target")
            epsilon, weight = stats.epsilon, stats.aggregation_weight  # the released (noised) pair count, or 1
        else:
            stats, epsilon = train_local(resident, user.train, config.train_settings, seed=seed), None
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
    training them one after another, ``fedpersona.alignment.cohort``)."""
    options = RoundOptions.from_extras(extras)
    if not config.cohort_batching:
        return "cohort-batching is off"
    if options.train_loss_key:
        return "the strategy asks for each user's loss before training"
    if get_scheme(config.scheme).shape_update is not None:
        return f"scheme {config.scheme} shapes each update after training"
    from fedpersona.alignment.cohort import cohort_supported

    return cohort_supported(resident_for(config), config.train_settings, dp=config.dp_epsilon > 0)


def train_cohort_rounds(config: RunConfig, users: Sequence[tuple[int, UserData, PrivateStore]],
                        server_round: int, shared: Mapping[str, torch.Tensor] | None,
                        extras: Mapping[str, Any] | None = None) -> list[RoundResult | Exception]:
    """``train_round`` for each ``(index, data, store)`` of a cohort, in order; each entry the user's result
    or the exception its round raised (one user's failure does not fail the others).

    Where ``batching_refusal`` allows, the cohort's training users run in one forward/backward per step
    (``fedpersona.alignment.cohort.train_cohort``: the same tensors as one after another, to float
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
    from fedpersona.alignment.cohort import CohortJob, train_cohort

    resident = resident_for(config)
    scheme = get_scheme(config.scheme)
    jobs = []
    for i in trainees:
        index, data, store = users[i]
        prepare(resident, shared, store, _private_init(config, resident, scheme, index))
        jobs.append(CohortJob(pairs=data.train, seed=round_seed(config, index, server_round),
                              shared=resident.adapters.tensors(Role.SHARED),
                              private=resident.adapters.tensors(Role.PRIVATE)))
    options = RoundOptions.from_extras(extras, server_round)
    trained = dict(zip(trainees, train_cohort(resident, jobs, config.train_settings, proximal_mu=options.proximal_mu),
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


# ---- evaluation ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    accuracies: dict[str, float]  # personalized, global, base
    metrics: dict[str, float | int] = field(default_factory=dict)  # final evaluation: private-params, gen-win-rate


def private_parameter_count(resident: ResidentModel, scheme: Scheme) -> int:
    """Parameters the device keeps for itself: its PRIVATE tensors, or the fine-tuned copy (finetune)."""
    role = Role.SHARED if scheme.personal_fit == "copy" else Role.PRIVATE
    return resident.adapters.count(role)


def fit_personal(resident: ResidentModel, scheme: Scheme, pairs: Sequence[PreferencePair],
                 settings: TrainSettings, seed: int, train: Callable[..., object] = train_local) -> None:
    """Fit only the user's personal part on ``pairs``: the PRIVATE tensors (shared ones held still), or,
    for a ``copy`` scheme, the user's copy of the shared tensors (trained at the private learning rate).
    ``train(resident, pairs, settings, seed)`` does the training (DP runs pass DP-SGD on the ledger)."""
    if scheme.personal_fit == "private":
        train(resident, pairs, dataclasses.replace(settings, shared_lr=0.0), seed)
    elif scheme.personal_fit == "copy":
        train(resident, pairs, dataclasses.replace(settings, shared_lr=settings.lr), seed)


class PersonalViews:
    """The personalized and the global model on one resident model.

    Usually both live in the resident at once (global = private tensors at their initial values, which
    ``private_strength(0)`` gives). A ``copy`` scheme keeps the global shared tensors aside instead and
    swaps them in for the global view.
    """

    def __init__(self, resident: ResidentModel, global_shared: dict[str, torch.Tensor] | None = None) -> None:
        self.resident = resident
        self.global_shared = global_shared
        self.personal_shared = resident.adapters.tensors(Role.SHARED) if global_shared is not None else None

    @contextmanager
    def global_view(self) -> Iterator[None]:
        if self.global_shared is None:
            with self.resident.adapters.private_strength(0.0):
                yield
            return
        self.resident.adapters.load(self.global_shared, Role.SHARED)
        try:
            yield
        finally:
            self.resident.adapters.load(self.personal_shared, Role.SHARED)

    def evaluate(self, pairs: Sequence[PreferencePair], max_length: int, *,
                 personal_is_global: bool = False) -> dict[str, float]:
        """Accuracies of the personalized, global and base models (``evaluate_user``);
        ``personal_is_global``: the private tensors are at their initial values (the global view)."""
        acc = evaluate_user(self.resident, pairs, max_length, personal_is_global=personal_is_global)
        if self.global_shared is not None:
            with self.global_view():
                acc["global"] = evaluate_user(self.resident, pairs, max_length)["global"]
        return acc

    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> tuple[list[str], list[str]]:
        """(personalized, global) generations: strength 1 vs 0 (for a copy scheme, swapped tensors), each
        prompt sampled with the same seed for both models (greedy when ``temperature`` is 0)."""
        from fedpersona.alignment.generation import generate

        def run(strength: float) -> list[str]:
            return [generate(self.resident, [prompt], strength=strength, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed + i)[0] for i, prompt in enumerate(prompts)]

        personal = run(1.0)
        with self.global_view() if self.global_shared is not None else nullcontext():
            global_ = run(0.0)
        return personal, global_


def win_rate(personal_scores: Sequence[float], global_scores: Sequence[float]) -> float:
    """Share of prompts where the personalized response scores higher; ties count half."""
    if not personal_scores:
        return math.nan
    wins = sum(1.0 if p > g else 0.5 if p == g else 0.0 for p, g in zip(personal_scores, global_scores, strict=True))
    return wins / len(personal_scores)


def in_generation_sample(config: RunConfig, index: int) -> bool:
    """Whether user ``index``'s final evaluation runs the generation check: a seeded sample of ``gen_users``
    training users and as many new users (every user of a group no larger; ``gen_users`` 0: everyone).
    The check costs ~1.5 s per user on the embedded model, 10x the rest of an evaluation."""
    if config.gen_users == 0:
        return True
    return index in _generation_sample(config.num_users, config.new_users, config.gen_users, config.seed)


@functools.lru_cache(maxsize=8)
def _generation_sample(num_users: int, new_users: int, k: int, seed: int) -> frozenset[int]:
    import random

    rng = random.Random(f"{seed}/generation-check")
    picked = rng.sample(range(num_users), min(k, num_users))
    picked += rng.sample(range(num_users, num_users + new_users), min(k, new_users))
    return frozenset(picked)


def generation_check(config: RunConfig, views: PersonalViews, user: UserData, index: int) -> float:
    """Win rate of the personalized over the global model's generations on the user's held-out prompts,
    scored with the synthetic user's hidden utility (``PreferenceSimulator.utility_of``).

    Responses are sampled at ``gen_temperature`` (default 0.7) with the same seed per prompt for both
    models: greedy decoding of a small DPO-tuned LM tends to fall into repetition loops that say little
    about the style the policy has learned; sampling scores the policy itself."""
    from fedpersona.data.sources import SYNTHETIC_PREFIX, simulator

    prompts = list(dict.fromkeys(p.prompt for p in user.test))[: config.gen_prompts]
    sim = simulator(config.data[len(SYNTHETIC_PREFIX):], config.num_users + config.new_users, config.seed,
                    config.dirichlet_alpha)
    personal, global_ = views.generate(prompts, config.gen_max_tokens, config.gen_temperature,
                                       seed=round_seed(config, index, -2))
    return win_rate([sim.utility_of(index, t) for t in personal], [sim.utility_of(index, t) for t in global_])


def evaluate_round(config: RunConfig, user: UserData, shared: Mapping[str, torch.Tensor] | None,
                   store: PrivateStore, *, index: int | None = None,
                   extras: Mapping[str, Any] | None = None) -> Evaluation:
    """Held-out accuracies of the personalized, global and base models for this user.

    At the final evaluation (``server-round`` == ``rounds``): a new user first fits its personal part on
    ``new_user_shots`` pairs, a finetune user fine-tunes its private copy on all its training pairs; the
    reply also carries ``private-params`` and, for synthetic data, ``gen-win-rate``. Nothing fitted here is
    stored or sent; under DP a new user's fit is DP-SGD and its spend is kept in the user's ledger.
    """
    options = RoundOptions.from_extras(extras)
    final = options.server_round >= config.rounds
    scheme = get_scheme(config.scheme)
    resident = resident_for(config)
    has_private = prepare(resident, shared, store)
    new = index is not None and is_new_user(config, index)
    fit_pairs: Sequence[PreferencePair] = ()
    settings = config.train_settings
    if final and new:
        fit_pairs = user.train[: config.new_user_shots]
        settings = dataclasses.replace(settings, min_steps=config.new_user_steps, max_steps=config.new_user_steps)
    elif final and scheme.finetune_at_eval:
        fit_pairs = user.train
    global_shared = resident.adapters.tensors(Role.SHARED) if scheme.personal_fit == "copy" and fit_pairs else None
    try:
        if fit_pairs and scheme.personal_fit != "none":
            # under DP a new user's fit is DP-SGD too, planned for this one fit (its pairs were never trained on)
            train = train_local if config.dp_epsilon <= 0 else (
                lambda r, pairs, s, seed: _train_private(config, r, pairs, s, seed, store, planned_rounds=1,
                                                         release_count=False))  # it sends nothing
            fit_personal(resident, scheme, fit_pairs, settings, round_seed(config, index or 0, -1), train)
        views = PersonalViews(resident, global_shared)
        # a user with no private tensors of its own (never trained: most of a large population) and nothing
        # fitted here has its private tensors at their initial values: its personal model IS the global one
        untouched = not has_private and not (fit_pairs and scheme.personal_fit != "none")
        evaluation = Evaluation(views.evaluate(user.test, config.max_length, personal_is_global=untouched))
        if final:
            evaluation.metrics["private-params"] = private_parameter_count(resident, scheme)
            checked = config.is_synthetic and config.gen_prompts > 0 and index is not None
            if checked and in_generation_sample(config, index):
                evaluation.metrics["gen-win-rate"] = generation_check(config, views, user, index)
        return evaluation
    finally:
        if global_shared is not None:
            resident.adapters.load(global_shared, Role.SHARED)
