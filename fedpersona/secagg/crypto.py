"""Key agreement, key derivation and authenticated encryption for secure aggregation, from ``cryptography``.

Why these choices (Bonawitz et al., CCS 2017, Sec. 3 and 4; Bell et al., CCS 2020):

* **X25519** (RFC 7748) for every Diffie-Hellman agreement: 32-byte keys, constant time, and no
  parameter choices to get wrong. Each user holds two fresh key pairs per round: ``c`` keys only
  encrypt the shares exchanged with neighbours, ``s`` keys only seed the pairwise masks. They must
  differ: when a user drops out its ``s`` private key is *reconstructed by the server* to remove its
  masks, and were it also the encryption key the server could then decrypt every share the dropped user
  exchanged.
* **HKDF-SHA256** (RFC 5869) turns a raw agreement (a curve point, not a uniform key) into keys. Every
  derivation names its purpose in ``info`` (one of the ``LABEL_*`` constants below) plus its context
  (round, the two users, their public keys), so a key derived for one purpose, round or pair can never
  be the key of another.
* **AES-256-GCM** encrypts the shares sent through the server, with the (round, stage, sender, receiver)
  bound as associated data: the server can neither read a share, flip a bit unnoticed, nor replay a
  share to another receiver, stage or round. Nonces are 96 random bits per message (a key encrypts two
  messages per round, one in each direction; random nonces are far from the 2^32-message bound).

Nothing here is home-made cryptography: ``cryptography`` (OpenSSL) does the arithmetic; this module only
fixes encodings and labels.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpersona.secagg.errors import ProtocolError

__all__ = [
    "KEY_BYTES",
    "LABEL_MASK_STREAM",
    "LABEL_PAIRWISE_MASK",
    "LABEL_SELF_MASK",
    "LABEL_SELF_MASK_COMMITMENT",
    "LABEL_SHARE_AD",
    "LABEL_SHARE_ENCRYPTION",
    "NONCE_BYTES",
    "agree",
    "commit",
    "decrypt",
    "derive_key",
    "encrypt",
    "generate_private_key",
    "load_private_key",
    "load_public_key",
    "pack_fields",
    "private_bytes",
    "public_bytes",
]

KEY_BYTES = 32  # X25519 public and private keys, derived keys, self-mask seeds
NONCE_BYTES = 12  # AES-GCM nonce

_PREFIX = b"fedpersona/secagg/v1/"
LABEL_SHARE_ENCRYPTION = _PREFIX + b"share-encryption"  # HKDF info: AES-GCM key of a pair of users
LABEL_PAIRWISE_MASK = _PREFIX + b"pairwise-mask"  # HKDF info: mask key of a pair of users
LABEL_SELF_MASK = _PREFIX + b"self-mask"  # HKDF info: a user's self-mask stream key from its seed
LABEL_SHARE_AD = _PREFIX + b"share-ciphertext"  # associated data of an encrypted share message
LABEL_SELF_MASK_COMMITMENT = _PREFIX + b"self-mask-commitment"  # hash binding a user to its seed
LABEL_MASK_STREAM = _PREFIX + b"mask-stream"  # HKDF info: AES-CTR key of one mask vector


def generate_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key from the operating system's CSPRNG.

    Returns:
        The private key; ``public_bytes`` gives the 32 bytes to advertise.
    """
    return X25519PrivateKey.generate()


