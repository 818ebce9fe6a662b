"""One user's evaluation, free of Flower: held-out accuracy of the personalized, global and base models.

At the final evaluation a new user first fits its personal part on a few shots, a ``finetune`` user fits
its private copy; the reply then also reports the private parameter count and, for a seeded sample of
users, a generation check on the user's held-out prompts: for synthetic users the personalized model's win
rate over the global one scored with the user's hidden utility; for text data (a real model) what the user
would read, judged (``text_generation_check``: degeneration of both models' answers, and where the user's
id names its poles the share of answers at them and the judged win rate). Nothing fitted here is stored
or sent.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from fedpersona.alignment.evaluation import evaluate_user
from fedpersona.alignment.trainer import TrainSettings, train_local
from fedpersona.config import RunConfig
from fedpersona.data.schema import PreferencePair, UserData
from fedpersona.model.adapters import Role
from fedpersona.model.resident import ResidentModel
from fedpersona.round.resident import resident_for
from fedpersona.round.stores import PrivateStore
from fedpersona.round.train import RoundOptions, _train_private, prepare
from fedpersona.round.users import is_new_user, round_seed
from fedpersona.strategies.schemes import Scheme, get_scheme

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

    def generate_batch(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                       *, same: bool = False, **decoding: Any) -> tuple[list[Any], list[Any]]:
        """(personalized, global) ``Generation``s of ``prompts``, batched (``generation.generate_batch``), the
        same seed for both; ``same``: the two models are one (no private part), generated once.
        ``decoding``: ``repetition_penalty``, ``no_repeat_ngram_size``."""
        from fedpersona.alignment.generation import generate_batch

        personal = generate_batch(self.resident, prompts, strength=1.0, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed, **decoding)
        if same:
            return personal, personal
        with self.global_view() if self.global_shared is not None else nullcontext():
            global_ = generate_batch(self.resident, prompts, strength=0.0, max_new_tokens=max_new_tokens,
                                     temperature=temperature, seed=seed, **decoding)
        return personal, global_

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


def generation_decodings(config: RunConfig) -> dict[str, float]:
    """The decodings of the text generation check: name -> temperature (``gen-decoding``)."""
    sampled = {"sampled": config.gen_temperature} if config.gen_temperature > 0 else {"greedy": 0.0}
    return {"sampled": sampled, "greedy": {"greedy": 0.0}, "both": {"greedy": 0.0, **sampled}}[config.gen_decoding]


def text_generation_check(config: RunConfig, views: PersonalViews, user: UserData, index: int, *,
                          same: bool = False) -> dict[str, float]:
    """What the user would read, judged (``fedpersona.alignment.judges``), on up to ``gen-prompts`` of the
    user's held-out prompts, for each decoding of ``gen-decoding`` (greedy, and sampled at
    ``gen-temperature`` with the same seed for both models):

    * ``gen-<decoding>-<model>-<measure>`` for model ``personal`` and ``global`` (and ``memory``: the base
      model with ``gen-memory-shots`` of the user's own chosen answers retrieved into the prompt, when on)
      and measure ``rep3``, ``distinct2``, ``words``, ``cut`` (``judges.degeneration``);
    * where the user id names its poles (the generated scenarios): ``...-pole`` (share of the user's
      dimensions x prompts at its pole), ``...-pole-<dimension>``, and ``gen-<decoding>-win-rate`` (judged
      win rate of personal over global); ``gen-win-rate`` is the first decoding's.

    Args:
        config: the run's configuration.
        views: the user's personalized and global models.
        user: the user (its ``test`` prompts are generated for; its ``train`` pairs are its memory).
        index: the user's index (the seed).
        same: the personalized model is the global one (generated once).

    Returns:
        Flat metrics (the evaluation reply's), every value a float.
    """
    from fedpersona.alignment.generation import generate_batch
    from fedpersona.alignment.judges import degeneration, judged_win_rate, pole_shares, user_poles
    from fedpersona.alignment.retrieval import memory_prompts

    prompts = list(dict.fromkeys(p.prompt for p in user.test))[: config.gen_prompts]
    poles = user_poles(user.user_id)
    decoding = {"repetition_penalty": config.gen_repetition_penalty,
                "no_repeat_ngram_size": config.gen_no_repeat_ngram}
    metrics: dict[str, float] = {}
    for name, temperature in generation_decodings(config).items():
        seed = round_seed(config, index, -2)
        personal, global_ = views.generate_batch(prompts, config.gen_max_tokens, temperature, seed, same=same,
                                                 **decoding)
        models = {"personal": personal, "global": global_}
        if config.gen_memory_shots > 0:
            models["memory"] = generate_batch(views.resident, memory_prompts(user.train, prompts,
                                                                             config.gen_memory_shots),
                                              max_new_tokens=config.gen_max_tokens, temperature=temperature,
                                              seed=seed, base=True, **decoding)
        for model, generations in models.items():
            texts, cuts = [g.text for g in generations], [g.cut for g in generations]
            for measure, value in degeneration(texts, cuts).items():
                metrics[f"gen-{name}-{model}-{measure}"] = float(value)
            if poles:
                shares = pole_shares(texts, cuts, poles)
                metrics[f"gen-{name}-{model}-pole"] = sum(shares.values()) / len(shares)
                metrics.update({f"gen-{name}-{model}-pole-{dim}": value for dim, value in shares.items()})
        if poles:
            metrics[f"gen-{name}-win-rate"] = judged_win_rate(
                [g.text for g in personal], [g.text for g in global_], [g.cut for g in personal],
                [g.cut for g in global_], poles)
            metrics.setdefault("gen-win-rate", metrics[f"gen-{name}-win-rate"])
    return metrics


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
            checked = config.gen_prompts > 0 and index is not None
            if checked and in_generation_sample(config, index):
                if config.is_synthetic:
                    evaluation.metrics["gen-win-rate"] = generation_check(config, views, user, index)
                else:
                    evaluation.metrics.update(text_generation_check(
                        config, views, user, index, same=scheme.personal_fit == "none" or untouched))
        return evaluation
    finally:
        if global_shared is not None:
            resident.adapters.load(global_shared, Role.SHARED)
