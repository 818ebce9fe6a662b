"""Secure aggregation over Flower's Message API: the strategy aggregates the users' sum, never one update.

Design: a Grid wrapper. Flower's ``Strategy.start`` samples users, sends each the same TRAIN message
(``configure_train``) through ``grid.send_and_receive`` and aggregates the replies (``aggregate_train``).
``SecureAggregationGrid`` takes that one call: instead of pushing the TRAIN message, it runs a SecAgg+
round (``fedpersona.secagg``; Bonawitz et al. CCS 2017, Bell et al. CCS 2020) with the sampled users as
its participants, four stages of ``train.secure_aggregation`` messages through the grid below it, and
returns **one** synthetic reply: the global tensors plus the users' weighted-average update
(``ArrayRecord``), with ``num-examples`` (the included users' mean weight), the total weight
(``secagg-weight-sum``) and the number of users in the sum (``secagg-users``) (``MetricRecord``).

1. setup: each user's neighbours in the SecAgg+ graph, the threshold, the vector length; two fresh key
   pairs come back (public halves).
2. share-keys: the neighbourhood's public keys; encrypted Shamir shares and a commitment come back.
3. masked-input: the TRAIN message's content (global tensors, run config) plus the quantization plan and
   the shares addressed to the user; the device trains, bounds and quantizes its update (shared tensors
   minus what it received: L2-clipped, weight capped, ``QuantizationPlan``), masks it and sends the
   masked vector (packed to b bits, ``secagg.wire``). A device that declines sends a zero contribution
   of weight 0, indistinguishable from a trained one.
4. unmask: who survived and who dropped; the shares that remove the masks come back. The server
   reconstructs the masks, and decodes and checks the sum (``QuantizationPlan.decode``: within n times
   the bound, coordinate-wise and in L2); the average update is ``weighted sum / weight sum``.

Why a Grid wrapper (not a Strategy wrapper, not Flower's legacy ``SecAggPlusWorkflow``): the strategy's
own ``configure_train`` (sampling, FedProx's mu, DP-FedAvg's clipping norm) and ``aggregate_train`` run
unchanged, so every sum-only strategy (``fedpersona.strategies.secure``), the reply screen, the recorder
and user-level DP (its noise lands on the average of the unmasked sum) work as they are; the wrapper is the
only server code that touches protocol messages, so nothing else on the server can reach a masked
vector; evaluation messages pass through. Simulations put it over ``UserGrid`` (per-user requests packed
into cohort messages, each simulated user its own participant with its own keys), deployments over
``ProgressGrid`` (one device, one participant).

Checks: every reply must hold exactly the protocol's records (``secagg.reply``, and at masked-input
``secagg.vector``), come from the node it was sent to, and pass the protocol's own checks (stage, round,
duplicates, lengths; ``secagg.server``). A reply that breaks them is dropped (``ProtocolError``): that
user counts as a dropout and the round goes on. A ``RoundFailed`` (too few users left, shares that do not
reconstruct, a sum outside its bound) ends the round without a sum: the strategy gets no reply and the
global adapter stays. Each stage waits at most the round timeout for its replies (a device that dies
mid-round shows up as an error reply once Flower's SuperLink notices it, or as a missing one).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedpersona.errors import UsageError
from fedpersona.protocol import (ARRAYS, METRICS, NUM_EXAMPLES, SECAGG_PLAN, SECAGG_REPLY, SECAGG_REQUEST,
                                 SECAGG_VECTOR, SECURE_AGGREGATION_ACTION)
from fedpersona.secagg import ProtocolError, QuantizationPlan, RoundFailed, Server
from fedpersona.secagg import messages as m
from fedpersona.secagg.local import message_bytes
from fedpersona.secagg.wire import unpack_vector
from fedpersona.server.progress_grid import DelegatingGrid

log = logging.getLogger(__name__)

SECURE_TRAIN = f"{MessageType.TRAIN}.{SECURE_AGGREGATION_ACTION}"
AGGREGATE_NODE = 0  # the synthetic reply's source: no user's node
CLIPPING_NORM_KEY = "clipping_norm"  # DP-FedAvg's clip, put in the train config by Flower's wrapper
WEIGHT_SUM_KEY = "secagg-weight-sum"
USERS_KEY = "secagg-users"
PLAN_KEYS = ("clip-norm", "weight-cap", "max-summands", "modulus-bits")


@dataclass(frozen=True)
class SecureSettings:
    """How the server runs secure aggregation (from ``RunConfig``'s secure-aggregation settings).

    Attributes:
        clip_norm: C, the L2 bound of one device's update (DP-FedAvg's clipping norm replaces it when the
            train config carries one).
        weight_cap: W, the largest weight one device adds (1 under user-level DP: every user weighs 1).
        modulus_bits: b, bits per coordinate.
        wave_bytes: the masked-input stage asks users in waves whose masked vectors (as uint64) take at
            most this many bytes together, so a round of 1,000 users with a large adapter never holds
            every vector at once on the server.
    """

    clip_norm: float = 10.0
    weight_cap: float = 1000.0
    modulus_bits: int = 32
    wave_bytes: int = 1 << 31

    @classmethod
    def from_config(cls, config: Any) -> SecureSettings:
        """The settings of a ``RunConfig``."""
        return cls(clip_norm=config.secure_aggregation_clip,
                   weight_cap=1.0 if config.user_dp_noise > 0 else config.secure_aggregation_weight_cap,
                   modulus_bits=config.secure_aggregation_bits)

    def plan(self, train_config: Mapping[str, Any], num_users: int) -> QuantizationPlan:
        """The round's ``QuantizationPlan`` (UsageError: b too small for ``num_users``)."""
        clip = float(train_config.get(CLIPPING_NORM_KEY, 0) or 0) or self.clip_norm
        return QuantizationPlan(clip_norm=clip, weight_cap=self.weight_cap, max_summands=num_users,
                                modulus_bits=self.modulus_bits)


