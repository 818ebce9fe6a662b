"""SecAgg+ rounds end to end: real Clients and a real Server exchanging their messages in one process."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from fedpersona.errors import UsageError
from fedpersona.secagg import messages as m
from fedpersona.secagg.client import Client
from fedpersona.secagg.errors import ProtocolError, RoundFailed
from fedpersona.secagg.graph import harary_graph
from fedpersona.secagg.local import RoundStats, run_round
from fedpersona.secagg.masks import add_mod
from fedpersona.secagg.quantize import QuantizationPlan, clip_l2, from_field
from fedpersona.secagg.server import Server
from fedpersona.secagg.shamir import PRIME, Share


def _inputs(n: int, d: int, bits: int, seed: int = 0, first: int = 100) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    top = np.uint64(2**bits - 1) if bits < 64 else np.uint64(2**64 - 1)
    return {first + 7 * i: rng.integers(0, top, d, dtype=np.uint64, endpoint=True) for i in range(n)}


def _plain_sum(inputs: dict[int, np.ndarray], users, bits: int) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for user in users:
        add_mod(total, inputs[user], bits)
    return total


class _Round:
    """Drives one round stage by stage, so a test can step in between."""

    def __init__(self, n: int, d: int = 33, bits: int = 32, **server_args: Any) -> None:
        self.inputs = _inputs(n, d, bits)
        self.users = sorted(self.inputs)
        self.server = Server(self.users, round_id=4, vector_length=d, modulus_bits=bits, **server_args)
        self.clients = {u: Client(u) for u in self.users}

    def answer(self, user: int, request: dict[str, Any]) -> dict[str, Any]:
        client, stage = self.clients[user], request[m.STAGE]
        if stage == m.MASKED_INPUT:
            return client.masked_input(request, self.inputs[user])
        return {m.SETUP: client.setup, m.SHARE_KEYS: client.share_keys, m.UNMASK: client.unmask}[stage](request)

    def stage(self, requests: dict[int, dict[str, Any]], skip=()) -> dict[int, dict[str, Any]]:
        replies = {}
        for user, request in requests.items():
            if user not in skip:
                replies[user] = self.answer(user, request)
                self.server.receive(user, replies[user])
        return replies

    def through_masked_input(self, skip=()) -> dict[int, dict[str, Any]]:
        self.stage(self.server.setup_requests())
        self.stage(self.server.share_keys_requests())
        self.stage(self.server.masked_input_requests(), skip)
        return self.server.unmask_requests()


# ---- correctness -------------------------------------------------------------------------------
@pytest.mark.parametrize("n,bits", [(2, 32), (3, 32), (10, 32), (50, 32), (10, 64), (10, 16)])
def test_sum_equals_the_plain_sum_mod_2_to_the_b(n, bits):
    inputs = _inputs(n, 257, bits, seed=n)
    stats = RoundStats()
    result = run_round(inputs, round_id=9, modulus_bits=bits, stats=stats)
    assert result.included == frozenset(inputs) and not result.dropped
    assert np.array_equal(result.total, _plain_sum(inputs, inputs, bits))
    assert stats.client_seconds > 0 and stats.bytes_up > 257 * 8 * n


def test_large_cohorts_use_the_sparse_graph():
    server = Server(range(50), round_id=0, vector_length=4)
    requests = server.setup_requests()
    assert server.degree == 18 and server.threshold == 10  # sparse: 18 of 49 others
    assert all(len(r[m.NEIGHBOURS]) == 18 for r in requests.values())


def test_quantized_round_matches_the_float_sum_within_the_documented_error():
    rng = np.random.default_rng(7)
    n, d = 10, 300
    plan = QuantizationPlan(clip_norm=1.0, weight_cap=5.0, max_summands=n, modulus_bits=32)
    updates = {u: rng.normal(scale=0.1, size=d) for u in range(n)}
    weights = {u: float(rng.integers(1, 9)) for u in range(n)}
    encoded = {u: plan.encode(updates[u], weights[u], rng) for u in range(n)}
    result = run_round(encoded, modulus_bits=plan.modulus_bits, drop_before={m.MASKED_INPUT: [3]})
    weighted, weight_sum = plan.decode(result.total, len(result.included))
    survivors = sorted(result.included)
    expected = sum(min(weights[u], 5.0) * clip_l2(updates[u], 1.0) for u in survivors)
    assert np.abs(weighted - expected).max() <= plan.error_bound(len(survivors))
    assert abs(weight_sum - sum(min(weights[u], 5.0) for u in survivors)) <= n / plan.weight_scale


# ---- dropouts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,dropped", [(3, [100]), (10, [114, 121]), (50, [100, 107, 170, 268, 443])])
def test_users_dropping_after_key_sharing_are_recovered_exactly(n, dropped):
    inputs = _inputs(n, 65, 32, seed=1)
    result = run_round(inputs, drop_before={m.MASKED_INPUT: dropped})
    assert result.dropped == frozenset(dropped)
    assert result.included == frozenset(inputs) - set(dropped)
    assert np.array_equal(result.total, _plain_sum(inputs, result.included, 32))


def test_dropouts_at_every_stage_leave_an_exact_sum_of_the_senders():
    inputs = _inputs(20, 65, 32, seed=2)
    users = sorted(inputs)
    drops = {m.SHARE_KEYS: users[:2], m.MASKED_INPUT: users[2:4], m.UNMASK: users[4:6]}
    result = run_round(inputs, drop_before=drops, graph_seed=b"g")
    # who answered setup but not share-keys is simply out; who sent its input but not its shares is in
    assert result.included == frozenset(users[4:]) and result.dropped == frozenset(users[2:4])
    assert np.array_equal(result.total, _plain_sum(inputs, users[4:], 32))


def test_round_fails_cleanly_below_the_threshold():
    inputs = _inputs(10, 9, 32)
    users = sorted(inputs)  # complete graph: k = 9, t = 6, at least 6 survivors
    with pytest.raises(RoundFailed, match="at least 6 needed"):
        run_round(inputs, drop_before={m.MASKED_INPUT: users[:5]})
    with pytest.raises(RoundFailed, match="only 5 shares .* threshold 6"):
        run_round(inputs, drop_before={m.UNMASK: users[:5]})  # inputs arrived, too few unmask answers
    with pytest.raises(RoundFailed, match="at least 2"):
        run_round(_inputs(2, 9, 32), drop_before={m.MASKED_INPUT: [100]})
    with pytest.raises(RoundFailed, match="answered the setup stage"):
        run_round(inputs, drop_before={m.SETUP: users[:9]})


def test_round_fails_when_one_users_neighbourhood_drops_below_the_threshold():
    inputs = _inputs(50, 9, 32)  # k = 18, t = 10 of the 19 holders
    victim = 170
    neighbours = harary_graph(sorted(inputs), seed=b"fixed")[victim]
    # 10 of the victim's neighbours drop: 9 holders of its secrets remain, fewer than t
    with pytest.raises(RoundFailed, match=f"only 9 surviving holders of user {victim}'s secrets, threshold 10"):
        run_round(inputs, graph_seed=b"fixed", drop_before={m.MASKED_INPUT: neighbours[:10]})
    # 9 of them: the victim's 10 holders suffice and everything else is exact
    result = run_round(inputs, graph_seed=b"fixed", drop_before={m.MASKED_INPUT: neighbours[:9]})
    assert victim in result.included
    assert np.array_equal(result.total, _plain_sum(inputs, result.included, 32))


def test_a_user_left_with_too_few_holders_before_masking_is_left_out_not_fatal():
    inputs = _inputs(50, 9, 32)
    victim = 170
    graph = harary_graph(sorted(inputs), seed=b"fixed")
    neighbours = graph[victim]
    # 10 of the victim's 18 neighbours never share their keys: 9 holders remain, t = 10
    result = run_round(inputs, graph_seed=b"fixed", drop_before={m.SHARE_KEYS: neighbours[:10]})
    assert victim not in result.included and not result.dropped
    assert np.array_equal(result.total, _plain_sum(inputs, result.included, 32))
    # the users kept are those with t live holders among the kept (users left out cascade through the
    # ring: some of the victim's ring neighbours lose too many holders too), and no one more is left out
    kept = result.included
    left_out = set(inputs) - kept - set(neighbours[:10])
    assert all(len(set(graph[u]) & kept) + 1 >= 10 for u in kept)
    assert all(len(set(graph[u]) & kept) + 1 < 10 for u in left_out)
    assert len(kept) >= 30


# ---- tampering ---------------------------------------------------------------------------------
def _flip_first_ciphertext(direction: str, user: int, message: dict[str, Any]) -> dict[str, Any]:
    if direction == "down" and message[m.STAGE] == m.MASKED_INPUT and user == 114:
        message = dict(message)
        first = bytearray(message[m.CIPHERTEXTS][0])
        first[20] ^= 0x01
        message[m.CIPHERTEXTS] = [bytes(first), *message[m.CIPHERTEXTS][1:]]
    return message


def test_a_flipped_ciphertext_bit_is_detected():
    inputs = _inputs(10, 17, 32)
    with pytest.raises(ProtocolError, match="authentication"):
        run_round(inputs, tap=_flip_first_ciphertext)
    stats = RoundStats()  # the receiving user refuses, drops out, and the others still aggregate
    result = run_round(inputs, tap=_flip_first_ciphertext, strict=False, stats=stats)
    assert list(stats.refused) == [114] and "authentication" in stats.refused[114]
    assert result.dropped == {114}
    assert np.array_equal(result.total, _plain_sum(inputs, result.included, 32))


@pytest.mark.parametrize("kind", [m.SELF_MASK_SHARES, m.MASK_KEY_SHARES])
def test_a_corrupted_unmask_share_fails_the_round(kind):
    def corrupt(direction: str, user: int, message: dict[str, Any]) -> dict[str, Any]:
        if direction == "up" and message[m.STAGE] == m.UNMASK and user == 107 and message[kind]:
            message = dict(message)
            share = Share.from_bytes(message[kind][0])
            message[kind] = [Share(share.index, (share.value + 1) % PRIME).to_bytes(), *message[kind][1:]]
        return message

    with pytest.raises(RoundFailed, match="do not match|inconsistent|do not reconstruct"):
        run_round(_inputs(6, 17, 32), tap=corrupt, drop_before={m.MASKED_INPUT: [135]})


# ---- stage order, duplicates, unknown senders, shapes -----------------------------------------
def test_server_enforces_stage_order():
    r = _Round(5)
    with pytest.raises(ProtocolError, match="stage 'new'"):
        r.server.share_keys_requests()
    setup = r.server.setup_requests()
    early = {m.STAGE: m.SHARE_KEYS, m.ROUND: 4, m.USER: 100}
    with pytest.raises(ProtocolError, match="expected a 'setup' message"):
        r.server.receive(100, early)
    replies = r.stage(setup, skip=[100])
    late = r.answer(100, setup[100])
    share = r.server.share_keys_requests()
    with pytest.raises(ProtocolError, match="expected a 'share-keys' message"):
        r.server.receive(100, late)  # a late setup reply
    with pytest.raises(ProtocolError):
        r.server.aggregate()
    with pytest.raises(ProtocolError):
        r.server.setup_requests()
    assert 100 not in share and set(share) == set(replies)


def test_clients_enforce_stage_order():
    r = _Round(3)
    setup = r.server.setup_requests()
    client = r.clients[100]
    with pytest.raises(ProtocolError, match="expects a 'setup' request"):
        client.share_keys({**setup[100], m.STAGE: m.SHARE_KEYS})
    r.stage(setup)
    with pytest.raises(ProtocolError, match="expects a 'share-keys' request"):
        client.setup(setup[100])
    with pytest.raises(ProtocolError):
        client.masked_input({m.STAGE: m.MASKED_INPUT}, r.inputs[100])
    r.stage(r.server.share_keys_requests())
    r.stage(r.server.masked_input_requests())
    unmask = r.server.unmask_requests()
    reply = client.unmask(unmask[100])
    with pytest.raises(ProtocolError, match="finished its round"):
        client.unmask(unmask[100])  # a second unmask request: no second set of shares
    r.server.receive(100, reply)
    r.stage({u: q for u, q in unmask.items() if u != 100})
    result = r.server.aggregate()
    assert np.array_equal(result.total, _plain_sum(r.inputs, r.users, 32))
    with pytest.raises(ProtocolError, match="not collecting"):
        r.server.receive(100, reply)


def test_refused_replies_leave_the_round_intact():
    r = _Round(10, d=33)
    setup = r.server.setup_requests()
    reply = r.answer(100, setup[100])
    r.server.receive(100, reply)
    bad = [(100, reply, "already answered"), (999, {**reply, m.USER: 999}, "not a participant"),
           (107, reply, "claims to come from"), (107, {**reply, m.USER: 107, m.ROUND: 5}, "round"),
           (107, {**reply, m.USER: 107}, "already in use"),
           (107, {**reply, m.USER: 107, m.C_PUBLIC_KEY: b"short"}, "32 bytes"), (107, "text", "dict")]
    for user, message, match in bad:
        with pytest.raises(ProtocolError, match=match):
            r.server.receive(user, message)
    r.stage({u: q for u, q in setup.items() if u != 100})
    shares = r.stage(r.server.share_keys_requests(), skip=[107])
    forged = {**shares[100], m.USER: 107, m.RECEIVERS: shares[100][m.RECEIVERS][:-1],
              m.CIPHERTEXTS: shares[100][m.CIPHERTEXTS][:-1]}
    with pytest.raises(ProtocolError, match="exactly its"):
        r.server.receive(107, forged)
    masked = r.server.masked_input_requests()
    good = r.answer(114, masked[114])
    vector = good[m.MASKED_VECTOR]
    for wrong, match in ((vector[:-1], "shape"), (vector.astype(np.int64), "uint64"),
                         (np.full_like(vector, 2**32), "outside"), (None, "uint64")):
        with pytest.raises(ProtocolError, match=match):
            r.server.receive(114, {**good, m.MASKED_VECTOR: wrong})
    r.server.receive(114, good)
    r.stage({u: q for u, q in masked.items() if u != 114})
    r.stage(r.server.unmask_requests())
    result = r.server.aggregate()
    assert result.dropped == frozenset() and 107 not in result.included
    assert np.array_equal(result.total, _plain_sum(r.inputs, result.included, 32))


def test_client_input_is_checked_as_the_callers_own():
    r = _Round(3)
    r.stage(r.server.setup_requests())
    r.stage(r.server.share_keys_requests())
    request = r.server.masked_input_requests()[100]
    with pytest.raises(UsageError, match="uint64"):
        r.clients[100].masked_input(request, r.inputs[100].astype(np.float32))
    with pytest.raises(UsageError):
        r.clients[100].masked_input(request, r.inputs[100][:-1])


# ---- the client's own rules --------------------------------------------------------------------
def test_client_never_reveals_both_secrets_of_one_user():
    r = _Round(5)
    unmask = r.through_masked_input(skip=[128])
    request = unmask[100]
    assert request[m.DROPPED] == [128]
    survivor = request[m.SURVIVORS][1]
    client = r.clients[100]
    forged = [({**request, m.DROPPED: [128, survivor]}, "both"),
              ({**request, m.SURVIVORS: [100, survivor], m.DROPPED: [128, *request[m.SURVIVORS][2:]]}, "threshold"),
              ({**request, m.SURVIVORS: request[m.SURVIVORS][1:], m.DROPPED: [100, 128]}, "cannot be a dropout"),
              ({**request, m.SURVIVORS: request[m.SURVIVORS][:-1]}, "partition"),
              ({**request, m.USER: 107}, "reached user 100")]
    for message, match in forged:
        with pytest.raises(ProtocolError, match=match):
            client.unmask(message)
    reply = client.unmask(request)  # the genuine request still works, once
    assert reply[m.SELF_MASK_OWNERS] == request[m.SURVIVORS] and reply[m.MASK_KEY_OWNERS] == [128]


def test_client_refuses_inconsistent_setup_and_keys():
    r = _Round(6)
    setup = r.server.setup_requests()
    client = Client(100)
    with pytest.raises(ProtocolError, match="at least 6"):
        Client(100, min_neighbours=6).setup(setup[100])  # the device's own floor: 5 neighbours are too few
    for message, match in (({**setup[100], m.THRESHOLD: 3}, "majority"),
                           ({**setup[100], m.NEIGHBOURS: []}, "non-empty"),
                           ({**setup[100], m.NEIGHBOURS: [100, 107]}, "exclude"),
                           ({**setup[100], m.MODULUS_BITS: 0}, "modulus_bits")):
        with pytest.raises(ProtocolError, match=match):
            client.setup(message)
    r.stage(setup)
    request = r.server.share_keys_requests()[100]
    client = r.clients[100]
    keys = request[m.C_PUBLIC_KEYS]
    own = request[m.HOLDERS].index(100)
    swapped = list(keys)
    swapped[own] = keys[(own + 1) % len(keys)]
    for message, match in (({**request, m.C_PUBLIC_KEYS: swapped}, "appears twice"),
                           ({**request, m.C_PUBLIC_KEYS: [*keys[:own], bytes(range(32)), *keys[own + 1:]]},
                            "other public keys"),
                           ({**request, m.HOLDERS: [*request[m.HOLDERS][:-1], 999]}, "neighbours"),
                           ({**request, m.HOLDERS: request[m.HOLDERS][:3], m.C_PUBLIC_KEYS: keys[:3],
                             m.S_PUBLIC_KEYS: request[m.S_PUBLIC_KEYS][:3]}, "threshold")):
        with pytest.raises(ProtocolError, match=match):
            client.share_keys(message)
    assert client.share_keys(request)[m.RECEIVERS]  # still in stage, the genuine request works


def test_client_state_survives_serialization_between_stages():
    inputs = _inputs(8, 40, 32, seed=3)
    server = Server(inputs, round_id=2, vector_length=40, modulus_bits=32)
    states = {u: Client(u).to_state() for u in inputs}
    for make in (server.setup_requests, server.share_keys_requests, server.masked_input_requests,
                 server.unmask_requests):
        for user, request in make().items():
            if make == server.masked_input_requests and user == 114:
                continue  # a dropout
            client = Client.from_state(copy.deepcopy({k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in states[user].items()}))
            if request[m.STAGE] == m.MASKED_INPUT:
                reply = client.masked_input(request, inputs[user])
            else:
                stages = {m.SETUP: client.setup, m.SHARE_KEYS: client.share_keys, m.UNMASK: client.unmask}
                reply = stages[request[m.STAGE]](request)
            states[user] = client.to_state()
            server.receive(user, reply)
    result = server.aggregate()
    assert result.dropped == {114}
    assert np.array_equal(result.total, _plain_sum(inputs, result.included, 32))
    assert all(states[u]["c-private"] == b"" and states[u]["stage"] == "done" for u in result.included)


# ---- what the server sees -----------------------------------------------------------------------
def _masked_vectors(inputs, round_id: int) -> dict[int, np.ndarray]:
    seen: dict[int, np.ndarray] = {}

    def tap(direction: str, user: int, message: dict[str, Any]) -> dict[str, Any]:
        if direction == "up" and message[m.STAGE] == m.MASKED_INPUT:
            seen[user] = message[m.MASKED_VECTOR].copy()
        return message

    run_round(inputs, round_id=round_id, tap=tap)
    return seen


def test_masks_differ_per_round_and_per_user():
    d = 1000
    same = np.arange(d, dtype=np.uint64)
    inputs = {1: same.copy(), 2: same.copy(), 3: same.copy()}
    first, second = _masked_vectors(inputs, 1), _masked_vectors(inputs, 1)
    for user in inputs:
        assert np.mean(first[user] == second[user]) < 0.01  # fresh keys every round
        assert np.mean(first[user] == same) < 0.01
    assert np.mean(first[1] == first[2]) < 0.01  # identical inputs, unrelated masked vectors


def test_every_masked_vector_alone_looks_uniform_and_uncorrelated_with_its_input():
    d, bits = 20_000, 32
    plan = QuantizationPlan(clip_norm=1.0, weight_cap=1.0, max_summands=3, modulus_bits=bits)
    rng = np.random.default_rng(8)
    ramp = np.linspace(-1, 1, d - 1)
    inputs = {u: plan.encode(ramp * (u + 1), 1.0, rng) for u in range(3)}  # strongly structured
    for user, masked in _masked_vectors(inputs, 5).items():
        top = (masked >> np.uint64(bits - 4)).astype(np.int64)
        counts = np.bincount(top, minlength=16)
        chi2 = float(((counts - d / 16) ** 2 / (d / 16)).sum())
        assert chi2 < 56.5  # chi-square, 15 degrees of freedom: P(> 56.5) = 1e-6 under uniformity
        signed_input = from_field(inputs[user], bits).astype(np.float64)
        r = np.corrcoef(masked.astype(np.float64), signed_input)[0, 1]
        assert abs(r) < 4.9 / np.sqrt(d)  # |r| beyond 4.9 standard errors: P = 1e-6
