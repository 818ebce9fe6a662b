"""Pair-level DP-SGD on the resident embedded model, checked against plain per-pair oracles."""

from __future__ import annotations

import math

import pytest
import torch

from fedpersona.alignment.trainer import TrainSettings, encode_pairs, pair_losses, reference_logps
from fedpersona.round.resident import resident_for
from fedpersona.config import RunConfig
from fedpersona.data.synthetic import PreferenceSimulator
from fedpersona.model.adapters import Role
from fedpersona.privacy.accountant import epsilon
from fedpersona.privacy.dp_training import DPSettings, per_pair_gradients, plan_ledger, train_local_dp
from fedpersona.privacy.ledger import PrivacyLedger

CLIP_ONLY = math.inf


@pytest.fixture(scope="module", params=["split", "pal"])
def resident(request):
    """split: LoRA private head; pal: private mixture logits with their own per-pair gradient rule."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and 2 cores may be shared
    r = resident_for(RunConfig(scheme=request.param))
    yield r
    r.adapters.reset(Role.SHARED)
    r.adapters.reset(Role.PRIVATE)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs():
    return PreferenceSimulator("conflicting", 4, 0).user_data(0).train[:12]


@pytest.fixture
def model(resident):
    """The resident model with every adapter tensor moved off its initial value (B != 0, so A gets
    gradients too); reset afterwards."""
    perturb(resident)
    yield resident
    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)


def perturb(resident, seed: int = 7) -> None:
    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in resident.adapters.params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def trainable(resident) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in resident.adapters.params.items() if p.requires_grad}


def snapshot(resident) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in resident.adapters.params.items()}


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding: relative 1e-4, and absolute 1e-4 of the tensor's largest entry."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-12)


def oracle_per_pair(resident, pairs, settings) -> dict[str, torch.Tensor]:
    """Per-pair gradients by a plain loop: one pair at a time, chosen and rejected in one padded forward
    (no hooks, no Opacus), ``torch.autograd.grad`` of that pair's loss."""
    encoded = encode_pairs(resident.prompt_format, pairs, settings.max_length)
    ref = reference_logps(resident, encoded)
    params = trainable(resident)
    resident.model.train()
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(len(encoded)):
        loss = pair_losses(resident, [encoded[i]], ref[i : i + 1], settings).sum()
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            rows[name].append(g)
    resident.model.eval()
    return {n: torch.stack(r) for n, r in rows.items()}


def clipped_sum(per_pair: dict[str, torch.Tensor], rows: list[int], clip: float) -> dict[str, torch.Tensor]:
    """Sum over ``rows`` of per-pair gradients clipped jointly over ALL tensors (one flat norm per pair)."""
    norms = torch.stack([g[rows].reshape(len(rows), -1).norm(dim=1) for g in per_pair.values()], 1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("i,i...->...", factor, g[rows]) for n, g in per_pair.items()}


def test_per_pair_gradients_match_a_per_pair_loop(model, pairs):
    settings = TrainSettings()
    chunk = pairs[:6]
    encoded = encode_pairs(model.prompt_format, chunk, settings.max_length)
    # chosen and rejected of different lengths, so both calls' padding and summing are exercised
    assert any(len(e.chosen[0]) != len(e.rejected[0]) for e in encoded)
    assert max(len(e.chosen[0]) for e in encoded) != max(len(e.rejected[0]) for e in encoded)

    got = per_pair_gradients(model, chunk, settings)
    want = oracle_per_pair(model, chunk, settings)
    assert set(got) == set(want) == set(trainable(model))
    roles = {model.adapters.roles[n] for n in got}
    assert roles == {Role.SHARED, Role.PRIVATE}
    for name in want:
        assert got[name].shape == (len(chunk), *model.adapters.params[name].shape)  # one row per PAIR
        close(got[name], want[name])
    norms = torch.stack([g.reshape(len(chunk), -1).norm(dim=1) for g in want.values()], 1).norm(dim=1)
    assert (norms > 0).all() and norms.max() > 1.05 * norms.min()  # distinct, non-trivial rows
    # hooks are gone afterwards: a plain backward leaves no per-sample gradients
    assert not hasattr(model.model, "autograd_grad_sample_hooks")
    assert all(getattr(p, "grad_sample", None) is None for p in model.adapters.params.values())


