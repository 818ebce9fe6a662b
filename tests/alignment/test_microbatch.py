"""Token-budget micro-batches: the cut respects the budget, and accumulated gradients equal one big batch."""

import pytest
import torch

from fedpersona.alignment.microbatch import token_chunks
from fedpersona.alignment.trainer import TrainSettings, train_local
from fedpersona.data.synthetic import PreferenceSimulator
from fedpersona.model.adapters import Role


@pytest.mark.parametrize("rows", [1, 2])
def test_chunks_keep_order_and_budget(rows):
    widths = [5, 9, 3, 40, 7, 7, 7, 2, 11]
    chunks = token_chunks(widths, 30, rows_per_item=rows, max_items=3)
    assert [i for c in chunks for i in c] == list(range(len(widths)))
    for chunk in chunks:
        assert len(chunk) <= 3
        padded = rows * len(chunk) * max(widths[i] for i in chunk)
        assert padded <= 30 or len(chunk) == 1  # only an item over the budget on its own may exceed it
    # greedy: merging any chunk with the next item would break the budget or the item cap
    for a, b in zip(chunks, chunks[1:]):
        merged = a + [b[0]]
        assert len(merged) > 3 or rows * len(merged) * max(widths[i] for i in merged) > 30
    with pytest.raises(ValueError):
        token_chunks(widths, 0)


def test_micro_batched_training_equals_one_batch(split_resident):
    pairs = PreferenceSimulator("conflicting", 3, 5).user_data(1).train[:10]
    settings = TrainSettings(batch_size=8, min_steps=3, max_steps=3, epochs=1)
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    results, budget = [], split_resident.max_tokens_per_batch
    for tokens in (100_000, 60):  # one forward per batch / several micro-batches per batch
        split_resident.adapters.reset(Role.SHARED)
        split_resident.adapters.reset(Role.PRIVATE)
        split_resident.max_tokens_per_batch = tokens
        grads: list = []  # the accumulated gradient each optimizer step sees (AdamW hides a scale error)
        handle = register_optimizer_step_pre_hook(lambda opt, *_: grads.append(
            [p.grad.clone() for group in opt.param_groups for p in group["params"] if p.grad is not None]))
        try:
            stats = train_local(split_resident, pairs, settings, seed=3)
        finally:
            handle.remove()
            split_resident.max_tokens_per_batch = budget
        results.append((stats, {n: p.detach().clone() for n, p in split_resident.adapters.params.items()}, grads))
    (whole, end_whole, grads_whole), (micro, end_micro, grads_micro) = results
    assert whole.steps == micro.steps == 3 and whole.pairs_seen == micro.pairs_seen
    assert abs(whole.mean_loss - micro.mean_loss) < 1e-5
    assert len(grads_whole) == len(grads_micro) == 3
    for step_whole, step_micro in zip(grads_whole, grads_micro):
        for g_whole, g_micro in zip(step_whole, step_micro, strict=True):
            torch.testing.assert_close(g_micro, g_whole, rtol=1e-4, atol=1e-7)
    moved = [n for n in end_whole if not torch.equal(end_whole[n], split_resident.adapters.initial[n])]
    assert moved
    for name in end_whole:
        torch.testing.assert_close(end_micro[name], end_whole[name], rtol=1e-3, atol=2e-5)  # after AdamW


def test_budget_and_checkpointing_settings_are_validated(cli):
    from fedpersona.config import RunConfig
    from fedpersona.errors import UsageError

    with pytest.raises(UsageError, match="max-tokens-per-batch=64 is invalid: must be >= max-length"):
        RunConfig(max_length=96, max_tokens_per_batch=64).validate()
    with pytest.raises(UsageError, match="activation checkpointing does not work with DP-SGD"):
        RunConfig(gradient_checkpointing=True, dp_epsilon=8.0).validate()
    code, _, err = cli("simulate", "--set", "max-tokens-per-batch=10", "--out", "/nonexistent/x")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "max-tokens-per-batch" in err
