"""Shamir t-of-n secret sharing (Shamir, CACM 1979) of short secrets, over the prime field GF(2^521 - 1).

Why this field: the secrets shared in secure aggregation are 32-byte values (a user's X25519 ``s``
private key and its self-mask seed), i.e. 256 bits. The Mersenne prime p = 2^521 - 1 is the smallest
well-known prime that holds any secret of up to 64 bytes *as one field element*: no chunking, so one
polynomial and one Lagrange interpolation per secret, and Python's big integers do the arithmetic in
microseconds for the thresholds SecAgg+ uses (t ~ 10-40). A share is 4 bytes of index + 66 bytes of
value. (Chunking into a 256-bit field, e.g. 2^255 - 19, cannot hold every 256-bit secret in one element;
a 64-bit field would need four polynomials per secret and four interpolations.)

A secret is encoded as the integer ``0x01 || secret`` (big-endian): the leading marker byte keeps
leading zero bytes and the length, and a reconstruction from too few or corrupted shares (a uniform
field element) fails to decode with probability about 1 - 2^-9 instead of silently returning garbage.

Security: the polynomial's t - 1 non-constant coefficients are uniform over the field (``secrets``), so
any t - 1 shares are uniformly distributed whatever the secret (perfect secrecy); any t shares
determine it. Share indices are the x-coordinates 1..n, never 0 (the secret sits at x = 0).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from fedpersona.errors import UsageError
from fedpersona.secagg.errors import ProtocolError

__all__ = ["MAX_SECRET_BYTES", "PRIME", "SHARE_BYTES", "Share", "combine", "split"]

PRIME = 2**521 - 1
MAX_SECRET_BYTES = 64  # 0x01 || 64 bytes < 2^513 < PRIME
_VALUE_BYTES = 66  # ceil(521 / 8)
_INDEX_BYTES = 4
SHARE_BYTES = _INDEX_BYTES + _VALUE_BYTES
_MAX_INDEX = 2**32 - 1


@dataclass(frozen=True)
class Share:
    """One point ``(index, value)`` of a sharing polynomial.

    Attributes:
        index: the x-coordinate, 1 <= index < 2^32 (never 0: that is where the secret sits).
        value: the polynomial at ``index``, an element of GF(``PRIME``).
    """

    index: int
    value: int

    def to_bytes(self) -> bytes:
        """``SHARE_BYTES`` bytes: index (4, big-endian) then value (66, big-endian)."""
        return self.index.to_bytes(_INDEX_BYTES, "big") + self.value.to_bytes(_VALUE_BYTES, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Share:
        """Parse ``to_bytes``'s encoding, as received from a peer.

        Args:
            raw: ``SHARE_BYTES`` bytes.

        Returns:
            The share.

        Raises:
            ProtocolError: wrong length, index 0, or a value outside the field.
        """
        if not isinstance(raw, bytes) or len(raw) != SHARE_BYTES:
            size = f"{len(raw)} bytes" if isinstance(raw, bytes) else type(raw).__name__
            raise ProtocolError(f"a Shamir share is {SHARE_BYTES} bytes, got {size}")
        share = cls(int.from_bytes(raw[:_INDEX_BYTES], "big"), int.from_bytes(raw[_INDEX_BYTES:], "big"))
        _check_share(share)
        return share


def split(secret: bytes, threshold: int, num_shares: int, rng: random.Random | None = None) -> list[Share]:
    """Split ``secret`` into ``num_shares`` shares, any ``threshold`` of which recover it.

    Args:
        secret: 1 to ``MAX_SECRET_BYTES`` bytes.
        threshold: t, the number of shares needed, 1 <= t <= num_shares.
        num_shares: n, the number of shares made, indexed 1..n.
        rng: the source of the polynomial's coefficients; default ``secrets.SystemRandom()`` (the OS
            CSPRNG). Pass a seeded ``random.Random`` only in tests: a predictable rng reveals the secret.

    Returns:
        ``num_shares`` shares with indices 1..n in order; give share i to the i-th participant.

    Raises:
        UsageError: empty or too long secret, or threshold / num_shares out of range.
    """
    if not isinstance(secret, bytes) or not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise UsageError(f"shamir.split: the secret must be 1 to {MAX_SECRET_BYTES} bytes")
    if not 1 <= num_shares <= _MAX_INDEX:
        raise UsageError(f"shamir.split: num_shares={num_shares} must be in [1, 2^32)")
    if not 1 <= threshold <= num_shares:
        raise UsageError(f"shamir.split: threshold={threshold} must be in [1, num_shares={num_shares}]")
    draw = rng if rng is not None else secrets.SystemRandom()
    coefficients = [int.from_bytes(b"\x01" + secret, "big")]
    coefficients += [draw.randrange(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num_shares + 1):
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares.append(Share(x, y))
    return shares


def combine(shares: Sequence[Share]) -> bytes:
    """Recover a secret from at least ``threshold`` of its shares (Lagrange interpolation at x = 0).

    All shares given are used: with more than ``threshold`` consistent shares the result is the same; an
    inconsistent share makes the result wrong (and, with probability about 1 - 2^-9, undecodable).

    Args:
        shares: distinct-index shares of one sharing.

    Returns:
        The secret's bytes.

    Raises:
        ProtocolError: no shares, a duplicate or invalid index, a value outside the field, or the
            interpolated value does not encode a secret (too few or corrupted shares).
    """
    if not shares:
        raise ProtocolError("no shares to combine")
    seen: set[int] = set()
    for share in shares:
        _check_share(share)
        if share.index in seen:
            raise ProtocolError(f"two shares with index {share.index}")
        seen.add(share.index)
    value = _interpolate_at_zero([(s.index, s.value) for s in shares])
    length = value.bit_length()
    if length < 9 or (length - 1) % 8 != 0:
        raise ProtocolError("the shares do not encode a secret (too few shares, or a corrupted one)")
    return value.to_bytes((length + 7) // 8, "big")[1:]


def _interpolate_at_zero(points: list[tuple[int, int]]) -> int:
    """The value at 0 of the polynomial through ``points`` (distinct nonzero x), in GF(PRIME).

    One modular inverse for the whole sum: accumulate numerator and denominator products, O(m^2).
    """
    total_num, total_den = 0, 1
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * xj % PRIME  # (0 - xj) / (xi - xj) = xj / (xj - xi)
                den = den * (xj - xi) % PRIME
        # total_num / total_den + yi * num / den
        total_num = (total_num * den + yi * num % PRIME * total_den) % PRIME
        total_den = total_den * den % PRIME
    return total_num * pow(total_den, -1, PRIME) % PRIME


def _check_share(share: Share) -> None:
    if not isinstance(share, Share):
        raise ProtocolError(f"expected a Share, got a {type(share).__name__}")
    if not 1 <= share.index <= _MAX_INDEX:
        raise ProtocolError(f"share index {share.index} is outside [1, 2^32) (0 would reveal the secret)")
    if not 0 <= share.value < PRIME:
        raise ProtocolError("share value is outside the field")
