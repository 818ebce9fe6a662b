"""Personalization schemes on the device: layouts, PAL's private mixture, FedProx's term, new users,
finetune's private copy, QFedAvg's loss request and the generation check (no Flower, no Ray)."""

import dataclasses

import pytest
import torch

from fedpersona.alignment.trainer import train_local
from fedpersona.round.evaluate import evaluate_round, fit_personal, win_rate
from fedpersona.round.resident import resident_for
from fedpersona.round.stores import MemoryStore
from fedpersona.round.train import train_round
from fedpersona.round.users import population_user, round_seed
from fedpersona.config import RunConfig
from fedpersona.model.adapters import Role
from fedpersona.strategies import pal
from fedpersona.strategies.proximal import proximal_term
from fedpersona.strategies.registry import TRAIN_LOSS_KEY
from fedpersona.strategies.schemes import SCHEMES, get_scheme

FAST = dict(num_users=3, rounds=2, epochs=1, min_steps=3, max_steps=3, gen_prompts=2, gen_max_tokens=24,
            new_user_steps=6)


def shared_of(config):
    return {k: v.clone() for k, v in resident_for(config).adapters.initial.items()
            if resident_for(config).adapters.roles[k] is Role.SHARED}


EXPECTED_ROLES = {"split": (True, True), "global": (True, False), "local": (False, True), "fedsa": (True, True),
                  "ffa": (True, False), "finetune": (True, False), "pal": (True, True)}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_scheme_has_its_documented_split(name):
    scheme = get_scheme(name)
    assert (scheme.has_shared, scheme.has_private) == EXPECTED_ROLES[name]
    resident = resident_for(RunConfig(scheme=name))
    shared, private = resident.adapters.count(Role.SHARED), resident.adapters.count(Role.PRIVATE)
    assert (shared > 0, private > 0) == EXPECTED_ROLES[name]
    assert any(ch.isdigit() for ch in scheme.description), "cite the source (arXiv id) in the description"


def test_counts_follow_the_layouts():
    count = {n: (resident_for(RunConfig(scheme=n)).adapters.count(Role.SHARED),
                 resident_for(RunConfig(scheme=n)).adapters.count(Role.PRIVATE)) for n in SCHEMES}
    full = count["global"][0]
    assert count["fedsa"][0] + count["fedsa"][1] == full  # A shared + B private = one rank-8 adapter
    assert count["finetune"] == (full, 0)
    assert count["pal"] == (2 * full, 2)  # two rank-8 prototypes shared, two mixture logits private
    assert resident_for(RunConfig(scheme="pal", pal_prototypes=3)).adapters.count(Role.PRIVATE) == 3


def test_pal_mixture_is_private_trained_and_scales_the_prototypes():
    config = RunConfig(scheme="pal", **FAST)
    resident = resident_for(config)
    state = resident.adapters
    (mixture_name,) = state.names(Role.PRIVATE)
    assert mixture_name.endswith(pal.MIXTURE_TENSOR) and state.params[mixture_name].requires_grad
    user = population_user(config, 0)
    store = MemoryStore()
    shared = {k: v + 0.05 * torch.randn_like(v) for k, v in shared_of(config).items()}  # prototypes that differ
    train_round(config, user, 0, 1, shared, store)
    logits = store.private[mixture_name]
    assert logits.abs().sum() > 0, "the mixture weights did not train"
    weights = pal.mixture_weights(store.private)
    assert abs(sum(weights) - 1) < 1e-6

    # the mixture really scales each prototype: a one-hot mixture changes the model's output
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        state.load(shared, Role.SHARED)
        state.reset(Role.PRIVATE)
        uniform = resident.model(input_ids=ids).logits
        state.params[mixture_name].copy_(torch.tensor([2.0, -2.0]))
        skewed = resident.model(input_ids=ids).logits
        with state.private_strength(0.0):  # the global model is the uniform mixture
            assert torch.allclose(resident.model(input_ids=ids).logits, uniform)
    assert not torch.allclose(uniform, skewed)
    state.reset(Role.PRIVATE)


