"""A cohort's round: trained in one forward/backward (cohort batching) or one user after another, the users
end with the same tensors, store the same private state and send the same replies."""

import pytest
import torch

from fedpersona.round.stores import MemoryStore

from fedpersona.round.train import batching_refusal, train_cohort_rounds

from fedpersona.round.users import population_user
from fedpersona.config import RunConfig
from fedpersona.model.adapters import Role


def _close(a, b):
    """Equal to float tolerance: the joint batch sums in another order and Adam's normalisation amplifies
    the last bits of a near-zero gradient now and then, so one element in a few hundred may differ by ~1e-4;
    wrong batches or a missed step differ everywhere (mean difference ~1e-3 and above)."""
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-2)
    assert float((a - b).abs().mean()) < 1e-5


def _round(config, resident, users, extras=None):
    shared = resident.adapters.tensors(Role.SHARED)
    stores = {u: MemoryStore() for u in users}
    work = [(u, population_user(config, u), stores[u]) for u in users]
    return train_cohort_rounds(config, work, 1, shared, extras), stores


@pytest.mark.parametrize("extras", [None, {"proximal-mu": 0.5}], ids=["plain", "fedprox"])
def test_batched_cohort_equals_users_one_after_another(split_resident, extras):
    config = RunConfig(num_users=4, new_users=1, min_steps=3, epochs=1, max_train_pairs=12)
    users = [0, 2, 3, 4]  # user 4 is a new (held-out) user: it declines either way
    assert batching_refusal(config, extras) is None
    batched, batched_stores = _round(config, split_resident, users, extras)
    sequential, sequential_stores = _round(config.replace(cohort_batching=False), split_resident, users, extras)
    assert batching_refusal(config.replace(cohort_batching=False), extras) is not None
    start = split_resident.adapters.initial
    for u, b, s in zip(users, batched, sequential, strict=True):
        assert not isinstance(b, Exception) and not isinstance(s, Exception), (b, s)
        assert b.declined == s.declined == (u == 4)
        if b.declined:
            continue
        assert b.num_examples == s.num_examples and b.stats.steps == s.stats.steps
        for name in s.shared:
            _close(b.shared[name], s.shared[name])
            assert not torch.equal(s.shared[name], start[name]) or "lora_A" in name  # B moved: real training
        bp, sp = batched_stores[u].load_private(), sequential_stores[u].load_private()
        for name in sp:
            _close(bp[name], sp[name])
        assert batched_stores[u].rounds_trained() == sequential_stores[u].rounds_trained() == 1


def test_dp_rounds_are_never_batched():
    assert "DP" in batching_refusal(RunConfig(dp_epsilon=8.0, scheme="split"))
