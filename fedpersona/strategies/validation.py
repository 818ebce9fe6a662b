"""Reply validation: the server checks every reply before any strategy aggregates it.

The server trusts no reply (docs/explanation/trust-model.md). Flower's strategies aggregate whatever they are
given: one NaN or Inf tensor makes a FedAvg global adapter NaN for every user, a claimed weight of 1e9
makes one user's tensors the global model, a tensor of the wrong shape or a missing key stops the
aggregation (or broadcasts a shape-[1] tensor into every coordinate), and even FedMedian passes a NaN
through. ``ReplyScreen`` sits in front of every strategy (Flower's built-ins, wrappers, users'
``module:Class`` strategies; ``fedpersona.server.recorder.attach_recorder`` calls it) and splits a round's
replies into accepted, rejected (with a reason code) and declined ones; only the accepted ones reach
the strategy, each with its influence bounded (``fedpersona.strategies.influence``).

Rejection is for what cannot be honest. Training reply checks, in order (the first failure is the reason):

* structure: exactly one ArrayRecord and one MetricRecord, named as the protocol names them (``arrays``,
  ``metrics``; none: ``missing-key``, more or another name: ``extra-key`` / ``bad-metric``);
* metrics: every value a finite scalar, every key one the protocol lets a training reply carry
  (``TRAIN_METRIC_KEYS``, plus the loss key the strategy asked for, which must then be there), ``epsilon``
  and ``train-steps`` >= 0 (``bad-metric``). The keys come from the protocol, never from a vote among the
  replies: a replier cannot get another reply rejected by what it sends;
* weight: ``num-examples`` a finite number in ``(0, max-reply-weight]`` (default 1e5 pairs; under
  pair-level DP the released noisy count, at least 1, so the same bound holds); exactly 1 under
  user-level DP, whose protocol fixes every weight (``bad-weight``);
* tensors: exactly the run's shared keys (``missing-key``, ``extra-key``) in the run's order (several
  Flower strategies pair tensors up by position), each with the run's shape (``wrong-shape``) and dtype
  (``wrong-dtype``; also an array that cannot be decoded), all values finite (``non-finite``).

An accepted reply is then bounded, not judged: its update (reply minus the tensors sent) is clipped to the
server's norm bound and its weight capped relative to the round (``influence.bound_replies``; settings
``max-update-norm``, ``update-norm-ratio``, ``reply-weight-ratio``). A large honest update (a user with
many pairs) is kept at a bounded size instead of being dropped. Under secure aggregation the strategy gets
one sum the server made itself (``fedpersona.server.secure``; each device bounds its own contribution):
its metric keys are the sum's and nothing is clipped or capped here.

Evaluation reply checks: one MetricRecord of finite scalars with keys from ``EVALUATE_METRIC_KEYS`` or
the ``acc-`` / ``gen-`` families (at most ``MAX_KEY`` characters); every ``acc-*`` in [0, 1], ``epsilon``
>= 0 (``bad-metric``); ``num-examples`` finite and >= 0 (``bad-weight``).

What the log says about a reply is bounded (``MAX_DETAIL`` characters): a key or value a replier chose is
cut and its size said, never written whole. Replies are named by ``name_of`` (the recorder names users:
a simulated user by its index, a device by the ``user-index`` it reported, else its node id).

Byzantine-robust rules (Krum, MultiKrum, Bulyan) are told ``f = num_malicious_nodes``, a bound on the
faulty replies among those they get. Replies the screen rejected were faulty, so among the accepted ones
at most ``f - r`` remain: ``rejected_count_against`` runs the rule with that for the round (otherwise
Bulyan, which needs ``n >= 4f + 3`` of what it gets, would skip every round in which the screen
dropped anything).

Declined replies (``fedpersona.protocol.decline_reason``: the device chose not to take part, e.g. its
privacy policy or budget) are not rejects: they are set apart and counted per reason. Replies that carry
a Flower error are counted as failures, as before. With ``validate-replies=false`` (the robustness
benchmark's "without validation" rows) only those two are set apart; everything else is accepted as sent.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedpersona.protocol import ARRAYS, DECLINED, METRICS, NUM_EXAMPLES, decline_reason
from fedpersona.strategies.influence import Bounded, InfluenceBounds, NormReference, a_priori_update_norm, bound_replies

log = logging.getLogger(__name__)

# Why a reply was rejected. Stable strings: counted in metrics.jsonl and summary.json, shown to operators.
REJECT_REASONS: dict[str, str] = {
    "non-finite": "a tensor holds NaN or Inf",
    "missing-key": "a shared tensor (or the ArrayRecord) is missing",
    "extra-key": "a tensor (or an ArrayRecord) the run does not share",
    "wrong-shape": "a tensor's shape is not the run's",
    "wrong-dtype": "a tensor's dtype is not the run's, or it cannot be decoded",
    "bad-weight": "num-examples is missing, not finite, not positive, above max-reply-weight or not the protocol's",
    "bad-metric": "a metric is not a finite scalar, out of range, missing, or a key the protocol does not know",
}
# The metric keys a reply may carry (fedpersona.protocol; fedpersona.client.app.train_reply and the
# evaluations of fedpersona.client.cohort / fedpersona.client.device write them). A training reply carries
# train-steps without DP and epsilon under pair-level DP (a user of a simulated population may train at its
# own epsilon in a round without DP: both keys are allowed in every round), plus the loss key a strategy asks
# for (QFedAvg; ``fedpersona.protocol.TRAIN_LOSS_KEY``).
TRAIN_METRIC_KEYS = frozenset({NUM_EXAMPLES, DECLINED, "train-steps", "epsilon"})
# An evaluation reply: the user's index and counters, accuracies ``acc-<model>`` and the generation checks'
# ``gen-...`` values (fedpersona.round.evaluate), families named by prefix; no key longer than MAX_KEY.
EVALUATE_METRIC_KEYS = frozenset({NUM_EXAMPLES, DECLINED, "user-index", "rounds-trained", "epsilon", "private-params"})
EVALUATE_METRIC_PREFIXES = ("acc-", "gen-")
MAX_KEY = 64
NON_NEGATIVE = ("epsilon", "train-steps", "rounds-trained", "private-params")
MAX_DETAIL = 200  # characters of one rejection's detail in the log


def short(value: Any, limit: int = 40) -> str:
    """``repr`` of something a replier chose, cut for a log line.

    Args:
        value: a key, value or name from a reply (any size).
        limit: the most characters of its ``repr`` kept.

    Returns:
        The ``repr``, or its first ``limit`` characters and its full length; a list as its length only.
    """
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} values"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


@dataclass(frozen=True)
class ScreenSettings:
    """The bounds a reply must respect (``RunConfig``'s "validation" settings), see the module docstring.

    Attributes:
        enabled: False: accept every reply that neither failed nor declined (no checks, no bounding).
        max_reply_weight: the largest ``num-examples`` (pairs) one reply may claim.
        bounds: how far one accepted reply may move the aggregate (``influence.InfluenceBounds``).
        unit_weight: every weight must be exactly 1 (user-level DP).
        server_sum: the strategy gets the server's own secure-aggregation sum: its metric keys are the
            sum's and it is not bounded again (each device bounded its contribution).
    """

    enabled: bool = True
    max_reply_weight: float = 1e5
    bounds: InfluenceBounds = InfluenceBounds()
    unit_weight: bool = False
    server_sum: bool = False

    @classmethod
    def from_config(cls, config: Any, shared_parameters: int = 0) -> ScreenSettings:
        """The settings of a run. Under user-level DP each device clips its update to ``user-dp-clip`` itself
        (DP-FedAvg): that is the bound, and every weight is 1.

        Args:
            config: the ``RunConfig``.
            shared_parameters: how many shared parameters a reply carries (the first round's a-priori bound).

        Returns:
            The ``ScreenSettings``.
        """
        user_dp = config.user_dp_noise > 0
        fixed = config.user_dp_clip if user_dp and not config.max_update_norm else config.max_update_norm
        bounds = InfluenceBounds(
            max_update_norm=fixed, update_norm_ratio=config.update_norm_ratio,
            initial_update_norm=a_priori_update_norm(config.shared_lr, shared_parameters, config.min_steps,
                                                     config.max_steps),
            reply_weight_ratio=config.reply_weight_ratio)
        return cls(enabled=config.validate_replies, max_reply_weight=config.max_reply_weight, bounds=bounds,
                   unit_weight=user_dp, server_sum=bool(getattr(config, "secure_aggregation", False)))


@dataclass(frozen=True)
class TensorSpec:
    """The run's shared tensors: names, shapes and numpy dtype names (from the initial shared adapter)."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @classmethod
    def of(cls, tensors: ArrayRecord | Mapping[str, Any]) -> TensorSpec:
        """Spec of an ArrayRecord or a mapping of name -> torch tensor / ndarray."""
        record = tensors if isinstance(tensors, ArrayRecord) else ArrayRecord(dict(tensors))
        arrays = {k: record[k].numpy() for k in record.keys()}
        return cls(shapes={k: tuple(a.shape) for k, a in arrays.items()},
                   dtypes={k: a.dtype.name for k, a in arrays.items()})

    @property
    def parameters(self) -> int:
        """How many scalars the shared tensors hold."""
        return int(sum(math.prod(shape) for shape in self.shapes.values()))


def tensor_problem(record: ArrayRecord, spec: TensorSpec, *, exact_dtype: bool = True) -> tuple[str, str] | None:
    """``(reason, detail)`` for the first way ``record`` differs from ``spec`` or holds a non-finite
    value, None when it matches. Used for replies and for checkpoints on ``--resume``; a checkpoint holds
    what the strategy aggregated, which may be wider than the replies (FedAdam works in float64), so
    ``exact_dtype=False`` accepts any floating dtype there. Names a replier chose are cut (``short``)."""
    keys = set(record.keys())
    if missing := sorted(set(spec.shapes) - keys):
        return "missing-key", f"missing {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if extra := sorted(keys - set(spec.shapes)):
        return "extra-key", f"unexpected {short(extra[0])}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
    if list(record.keys()) != list(spec.shapes):  # Krum, Bulyan, QFedAvg, ... pair tensors up by position
        return "wrong-shape", "the tensors are in another order than the run's"
    for key in spec.shapes:
        try:
            array = record[key].numpy()
        except Exception as err:  # noqa: BLE001 - any undecodable payload is the sender's fault
            return "wrong-dtype", f"{key!r} cannot be decoded ({type(err).__name__})"
        if tuple(array.shape) != spec.shapes[key]:
            return "wrong-shape", f"{key!r} has shape {list(array.shape)}, expected {list(spec.shapes[key])}"
        if (array.dtype.name != spec.dtypes[key]) if exact_dtype else not np.issubdtype(array.dtype, np.floating):
            return "wrong-dtype", f"{key!r} is {short(array.dtype.name)}, expected {spec.dtypes[key]}"
        if not np.isfinite(array).all():
            return "non-finite", f"{key!r} holds NaN or Inf"
    return None


def _finite_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Screened:
    """One round's replies, sorted: what the strategy may aggregate and what was set apart.

    ``bounded`` holds one ``influence.Bounded`` per accepted training reply (empty when nothing was
    bounded: evaluation, validation off, a secure-aggregation sum) and ``update_norm_bound`` the clip norm
    of the round (``math.inf``: none). ``names`` maps each set-apart reply to who sent it (for people)."""

    accepted: list[Message] = field(default_factory=list)
    rejected: list[tuple[Message, str]] = field(default_factory=list)  # (reply, reason code)
    declined: list[tuple[Message, str]] = field(default_factory=list)  # (reply, decline reason)
    failures: list[Message] = field(default_factory=list)  # replies carrying a Flower error
    bounded: list[Bounded] = field(default_factory=list)
    update_norm_bound: float = math.inf
    rejected_by: list[tuple[str, str]] = field(default_factory=list)  # (who, reason code), in reply order

    @property
    def rejected_reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(reason for _, reason in self.rejected).items()))

    @property
    def declined_reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(reason for _, reason in self.declined).items()))

    @property
    def clipped(self) -> int:
        return sum(b.clipped for b in self.bounded)

    @property
    def weight_capped(self) -> int:
        return sum(b.capped for b in self.bounded)


