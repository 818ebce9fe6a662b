"""``train_stacked``: a cohort's users in one forward/backward per step end where ``train_local`` takes each of
them one after another, for every scheme it accepts; what it refuses, it refuses with a reason."""

import pytest
import torch

from fedpersona.alignment.stacked import StackedJob, batch_schedule, stacking_supported, train_stacked
from fedpersona.alignment.trainer import TrainSettings, train_local
from fedpersona.round.resident import resident_for
from fedpersona.round.users import population_user
from fedpersona.config import RunConfig
from fedpersona.model.adapters import Role

SETTINGS = TrainSettings(epochs=2, batch_size=4, min_steps=1)  # 3 pairs: 2 steps, 8 pairs: 4 steps


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Float tolerance (the joint batch sums in another order; see tests/client/test_cohort_rounds.py)."""
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-2)
    assert float((a - b).abs().mean()) < 1e-5


@pytest.fixture
def resident_of():
    """``resident_of(scheme)``: the process's resident model for that scheme, its adapters reset afterwards."""
    used = []

    def get(scheme: str):
        resident = resident_for(RunConfig(scheme=scheme))
        used.append(resident)
        return resident

    yield get
    for resident in used:
        resident.adapters.reset(Role.SHARED)
        resident.adapters.reset(Role.PRIVATE)


def _jobs(resident, pair_counts: list[int]) -> list[StackedJob]:
    """One job per count: that many of a population user's pairs, a seed, the server's shared tensors and a
    private start of its own (perturbed, so a user's slice mixing with another's would show)."""
    config = RunConfig(num_users=len(pair_counts), max_train_pairs=16)
    shared = resident.adapters.tensors(Role.SHARED)
    generator = torch.Generator().manual_seed(7)
    jobs = []
    for u, count in enumerate(pair_counts):
        private = {n: t + 0.01 * torch.randn(t.shape, generator=generator)
                   for n, t in resident.adapters.tensors(Role.PRIVATE).items()}
        pairs = population_user(config, u).train[:count]
        assert len(pairs) == count, "the population user has fewer pairs than the test asks for"
        jobs.append(StackedJob(pairs=pairs, seed=1000 + u, shared=shared, private=private))
    return jobs


def _one_after_another(resident, jobs, settings):
    out = []
    for job in jobs:
        if not job.pairs:  # train_local is never called without pairs: the user keeps its start
            out.append((dict(job.shared), dict(job.private), None))
            continue
        resident.adapters.load(job.shared, Role.SHARED)
        resident.adapters.load(job.private, Role.PRIVATE)
        stats = train_local(resident, job.pairs, settings, job.seed)
        out.append((resident.adapters.tensors(Role.SHARED), resident.adapters.tensors(Role.PRIVATE), stats))
    return out


@pytest.mark.parametrize("scheme", ["split", "fedsa", "ffa", "local", "global"])
def test_cohort_equals_users_one_after_another(resident_of, scheme):
    """Users of unequal sizes (so unequal step counts: some finish while others go on) and one without pairs."""
    resident = resident_of(scheme)
    assert stacking_supported(resident, SETTINGS) is None
    jobs = _jobs(resident, [3, 8, 0, 5])
    batched = train_stacked(resident, jobs, SETTINGS)
    sequential = _one_after_another(resident, jobs, SETTINGS)
    assert len(batched) == len(jobs)
    for job, got, (shared, private, stats) in zip(jobs, batched, sequential, strict=True):
        if stats is None:
            assert (got.stats.steps, got.stats.pairs_seen) == (0, 0)
        else:
            assert (got.stats.steps, got.stats.pairs_seen) == (stats.steps, stats.pairs_seen)
            assert got.stats.mean_loss == pytest.approx(stats.mean_loss, rel=1e-4, abs=1e-6)
        assert got.shared.keys() == shared.keys() and got.private.keys() == private.keys()
        for name in shared:
            _close(got.shared[name], shared[name])
        for name in private:
            _close(got.private[name], private[name])
        if not job.pairs:  # no steps: the user's tensors are its starting ones, exactly
            for name in private:
                assert torch.equal(got.private[name], job.private[name])
    assert [r.stats.steps for r in batched] == [2, 4, 0, 4]
    moved = [name for name in batched[1].shared if not torch.equal(batched[1].shared[name], jobs[1].shared[name])]
    assert moved or scheme == "local", "nothing shared was trained"


def test_fedprox_term_matches(resident_of):
    resident = resident_of("split")
    jobs = _jobs(resident, [5, 8])
    plain = train_stacked(resident, jobs, SETTINGS)
    prox = train_stacked(resident, jobs, SETTINGS, proximal_mu=5.0)
    # mu pulls the shared tensors back toward the start: a smaller step than without it
    for p, q, job in zip(plain, prox, jobs, strict=True):
        drift_plain = sum(float((p.shared[n] - job.shared[n]).norm()) for n in job.shared)
        drift_prox = sum(float((q.shared[n] - job.shared[n]).norm()) for n in job.shared)
        assert drift_prox < drift_plain


