"""The messages of the SecAgg+ protocol: their keys, their parsing, and the derivations both ends share.

Messages are plain dicts whose values are ints, bytes, lists of ints or bytes, or (the masked vector
only) a ``numpy.uint64`` array: what a Flower ``ConfigRecord`` (and, for the vector, an ``ArrayRecord``)
carries, so wiring them into Flower messages is a copy. Every message names its ``stage``, its
``round`` and (replies) its ``user``; a parser refuses anything else with a ``ProtocolError`` naming the
key and what was expected. The derivations (pair contexts, mask vectors) live here so the client and
the server compute the same bytes by construction.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpersona.secagg.crypto import (
    LABEL_PAIRWISE_MASK,
    LABEL_SELF_MASK,
    LABEL_SHARE_AD,
    LABEL_SHARE_ENCRYPTION,
    agree,
    load_private_key,
    pack_fields,
)
from fedpersona.secagg.errors import ProtocolError
from fedpersona.secagg.masks import expand_mask
from fedpersona.secagg.shamir import SHARE_BYTES

# stages, in order
SETUP = "setup"
SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
UNMASK = "unmask"
STAGES = (SETUP, SHARE_KEYS, MASKED_INPUT, UNMASK)

# keys of every message
STAGE = "stage"
ROUND = "round"
USER = "user"  # the addressee of a request, the author of a reply
# setup: request, then reply (advertise keys)
NEIGHBOURS = "neighbours"
THRESHOLD = "threshold"
VECTOR_LENGTH = "vector-length"
MODULUS_BITS = "modulus-bits"
C_PUBLIC_KEY = "c-public-key"
S_PUBLIC_KEY = "s-public-key"
# share-keys: request (the holders' keys), then reply (encrypted shares, self-mask commitment)
HOLDERS = "holders"
C_PUBLIC_KEYS = "c-public-keys"
S_PUBLIC_KEYS = "s-public-keys"
RECEIVERS = "receivers"
CIPHERTEXTS = "ciphertexts"
COMMITMENT = "self-mask-commitment"
# masked-input: request (the shares sent to this user), then reply (the masked vector)
SENDERS = "senders"
MASKED_VECTOR = "masked-vector"
# unmask: request (who survived, who dropped), then reply (one share per listed user)
SURVIVORS = "survivors"
DROPPED = "dropped"
SELF_MASK_OWNERS = "self-mask-owners"
SELF_MASK_SHARES = "self-mask-shares"
MASK_KEY_OWNERS = "mask-key-owners"
MASK_KEY_SHARES = "mask-key-shares"

_SHARE_PLAINTEXT = struct.Struct(f">QQ{SHARE_BYTES}s{SHARE_BYTES}s")  # sender, receiver, b share, s share


def expect(message: object, stage: str, round_id: int) -> Mapping[str, Any]:
    """Check a message's type, stage and round.

    Args:
        message: what arrived.
        stage: the stage the receiver is in.
        round_id: the round the receiver is in.

    Returns:
        The message, as a mapping.

    Raises:
        ProtocolError: not a mapping, another stage (early, late or forged), or another round.
    """
    if not isinstance(message, Mapping):
        raise ProtocolError(f"a {stage} message must be a dict, got a {type(message).__name__}")
    got = message.get(STAGE)
    if got != stage:
        raise ProtocolError(f"expected a {stage!r} message, got stage {got!r} (stages run in the order "
                            f"{' -> '.join(STAGES)}, each once)")
    if get_int(message, ROUND) != round_id:
        raise ProtocolError(f"a {stage} message of round {message.get(ROUND)!r} arrived in round {round_id}")
    return message


def get_int(message: Mapping[str, Any], key: str) -> int:
    """``message[key]`` as a non-negative int below 2^64 (ids, counts, rounds), or ProtocolError."""
    value = message.get(key)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not 0 <= int(value) < 2**64:
        raise ProtocolError(f"message key {key!r} must be an integer in [0, 2^64), got {_kind(value)}")
    return int(value)


def get_bytes(message: Mapping[str, Any], key: str, size: int | None = None) -> bytes:
    """``message[key]`` as bytes (of exactly ``size`` bytes if given), or ProtocolError."""
    value = message.get(key)
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        want = f"{size} bytes" if size is not None else "bytes"
        raise ProtocolError(f"message key {key!r} must be {want}, got {_kind(value)}")
    return value


def get_int_list(message: Mapping[str, Any], key: str) -> list[int]:
    """``message[key]`` as a list of distinct ints in [0, 2^64), or ProtocolError."""
    value = message.get(key)
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"message key {key!r} must be a list of integers, got {_kind(value)}")
    out = [get_int({key: item}, key) for item in value]
    if len(set(out)) != len(out):
        raise ProtocolError(f"message key {key!r} lists a user twice")
    return out


def get_bytes_list(message: Mapping[str, Any], key: str, length: int, size: int | None = None) -> list[bytes]:
    """``message[key]`` as a list of ``length`` bytes values (each ``size`` bytes if given)."""
    value = message.get(key)
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ProtocolError(f"message key {key!r} must be a list of {length} bytes values, got "
                            f"{_kind(value)}")
    return [get_bytes({key: item}, key, size) for item in value]


def _kind(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if isinstance(value, (bool, int, np.integer)):
        return f"the integer {int(value)}" if not isinstance(value, bool) else "a bool"
    return "nothing" if value is None else f"a {type(value).__name__}"


def pair_context(round_id: int, u: int, v: int, public_u: bytes, public_v: bytes) -> bytes:
    """HKDF context of the pair {u, v} in a round: round, both ids and both public keys, in id order."""
    if u < v:
        return pack_fields(round_id, u, v, public_u, public_v)
    return pack_fields(round_id, v, u, public_v, public_u)


def share_associated_data(round_id: int, sender: int, receiver: int) -> bytes:
    """AEAD associated data of the shares ``sender`` encrypts for ``receiver``: binds round and direction."""
    return pack_fields(LABEL_SHARE_AD, SHARE_KEYS.encode(), round_id, sender, receiver)


def encryption_key(c_private: bytes, round_id: int, me: int, peer: int, my_public: bytes,
                   peer_public: bytes) -> bytes:
    """The AES-GCM key of the pair (me, peer), from my ``c`` private key and the peer's ``c`` public key."""
    return agree(load_private_key(c_private), peer_public, LABEL_SHARE_ENCRYPTION,
                 pair_context(round_id, me, peer, my_public, peer_public))