@dataclass
class SecureRoundReport:
    """What one secure round did, for metrics.jsonl (``row``) and the run's summary.

    Attributes:
        server_round: the round.
        sampled: users the strategy sampled (the setup stage's participants).
        included: users whose contributions are in the sum.
        refused: reason -> replies dropped by a check (``ProtocolError``) or declined by the device.
        failed: why the round ended without a sum (None: it produced one).
        bytes_down: bytes sent to users, all stages (requests and, at masked-input, the global tensors).
        bytes_up: bytes users sent, all stages (protocol values and packed masked vectors).
        server_seconds: the server's CPU seconds for the protocol (this thread; waiting not counted).
        weight_sum: the unmasked total weight.
    """

    server_round: int
    sampled: int = 0
    included: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    failed: str | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    server_seconds: float = 0.0
    weight_sum: float = 0.0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def row(self) -> dict[str, Any]:
        """The round's metrics.jsonl entries (``train_replies``: the users in the sum)."""
        return {"train_replies": self.included, "secure_aggregation_users": self.sampled,
                "secure_aggregation_dropped": self.sampled - self.included,
                "secure_aggregation_refused": dict(sorted(self.refused.items())),
                "secure_aggregation_failed": self.failed,
                "secure_aggregation_weight_sum": self.weight_sum,
                "secure_aggregation_server_seconds": round(self.server_seconds, 4),
                "bytes_up_mean": self.bytes_up / self.sampled if self.sampled else 0.0,
                "bytes_down_mean": self.bytes_down / self.sampled if self.sampled else 0.0}


def record_bytes(record: Any) -> int:
    """Payload bytes of a record: an ArrayRecord's arrays; a Config/MetricRecord's values (strings at their
    UTF-8 length, numbers at 8 bytes, bytes at length; ``secagg.local.message_bytes``). Keys and framing are
    not counted, for the protocol's messages and a plain reply alike."""
    if isinstance(record, ArrayRecord):
        return sum(len(record[key].data) for key in record.keys())
    values = dict(record)
    strings = sum(len(v.encode()) for v in values.values() if isinstance(v, str))
    return message_bytes(values) + strings


def flatten(arrays: ArrayRecord) -> np.ndarray:
    """The tensors of ``arrays`` in their order, raveled and joined: float64 (d,)."""
    parts = [arrays[key].numpy().astype(np.float64).ravel() for key in arrays.keys()]
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(values: np.ndarray, like: ArrayRecord) -> ArrayRecord:
    """``values`` (d,) cut into the keys, shapes and dtypes of ``like`` (its order)."""
    out, start = {}, 0
    for key in like.keys():
        reference = like[key].numpy()
        out[key] = Array(values[start : start + reference.size].reshape(reference.shape).astype(reference.dtype))
        start += reference.size
    return ArrayRecord(out)