def test_noise_free_update_is_the_sum_of_jointly_clipped_per_pair_gradients(model, pairs):
    settings = TrainSettings(batch_size=6, max_steps=1)
    per_pair = oracle_per_pair(model, pairs, settings)
    norms = torch.stack([g.reshape(len(pairs), -1).norm(dim=1) for g in per_pair.values()], 1).norm(dim=1)
    clip = float(norms.median())  # some pairs are clipped, some are not
    dp = DPSettings(target_epsilon=CLIP_ONLY, max_grad_norm=clip, reproducible=True)
    ledger = plan_ledger(len(pairs), settings, dp, planned_rounds=1)
    assert ledger.noise_multiplier == 0.0
    before = snapshot(model)
    seen = []
    stats = train_local_dp(model, pairs, settings, 3, dp, ledger, on_step=lambda *a: seen.append(a))
    assert stats.steps == 1 and len(seen) == 1
    _, batch, grads = seen[0]
    assert len(batch) >= 2 and any(norms[i] > clip for i in batch) and any(norms[i] < clip for i in batch)
    want = clipped_sum(per_pair, batch, clip)
    assert set(grads) == set(want)  # shared and private, one joint clip
    expected_batch = settings.batch_size
    for name in want:
        close(grads[name] * expected_batch, want[name])
    # a clipped per-side (or per-tensor-group) scheme would give a different total norm
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in want.values()))
    assert total <= clip * len(batch) + 1e-5
    # the adapters moved because of the gradient alone (no noise): Opacus #820 would leave them still
    moved = {model.adapters.roles[n] for n, p in model.adapters.params.items() if not torch.equal(p, before[n])}
    assert moved == {Role.SHARED, Role.PRIVATE}


def test_group_clipping_gives_private_and_shared_tensors_their_share_of_the_clip(model, pairs):
    """private_clip_share f: private tensors clipped to C sqrt(f), shared to C sqrt(1-f), so a pair's whole
    clipped gradient still has norm <= C (the sensitivity the noise and the accountant assume)."""
    settings = TrainSettings(batch_size=6, max_steps=1)
    per_pair = oracle_per_pair(model, pairs, settings)
    roles = model.adapters.roles
    groups = {role: {n: g for n, g in per_pair.items() if roles[n] is role} for role in (Role.PRIVATE, Role.SHARED)}
    clip = float(torch.stack([g.reshape(len(pairs), -1).norm(dim=1) for g in per_pair.values()], 1).norm(dim=1).median())
    dp = DPSettings(target_epsilon=CLIP_ONLY, max_grad_norm=clip, private_clip_share=0.25, reproducible=True)
    seen = []
    train_local_dp(model, pairs, settings, 3, dp, plan_ledger(len(pairs), settings, dp, planned_rounds=1),
                   on_step=lambda *a: seen.append(a))
    _, batch, grads = seen[0]
    want = {**clipped_sum(groups[Role.PRIVATE], batch, clip * 0.5),
            **clipped_sum(groups[Role.SHARED], batch, clip * math.sqrt(0.75))}
    assert set(grads) == set(want)
    for name in want:
        close(grads[name] * settings.batch_size, want[name])
    joint = clipped_sum(per_pair, batch, clip)  # what one joint clip gives: different on the private part
    private = next(n for n in want if roles[n] is Role.PRIVATE)
    assert not torch.allclose(want[private], joint[private], rtol=1e-3)


def test_adapters_move_under_dp_and_ledger_counts_steps(model, pairs):
    settings = TrainSettings(batch_size=4, max_steps=3)
    dp = DPSettings(target_epsilon=8.0, max_grad_norm=1.0, max_physical_batch=3)
    ledger = plan_ledger(len(pairs), settings, dp, planned_rounds=4)
    before = snapshot(model)
    stats = train_local_dp(model, pairs, settings, 0, dp, ledger)
    assert not stats.declined and stats.steps == 3
    for name, p in trainable(model).items():
        assert not torch.equal(p, before[name]), f"{name} did not move under DP-SGD"
    assert {model.adapters.roles[n] for n in trainable(model)} == {Role.SHARED, Role.PRIVATE}
    assert 0 < stats.epsilon == ledger.spent_epsilon() < dp.target_epsilon
    assert not model.model.training


def test_accountant_steps_equal_logical_batches_including_empty_ones(model, pairs):
    settings = TrainSettings(batch_size=1, max_steps=10)  # q = 1/12: many Poisson batches are empty
    dp = DPSettings(target_epsilon=20.0, max_grad_norm=0.5, max_physical_batch=1, reproducible=True)
    ledger = plan_ledger(len(pairs), settings, dp, planned_rounds=3)
    q = 1 / len(pairs)
    batches = []
    for round_ in range(2):
        stored = ledger.dumps()  # the client's state between rounds
        ledger = PrivacyLedger.from_json(stored)
        stats = train_local_dp(model, pairs, settings, 11 + round_, dp, ledger,
                               on_step=lambda step, batch, grads: batches.append(list(batch)))
        assert stats.steps == 10
    assert len(batches) == 20 == ledger.steps_taken
    assert ledger.history == [(ledger.noise_multiplier, q, 20)]
    assert ledger.spent_epsilon() == epsilon(ledger.noise_multiplier, q, 20, ledger.delta)
    assert stats.empty_batches == sum(1 for b in batches[10:] if not b) > 0
    assert stats.physical_batches == sum(len(b) for b in batches[10:])  # cap 1: one chunk per pair
    assert stats.pairs_seen == sum(len(b) for b in batches[10:])


