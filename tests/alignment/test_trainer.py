"""Local DPO training: adapters move, the base does not, runs are deterministic, references are cached."""

import math

import torch

from fedpersona.alignment.losses import dpo_loss, ipo_loss, simpo_loss
from fedpersona.alignment.trainer import TrainSettings, train_local
from fedpersona.data.synthetic import PreferenceSimulator
from fedpersona.model.adapters import Role

SETTINGS = TrainSettings(epochs=1, min_steps=4, batch_size=4, lr=3e-3, shared_lr=1e-3)


def _pairs(n=8):
    return PreferenceSimulator("conflicting", 2, 0).user_data(0).train[:n]


def test_training_moves_shared_and_private_but_not_the_base(split_resident):
    state = split_resident.adapters
    before = {n: p.detach().clone() for n, p in split_resident.model.named_parameters()}
    stats = train_local(split_resident, _pairs(), SETTINGS, seed=1)
    assert stats.steps == 4 and stats.pairs_seen == 16
    after = dict(split_resident.model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved, "nothing trained"
    assert moved <= set(state.params), "a base weight changed"
    assert any(".shared." in n for n in moved) and any(".private." in n for n in moved)


def test_same_seed_same_result_on_cpu(split_resident):
    state = split_resident.adapters
    train_local(split_resident, _pairs(), SETTINGS, seed=7)
    first = {**state.tensors(Role.SHARED), **state.tensors(Role.PRIVATE)}
    state.reset(Role.SHARED)
    state.reset(Role.PRIVATE)
    train_local(split_resident, _pairs(), SETTINGS, seed=7)
    second = {**state.tensors(Role.SHARED), **state.tensors(Role.PRIVATE)}
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_reference_logprobs_are_computed_once_per_pair(split_resident):
    from fedpersona.alignment.batching import encode_pairs
    from fedpersona.alignment.trainer import reference_logps

    pairs = PreferenceSimulator("conflicting", 3, 5).user_data(2).train[:6]
    encoded = encode_pairs(split_resident.prompt_format, pairs, 96)
    calls = []
    body = split_resident.model.get_base_model().base_model  # the decoder every log-prob path runs
    handle = body.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = reference_logps(split_resident, encoded)
        n_first = len(calls)
        second = reference_logps(split_resident, encoded)
    finally:
        handle.remove()
    assert n_first >= 1 and len(calls) == n_first, "the second call ran the model again"
    assert torch.equal(first, second)


def test_loss_formulas():
    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0])
    margin = (pc - rc) - (pr - rr)  # 2
    assert math.isclose(float(dpo_loss(pc, pr, rc, rr, beta=0.5)), -math.log(1 / (1 + math.exp(-1.0))), rel_tol=1e-6)
    assert math.isclose(float(ipo_loss(pc, pr, rc, rr, beta=0.5)), float((margin - 1.0) ** 2), rel_tol=1e-6)
    lens = torch.tensor([5.0])
    expected = -math.log(1 / (1 + math.exp(-(2.0 * (-10 / 5 + 12 / 5) - 0.5))))
    assert math.isclose(float(simpo_loss(pc, pr, rc, rr, beta=2.0, len_c=lens, len_r=lens)), expected, rel_tol=1e-6)