def node_name(msg: Message) -> str:
    """A reply's sender as Flower knows it (the default ``name_of``; ``fedpersona.server.reply_names`` names
    users).

    Args:
        msg: a reply.

    Returns:
        ``"node <id>"``.
    """
    return f"node {msg.metadata.src_node_id}"


class ReplyScreen:
    """Validates a round's replies against the run's shared tensors and bounds the accepted ones' influence
    (see the module docstring).

    Args:
        spec: the run's shared tensors (None only for a permissive screen).
        settings: the bounds.
        name_of: who sent a reply, for the log (default: its node id).
    """

    def __init__(self, spec: TensorSpec | None, settings: ScreenSettings = ScreenSettings(),
                 name_of: Callable[[Message], str] = node_name) -> None:
        if settings.enabled and spec is None:
            raise ValueError("a validating screen needs the run's tensor spec")
        self.spec = spec
        self.settings = settings
        self.name_of = name_of
        self.reference = NormReference()  # earlier rounds' clipped update norms (checkpointed by the recorder)

    @classmethod
    def permissive(cls) -> ReplyScreen:
        """Sets apart failed and declined replies only (no validation)."""
        return cls(None, ScreenSettings(enabled=False))

    # ------------------------------------------------------------------ training
    def train(self, replies: Iterable[Message], sent: ArrayRecord | None = None, server_round: int | None = None,
              requested: Iterable[str] = ()) -> Screened:
        """Sort training replies and bound the accepted ones (in place).

        Args:
            replies: the round's replies.
            sent: the global tensors of this round (the update is the reply minus these).
            server_round: for the log.
            requested: metric keys the strategy asked every reply for (QFedAvg's loss key).

        Returns:
            The sorted replies; ``accepted`` are bounded (update clipped, weight capped).
        """
        out = _triage(replies)
        if not self.settings.enabled:
            return out
        required = frozenset(requested)
        accepted = []
        for msg in out.accepted:
            problem = self._train_problem(msg, required)
            if problem is None:
                accepted.append(msg)
            else:
                self._reject(out, msg, *problem, server_round)
        out.accepted = accepted
        if accepted and not self.settings.server_sum and self.settings.bounds.active:
            out.update_norm_bound = self.reference.bound(self.settings.bounds)
            out.bounded = bound_replies(accepted, sent, out.update_norm_bound, self.settings.bounds)
            if sent is not None:
                self.reference.observe([b.norm * b.scale for b in out.bounded])
            self._log_bounded(out, server_round)
        return out

    def _train_problem(self, msg: Message, required: frozenset[str]) -> tuple[str, str] | None:
        content = msg.content
        if len(content.array_records) != 1:
            return ("missing-key", "no ArrayRecord") if not content.array_records else \
                ("extra-key", f"{len(content.array_records)} ArrayRecords")
        if ARRAYS not in content.array_records and not self.settings.server_sum:
            return "extra-key", f"an ArrayRecord named {short(next(iter(content.array_records)))}, not {ARRAYS!r}"
        keys = None if self.settings.server_sum else TRAIN_METRIC_KEYS | required
        if (problem := _metrics_problem(content, keys, required)) is not None:
            return problem
        weight = next(iter(content.metric_records.values())).get(NUM_EXAMPLES)
        if not (_finite_scalar(weight) and 0 < weight <= self.settings.max_reply_weight):
            return "bad-weight", f"{NUM_EXAMPLES}={short(weight)} (must be in (0, {self.settings.max_reply_weight:g}])"
        if self.settings.unit_weight and weight != 1:
            return "bad-weight", f"{NUM_EXAMPLES}={short(weight)}: under user-level DP every weight is 1"
        assert self.spec is not None
        return tensor_problem(next(iter(content.array_records.values())), self.spec)

    def _log_bounded(self, out: Screened, server_round: int | None) -> None:
        where = server_round if server_round is not None else "?"
        for msg, b in zip(out.accepted, out.bounded, strict=True):
            if b.clipped or b.capped:
                parts = ([f"update norm {b.norm:.4g} clipped to {out.update_norm_bound:.4g}"] if b.clipped else []) + \
                        ([f"weight {b.weight:g} capped at {b.capped_weight:.4g}"] if b.capped else [])
                log.info("round %s: %s's reply bounded: %s", where, self.name_of(msg), "; ".join(parts))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, replies: Iterable[Message], server_round: int | None = None) -> Screened:
        """Sort evaluation replies: protocol keys, accuracies ``acc-*`` in [0, 1], ``num-examples`` >= 0.

        Args:
            replies: the round's evaluation replies.
            server_round: for the log.

        Returns:
            The sorted replies (nothing is bounded).
        """
        out = _triage(replies)
        if not self.settings.enabled:
            return out
        accepted = []
        for msg in out.accepted:
            problem = _evaluate_problem(msg.content)
            if problem is None:
                accepted.append(msg)
            else:
                self._reject(out, msg, *problem, server_round)
        out.accepted = accepted
        return out

    def _reject(self, out: Screened, msg: Message, reason: str, detail: str, server_round: int | None) -> None:
        who = self.name_of(msg)
        out.rejected.append((msg, reason))
        out.rejected_by.append((who, reason))
        text = " ".join(detail.split())
        text = text if len(text) <= MAX_DETAIL else f"{text[:MAX_DETAIL]}... ({len(text):,} characters)"
        log.warning("round %s: %s's reply rejected (%s: %s): %s", server_round if server_round is not None else "?",
                    who, reason, REJECT_REASONS.get(reason, ""), text)