def test_client_past_its_budget_does_not_train(model, pairs):
    settings = TrainSettings(batch_size=4, max_steps=5)
    dp = DPSettings(target_epsilon=3.0)
    ledger = plan_ledger(len(pairs), settings, dp, planned_rounds=1)
    ledger.record(settings.steps_for(len(pairs)), 4 / len(pairs))  # the one planned round is spent
    history = list(ledger.history)
    before = snapshot(model)
    stats = train_local_dp(model, pairs, settings, 0, dp, ledger)
    assert stats.declined and stats.steps == 0 and stats.pairs_seen == 0
    assert ledger.history == history and stats.epsilon == ledger.spent_epsilon() <= 3.0
    for name, p in model.adapters.params.items():
        assert torch.equal(p, before[name])


@pytest.mark.parametrize("limit", ["pairs", "tokens"])
def test_physical_batch_cap_gives_the_same_clipped_sum(resident, pairs, limit):
    """Physical batches cut by max_physical_batch or by the token budget (max-tokens-per-batch): the same
    noise-free step as one big batch, the same accountant steps."""
    settings = TrainSettings(batch_size=8, max_steps=3)
    runs = []
    budget = resident.max_tokens_per_batch
    widest = max(max(len(e.chosen[0]), len(e.rejected[0])) for e in encode_pairs(resident.prompt_format, pairs, 96))
    for small in (True, False):
        perturb(resident)
        cap = 2 if small and limit == "pairs" else 100
        resident.max_tokens_per_batch = 2 * widest if small and limit == "tokens" else 100_000
        dp = DPSettings(target_epsilon=CLIP_ONLY, max_grad_norm=0.05, max_physical_batch=cap, reproducible=True)
        steps: list = []
        try:
            stats = train_local_dp(resident, pairs, settings, 5, dp, plan_ledger(len(pairs), settings, dp, 1),
                                   on_step=lambda step, batch, grads, steps=steps: steps.append((list(batch), grads)))
        finally:
            resident.max_tokens_per_batch = budget
        runs.append((stats, steps, snapshot(resident)))
    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)
    (capped, capped_steps, capped_end), (whole, whole_steps, whole_end) = runs
    assert capped.physical_batches > whole.physical_batches == 3  # the cap really split batches
    for (b1, g1), (b2, g2) in zip(capped_steps, whole_steps, strict=True):
        assert b1 == b2 and len(b1) > 2
        for name in g2:
            close(g1[name], g2[name])
    for name in whole_end:
        close(capped_end[name], whole_end[name])


def test_released_pair_count_is_noised_once_and_reproducible_only_when_asked():
    settings = TrainSettings(batch_size=8, min_steps=4)
    n, noise = 40, 5.0
    secure = DPSettings(target_epsilon=8.0, count_noise=noise)
    draws = [plan_ledger(n, settings, secure, planned_rounds=2, seed=7).released_count for _ in range(60)]
    mean = sum(draws) / len(draws)
    std = math.sqrt(sum((d - mean) ** 2 for d in draws) / (len(draws) - 1))
    assert abs(mean - n) < 4 * noise / math.sqrt(len(draws))  # unbiased around the true count
    assert 0.6 * noise < std < 1.4 * noise  # with the noise asked for (same seed, fresh OS draws)
    seeded = DPSettings(target_epsilon=8.0, count_noise=noise, reproducible=True)
    assert (plan_ledger(n, settings, seeded, 2, seed=7).released_count
            == plan_ledger(n, settings, seeded, 2, seed=7).released_count
            != plan_ledger(n, settings, seeded, 2, seed=8).released_count)
    # nothing released when the caller sends nothing, when asked for 0, or without a guarantee (clip only)
    assert plan_ledger(n, settings, secure, 1, release_count=False).released_count is None
    assert plan_ledger(n, settings, DPSettings(target_epsilon=8.0), 1).released_count is None
    assert plan_ledger(n, settings, DPSettings(target_epsilon=CLIP_ONLY, count_noise=noise), 1).released_count is None


def test_count_noise_setting_is_auto_by_epsilon_explicit_or_off():
    from fedpersona.errors import UsageError

    assert RunConfig(dp_epsilon=8.0).dp_settings.count_noise == 5.0  # auto: 40 / epsilon
    assert RunConfig(dp_epsilon=1.0).dp_settings.count_noise == 40.0  # a fixed 5 would eat a small budget
    assert RunConfig(dp_epsilon=1.0, dp_count_noise=3.0).dp_settings.count_noise == 3.0
    assert RunConfig(dp_epsilon=8.0, dp_count_noise=0.0).dp_settings.count_noise == 0.0
    # user-level DP needs constant weights: no count is released (and no budget spent on one)
    both = RunConfig(dp_epsilon=8.0, user_dp_noise=1.0)
    assert both.dp_settings.count_noise == 0.0 and both.count_noise == 0.0  # as summary.json reports it
    with pytest.raises(UsageError, match="dp-count-noise"):
        RunConfig(dp_epsilon=8.0, dp_count_noise=-2.0).validate()