def test_resident_is_left_as_found(resident_of):
    resident = resident_of("split")
    before = {n: p.detach().clone() for n, p in resident.adapters.params.items()}
    trainable = {n: p.requires_grad for n, p in resident.adapters.params.items()}
    train_stacked(resident, _jobs(resident, [4, 4]), SETTINGS)
    for n, p in resident.adapters.params.items():
        assert torch.equal(p.detach(), before[n]) and p.requires_grad == trainable[n]
    assert not any("forward" in vars(m) for m in resident.model.modules()), "a per-row forward was left patched"
    assert not resident.model.training


def test_a_failing_job_leaves_the_resident_as_found(resident_of):
    resident = resident_of("split")
    before = {n: p.detach().clone() for n, p in resident.adapters.params.items()}
    good = _jobs(resident, [4])[0]
    bad = StackedJob(pairs=good.pairs, seed=1, shared={"no.such.tensor": torch.zeros(2)}, private=good.private)
    with pytest.raises((KeyError, ValueError)):
        train_stacked(resident, [good, bad], SETTINGS)
    for n, p in resident.adapters.params.items():
        assert torch.equal(p.detach(), before[n])
    assert not any("forward" in vars(m) for m in resident.model.modules())


def test_batch_schedule_is_train_locals_order():
    settings = TrainSettings(epochs=2, batch_size=3)
    schedule = batch_schedule(7, settings, seed=11)
    assert len(schedule) == settings.steps_for(7) == 6
    generator = torch.Generator().manual_seed(11)
    first, second = torch.randperm(7, generator=generator).tolist(), torch.randperm(7, generator=generator).tolist()
    assert schedule == [first[0:3], first[3:6], first[6:7], second[0:3], second[3:6], second[6:7]]
    assert batch_schedule(0, settings, seed=11) == []


def test_what_is_not_batched_says_why(resident_of):
    resident = resident_of("split")
    assert "DP-SGD" in stacking_supported(resident, SETTINGS, dp=True)
    pal = resident_of("pal")
    reason = stacking_supported(pal, SETTINGS)
    assert reason is not None and ("hooks" in reason or "mixture" in reason)
    with pytest.raises(ValueError, match="not supported"):
        train_stacked(pal, _jobs(pal, [2, 2]), SETTINGS)


def test_reference_values_do_not_depend_on_the_cohort(resident_of):
    """A user's reference log-probs are those it gets alone, to the bit, whoever shares its cohort: they are
    cached per worker and a seeded simulation must repeat whichever worker took the cohort."""
    from fedpersona.alignment.batching import encode_pairs
    from fedpersona.alignment.stacked import _stacked_references
    from fedpersona.alignment.trainer import reference_logps
    from fedpersona.model.resident import RefLogpCache

    resident = resident_of("split")
    jobs = _jobs(resident, [8, 5, 3])
    encoded = [encode_pairs(resident.prompt_format, job.pairs, SETTINGS.max_length) for job in jobs]
    saved = resident.ref_cache
    try:
        alone = []
        for user in encoded:
            resident.ref_cache = RefLogpCache()
            alone.append(reference_logps(resident, user))
        resident.ref_cache = RefLogpCache()
        together = _stacked_references(resident, encoded[::-1])[::-1]
    finally:
        resident.ref_cache = saved
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a, b)


def test_a_cohort_of_one_equals_train_local(resident_of):
    resident = resident_of("split")
    job = _jobs(resident, [6])[0]
    (got,) = train_stacked(resident, [job], SETTINGS)
    ((shared, private, _),) = _one_after_another(resident, [job], SETTINGS)
    for name in shared:
        _close(got.shared[name], shared[name])
    for name in private:
        _close(got.private[name], private[name])


def test_joined_adapters_are_the_sum_of_each_adapters_update():
    """``_joined``: one rank-(r1+r2) LoRA equals sum_k scaling_k B_k A_k, per user, also when one adapter's
    tensor is single (FROZEN) among stacked ones."""
    from fedpersona.alignment.stacked import _joined, _Site

    g = torch.Generator().manual_seed(0)
    users, r1, r2, d_in, d_out = 3, 4, 2, 6, 5
    weights = {"a1": torch.randn(users, r1, d_in, generator=g), "b1": torch.randn(users, d_out, r1, generator=g),
               "a2": torch.randn(r2, d_in, generator=g), "b2": torch.randn(users, d_out, r2, generator=g)}
    site = _Site(torch.nn.Identity(), (("a1", "b1", 0.5), ("a2", "b2", 2.0)))
    a, b = _joined(site, weights)
    assert a.shape == (users, r1 + r2, d_in) and b.shape == (users, d_out, r1 + r2)
    for u in range(users):
        expected = 0.5 * weights["b1"][u] @ weights["a1"][u] + 2.0 * weights["b2"][u] @ weights["a2"]
        torch.testing.assert_close(b[u] @ a[u], expected)
