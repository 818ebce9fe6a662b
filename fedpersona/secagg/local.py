"""A whole SecAgg+ round in one process: real ``Client``s and a real ``Server`` exchanging their messages.

Why: the reference loop for wiring the protocol into Flower (one ``*_requests`` call, then one reply per
user, per stage), and the engine of the tests and of ``benchmarks/secagg_core.py``. Dropouts are users
that stop answering from a given stage on; ``tap`` sees (and may alter) every message in transit, as a
curious or tampering network/server would. CPU seconds and message bytes are counted per side.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpersona.errors import UsageError
from fedpersona.secagg import messages as m
from fedpersona.secagg.client import Client
from fedpersona.secagg.errors import ProtocolError
from fedpersona.secagg.server import RoundResult, Server

__all__ = ["RoundStats", "message_bytes", "run_round"]

Tap = Callable[[str, int, dict[str, Any]], dict[str, Any]]  # (direction "down"/"up", user, message)


@dataclass
class RoundStats:
    """Costs of one simulated round.

    Attributes:
        client_seconds: CPU seconds of all clients together (divide by n for one user).
        server_seconds: CPU seconds of the server.
        bytes_down: bytes of all requests (server -> users), as ``message_bytes`` counts them.
        bytes_up: bytes of all replies (users -> server).
        refused: user -> the ``ProtocolError`` text of a client that refused a request (non-strict runs).
    """

    client_seconds: float = 0.0
    server_seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    refused: dict[int, str] = field(default_factory=dict)


def message_bytes(message: Mapping[str, Any]) -> int:
    """Payload bytes of a message: bytes values at length, ints at 8 bytes, arrays at ``nbytes``.

    Keys and framing are not counted (they depend on the transport); a uint64 vector counts 8 bytes
    per coordinate (pack it to b bits on the wire to send b / 8).
    """
    total = 0
    for value in message.values():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, bytes):
                total += len(item)
            elif isinstance(item, np.ndarray):
                total += item.nbytes
            elif isinstance(item, (int, np.integer)):
                total += 8
    return total


def run_round(inputs: Mapping[int, np.ndarray], *, round_id: int = 0, modulus_bits: int = 32,
              degree: int | None = None, threshold: int | None = None, graph_seed: bytes | None = None,
              min_survivors: int | None = None, drop_before: Mapping[str, Collection[int]] | None = None,
              tap: Tap | None = None, strict: bool = True,
              stats: RoundStats | None = None) -> RoundResult:
    """Run one SecAgg+ round over ``inputs`` with every user's own ``Client`` and one ``Server``.

    Args:
        inputs: user id -> its encoded input, ``numpy.uint64`` (d,) with values < 2^b (all the same d).
        round_id, modulus_bits, degree, threshold, graph_seed, min_survivors: as ``Server``.
        drop_before: stage name (``"share-keys"``, ``"masked-input"``, ``"unmask"``, ``"setup"``) -> users
            that stop answering from that stage on (they receive its request but never reply).
        tap: called on every request ("down") and reply ("up") with the user and the message; returns
            the message to deliver (the same, or an altered copy).
        strict: re-raise a client's ``ProtocolError`` (default); else count the user as dropped and
            record the refusal in ``stats.refused``.
        stats: filled with CPU seconds and bytes when given.

    Returns:
        The server's ``RoundResult``.

    Raises:
        ProtocolError: a client refused a request (strict), or the server refused a reply.
        RoundFailed: the round could not complete.
    """
    stats = stats if stats is not None else RoundStats()
    dropouts = {stage: set(users) for stage, users in (drop_before or {}).items()}
    unknown = set(dropouts) - set(m.STAGES)
    if unknown:
        raise UsageError(f"drop_before names unknown stages {sorted(unknown)}; stages: {m.STAGES}")
    gone: set[int] = set()
    lengths = {vector.shape for vector in inputs.values()}
    if len(lengths) != 1:
        raise UsageError("run_round: every input must have the same shape (d,)")
    (d,), = lengths

    started = time.process_time()
    server = Server(inputs, round_id=round_id, vector_length=d, modulus_bits=modulus_bits, degree=degree,
                    threshold=threshold, graph_seed=graph_seed, min_survivors=min_survivors)
    clients = {user: Client(user) for user in inputs}
    stats.server_seconds += time.process_time() - started

    Requests = Callable[[], dict[int, dict[str, Any]]]
    Answer = Callable[[Client, dict[str, Any]], dict[str, Any]]
    steps: list[tuple[str, Requests, Answer]] = [
        (m.SETUP, server.setup_requests, lambda c, r: c.setup(r)),
        (m.SHARE_KEYS, server.share_keys_requests, lambda c, r: c.share_keys(r)),
        (m.MASKED_INPUT, server.masked_input_requests, lambda c, r: c.masked_input(r, inputs[c.user])),
        (m.UNMASK, server.unmask_requests, lambda c, r: c.unmask(r)),
    ]
    for stage, make_requests, answer in steps:
        started = time.process_time()
        requests = make_requests()
        stats.server_seconds += time.process_time() - started
        gone |= dropouts.get(stage, set())
        for user, request in requests.items():
            request = tap("down", user, request) if tap else request
            stats.bytes_down += message_bytes(request)
            if user in gone:
                continue
            started = time.process_time()
            try:
                reply = answer(clients[user], request)
            except ProtocolError as exc:
                if strict:
                    raise
                stats.refused[user] = str(exc)
                gone.add(user)
                continue
            finally:
                stats.client_seconds += time.process_time() - started
            reply = tap("up", user, reply) if tap else reply
            stats.bytes_up += message_bytes(reply)
            started = time.process_time()
            server.receive(user, reply)
            stats.server_seconds += time.process_time() - started
    started = time.process_time()
    result = server.aggregate()
    stats.server_seconds += time.process_time() - started
    return result