def public_bytes(private_key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key (RFC 7748 encoding) of ``private_key``.

    Args:
        private_key: an X25519 private key.

    Returns:
        32 bytes, what a user advertises in the setup stage.
    """
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(private_key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key: what a user secret-shares (``s`` key) or keeps in its state.

    Args:
        private_key: an X25519 private key.

    Returns:
        32 bytes. Secret: never put them in a message except as Shamir shares.
    """
    return private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def load_private_key(raw: bytes) -> X25519PrivateKey:
    """An X25519 private key from its raw 32 bytes (e.g. reconstructed from Shamir shares).

    Args:
        raw: 32 bytes.

    Returns:
        The private key.

    Raises:
        ProtocolError: ``raw`` is not 32 bytes.
    """
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise ProtocolError(f"an X25519 private key is {KEY_BYTES} bytes, got {_describe(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def load_public_key(raw: bytes) -> X25519PublicKey:
    """An X25519 public key from its raw 32 bytes, as advertised by a peer.

    Args:
        raw: 32 bytes.

    Returns:
        The public key.

    Raises:
        ProtocolError: ``raw`` is not 32 bytes.
    """
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise ProtocolError(f"an X25519 public key is {KEY_BYTES} bytes, got {_describe(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def pack_fields(*fields: bytes | int) -> bytes:
    """An unambiguous byte encoding of a tuple of fields, for HKDF ``info`` and AEAD associated data.

    Each field is length-prefixed (4 bytes, big-endian); an int is encoded as 8 bytes big-endian
    unsigned (user ids are Flower node ids, below 2^64), so ``(b"ab", b"c")`` and ``(b"a", b"bc")``
    never collide.

    Args:
        *fields: bytes or non-negative ints below 2^64.

    Returns:
        The encoding.

    Raises:
        ProtocolError: an int field is negative or too large, or a field is neither int nor bytes.
    """
    out = bytearray()
    for field in fields:
        if isinstance(field, bool) or not isinstance(field, (int, bytes)):
            raise ProtocolError(f"cannot encode a field of type {type(field).__name__}")
        if isinstance(field, int):
            if not 0 <= field < 2**64:
                raise ProtocolError(f"integer field {field} is outside [0, 2^64)")
            field = field.to_bytes(8, "big")
        out += struct.pack(">I", len(field)) + field
    return bytes(out)


def derive_key(secret: bytes, label: bytes, context: bytes = b"", length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` with ``info = pack_fields(label, context)`` and no salt.

    Args:
        secret: input key material (an X25519 shared secret or a 32-byte random seed).
        label: one of the ``LABEL_*`` constants: the purpose of the key.
        context: what the key is bound to (``pack_fields`` of round, users, public keys).
        length: bytes of output key material.

    Returns:
        ``length`` bytes.
    """
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=pack_fields(label, context)).derive(secret)


def agree(private_key: X25519PrivateKey, peer_public: bytes, label: bytes, context: bytes) -> bytes:
    """X25519 agreement with a peer's advertised key, then HKDF into a 32-byte key for ``label``.

    Both ends compute the same key when they pass the same ``context`` (order the pair by user id).

    Args:
        private_key: this side's private key.
        peer_public: the peer's raw 32-byte public key.
        label: the key's purpose (``LABEL_SHARE_ENCRYPTION`` or ``LABEL_PAIRWISE_MASK``).
        context: ``pack_fields`` of round, both users and both public keys, in user-id order.

    Returns:
        32 bytes.

    Raises:
        ProtocolError: the peer's key is malformed or of low order (the agreement would be all zero).
    """
    peer = load_public_key(peer_public)
    try:
        shared = private_key.exchange(peer)
    except ValueError as exc:  # OpenSSL refuses an all-zero shared secret (a low-order public key)
        raise ProtocolError("key agreement failed: the peer's public key is of low order") from exc
    return derive_key(shared, label, context)


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM encryption with a fresh random nonce.

    Args:
        key: 32 bytes from ``agree(..., LABEL_SHARE_ENCRYPTION, ...)``.
        plaintext: the message.
        associated_data: what the ciphertext is bound to (round, stage, sender, receiver), not secret.

    Returns:
        ``nonce (12 bytes) || ciphertext || tag (16 bytes)``.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Authenticated decryption of ``encrypt``'s output.

    Args:
        key: the 32-byte key it was encrypted with.
        ciphertext: ``nonce || ciphertext || tag``.
        associated_data: the same associated data as at encryption.

    Returns:
        The plaintext.

    Raises:
        ProtocolError: the ciphertext is truncated, altered, or bound to other associated data.
    """
    if not isinstance(ciphertext, bytes) or len(ciphertext) < NONCE_BYTES + 16:
        raise ProtocolError(f"a share ciphertext is at least {NONCE_BYTES + 16} bytes, got "
                            f"{_describe(ciphertext)}")
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise ProtocolError("a share ciphertext failed authentication (altered, or not meant for this "
                            "receiver, stage or round)") from exc


def commit(label: bytes, context: bytes, secret: bytes) -> bytes:
    """A hiding and binding commitment to a uniformly random 32-byte ``secret``: SHA-256 of the fields.

    Hiding because ``secret`` has 256 bits of entropy; lets the server check a reconstructed self-mask
    seed (a corrupted share gives a different seed) instead of unmasking with garbage.

    Args:
        label: ``LABEL_SELF_MASK_COMMITMENT``.
        context: ``pack_fields`` of round and user.
        secret: the 32-byte seed.

    Returns:
        32 bytes.
    """
    digest = hashes.Hash(hashes.SHA256())
    digest.update(pack_fields(label, context, secret))
    return digest.finalize()


def _describe(value: object) -> str:
    return f"{len(value)} bytes" if isinstance(value, bytes) else f"a {type(value).__name__}"
