"""Shamir t-of-n sharing over GF(2^521 - 1) (fedpersona.secagg.shamir)."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from fedpersona.errors import UsageError
from fedpersona.secagg import shamir
from fedpersona.secagg.errors import ProtocolError
from fedpersona.secagg.shamir import PRIME, Share, combine, split


def test_every_threshold_subset_recovers_the_secret():
    secret = os.urandom(32)
    shares = split(secret, 3, 6)
    assert [s.index for s in shares] == [1, 2, 3, 4, 5, 6]
    for size in (3, 4, 6):
        for subset in itertools.combinations(shares, size):
            assert combine(list(subset)) == secret


def test_large_sharings_recover_from_random_subsets():
    rng = random.Random(1)
    for t, n in ((16, 31), (2, 2), (1, 3), (40, 80)):
        secret = os.urandom(32)
        shares = split(secret, t, n)
        for _ in range(5):
            assert combine(rng.sample(shares, rng.randint(t, n))) == secret


@pytest.mark.parametrize("secret", [b"\x00" * 32, b"\x00\x01", b"\xff" * 64, b"x"])
def test_edge_secrets_keep_their_length_and_leading_zeros(secret):
    assert combine(split(secret, 2, 3)[1:]) == secret


def test_fewer_than_threshold_shares_do_not_give_the_secret():
    for trial in range(50):
        secret = os.urandom(32)
        t = 2 + trial % 6
        shares = split(secret, t, t + 2)
        try:
            assert combine(shares[: t - 1]) != secret
        except ProtocolError:
            pass  # the usual outcome: the interpolated value does not decode


def test_threshold_minus_one_shares_are_consistent_with_every_secret():
    """Perfect secrecy, concretely: for t - 1 shares and ANY candidate secret, one further point makes a
    valid sharing of the candidate, so t - 1 shares cannot rule any secret out."""
    t = 4
    shares = split(os.urandom(32), t, 6)
    known = [(s.index, s.value) for s in shares[: t - 1]]
    for candidate in (os.urandom(32), b"\x00" * 32, b"another secret"):
        encoded = int.from_bytes(b"\x01" + candidate, "big")
        points = [(0, encoded)] + known
        x = 6  # the polynomial through these t points, evaluated at x = 6 (Lagrange)
        y = 0
        for i, (xi, yi) in enumerate(points):
            num = den = 1
            for j, (xj, _) in enumerate(points):
                if i != j:
                    num = num * (x - xj) % PRIME
                    den = den * (xi - xj) % PRIME
            y = (y + yi * num * pow(den, -1, PRIME)) % PRIME
        assert combine([Share(i, v) for i, v in known] + [Share(x, y)]) == candidate


def test_bad_shares_are_refused():
    shares = split(os.urandom(32), 2, 3)
    with pytest.raises(ProtocolError, match="no shares"):
        combine([])
    with pytest.raises(ProtocolError, match="two shares with index"):
        combine([shares[0], shares[0]])
    with pytest.raises(ProtocolError, match="index 0"):
        combine([Share(0, 5), shares[1]])
    with pytest.raises(ProtocolError, match="outside the field"):
        combine([Share(1, PRIME), shares[1]])
    with pytest.raises(ProtocolError):
        combine([shares[0], "not a share"])  # type: ignore[list-item]


def test_a_corrupted_share_changes_the_result():
    secret = os.urandom(32)
    shares = split(secret, 3, 5)
    bad = Share(shares[0].index, (shares[0].value + 1) % PRIME)
    try:
        assert combine([bad, *shares[1:3]]) != secret
    except ProtocolError:
        pass


def test_share_encoding_round_trips_and_checks():
    share = split(os.urandom(32), 2, 3)[2]
    raw = share.to_bytes()
    assert len(raw) == shamir.SHARE_BYTES and Share.from_bytes(raw) == share
    with pytest.raises(ProtocolError):
        Share.from_bytes(raw[:-1])
    with pytest.raises(ProtocolError):
        Share.from_bytes(bytes(4) + raw[4:])  # index 0
    with pytest.raises(ProtocolError):
        Share.from_bytes(raw[:4] + b"\xff" * 66)  # value beyond the prime


@pytest.mark.parametrize("args", [(b"", 1, 1), (b"x" * 65, 1, 1), (b"x", 0, 3), (b"x", 4, 3), (b"x", 1, 0)])
def test_split_refuses_bad_parameters(args):
    with pytest.raises(UsageError):
        split(*args)


def test_coefficients_come_from_the_given_rng():
    secret = b"k" * 32
    assert split(secret, 3, 4, random.Random(5)) == split(secret, 3, 4, random.Random(5))
    assert split(secret, 3, 4) != split(secret, 3, 4)  # the default rng is the OS CSPRNG
