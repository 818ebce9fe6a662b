"""The server's side of a SecAgg+ round: route keys and encrypted shares, sum masked vectors, unmask the sum.

The server is the protocol's only router (users never talk directly), so it sees every message; what
it can learn is bounded by what the messages hold: public keys, ciphertexts it cannot open (AES-GCM
under keys agreed between users), masked vectors that are uniform mod 2^b one by one, and, at the end,
for each user *either* the shares of its self-mask seed (it survived) *or* those of its mask key (it
dropped), from which it removes exactly the masks that do not cancel. It keeps only the running sum of
masked vectors (O(d) memory, whatever n), never an individual one.

Users that do not answer a stage simply leave the round: before sharing keys they are forgotten; after
sharing keys but before their masked input, they are *dropped* and their pairwise masks with survivors
are reconstructed from their neighbours' shares (the sum of the survivors stays exact); after their
masked input, their self mask is reconstructed from their neighbours' shares. When too few answer, the
round fails with ``RoundFailed`` and no sum. Stages are strictly ordered; a reply of another stage, of
another round, from an unknown or already-answered user, or of the wrong shape is refused with a
``ProtocolError`` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from fedpersona.errors import UsageError
from fedpersona.secagg import messages as m
from fedpersona.secagg.crypto import (
    KEY_BYTES,
    LABEL_SELF_MASK_COMMITMENT,
    commit,
    load_private_key,
    load_public_key,
    pack_fields,
    public_bytes,
)
from fedpersona.secagg.errors import ProtocolError, RoundFailed
from fedpersona.secagg.graph import check_threshold, default_threshold, harary_graph
from fedpersona.secagg.masks import (
    add_mod,
    check_field_vector,
    check_modulus_bits,
    sub_mod,
)
from fedpersona.secagg.shamir import SHARE_BYTES, Share, combine

__all__ = ["RoundResult", "Server"]

_NEW, _DONE, _FAILED = "new", "done", "failed"


@dataclass(frozen=True)
class RoundResult:
    """What a completed round yields.

    Attributes:
        total: ``numpy.uint64`` (vector-length,): the sum mod 2^b of the included users' inputs
            (``QuantizationPlan.decode`` turns it back into floats and checks its bound).
        included: the users whose inputs are in ``total`` (they sent their masked vectors).
        dropped: users that shared keys but sent no masked vector: not in ``total``, masks removed.
    """

    total: np.ndarray
    included: frozenset[int]
    dropped: frozenset[int]


class Server:
    """The server of one SecAgg+ round (Bonawitz et al. CCS 2017; Bell et al. CCS 2020).

    Args:
        users: the round's sampled users (distinct ids in [0, 2^64)), n >= 2.
        round_id: the round's number; bound into every key, mask and ciphertext.
        vector_length: d, coordinates of every input (``QuantizationPlan.vector_length``).
        modulus_bits: b, inputs are mod 2^b (``QuantizationPlan.modulus_bits``).
        degree: k, neighbours per user (default ``graph.default_degree(n)``; >= n - 1: plain SecAgg).
        threshold: t, shares needed to reconstruct a user's secret (default ``graph.default_threshold``).
        graph_seed: seed of the random graph (default: fresh random bytes).
        min_survivors: the fewest users whose sum the server may output (default max(2, t)).

    Raises:
        UsageError: a parameter out of range (fewer than 2 users, a threshold that is not a majority).

    Drive it: ``setup_requests()``, ``receive(user, reply)`` for each reply, ``share_keys_requests()``,
    ``receive`` ..., ``masked_input_requests()``, ``receive`` ..., ``unmask_requests()``, ``receive`` ...,
    ``aggregate()``. Each ``*_requests`` call closes the previous stage with the replies received so far
    (the deadline passed) and returns {user: request} for the users still in the round.
    """

    def __init__(self, users: Iterable[int], *, round_id: int, vector_length: int, modulus_bits: int = 32,
                 degree: int | None = None, threshold: int | None = None, graph_seed: bytes | None = None,
                 min_survivors: int | None = None) -> None:
        members = list(users)
        for user in members:
            if isinstance(user, bool) or not isinstance(user, int) or not 0 <= user < 2**64:
                raise UsageError(f"secure aggregation: user id {user!r} must be an integer in [0, 2^64)")
        for name, value in (("round_id", round_id), ("vector_length", vector_length)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise UsageError(f"secure aggregation: {name}={value!r} must be a non-negative integer")
        self.round_id, self.vector_length = round_id, vector_length
        self.modulus_bits = check_modulus_bits(modulus_bits)
        self.graph = harary_graph(members, degree, graph_seed)
        self.degree = len(next(iter(self.graph.values())))
        self.threshold = default_threshold(self.degree) if threshold is None \
            else check_threshold(threshold, self.degree)
        self.min_survivors = max(2, self.threshold) if min_survivors is None else min_survivors
        if isinstance(self.min_survivors, bool) or not isinstance(self.min_survivors, int) \
                or self.min_survivors < 2:
            raise UsageError(f"secure aggregation: min_survivors={min_survivors!r} must be an integer >= 2 "
                             "(the sum of one user is that user's input)")
        self.stage = _NEW
        self._expected: frozenset[int] = frozenset(self.graph)
        self._answered: set[int] = set()
        self._c_publics: dict[int, bytes] = {}
        self._s_publics: dict[int, bytes] = {}
        self._keys_seen: set[bytes] = set()
        self._holders: dict[int, tuple[int, ...]] = {}  # N1[u], u included
        self._inbox: dict[int, dict[int, bytes]] = {}  # receiver -> sender -> ciphertext
        self._commitments: dict[int, bytes] = {}
        self._live: dict[int, tuple[int, ...]] = {}  # N2[u], u included
        self._total = np.zeros(0, dtype=np.uint64)
        self._requested: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        self._self_mask_shares: dict[int, list[Share]] = {}
        self._mask_key_shares: dict[int, list[Share]] = {}

    # ---- requests (each closes the previous stage) -------------------------------------------
    def setup_requests(self) -> dict[int, dict[str, Any]]:
        """Open the round: each user's neighbours and the round's parameters.

        Returns:
            {user: ``{stage: "setup", round, user, neighbours, threshold, vector-length, modulus-bits}``}.
        """
        self._advance(_NEW, m.SETUP, frozenset(self.graph))
        return {u: self._request(m.SETUP, u, {
            m.NEIGHBOURS: list(self.graph[u]), m.THRESHOLD: self.threshold,
            m.VECTOR_LENGTH: self.vector_length, m.MODULUS_BITS: self.modulus_bits}) for u in sorted(self.graph)}

    def share_keys_requests(self) -> dict[int, dict[str, Any]]:
        """Close setup (U1 = users that advertised keys); send each its neighbourhood's public keys.

        Returns:
            {user in U1: ``{stage: "share-keys", round, user, holders, c-public-keys, s-public-keys}``}.
            A user with fewer than ``threshold`` holders among U1 (itself included) is left out (it would
            refuse: its secrets could never be reconstructed), and so on until every user kept has enough.

        Raises:
            RoundFailed: fewer than ``min_survivors`` users advertised keys.
        """
        advertised = self._keep_recoverable(self._advance(m.SETUP, m.SHARE_KEYS),
                                            {u: (u, *self.graph[u]) for u in self.graph}, "advertised keys")
        requests = {}
        for u in sorted(advertised):
            holders = tuple(sorted({u} | (set(self.graph[u]) & advertised)))
            self._holders[u] = holders
            requests[u] = self._request(m.SHARE_KEYS, u, {
                m.HOLDERS: list(holders), m.C_PUBLIC_KEYS: [self._c_publics[v] for v in holders],
                m.S_PUBLIC_KEYS: [self._s_publics[v] for v in holders]})
        self._inbox = {u: {} for u in advertised}
        return requests

    def masked_input_requests(self) -> dict[int, dict[str, Any]]:
        """Close key sharing (U2 = users whose encrypted shares arrived); route the shares to their holders.

        Returns:
            {user in U2: ``{stage: "masked-input", round, user, senders, ciphertexts}``}. A user left with
            fewer than ``threshold`` live holders (itself included) is left out of U2, as if it had not
            shared: its secrets could not be reconstructed, and no one masks with it.

        Raises:
            RoundFailed: fewer than ``min_survivors`` users shared their keys.
        """
        shared = self._keep_recoverable(self._advance(m.SHARE_KEYS, m.MASKED_INPUT), self._holders,
                                        "shared keys")
        requests = {}
        for u in sorted(shared):
            senders = sorted(v for v in self._inbox[u] if v in shared)
            self._live[u] = tuple(sorted([u, *senders]))
            requests[u] = self._request(m.MASKED_INPUT, u, {
                m.SENDERS: senders, m.CIPHERTEXTS: [self._inbox[u][v] for v in senders]})
        self._inbox = {}
        self._total = np.zeros(self.vector_length, dtype=np.uint64)
        return requests

    def unmask_requests(self) -> dict[int, dict[str, Any]]:
        """Close masked input (U3 = users whose masked vectors arrived); ask each for the shares it holds.

        Returns:
            {user in U3: ``{stage: "unmask", round, user, survivors, dropped}``}: survivors and dropouts
            among the users whose shares it holds.

        Raises:
            RoundFailed: fewer than ``min_survivors`` masked vectors, or a user whose secret fewer than
                ``threshold`` survivors hold (its mask could never be removed).
        """
        survived = self._advance(m.MASKED_INPUT, m.UNMASK)
        for u in sorted(self._live):
            holders_alive = len(set(self._live[u]) & survived)
            needed = u in survived or holders_alive > 0  # a dropout's masks matter only next to survivors
            if needed and holders_alive < self.threshold:
                self._fail(f"only {holders_alive} surviving holders of user {u}'s secrets, threshold "
                           f"{self.threshold}")
        requests = {}
        for u in sorted(survived):
            alive = frozenset(self._live[u]) & survived
            dropped = frozenset(self._live[u]) - survived
            self._requested[u] = (alive, dropped)
            requests[u] = self._request(m.UNMASK, u, {m.SURVIVORS: sorted(alive), m.DROPPED: sorted(dropped)})
        return requests

    def aggregate(self) -> RoundResult:
        """Close unmasking: reconstruct the secrets, remove the masks that do not cancel, return the sum.

        Returns:
            The ``RoundResult``: the sum mod 2^b of the survivors' inputs, survivors and dropouts.

        Raises:
            RoundFailed: fewer than ``threshold`` shares of a secret arrived, or the shares do not
                reconstruct the committed secret (a holder sent a corrupted share).
        """
        self._advance(m.UNMASK, _DONE)
        survived = frozenset(self._requested)
        dropped = frozenset(self._live) - survived
        total = self._total
        for u in sorted(survived):
            seed = self._reconstruct(u, self._self_mask_shares.get(u, []), "self-mask seed")
            expected = commit(LABEL_SELF_MASK_COMMITMENT, pack_fields(self.round_id, u), seed)
            if expected != self._commitments[u]:
                self._fail(f"the shares of user {u}'s self-mask seed do not match its commitment")
            sub_mod(total, m.self_mask(seed, self.round_id, u, self.vector_length, self.modulus_bits),
                    self.modulus_bits)
        for v in sorted(dropped):
            neighbours = sorted(set(self._live[v]) & survived)
            if not neighbours:
                continue
            s_private = self._reconstruct(v, self._mask_key_shares.get(v, []), "mask key")
            if public_bytes(load_private_key(s_private)) != self._s_publics[v]:
                self._fail(f"the shares of user {v}'s mask key do not match its advertised public key")
            for w in neighbours:  # w added +mask if w < v, -mask otherwise: take it back out
                mask = m.pairwise_mask(s_private, self.round_id, v, w, self._s_publics[v], self._s_publics[w],
                                       self.vector_length, self.modulus_bits)
                (sub_mod if w < v else add_mod)(total, mask, self.modulus_bits)
        self.stage = _DONE
        self._total = np.zeros(0, dtype=np.uint64)
        return RoundResult(total=total, included=survived, dropped=dropped)

    # ---- replies ----------------------------------------------------------------------------
    def receive(self, user: int, reply: Mapping[str, Any]) -> None:
        """Take one user's reply to the current stage's request.

        Args:
            user: the sender as the transport authenticated it (Flower's source node / the user's id).
            reply: the reply the user's ``Client`` returned.

        Raises:
            ProtocolError: no stage is collecting replies; a reply of another stage or round; a user that
                is not in this stage or already answered; a reply naming another user; wrong keys,
                types, lengths or values. The server's state is unchanged by a refused reply.
        """
        if self.stage not in m.STAGES:
            raise ProtocolError(f"the server is not collecting replies (round {self.stage})")
        reply = m.expect(reply, self.stage, self.round_id)
        if m.get_int(reply, m.USER) != user:
            raise ProtocolError(f"a reply from user {user} claims to come from user {reply.get(m.USER)!r}")
        if user not in self._expected:
            raise ProtocolError(f"user {user} is not a participant of the {self.stage} stage")
        if user in self._answered:
            raise ProtocolError(f"user {user} already answered the {self.stage} stage")
        {m.SETUP: self._on_setup, m.SHARE_KEYS: self._on_share_keys, m.MASKED_INPUT: self._on_masked_input,
         m.UNMASK: self._on_unmask}[self.stage](user, reply)
        self._answered.add(user)

    def _on_setup(self, user: int, reply: Mapping[str, Any]) -> None:
        c_public = m.get_bytes(reply, m.C_PUBLIC_KEY, KEY_BYTES)
        s_public = m.get_bytes(reply, m.S_PUBLIC_KEY, KEY_BYTES)
        load_public_key(c_public)
        load_public_key(s_public)
        if c_public == s_public or c_public in self._keys_seen or s_public in self._keys_seen:
            raise ProtocolError(f"user {user} advertises a public key already in use")
        self._c_publics[user], self._s_publics[user] = c_public, s_public
        self._keys_seen.update((c_public, s_public))

    def _on_share_keys(self, user: int, reply: Mapping[str, Any]) -> None:
        receivers = m.get_int_list(reply, m.RECEIVERS)
        if set(receivers) != set(self._holders[user]) - {user}:
            raise ProtocolError(f"user {user} must send shares to exactly its {len(self._holders[user]) - 1} "
                                f"holders, sent {len(receivers)}")
        ciphertexts = m.get_bytes_list(reply, m.CIPHERTEXTS, len(receivers))
        self._commitments[user] = m.get_bytes(reply, m.COMMITMENT, KEY_BYTES)
        for receiver, ciphertext in zip(receivers, ciphertexts):
            self._inbox[receiver][user] = ciphertext

    def _on_masked_input(self, user: int, reply: Mapping[str, Any]) -> None:
        vector = check_field_vector(reply.get(m.MASKED_VECTOR), self.vector_length, self.modulus_bits,
                                    f"user {user}'s masked vector")
        add_mod(self._total, vector, self.modulus_bits)

    def _on_unmask(self, user: int, reply: Mapping[str, Any]) -> None:
        alive, dropped = self._requested[user]
        parsed = []
        for owners_key, shares_key, wanted in ((m.SELF_MASK_OWNERS, m.SELF_MASK_SHARES, alive),
                                               (m.MASK_KEY_OWNERS, m.MASK_KEY_SHARES, dropped)):
            owners = m.get_int_list(reply, owners_key)
            if set(owners) != wanted:
                raise ProtocolError(f"user {user}'s {owners_key} are not the users it was asked about")
            raw = m.get_bytes_list(reply, shares_key, len(owners), SHARE_BYTES)
            parsed.append([(owner, Share.from_bytes(share)) for owner, share in zip(owners, raw)])
        for owner, share in parsed[0]:
            self._self_mask_shares.setdefault(owner, []).append(share)
        for owner, share in parsed[1]:
            self._mask_key_shares.setdefault(owner, []).append(share)

    # ---- helpers ------------------------------------------------------------------------------
    def _advance(self, current: str, following: str, expected: frozenset[int] | None = None) -> frozenset[int]:
        if self.stage != current:
            raise ProtocolError(f"the server is in stage {self.stage!r}; the next step needs {current!r} "
                                f"(stages run in the order {' -> '.join(m.STAGES)}, each once)")
        answered = frozenset(self._answered)
        if current != _NEW and following != _DONE and len(answered) < self.min_survivors:
            self._fail(f"only {len(answered)} users answered the {current} stage, at least "
                       f"{self.min_survivors} needed")
        self.stage = following
        self._expected = answered if expected is None else expected
        self._answered = set()
        return answered

    def _keep_recoverable(self, answered: frozenset[int], holders: Mapping[int, Iterable[int]],
                          what: str) -> frozenset[int]:
        """The largest subset of ``answered`` where every user keeps ``threshold`` holders in the subset."""
        kept = set(answered)
        while True:
            weak = {u for u in kept if len(set(holders[u]) & kept) < self.threshold}
            if not weak:
                break
            kept -= weak
        if len(kept) < self.min_survivors:
            self._fail(f"only {len(kept)} of the {len(answered)} users that {what} keep {self.threshold} "
                       f"live holders, at least {self.min_survivors} needed")
        self._expected = frozenset(kept)
        return frozenset(kept)

    def _reconstruct(self, owner: int, shares: list[Share], what: str) -> bytes:
        if len(shares) < self.threshold:
            self._fail(f"only {len(shares)} shares of user {owner}'s {what} arrived, threshold {self.threshold}")
        try:
            secret = combine(shares)
        except ProtocolError as exc:
            self._fail(f"the shares of user {owner}'s {what} are inconsistent ({exc})")
        if len(secret) != KEY_BYTES:
            self._fail(f"the shares of user {owner}'s {what} do not reconstruct {KEY_BYTES} bytes")
        return secret

    def _fail(self, reason: str) -> NoReturn:
        self.stage = _FAILED
        self._total = np.zeros(0, dtype=np.uint64)
        raise RoundFailed(f"secure aggregation round {self.round_id} failed: {reason}")

    def _request(self, stage: str, user: int, body: dict[str, Any]) -> dict[str, Any]:
        return {m.STAGE: stage, m.ROUND: self.round_id, m.USER: user, **body}