class SecureAggregationGrid(DelegatingGrid):
    """Runs every training call as a SecAgg+ round (see the module docstring); everything else passes through.

    Args:
        inner: the grid users are reached through (``UserGrid`` or ``ProgressGrid``).
        settings: the round's bounds and bits.
        on_round: called with each round's ``SecureRoundReport`` when the round ends (failed or not).
    """

    def __init__(self, inner: Grid, settings: SecureSettings,
                 on_round: Callable[[SecureRoundReport], None] | None = None) -> None:
        super().__init__(inner)
        self.settings = settings
        self.on_round = on_round
        self.reports: list[SecureRoundReport] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(msg.metadata.message_type != MessageType.TRAIN for msg in messages):
            return self.inner.send_and_receive(messages, timeout=timeout)
        content = messages[0].content
        server_round = int(content.config_records["config"].get("server-round", 0)) \
            if "config" in content.config_records else 0
        report = SecureRoundReport(server_round, sampled=len(messages))
        try:
            if any(msg.content is not content for msg in messages):
                raise RoundFailed("the strategy sent its users different contents; secure aggregation sends "
                                  "every user the same global tensors and config")
            replies = _SecureRound(self, messages, content, report, timeout).run()
        except (RoundFailed, UsageError) as exc:
            report.failed = str(exc).splitlines()[0][:300]
            log.warning("round %s: secure aggregation produced no sum: %s", server_round, report.failed)
            replies = []
        self.reports.append(report)
        if self.on_round is not None:
            self.on_round(report)
        return replies

    def summary(self) -> dict[str, Any]:
        """summary.json's secure-aggregation keys (and the true bytes each user sent per round)."""
        reports = self.reports
        sampled = sum(r.sampled for r in reports)
        return {"secure_aggregation": True,
                "secure_aggregation_failed_rounds": sum(r.failed is not None for r in reports),
                "secure_aggregation_users_included": sum(r.included for r in reports),
                "secure_aggregation_server_seconds": round(sum(r.server_seconds for r in reports), 3),
                "bytes_up_per_client_round": sum(r.bytes_up for r in reports) / sampled if sampled else 0.0}


