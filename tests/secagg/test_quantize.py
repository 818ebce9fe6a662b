"""Bounded contributions: L2 clip, capped weight, unbiased stochastic rounding, no-wrap modulus."""

from __future__ import annotations

import numpy as np
import pytest

from fedpersona.errors import UsageError
from fedpersona.secagg.errors import ProtocolError
from fedpersona.secagg.masks import add_mod
from fedpersona.secagg.quantize import (
    QuantizationPlan,
    clip_l2,
    from_field,
    stochastic_round,
    to_field,
)


def _sum(vectors: list[np.ndarray], bits: int) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for vector in vectors:
        add_mod(total, vector, bits)
    return total


def test_clip_bounds_the_l2_norm_and_leaves_small_updates_alone():
    rng = np.random.default_rng(0)
    big = rng.normal(size=1000) * 10
    clipped = clip_l2(big, 2.0)
    assert np.linalg.norm(clipped) == pytest.approx(2.0)
    assert np.allclose(clipped / np.linalg.norm(clipped), big / np.linalg.norm(big))
    small = big / np.linalg.norm(big)
    assert np.array_equal(clip_l2(small, 2.0), small)
    with pytest.raises(UsageError):
        clip_l2(np.array([1.0, np.nan]), 1.0)


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(1)
    values = np.array([0.3, -0.3, 2.75, -7.01, 5.0])
    draws = np.stack([stochastic_round(values, rng) for _ in range(20_000)])
    assert set(np.unique(draws[:, 0])) == {0, 1} and set(np.unique(draws[:, 4])) == {5}
    stderr = draws.std(axis=0) / np.sqrt(len(draws)) + 1e-12
    assert np.all(np.abs(draws.mean(axis=0) - values) < 5 * stderr + 1e-9)


@pytest.mark.parametrize("bits", [8, 32, 63, 64])
def test_signed_values_round_trip_through_the_field(bits):
    half = 2 ** (bits - 1)
    signed = np.array([0, 1, -1, half - 1, -half, 12, -12], dtype=np.int64)
    residues = to_field(signed, bits)
    assert residues.dtype == np.uint64
    if bits < 64:
        assert int(residues.max()) < 2**bits
    assert np.array_equal(from_field(residues, bits), signed)


def test_levels_follow_the_documented_arithmetic():
    plan = QuantizationPlan(clip_norm=1.0, weight_cap=1.0, max_summands=1000, modulus_bits=32)
    assert plan.levels == 2**31 // 1000 - 1 == 2_147_482  # 21 bits of resolution per device
    assert plan.max_summands * plan.levels < 2**31  # the cohort's sum never wraps
    assert QuantizationPlan(1.0, 1.0, 10, 64).levels == 2**52  # float64's exact-integer range
    with pytest.raises(UsageError, match="no resolution"):
        QuantizationPlan(1.0, 1.0, 1000, modulus_bits=10)
    base = {"clip_norm": 1.0, "weight_cap": 1.0, "max_summands": 10}
    for bad in ({"clip_norm": 0.0}, {"weight_cap": -1.0}, {"max_summands": 0}, {"modulus_bits": 65},
                {"clip_norm": float("inf")}):
        with pytest.raises(UsageError):
            QuantizationPlan(**{**base, **bad})


def test_encoding_is_unbiased_for_one_device():
    plan = QuantizationPlan(clip_norm=1.0, weight_cap=4.0, max_summands=8, modulus_bits=12)  # coarse: L = 255
    rng = np.random.default_rng(2)
    update = rng.normal(size=50)
    update *= 0.5 / np.linalg.norm(update)  # inside the clip
    sums = [plan.decode(plan.encode(update, 3.0, rng), 1) for _ in range(4000)]
    mean = np.mean([s[0] for s in sums], axis=0)
    # per-coordinate rounding error is < 1/s with variance <= 1/(4 s^2): the mean of 4000 is within 5 sigma
    sigma = 1 / (2 * plan.scale * np.sqrt(len(sums)))
    assert np.all(np.abs(mean - 3.0 * update) < 5 * sigma)
    assert np.mean([s[1] for s in sums]) == pytest.approx(3.0, abs=5 / (2 * plan.weight_scale * np.sqrt(len(sums))))
    assert not np.allclose(sums[0][0], sums[1][0])  # the rounding really is random


def test_dequantized_sum_is_within_the_documented_error_of_the_float_sum():
    rng = np.random.default_rng(3)
    plan = QuantizationPlan(clip_norm=2.0, weight_cap=10.0, max_summands=50, modulus_bits=32)
    n, d = 50, 2000
    updates = [rng.normal(scale=rng.uniform(0.01, 1.0), size=d) for _ in range(n)]
    weights = rng.uniform(0, 20, size=n)  # half above the cap
    total = _sum([plan.encode(u, w, rng) for u, w in zip(updates, weights)], 32)
    weighted, weight_sum = plan.decode(total, n)
    expected = sum(min(w, 10.0) * clip_l2(u, 2.0) for u, w in zip(updates, weights))
    error = np.abs(weighted - expected)
    assert error.max() <= plan.error_bound(n)
    assert error.max() > 0  # it is really quantized
    assert abs(weight_sum - np.minimum(weights, 10.0).sum()) <= n / plan.weight_scale


def test_extreme_contributions_at_max_summands_do_not_wrap():
    plan = QuantizationPlan(clip_norm=3.0, weight_cap=2.0, max_summands=100, modulus_bits=16)
    rng = np.random.default_rng(4)
    for sign in (1.0, -1.0):
        vectors = [plan.encode(np.array([sign * 1e6, 0.0]), 1e9, rng) for _ in range(100)]
        weighted, weight_sum = plan.decode(_sum(vectors, 16), 100)
        assert weighted[0] == pytest.approx(sign * 100 * 2.0 * 3.0)
        assert weight_sum == pytest.approx(200.0)


def test_out_of_bound_sums_are_refused():
    plan = QuantizationPlan(clip_norm=1.0, weight_cap=1.0, max_summands=10, modulus_bits=32)
    rng = np.random.default_rng(5)
    honest = [plan.encode(rng.normal(size=20), 1.0, rng) for _ in range(3)]
    plan.decode(_sum(honest, 32), 3)
    forged = to_field(np.full(21, 6 * plan.levels, dtype=np.int64), 32)  # a device ignoring its bound
    with pytest.raises(ProtocolError, match="bound"):
        plan.decode(_sum([*honest, forged], 32), 4)
    spread = to_field(np.array([plan.levels] * 20 + [plan.levels], dtype=np.int64), 32)  # L2 ~ 4.5 C
    with pytest.raises(ProtocolError, match="L2"):
        plan.decode(spread, 1)
    negative_weight = to_field(np.array([0] * 20 + [-plan.levels], dtype=np.int64), 32)
    with pytest.raises(ProtocolError, match="negative"):
        plan.decode(negative_weight, 1)
    with pytest.raises(UsageError):
        plan.decode(_sum(honest, 32), 11)


def test_bad_device_inputs_are_usage_errors():
    plan = QuantizationPlan(clip_norm=1.0, weight_cap=1.0, max_summands=10)
    rng = np.random.default_rng(6)
    for update, weight in ((np.ones((2, 2)), 1.0), (np.array([np.inf]), 1.0), (np.ones(3), -1.0),
                           (np.ones(3), float("nan"))):
        with pytest.raises(UsageError):
            plan.encode(update, weight, rng)
    assert plan.encode(np.ones(3), 1.0, rng).shape == (plan.vector_length(3),)