def test_fedprox_term_keeps_shared_tensors_near_the_global_ones():
    config = RunConfig(**{**FAST, "max_steps": 8, "min_steps": 8})
    resident = resident_for(config)
    user = population_user(config, 1)
    start = shared_of(config)

    def drift(mu: float) -> float:
        resident.adapters.load(start, Role.SHARED)
        resident.adapters.reset(Role.PRIVATE)
        names = resident.adapters.names(Role.SHARED)
        with proximal_term([resident.adapters.params[n] for n in names], mu):
            train_local(resident, user.train, dataclasses.replace(config.train_settings, shared_lr=1e-2), seed=3)
        return sum(float((resident.adapters.params[n].detach() - start[n]).pow(2).sum()) for n in names)

    free, near = drift(0.0), drift(50.0)
    assert near < 0.7 * free, (free, near)
    resident.adapters.load(start, Role.SHARED)


def test_training_loss_is_sent_only_when_the_strategy_asks():
    config = RunConfig(**FAST)
    user = population_user(config, 0)
    plain = train_round(config, user, 0, 1, shared_of(config), MemoryStore())
    assert plain.metrics == {}
    asked = train_round(config, user, 0, 1, shared_of(config), MemoryStore(), {TRAIN_LOSS_KEY: "train_loss"})
    assert set(asked.metrics) == {"train_loss"} and 0.0 < asked.metrics["train_loss"] < 5.0
    with pytest.raises(ValueError, match="DP-SGD does not protect"):
        train_round(config.replace(dp_epsilon=8.0), user, 0, 1, shared_of(config), MemoryStore(),
                    {TRAIN_LOSS_KEY: "train_loss"})


@pytest.mark.parametrize("scheme", ["split", "pal", "local"])
def test_new_user_declines_training_then_fits_only_its_private_part(scheme):
    config = RunConfig(scheme=scheme, new_users=1, **FAST)
    new = config.num_users  # the first new user
    user = population_user(config, new)
    store = MemoryStore()
    result = train_round(config, user, new, 1, shared_of(config), store)
    assert result.declined and result.shared == {} and store.private is None

    resident = resident_for(config)
    shared = shared_of(config)
    before_final = evaluate_round(config, user, shared, store, index=new, extras={"server-round": 1})
    assert before_final.metrics == {}  # not the final round: nothing fitted, no extras
    assert before_final.accuracies["personalized"] == before_final.accuracies["global"]
    final = evaluate_round(config, user, shared, store, index=new, extras={"server-round": config.rounds})
    assert final.metrics["private-params"] == resident.adapters.count(Role.PRIVATE)
    assert 0.0 <= final.metrics["gen-win-rate"] <= 1.0
    assert store.private is None  # what a new user fitted is not stored
    after = resident.adapters.tensors(Role.SHARED)
    assert all(torch.equal(after[k], shared[k]) for k in shared), "the shared part moved during the private fit"


def test_fit_personal_trains_the_right_part():
    config = RunConfig(**FAST)
    pairs = population_user(config, 0).train[:8]
    for scheme_name, moves in (("split", Role.PRIVATE), ("finetune", Role.SHARED)):
        cfg = config.replace(scheme=scheme_name)
        resident = resident_for(cfg)
        resident.adapters.load(shared_of(cfg), Role.SHARED)
        resident.adapters.reset(Role.PRIVATE)
        before = {r: resident.adapters.tensors(r) for r in (Role.SHARED, Role.PRIVATE)}
        fit_personal(resident, get_scheme(scheme_name), pairs, cfg.train_settings, seed=1)
        for role in (Role.SHARED, Role.PRIVATE):
            now = resident.adapters.tensors(role)
            changed = any(not torch.equal(now[k], before[role][k]) for k in now)
            assert changed == (role is moves and bool(now)), (scheme_name, role)
        resident.adapters.load(before[Role.SHARED], Role.SHARED)


def test_finetune_personalizes_at_the_final_evaluation_only_and_restores_the_global_adapter():
    config = RunConfig(scheme="finetune", **{**FAST, "max_steps": 0, "min_steps": 16})
    resident = resident_for(config)
    user = population_user(config, 2)
    shared = shared_of(config)
    shared = {k: v + 0.02 * torch.randn_like(v) for k, v in shared.items()}
    mid = evaluate_round(config, user, shared, MemoryStore(), index=2, extras={"server-round": 1})
    assert mid.accuracies["personalized"] == mid.accuracies["global"] and mid.metrics == {}
    final = evaluate_round(config, user, shared, MemoryStore(), index=2, extras={"server-round": 2})
    assert final.metrics["private-params"] == resident.adapters.count(Role.SHARED)  # the private copy
    assert final.accuracies["global"] == mid.accuracies["global"]
    after = resident.adapters.tensors(Role.SHARED)
    assert all(torch.equal(after[k], shared[k]) for k in shared)


