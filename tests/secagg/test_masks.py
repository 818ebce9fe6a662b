"""AES-CTR mask expansion and arithmetic mod 2^b (fedpersona.secagg.masks)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedpersona.errors import UsageError
from fedpersona.secagg.errors import ProtocolError
from fedpersona.secagg.masks import add_mod, check_field_vector, expand_mask, sub_mod


def _chi_square_uniform(values: np.ndarray, bins: int) -> float:
    counts = np.bincount(values, minlength=bins)
    expected = values.size / bins
    return float(((counts - expected) ** 2 / expected).sum())


def test_expansion_is_deterministic_per_key_label_length_and_bits():
    key = os.urandom(32)
    a = expand_mask(key, b"round-1", 5000, 32)
    assert a.dtype == np.uint64 and a.shape == (5000,)
    assert np.array_equal(a, expand_mask(key, b"round-1", 5000, 32))
    assert np.array_equal(a[:100], expand_mask(key, b"round-1", 100, 32))  # a prefix
    assert not np.array_equal(a, expand_mask(key, b"round-2", 5000, 32))
    assert not np.array_equal(a, expand_mask(os.urandom(32), b"round-1", 5000, 32))
    flipped = bytes([key[0] ^ 1]) + key[1:]
    assert np.mean(a == expand_mask(flipped, b"round-1", 5000, 32)) < 0.01
    assert expand_mask(key, b"x", 0, 32).shape == (0,)


def test_expansion_crosses_chunk_boundaries_consistently():
    key = os.urandom(32)
    long = expand_mask(key, b"l", (1 << 17) + 3, 64)  # 1 MiB chunk = 131072 words
    assert np.array_equal(long[: (1 << 17) - 1], expand_mask(key, b"l", (1 << 17) - 1, 64))
    assert len(np.unique(long)) == long.size  # 64-bit words: a repeat would be a stream bug


@pytest.mark.parametrize("bits", [8, 20, 32, 64])
def test_masks_are_uniform_mod_2_to_the_b(bits):
    mask = expand_mask(bytes(range(32)), b"u", 40_000, bits)  # a fixed key: the test is deterministic
    if bits < 64:
        assert int(mask.max()) < 2**bits
    top = (mask >> np.uint64(bits - 4)).astype(np.int64)  # the 4 top bits: 16 bins
    low = (mask & np.uint64(15)).astype(np.int64)
    # chi-square with 15 degrees of freedom: P(> 37.7) = 0.001
    assert _chi_square_uniform(top, 16) < 37.7
    assert _chi_square_uniform(low, 16) < 37.7


def test_full_key_is_required():
    for bad in (b"\x00" * 4, b"\x00" * 31, "k" * 32):
        with pytest.raises(UsageError):
            expand_mask(bad, b"x", 10, 32)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        expand_mask(os.urandom(32), b"x", -1, 32)
    with pytest.raises(UsageError):
        expand_mask(os.urandom(32), b"x", 10, 65)


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_add_and_sub_mod_are_inverse_and_wrap(bits):
    rng = np.random.default_rng(0)
    top = 2**bits
    a = rng.integers(0, top, 1000, dtype=np.uint64, endpoint=False) if bits < 64 else \
        rng.integers(0, 2**63, 1000, dtype=np.uint64) * np.uint64(2)
    b = expand_mask(os.urandom(32), b"b", 1000, bits)
    total = add_mod(a.copy(), b, bits)
    expected = [(int(x) + int(y)) % top for x, y in zip(a, b)]
    assert [int(v) for v in total] == expected
    assert np.array_equal(sub_mod(total, b, bits), a)


def test_field_vectors_are_checked():
    good = np.zeros(5, dtype=np.uint64)
    assert check_field_vector(good, 5, 32, "v") is good
    for bad, match in ((np.zeros(5, dtype=np.int64), "uint64"), (np.zeros(4, dtype=np.uint64), "shape"),
                       (np.full(5, 2**32, dtype=np.uint64), "outside"), ([0, 0, 0, 0, 0], "uint64")):
        with pytest.raises(ProtocolError, match=match):
            check_field_vector(bad, 5, 32, "v")