def pairwise_mask(s_private: bytes, round_id: int, me: int, peer: int, my_public: bytes, peer_public: bytes,
                  length: int, modulus_bits: int) -> np.ndarray:
    """The mask of the pair (me, peer): expanded from their ``s`` agreement; both ends get the same vector.

    The user with the smaller id adds it, the other subtracts it, so it cancels in the sum.
    """
    key = agree(load_private_key(s_private), peer_public, LABEL_PAIRWISE_MASK,
                pair_context(round_id, me, peer, my_public, peer_public))
    lo, hi = min(me, peer), max(me, peer)
    return expand_mask(key, pack_fields(LABEL_PAIRWISE_MASK, round_id, lo, hi), length, modulus_bits)


def self_mask(seed: bytes, round_id: int, user: int, length: int, modulus_bits: int) -> np.ndarray:
    """The self mask of ``user``, expanded from its 32-byte seed b_u."""
    return expand_mask(seed, pack_fields(LABEL_SELF_MASK, round_id, user), length, modulus_bits)


def pack_share_plaintext(sender: int, receiver: int, self_mask_share: bytes, mask_key_share: bytes) -> bytes:
    """The plaintext one user encrypts for a holder: both ids, then its b share and its s share."""
    return _SHARE_PLAINTEXT.pack(sender, receiver, self_mask_share, mask_key_share)


def unpack_share_plaintext(plaintext: bytes, sender: int, receiver: int) -> tuple[bytes, bytes]:
    """Parse ``pack_share_plaintext`` and check the ids inside match the envelope.

    Returns:
        (b share bytes, s share bytes).

    Raises:
        ProtocolError: wrong length or ids that do not match.
    """
    if len(plaintext) != _SHARE_PLAINTEXT.size:
        raise ProtocolError(f"a share plaintext is {_SHARE_PLAINTEXT.size} bytes, got {len(plaintext)}")
    inner_sender, inner_receiver, b_share, s_share = _SHARE_PLAINTEXT.unpack(plaintext)
    if (inner_sender, inner_receiver) != (sender, receiver):
        raise ProtocolError(f"the shares from user {sender} name sender {inner_sender} and receiver "
                            f"{inner_receiver}")
    return b_share, s_share