def test_global_scheme_has_no_personal_part():
    config = RunConfig(scheme="global", new_users=1, **FAST)
    user = population_user(config, 3)
    final = evaluate_round(config, user, shared_of(config), MemoryStore(), index=3, extras={"server-round": 2})
    assert final.accuracies["personalized"] == final.accuracies["global"]
    assert final.metrics == {"private-params": 0, "gen-win-rate": 0.5}  # identical generations: all ties


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 2.0, 1.0]) == pytest.approx(0.5)
    assert win_rate([3.0, 3.0], [1.0, 2.0]) == 1.0


def test_pal_sends_each_prototype_update_scaled_by_the_users_gain():
    config = RunConfig(scheme="pal", **FAST)
    state = resident_for(config).adapters
    received = shared_of(config)
    trained = {k: v + 1.0 for k, v in received.items()}
    (mixture,) = state.names(Role.PRIVATE)
    with torch.no_grad():
        state.params[mixture].copy_(torch.tensor([1.0, -1.0]))  # effective logits +-10: gains ~(2, 0)
    sent = pal.weight_update(state, received, trained)
    assert set(sent) == set(received)
    for name, value in sent.items():
        moved = float((value - received[name]).mean())
        assert moved == pytest.approx(2.0 if ".proto0." in name else 0.0, abs=1e-4), name
    state.reset(Role.PRIVATE)
    uniform = pal.weight_update(state, received, trained)  # uniform mixture: plain updates
    assert all(torch.allclose(uniform[k], trained[k]) for k in trained)


def test_ffa_trains_under_dp_with_its_a_matrices_frozen():
    """PEFT's disable_adapter() re-marks every adapter tensor trainable; the frozen A must stay frozen."""
    config = RunConfig(scheme="ffa", dp_epsilon=8.0, dp_reproducible=True, **FAST)
    resident = resident_for(config)
    user = population_user(config, 1)
    frozen = [n for n, r in resident.adapters.roles.items() if r is Role.FROZEN]
    before = {n: resident.adapters.params[n].detach().clone() for n in frozen}
    result = train_round(config, user, 1, 1, shared_of(config), MemoryStore())
    assert not result.declined and result.shared
    assert all(not resident.adapters.params[n].requires_grad for n in frozen)
    assert all(torch.equal(resident.adapters.params[n].detach(), before[n]) for n in frozen)


def test_pal_trains_under_dp_and_its_mixture_moves():
    config = RunConfig(scheme="pal", dp_epsilon=8.0, dp_reproducible=True, **FAST)
    resident = resident_for(config)
    user = population_user(config, 0)
    store = MemoryStore()
    received = shared_of(config)
    result = train_round(config, user, 0, 1, received, store)
    assert not result.declined and result.epsilon is not None and 0 < result.epsilon <= 8.0
    (mixture,) = resident.adapters.names(Role.PRIVATE)
    pal.init_mixture(resident.adapters, round_seed(config, 0, 0), config)  # where user 0's logits started
    start = resident.adapters.tensors(Role.PRIVATE)[mixture]
    resident.adapters.reset(Role.PRIVATE)
    assert set(store.private) == {mixture} and not torch.allclose(store.private[mixture], start)
    assert any(not torch.equal(result.shared[k], received[k]) for k in received)


def test_new_user_fit_under_dp_spends_its_own_ledger():
    from fedpersona.privacy.ledger import PrivacyLedger

    config = RunConfig(scheme="pal", new_users=1, dp_epsilon=8.0, dp_reproducible=True, **FAST)
    new = config.num_users
    store = MemoryStore()
    evaluate_round(config, population_user(config, new), shared_of(config), store, index=new,
                   extras={"server-round": config.rounds})
    ledger = PrivacyLedger.from_json(store.ledger)
    assert ledger.steps_taken == config.new_user_steps and 0 < ledger.spent_epsilon() <= 8.0
    assert store.private is None  # the fit itself is still not stored


def test_finetune_refuses_dp():
    from fedpersona.errors import UsageError

    with pytest.raises(UsageError, match="scheme"):
        RunConfig().replace(scheme="finetune", dp_epsilon=8.0)