class _SecureRound:
    """One SecAgg+ round over the grid: the four exchanges, then the synthetic reply."""

    def __init__(self, grid: SecureAggregationGrid, messages: list[Message], content: RecordDict,
                 report: SecureRoundReport, timeout: float | None) -> None:
        self.grid, self.inner, self.report, self.timeout = grid, grid.inner, report, timeout
        self.content = content
        self.arrays = content.array_records.get(ARRAYS, ArrayRecord())
        self.config = content.config_records.get("config", ConfigRecord())
        self.users = [int(msg.metadata.dst_node_id) for msg in messages]
        started = time.thread_time()
        self.base = flatten(self.arrays)
        self.plan = grid.settings.plan(self.config, len(self.users))
        self.server = Server(self.users, round_id=report.server_round,
                             vector_length=self.plan.vector_length(self.base.size),
                             modulus_bits=self.plan.modulus_bits)
        report.server_seconds += time.thread_time() - started

    def run(self) -> list[Message]:
        server = self.server
        self._exchange(m.SETUP, self._timed(server.setup_requests))
        self._exchange(m.SHARE_KEYS, self._timed(server.share_keys_requests))
        requests = self._timed(server.masked_input_requests)
        plan = ConfigRecord({"clip-norm": self.plan.clip_norm, "weight-cap": self.plan.weight_cap,
                             "max-summands": self.plan.max_summands, "modulus-bits": self.plan.modulus_bits})
        shared = {key: record for key, record in self.content.items()}
        shared[SECAGG_PLAN] = plan
        wave = max(1, self.grid.settings.wave_bytes // max(8 * server.vector_length, 1))
        users = [user for user in self.users if user in requests]  # in waves, in the strategy's order
        for start in range(0, len(users), wave):
            self._exchange(m.MASKED_INPUT, {u: requests[u] for u in users[start : start + wave]}, shared)
        self._exchange(m.UNMASK, self._timed(server.unmask_requests))
        return self._timed(self._aggregate)

    def _timed(self, work: Callable[[], Any]) -> Any:
        started = time.thread_time()
        try:
            return work()
        finally:
            self.report.server_seconds += time.thread_time() - started

    def _exchange(self, stage: str, requests: Mapping[int, dict[str, Any]],
                  shared: Mapping[str, Any] | None = None) -> None:
        """Send a stage's requests (one message per user, ``shared`` records beside each), feed the replies."""
        shared = dict(shared or {})
        outgoing, started = [], time.thread_time()
        shared_bytes = sum(record_bytes(record) for record in shared.values())
        requests = {user: requests[user] for user in self.users if user in requests}  # the strategy's order
        for user, request in requests.items():
            content = RecordDict({**shared, SECAGG_REQUEST: ConfigRecord(dict(request))})
            outgoing.append(Message(content=content, dst_node_id=user, message_type=SECURE_TRAIN,
                                    group_id=str(self.report.server_round)))
            self.report.bytes_down += message_bytes(request) + shared_bytes
        self.report.server_seconds += time.thread_time() - started
        if not outgoing:
            return
        replies = list(self.inner.send_and_receive(outgoing, timeout=self.timeout))
        started = time.thread_time()
        addressee = {msg.metadata.message_id: user for msg, user in zip(outgoing, requests, strict=True)}
        for reply in replies:
            user = addressee.pop(reply.metadata.reply_to_message_id, None)
            if user is None:
                continue  # not an answer to this stage (or a second one): ignored
            if reply.has_error():
                self.report.refuse(f"{stage}: no reply")
                continue
            try:
                parsed, size = self._parse(stage, user, reply)
                self.report.bytes_up += size
                self.server.receive(user, parsed)
            except ProtocolError as exc:
                reason = "declined" if not len(reply.content) else "protocol-error"
                self.report.refuse(f"{stage}: {reason}")
                if reason != "declined":
                    log.warning("round %s: %s reply of user %s dropped: %s", self.report.server_round, stage, user,
                                str(exc).splitlines()[0][:300])
        for _ in addressee:  # no reply before the timeout
            self.report.refuse(f"{stage}: no reply")
        self.report.server_seconds += time.thread_time() - started

    def _parse(self, stage: str, user: int, reply: Message) -> tuple[dict[str, Any], int]:
        """A reply's protocol dict and its payload bytes; ProtocolError for anything but the protocol's records."""
        if int(reply.metadata.src_node_id) != user:
            raise ProtocolError(f"a reply to user {user}'s {stage} request came from node {reply.metadata.src_node_id}")
        content = reply.content
        expected = {SECAGG_REPLY} | ({SECAGG_VECTOR} if stage == m.MASKED_INPUT else set())
        if set(content.keys()) != expected or SECAGG_REPLY not in content.config_records:
            raise ProtocolError(f"user {user}'s {stage} reply holds {sorted(content.keys())}; under secure "
                                f"aggregation a reply holds {sorted(expected)} and nothing else")
        parsed = dict(content.config_records[SECAGG_REPLY])
        if m.MASKED_VECTOR in parsed:
            raise ProtocolError(f"user {user}'s masked vector must travel in {SECAGG_VECTOR}")
        size = message_bytes(parsed)
        if stage == m.MASKED_INPUT:
            record = content.array_records.get(SECAGG_VECTOR)
            if record is None or list(record.keys()) != [m.MASKED_VECTOR]:
                raise ProtocolError(f"user {user}'s {SECAGG_VECTOR} must hold one array, {m.MASKED_VECTOR!r}")
            try:
                packed = record[m.MASKED_VECTOR].numpy()
            except Exception as exc:  # noqa: BLE001 - an undecodable payload is the sender's fault
                raise ProtocolError(f"user {user}'s masked vector cannot be decoded ({type(exc).__name__})") from None
            parsed[m.MASKED_VECTOR] = unpack_vector(packed, self.server.vector_length, self.plan.modulus_bits,
                                                    f"user {user}'s masked vector")
            size += packed.nbytes
        return parsed, size

    def _aggregate(self) -> list[Message]:
        """Unmask, decode and check the sum; the synthetic reply (none when no included user trained)."""
        result = self.server.aggregate()
        try:
            weighted, weight_sum = self.plan.decode(result.total, len(result.included))
        except ProtocolError as exc:
            raise RoundFailed(f"the unmasked sum fails its check: {exc}") from None
        self.report.included, self.report.weight_sum = len(result.included), weight_sum
        if weight_sum <= 0:
            raise RoundFailed(f"none of the {len(result.included)} users in the sum trained (total weight 0)")
        average = self.base + weighted / weight_sum
        if not np.all(np.isfinite(average)):
            raise RoundFailed("the average update is not finite")
        anchor = Message(RecordDict(), dst_node_id=AGGREGATE_NODE, message_type=MessageType.TRAIN)
        anchor.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # an id to reply to; never sent
        metrics = MetricRecord({NUM_EXAMPLES: weight_sum / len(result.included), WEIGHT_SUM_KEY: weight_sum,
                                USERS_KEY: len(result.included)})
        content = RecordDict({ARRAYS: unflatten(average, self.arrays), METRICS: metrics})
        return [Message(content, reply_to=anchor)]
