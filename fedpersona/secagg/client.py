"""One user's side of a SecAgg+ round (Bonawitz et al. CCS 2017, Fig. 4; Bell et al. CCS 2020): a state machine.

One ``Client`` per user and round: in a simulation every simulated user has its own, even when one
worker serves a cohort; on a device there is one. It holds the user's two fresh X25519 key pairs, its
self-mask seed and the shares its neighbours entrusted to it, answers each stage's request once and in
order, and checks every request against what it already knows, because the server is not trusted to be
consistent: a holder list outside its neighbourhood, a public key that is not its own or appears twice, a
threshold that is not a majority, an unmask request naming a user as both survivor and dropout (the
classic rule: never reveal both the self-mask share and the mask-key share of one user), are refused.

State survives between stages in memory, or through ``to_state`` / ``from_state`` (plain ints, bytes
and lists, e.g. a Flower ``ConfigRecord`` in ``Context.state``): it holds private keys and shares, so it
stays on the device. After the unmask stage the secrets are forgotten.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpersona.errors import UsageError
from fedpersona.secagg import messages as m
from fedpersona.secagg.crypto import (
    KEY_BYTES,
    LABEL_SELF_MASK_COMMITMENT,
    commit,
    decrypt,
    encrypt,
    generate_private_key,
    load_private_key,
    pack_fields,
    private_bytes,
    public_bytes,
)
from fedpersona.secagg.errors import ProtocolError
from fedpersona.secagg.graph import check_threshold
from fedpersona.secagg.masks import add_mod, check_modulus_bits, sub_mod
from fedpersona.secagg.shamir import SHARE_BYTES, Share, split

__all__ = ["Client"]

_NEW, _ADVERTISED, _SHARED, _MASKED, _DONE = "new", "keys-advertised", "shares-sent", "input-sent", "done"
_NEXT_REQUEST = {_NEW: m.SETUP, _ADVERTISED: m.SHARE_KEYS, _SHARED: m.MASKED_INPUT, _MASKED: m.UNMASK}


class Client:
    """A user's SecAgg+ participant for one round.

    Args:
        user: the user's id (a non-negative int below 2^64: a Flower node id or a simulated user's id).
        min_neighbours: the device's own floor on its neighbours: a setup naming fewer is refused (with
            one neighbour, that neighbour alone knows every pairwise mask of the user; a device policy
            may ask for more). Default 1.

    Call ``setup``, ``share_keys``, ``masked_input``, ``unmask`` with the server's requests, in that
    order, each once; each returns the reply to send. Any method raises ``ProtocolError`` for a request
    it refuses (then the user simply does not answer: to the server it dropped out).
    """

    def __init__(self, user: int, *, min_neighbours: int = 1) -> None:
        if isinstance(user, bool) or not isinstance(user, int) or not 0 <= user < 2**64:
            raise UsageError(f"secure aggregation: user id {user!r} must be an integer in [0, 2^64)")
        if isinstance(min_neighbours, bool) or not isinstance(min_neighbours, int) or min_neighbours < 1:
            raise UsageError(f"secure aggregation: min_neighbours={min_neighbours!r} must be an integer >= 1")
        self.user = user
        self.min_neighbours = min_neighbours
        self.stage = _NEW
        self.round_id = 0
        self.neighbours: tuple[int, ...] = ()
        self.threshold = 0
        self.vector_length = 0
        self.modulus_bits = 0
        self._c_private = b""
        self._s_private = b""
        self._holders: tuple[int, ...] = ()  # N1[u]: the holders of this user's shares, itself included
        self._c_publics: dict[int, bytes] = {}
        self._s_publics: dict[int, bytes] = {}
        self._seed = b""  # b_u, the self-mask seed
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (b share, s share) this user holds
        self._live: tuple[int, ...] = ()  # N2[u]: owners whose shares this user holds, itself included

    @property
    def expects(self) -> str | None:
        """The stage of the request this client answers next; None once its round is done."""
        return _NEXT_REQUEST.get(self.stage)

    # ---- stages ---------------------------------------------------------------------------
    def setup(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 1: learn the round's parameters, make two fresh key pairs, advertise the public keys.

        Args:
            request: ``{stage: "setup", round, user, neighbours: [ids], threshold, vector-length,
                modulus-bits}``.

        Returns:
            ``{stage: "setup", round, user, c-public-key: 32 bytes, s-public-key: 32 bytes}``.

        Raises:
            ProtocolError: out of order, addressed to another user, malformed, fewer neighbours than
                ``min_neighbours``, or a threshold that is not a majority of the user and its neighbours.
        """
        self._check_order(m.SETUP)
        if not isinstance(request, Mapping):
            raise ProtocolError(f"a setup message must be a dict, got a {type(request).__name__}")
        round_id = m.get_int(request, m.ROUND)
        request = m.expect(request, m.SETUP, round_id)
        self._check_addressee(request)
        neighbours = m.get_int_list(request, m.NEIGHBOURS)
        if not neighbours or self.user in neighbours:
            raise ProtocolError(f"user {self.user}: the neighbour list must be non-empty and exclude the user")
        if len(neighbours) < self.min_neighbours:
            raise ProtocolError(f"user {self.user} refuses the round: {len(neighbours)} neighbours, its policy "
                                f"asks for at least {self.min_neighbours}")
        threshold = m.get_int(request, m.THRESHOLD)
        try:
            check_threshold(threshold, len(neighbours))
            bits = check_modulus_bits(m.get_int(request, m.MODULUS_BITS))
        except UsageError as exc:
            raise ProtocolError(f"user {self.user} refuses the round: {exc}") from exc
        c_key, s_key = generate_private_key(), generate_private_key()
        self.round_id, self.neighbours, self.threshold = round_id, tuple(sorted(neighbours)), threshold
        self.vector_length, self.modulus_bits = m.get_int(request, m.VECTOR_LENGTH), bits
        self._c_private, self._s_private = private_bytes(c_key), private_bytes(s_key)
        self.stage = _ADVERTISED
        return self._reply(m.SETUP, {m.C_PUBLIC_KEY: public_bytes(c_key), m.S_PUBLIC_KEY: public_bytes(s_key)})

    def share_keys(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 2: Shamir-share b_u and the ``s`` private key among the holders; encrypt each holder's pair.

        Args:
            request: ``{stage: "share-keys", round, user, holders: [ids], c-public-keys: [32 bytes],
                s-public-keys: [32 bytes]}``: the users of this user's neighbourhood that advertised keys,
                itself included, with their keys (aligned lists).

        Returns:
            ``{stage: "share-keys", round, user, receivers: [ids], ciphertexts: [bytes],
            self-mask-commitment: 32 bytes}``; one ciphertext per holder other than the user.

        Raises:
            ProtocolError: out of order or malformed; a holder outside the neighbourhood; fewer holders
                than the threshold; the user's own keys missing or altered; a public key used twice.
        """
        self._check_order(m.SHARE_KEYS)
        request = m.expect(request, m.SHARE_KEYS, self.round_id)
        self._check_addressee(request)
        holders = m.get_int_list(request, m.HOLDERS)
        c_publics = m.get_bytes_list(request, m.C_PUBLIC_KEYS, len(holders), KEY_BYTES)
        s_publics = m.get_bytes_list(request, m.S_PUBLIC_KEYS, len(holders), KEY_BYTES)
        if self.user not in holders or not set(holders) <= set(self.neighbours) | {self.user}:
            raise ProtocolError(f"user {self.user}: the holders must be the user and some of its neighbours")
        if len(holders) < self.threshold:
            raise ProtocolError(f"user {self.user}: {len(holders)} holders cannot reach the threshold "
                                f"{self.threshold}; the user's secrets could not be recovered")
        if len(set(c_publics) | set(s_publics)) != 2 * len(holders):
            raise ProtocolError(f"user {self.user}: a public key appears twice among the holders")
        own = holders.index(self.user)
        c_mine, s_mine = _public_of(self._c_private), _public_of(self._s_private)
        if (c_publics[own], s_publics[own]) != (c_mine, s_mine):
            raise ProtocolError(f"user {self.user}: the server lists other public keys than the user's own")
        ordered = sorted(range(len(holders)), key=holders.__getitem__)
        self._holders = tuple(holders[i] for i in ordered)
        self._c_publics = {holders[i]: c_publics[i] for i in ordered}
        self._s_publics = {holders[i]: s_publics[i] for i in ordered}
        self._seed = os.urandom(KEY_BYTES)
        count = len(self._holders)
        b_shares = split(self._seed, self.threshold, count)
        s_shares = split(self._s_private, self.threshold, count)
        receivers, ciphertexts = [], []
        for holder, b_share, s_share in zip(self._holders, b_shares, s_shares):
            b_raw, s_raw = b_share.to_bytes(), s_share.to_bytes()
            if holder == self.user:
                self._held[self.user] = (b_raw, s_raw)
                continue
            key = m.encryption_key(self._c_private, self.round_id, self.user, holder, c_mine,
                                   self._c_publics[holder])
            plaintext = m.pack_share_plaintext(self.user, holder, b_raw, s_raw)
            receivers.append(holder)
            ciphertexts.append(encrypt(key, plaintext, m.share_associated_data(self.round_id, self.user, holder)))
        self.stage = _SHARED
        commitment = commit(LABEL_SELF_MASK_COMMITMENT, pack_fields(self.round_id, self.user), self._seed)
        return self._reply(m.SHARE_KEYS, {m.RECEIVERS: receivers, m.CIPHERTEXTS: ciphertexts,
                                          m.COMMITMENT: commitment})

    def masked_input(self, request: Mapping[str, Any], vector: np.ndarray) -> dict[str, Any]:
        """Stage 3: store the holders' shares, mask the input, send it.

        ``y_u = x_u + PRG(b_u) + sum_{v in senders, u < v} PRG(s_uv) - sum_{v in senders, u > v} PRG(s_uv)``
        (mod 2^b), with pairwise masks only for the neighbours whose shares arrived: exactly those the
        server can reconstruct if they drop out next.

        Args:
            request: ``{stage: "masked-input", round, user, senders: [ids], ciphertexts: [bytes]}``.
            vector: the user's encoded contribution, ``numpy.uint64`` (vector-length,), values < 2^b
                (``QuantizationPlan.encode``).

        Returns:
            ``{stage: "masked-input", round, user, masked-vector: numpy.uint64 (vector-length,)}``.

        Raises:
            UsageError: ``vector`` of the wrong dtype, shape or range (the caller's own input).
            ProtocolError: out of order or malformed; a sender that is not a holder; a ciphertext that
                fails authentication; fewer live holders than the threshold.
        """
        self._check_order(m.MASKED_INPUT)
        if not isinstance(vector, np.ndarray) or vector.dtype != np.uint64 \
                or vector.shape != (self.vector_length,) \
                or (self.modulus_bits < 64 and vector.size and int(vector.max()) >> self.modulus_bits):
            raise UsageError(f"secure aggregation: user {self.user}'s input must be a uint64 array of shape "
                             f"({self.vector_length},) with values below 2^{self.modulus_bits} "
                             "(QuantizationPlan.encode makes one)")
        request = m.expect(request, m.MASKED_INPUT, self.round_id)
        self._check_addressee(request)
        senders = m.get_int_list(request, m.SENDERS)
        ciphertexts = m.get_bytes_list(request, m.CIPHERTEXTS, len(senders))
        if not set(senders) <= set(self._holders) - {self.user}:
            raise ProtocolError(f"user {self.user}: shares from users that are not its holders")
        if len(senders) + 1 < self.threshold:
            raise ProtocolError(f"user {self.user}: only {len(senders) + 1} live holders, threshold "
                                f"{self.threshold}; the user's secrets could not be recovered")
        c_mine = _public_of(self._c_private)
        held = {}
        for sender, ciphertext in zip(senders, ciphertexts):
            key = m.encryption_key(self._c_private, self.round_id, self.user, sender, c_mine,
                                   self._c_publics[sender])
            plaintext = decrypt(key, ciphertext, m.share_associated_data(self.round_id, sender, self.user))
            b_raw, s_raw = m.unpack_share_plaintext(plaintext, sender, self.user)
            Share.from_bytes(b_raw)  # validate now, not at unmask time
            Share.from_bytes(s_raw)
            held[sender] = (b_raw, s_raw)
        masked = vector.copy()
        d, bits = self.vector_length, self.modulus_bits
        add_mod(masked, m.self_mask(self._seed, self.round_id, self.user, d, bits), bits)
        s_mine = _public_of(self._s_private)
        for peer in senders:
            mask = m.pairwise_mask(self._s_private, self.round_id, self.user, peer, s_mine,
                                   self._s_publics[peer], d, bits)
            (add_mod if self.user < peer else sub_mod)(masked, mask, bits)
        self._held.update(held)
        self._live = tuple(sorted([self.user, *senders]))
        self.stage = _MASKED
        return self._reply(m.MASKED_INPUT, {m.MASKED_VECTOR: masked})

    def unmask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 4: reveal b shares of survivors and s shares of dropouts, never both for one user.

        Args:
            request: ``{stage: "unmask", round, user, survivors: [ids], dropped: [ids]}``: a partition of
                the users whose shares this user holds (itself among the survivors).

        Returns:
            ``{stage: "unmask", round, user, self-mask-owners: [ids], self-mask-shares: [70 bytes],
            mask-key-owners: [ids], mask-key-shares: [70 bytes]}``.

        Raises:
            ProtocolError: out of order or malformed; a user listed as both survivor and dropout, or not
                among those whose shares it holds, or left out; the user itself not a survivor; fewer
                survivors than the threshold.
        """
        self._check_order(m.UNMASK)
        request = m.expect(request, m.UNMASK, self.round_id)
        self._check_addressee(request)
        survivors = m.get_int_list(request, m.SURVIVORS)
        dropped = m.get_int_list(request, m.DROPPED)
        if set(survivors) & set(dropped):
            raise ProtocolError(f"user {self.user} refuses to reveal both the self-mask share and the "
                                "mask-key share of one user")
        if self.user not in survivors:
            raise ProtocolError(f"user {self.user} sent its masked input and cannot be a dropout")
        if set(survivors) | set(dropped) != set(self._live):
            raise ProtocolError(f"user {self.user}: survivors and dropouts must partition the users whose "
                                "shares it holds")
        if len(survivors) < self.threshold:
            raise ProtocolError(f"user {self.user}: {len(survivors)} survivors among its holders, threshold "
                                f"{self.threshold}; unmasking would fail")
        reply = self._reply(m.UNMASK, {
            m.SELF_MASK_OWNERS: survivors, m.SELF_MASK_SHARES: [self._held[v][0] for v in survivors],
            m.MASK_KEY_OWNERS: dropped, m.MASK_KEY_SHARES: [self._held[v][1] for v in dropped]})
        self._forget()
        return reply

    # ---- state ----------------------------------------------------------------------------
    def to_state(self) -> dict[str, int | str | bytes | list[int] | list[bytes]]:
        """The client's whole state as plain values (a Flower ``ConfigRecord``'s types).

        Returns:
            A dict for ``from_state``. Holds private keys and shares: keep it on the device.
        """
        owners = sorted(self._held)
        return {
            "user": self.user, "min-neighbours": self.min_neighbours, "stage": self.stage, "round": self.round_id,
            "neighbours": list(self.neighbours),
            "threshold": self.threshold, "vector-length": self.vector_length, "modulus-bits": self.modulus_bits,
            "c-private": self._c_private, "s-private": self._s_private, "holders": list(self._holders),
            "c-publics": [self._c_publics[v] for v in self._holders],
            "s-publics": [self._s_publics[v] for v in self._holders], "seed": self._seed,
            "held-owners": owners, "held-b": [self._held[v][0] for v in owners],
            "held-s": [self._held[v][1] for v in owners], "live": list(self._live)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Client:
        """Rebuild a client from ``to_state``'s dict.

        Args:
            state: what ``to_state`` returned (lists may come back as tuples).

        Returns:
            The client, in the same stage.

        Raises:
            ProtocolError: a malformed state.
        """
        client = cls(m.get_int(state, "user"), min_neighbours=max(1, m.get_int(state, "min-neighbours")))
        stage = state.get("stage")
        if stage not in (_NEW, _ADVERTISED, _SHARED, _MASKED, _DONE):
            raise ProtocolError(f"unknown secure-aggregation client stage {stage!r}")
        client.stage = stage
        client.round_id, client.threshold = m.get_int(state, "round"), m.get_int(state, "threshold")
        client.vector_length, client.modulus_bits = m.get_int(state, "vector-length"), m.get_int(state, "modulus-bits")
        client.neighbours = tuple(m.get_int_list(state, "neighbours"))
        client._c_private, client._s_private = m.get_bytes(state, "c-private"), m.get_bytes(state, "s-private")
        client._holders = tuple(m.get_int_list(state, "holders"))
        n = len(client._holders)
        client._c_publics = dict(zip(client._holders, m.get_bytes_list(state, "c-publics", n, KEY_BYTES)))
        client._s_publics = dict(zip(client._holders, m.get_bytes_list(state, "s-publics", n, KEY_BYTES)))
        client._seed = m.get_bytes(state, "seed")
        owners = m.get_int_list(state, "held-owners")
        held_b = m.get_bytes_list(state, "held-b", len(owners), SHARE_BYTES)
        held_s = m.get_bytes_list(state, "held-s", len(owners), SHARE_BYTES)
        client._held = {v: (b, s) for v, b, s in zip(owners, held_b, held_s)}
        client._live = tuple(m.get_int_list(state, "live"))
        return client

    # ---- helpers --------------------------------------------------------------------------
    def _check_order(self, stage: str) -> None:
        expected = _NEXT_REQUEST.get(self.stage)
        if stage != expected:
            now = f"expects a {expected!r} request" if expected else "has finished its round"
            raise ProtocolError(f"user {self.user} {now}, not a {stage!r} one (stages run in the order "
                                f"{' -> '.join(m.STAGES)}, each once)")

    def _check_addressee(self, request: Mapping[str, Any]) -> None:
        if m.get_int(request, m.USER) != self.user:
            raise ProtocolError(f"a request for user {request.get(m.USER)!r} reached user {self.user}")

    def _reply(self, stage: str, body: dict[str, Any]) -> dict[str, Any]:
        return {m.STAGE: stage, m.ROUND: self.round_id, m.USER: self.user, **body}

    def _forget(self) -> None:
        self._c_private = self._s_private = self._seed = b""
        self._held = {}
        self.stage = _DONE


def _public_of(private: bytes) -> bytes:
    return public_bytes(load_private_key(private))