def _triage(replies: Iterable[Message]) -> Screened:
    """Failed and declined replies set apart; everything else provisionally accepted."""
    out = Screened()
    for msg in replies:
        if msg.has_error():
            out.failures.append(msg)
        elif (reason := decline_reason(msg.content)) is not None:
            out.declined.append((msg, reason))
        else:
            out.accepted.append(msg)
    return out


def _known(key: str, allowed: frozenset[str], prefixes: tuple[str, ...]) -> bool:
    return key in allowed or (len(key) <= MAX_KEY and key.startswith(prefixes))


def _metrics_problem(content: Any, allowed: frozenset[str] | None, required: frozenset[str] = frozenset(),
                     prefixes: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """The first problem of a reply's one MetricRecord: count and name, unknown keys (when ``allowed`` is
    given: not in it and, up to ``MAX_KEY`` characters, not starting with one of ``prefixes``), values that
    are not finite scalars, negative counters, missing ``required`` keys."""
    if len(content.metric_records) != 1:
        return "bad-metric", f"{len(content.metric_records)} MetricRecords (expected 1)"
    name, metrics = next(iter(content.metric_records.items()))
    if allowed is not None and name != METRICS:
        return "bad-metric", f"a MetricRecord named {short(name)}, not {METRICS!r}"
    if allowed is not None and (unknown := sorted(k for k in metrics.keys() if not _known(k, allowed, prefixes))):
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        return "bad-metric", f"metric key {short(unknown[0])}{more} is not one the protocol knows"
    for key, value in metrics.items():
        if not _finite_scalar(value):
            if key == NUM_EXAMPLES:
                return "bad-weight", f"{NUM_EXAMPLES}={short(value)}"
            return "bad-metric", f"{short(key)}={short(value)} is not a finite scalar"
        if key in NON_NEGATIVE and value < 0:
            return "bad-metric", f"{key}={value!r} is negative"
    if missing := sorted(required - set(metrics.keys())):
        return "bad-metric", f"metric {short(missing[0])} the strategy asked for is missing"
    if NUM_EXAMPLES not in metrics:
        return "bad-weight", f"no {NUM_EXAMPLES}"
    return None


def _evaluate_problem(content: Any) -> tuple[str, str] | None:
    if (problem := _metrics_problem(content, EVALUATE_METRIC_KEYS, prefixes=EVALUATE_METRIC_PREFIXES)) is not None:
        return problem
    metrics = next(iter(content.metric_records.values()))
    if metrics[NUM_EXAMPLES] < 0:
        return "bad-weight", f"{NUM_EXAMPLES}={metrics[NUM_EXAMPLES]!r} (must be a finite number >= 0)"
    for key, value in metrics.items():
        if key.startswith("acc-") and not 0.0 <= value <= 1.0:
            return "bad-metric", f"{key}={value!r} is not in [0, 1]"
    return None


def update_norm(record: ArrayRecord, base: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``record - base`` over all tensors (float64); both have the same keys and shapes."""
    total = 0.0
    for key, reference in base.items():
        diff = record[key].numpy().astype(np.float64) - reference
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


@contextmanager
def rejected_count_against(strategy: Any, rejected: int) -> Iterator[None]:
    """Within the block, ``strategy.num_malicious_nodes`` (if it has one) is lowered by ``rejected``
    (not below 0): the faulty replies already removed count against the rule's bound f."""
    f = getattr(strategy, "num_malicious_nodes", None)
    if not isinstance(f, int) or isinstance(f, bool) or rejected <= 0:
        yield
        return
    strategy.num_malicious_nodes = max(0, f - rejected)
    try:
        yield
    finally:
        strategy.num_malicious_nodes = f
