"""X25519 agreement, HKDF domain separation, AES-GCM binding, key encodings (fedpersona.secagg.crypto)."""

from __future__ import annotations

import pytest

from fedpersona.secagg import crypto
from fedpersona.secagg.errors import ProtocolError
from fedpersona.secagg.messages import share_associated_data


def test_agreement_is_symmetric_and_bound_to_label_and_context():
    a, b = crypto.generate_private_key(), crypto.generate_private_key()
    context = crypto.pack_fields(3, 1, 2)
    k_ab = crypto.agree(a, crypto.public_bytes(b), crypto.LABEL_PAIRWISE_MASK, context)
    k_ba = crypto.agree(b, crypto.public_bytes(a), crypto.LABEL_PAIRWISE_MASK, context)
    assert k_ab == k_ba and len(k_ab) == 32
    assert crypto.agree(a, crypto.public_bytes(b), crypto.LABEL_SHARE_ENCRYPTION, context) != k_ab
    assert crypto.agree(a, crypto.public_bytes(b), crypto.LABEL_PAIRWISE_MASK, crypto.pack_fields(4, 1, 2)) != k_ab
    c = crypto.generate_private_key()
    assert crypto.agree(a, crypto.public_bytes(c), crypto.LABEL_PAIRWISE_MASK, context) != k_ab


def test_labels_are_distinct_and_derivation_is_deterministic():
    labels = [getattr(crypto, name) for name in dir(crypto) if name.startswith("LABEL_")]
    assert len(labels) == len(set(labels)) == 6
    secret = bytes(range(32))
    once = crypto.derive_key(secret, crypto.LABEL_SELF_MASK, b"x")
    assert once == crypto.derive_key(secret, crypto.LABEL_SELF_MASK, b"x")
    assert len({crypto.derive_key(secret, label, b"x") for label in labels}) == len(labels)


def test_pack_fields_is_unambiguous_and_refuses_bad_fields():
    assert crypto.pack_fields(b"ab", b"c") != crypto.pack_fields(b"a", b"bc")
    assert crypto.pack_fields(1, 2) != crypto.pack_fields(2, 1)
    for bad in (-1, 2**64, True, "text", 1.5):
        with pytest.raises(ProtocolError):
            crypto.pack_fields(bad)


def test_keys_round_trip_through_raw_bytes():
    key = crypto.generate_private_key()
    raw = crypto.private_bytes(key)
    assert len(raw) == 32 and len(crypto.public_bytes(key)) == 32
    assert crypto.public_bytes(crypto.load_private_key(raw)) == crypto.public_bytes(key)
    public = crypto.load_public_key(crypto.public_bytes(key))
    other = crypto.generate_private_key()
    assert other.exchange(public) == key.exchange(other.public_key())
    for bad in (raw[:31], raw + b"\x00", "x" * 32, None):
        with pytest.raises(ProtocolError):
            crypto.load_private_key(bad)
        with pytest.raises(ProtocolError):
            crypto.load_public_key(bad)


def test_low_order_public_key_is_refused():
    with pytest.raises(ProtocolError, match="low order"):
        crypto.agree(crypto.generate_private_key(), bytes(32), crypto.LABEL_SHARE_ENCRYPTION, b"")


def test_encryption_detects_every_bit_flip_and_binds_sender_receiver_round():
    key = bytes(range(32))
    ad = share_associated_data(7, 1, 2)
    plaintext = b"two shares" * 10
    ciphertext = crypto.encrypt(key, plaintext, ad)
    assert crypto.decrypt(key, ciphertext, ad) == plaintext
    assert crypto.encrypt(key, plaintext, ad) != ciphertext  # fresh nonce per message
    for position in range(0, len(ciphertext), 7):  # nonce, body and tag
        flipped = bytearray(ciphertext)
        flipped[position] ^= 0x10
        with pytest.raises(ProtocolError, match="authentication"):
            crypto.decrypt(key, bytes(flipped), ad)
    for other in (share_associated_data(7, 2, 1), share_associated_data(8, 1, 2), share_associated_data(7, 1, 3)):
        with pytest.raises(ProtocolError):
            crypto.decrypt(key, ciphertext, other)
    with pytest.raises(ProtocolError):
        crypto.decrypt(bytes(32), ciphertext, ad)
    with pytest.raises(ProtocolError):
        crypto.decrypt(key, ciphertext[:20], ad)


def test_commitment_binds_the_secret_and_its_context():
    seed = bytes(range(32))
    c = crypto.commit(crypto.LABEL_SELF_MASK_COMMITMENT, crypto.pack_fields(1, 5), seed)
    assert c == crypto.commit(crypto.LABEL_SELF_MASK_COMMITMENT, crypto.pack_fields(1, 5), seed)
    assert c != crypto.commit(crypto.LABEL_SELF_MASK_COMMITMENT, crypto.pack_fields(1, 6), seed)
    assert c != crypto.commit(crypto.LABEL_SELF_MASK_COMMITMENT, crypto.pack_fields(1, 5), bytes(32))
