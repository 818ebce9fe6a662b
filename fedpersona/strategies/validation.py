"""Reply validation: the server checks every reply before any strategy aggregates it.

The server trusts no reply (docs/explanation/trust-model.md). Flower's strategies aggregate whatever they are
given: one NaN or Inf tensor makes a FedAvg global adapter NaN for every user, a claimed weight of 1e9
makes one user's tensors the global model, a tensor of the wrong shape or a missing key stops the
aggregation (or broadcasts a shape-[1] tensor into every coordinate), and even FedMedian passes a NaN
through. ``ReplyScreen`` sits in front of every strategy (Flower's built-ins, wrappers, users'
``module:Class`` strategies; ``fedpersona.server.recorder.attach_recorder`` calls it) and splits a round's
replies into accepted, rejected (with a reason code) and declined ones; only the accepted ones reach
the strategy.

Training reply checks, in order (the first failure is the reason):

* structure: exactly one ArrayRecord (none: ``missing-key``, more: ``extra-key``) and exactly one
  MetricRecord of finite scalars (``bad-metric``);
* weight: ``num-examples`` a finite number in ``(0, max-reply-weight]`` (default 1e5 pairs; under
  pair-level DP this is the released noisy count, at least 1, so the same bound holds) (``bad-weight``);
* tensors: exactly the run's shared keys (``missing-key``, ``extra-key``) in the run's order (several
  Flower strategies pair tensors up by position), each with the run's shape (``wrong-shape``) and dtype (``wrong-dtype``; also an array that cannot be decoded), all values
  finite (``non-finite``);
* the same metric keys as the round's other replies: Flower refuses to aggregate a round whose
  MetricRecords differ, so the odd ones out are dropped (``bad-metric``; majority, ties resolved by the
  previous round's keys);
* update norm: ``||reply - sent||_2`` over all shared tensors (the L2 distance from the global tensors the
  server sent this round). Above ``max-update-norm`` when that is > 0 (norm bounding, Sun et al. 2019,
  "Can you really backdoor federated learning?", arXiv 1911.07963), and always above ``update-norm-ratio``
  (default 10) times the median norm of the round's *other* otherwise-valid replies (``update-norm``).
  The median of the others, not of all: with two replies the median of both is half the larger one, so a
  x1e6 update would pass; against the other one alone it does not. With a single reply there is no
  reference and only the absolute bound applies; zero norms (nothing trained) give no scale either.
  A median bound is the robust-statistics idea behind Krum / coordinate-wise median rules (Blanchard et
  al. 2017, "Machine learning with adversaries: Byzantine tolerant gradient descent"; Yin et al. 2018):
  with fewer than half the replies malicious, the median is an honest reply's norm.

Evaluation reply checks: one MetricRecord of finite scalars; every ``acc-*`` in [0, 1] (``bad-metric``);
``num-examples`` finite and >= 0 (``bad-weight``).

Byzantine-robust rules (Krum, MultiKrum, Bulyan) are told ``f = num_malicious_nodes``, a bound on the
faulty replies among those they get. Replies the screen rejected were faulty, so among the accepted ones
at most ``f - r`` remain: ``rejected_count_against`` runs the rule with that for the round (otherwise
Bulyan, which needs ``n >= 4f + 3`` of what it gets, would skip every round in which the screen
dropped anything).

Declined replies (``fedpersona.protocol.decline_reason``: the device chose not to take part, e.g. its
privacy policy or budget) are not rejects: they are set apart and counted per reason. Replies that carry
a Flower error are counted as failures, as before. With ``validate-replies=false`` (the robustness
benchmark's "without validation" rows) only those two are set apart and everything else is accepted.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedpersona.protocol import NUM_EXAMPLES, decline_reason

log = logging.getLogger(__name__)

# Why a reply was rejected. Stable strings: counted in metrics.jsonl and summary.json, shown to operators.
REJECT_REASONS: dict[str, str] = {
    "non-finite": "a tensor holds NaN or Inf",
    "missing-key": "a shared tensor (or the ArrayRecord) is missing",
    "extra-key": "a tensor (or an ArrayRecord) the run does not share",
    "wrong-shape": "a tensor's shape is not the run's",
    "wrong-dtype": "a tensor's dtype is not the run's, or it cannot be decoded",
    "bad-weight": "num-examples is missing, not finite, not positive or above max-reply-weight",
    "update-norm": "the update's L2 norm exceeds max-update-norm or update-norm-ratio x the round's median",
    "bad-metric": "a metric is missing, not a finite scalar, out of range, or its keys differ from the round's",
}


@dataclass(frozen=True)
class ScreenSettings:
    """The bounds a reply must respect (``RunConfig``'s ``validate-replies`` block)."""

    enabled: bool = True  # False: accept every reply that neither failed nor declined
    max_update_norm: float = 0.0  # L2, in the shared tensors' units; 0: no absolute bound
    update_norm_ratio: float = 10.0  # x the median norm of the round's other valid replies; 0: off
    max_reply_weight: float = 1e5  # largest num-examples (pairs) one reply may claim

    @classmethod
    def from_config(cls, config: Any) -> ScreenSettings:
        return cls(enabled=config.validate_replies, max_update_norm=config.max_update_norm,
                   update_norm_ratio=config.update_norm_ratio, max_reply_weight=config.max_reply_weight)


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


def tensor_problem(record: ArrayRecord, spec: TensorSpec, *, exact_dtype: bool = True) -> tuple[str, str] | None:
    """``(reason, detail)`` for the first way ``record`` differs from ``spec`` or holds a non-finite
    value, None when it matches. Used for replies and for checkpoints on ``--resume``; a checkpoint holds
    what the strategy aggregated, which may be wider than the replies (FedAdam works in float64), so
    ``exact_dtype=False`` accepts any floating dtype there."""
    keys = set(record.keys())
    if missing := sorted(set(spec.shapes) - keys):
        return "missing-key", f"missing {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if extra := sorted(keys - set(spec.shapes)):
        return "extra-key", f"unexpected {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
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
            return "wrong-dtype", f"{key!r} is {array.dtype.name}, expected {spec.dtypes[key]}"
        if not np.isfinite(array).all():
            return "non-finite", f"{key!r} holds NaN or Inf"
    return None


def _finite_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Screened:
    """One round's replies, sorted: what the strategy may aggregate and what was set apart."""

    accepted: list[Message] = field(default_factory=list)
    rejected: list[tuple[Message, str]] = field(default_factory=list)  # (reply, reason code)
    declined: list[tuple[Message, str]] = field(default_factory=list)  # (reply, decline reason)
    failures: list[Message] = field(default_factory=list)  # replies carrying a Flower error

    @property
    def rejected_reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(reason for _, reason in self.rejected).items()))

    @property
    def declined_reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(reason for _, reason in self.declined).items()))


class ReplyScreen:
    """Validates a round's replies against the run's shared tensors (see the module docstring)."""

    def __init__(self, spec: TensorSpec | None, settings: ScreenSettings = ScreenSettings()) -> None:
        if settings.enabled and spec is None:
            raise ValueError("a validating screen needs the run's tensor spec")
        self.spec = spec
        self.settings = settings
        self._metric_keys: frozenset[str] | None = None  # the previous round's accepted metric keys

    @classmethod
    def permissive(cls) -> ReplyScreen:
        """Sets apart failed and declined replies only (no validation)."""
        return cls(None, ScreenSettings(enabled=False))

    # ------------------------------------------------------------------ training
    def train(self, replies: Iterable[Message], sent: ArrayRecord | None = None,
              server_round: int | None = None) -> Screened:
        """Sort training replies; ``sent``: the global tensors of this round (for the update norm)."""
        out = _triage(replies)
        if not self.settings.enabled:
            return out
        candidates = []
        for msg in out.accepted:
            problem = self._train_problem(msg)
            if problem is None:
                candidates.append(msg)
            else:
                self._reject(out, msg, *problem, server_round)
        candidates = self._same_metric_keys(out, candidates, server_round)
        out.accepted = self._norm_bounded(out, candidates, sent, server_round)
        return out

    def _train_problem(self, msg: Message) -> tuple[str, str] | None:
        content = msg.content
        if len(content.array_records) != 1:
            return ("missing-key", "no ArrayRecord") if not content.array_records else \
                ("extra-key", f"{len(content.array_records)} ArrayRecords")
        if (problem := _metrics_problem(content)) is not None:
            return problem
        metrics = next(iter(content.metric_records.values()))
        weight = metrics.get(NUM_EXAMPLES)
        if not (_finite_scalar(weight) and 0 < weight <= self.settings.max_reply_weight):
            return "bad-weight", f"{NUM_EXAMPLES}={weight!r} (must be in (0, {self.settings.max_reply_weight:g}])"
        assert self.spec is not None
        return tensor_problem(next(iter(content.array_records.values())), self.spec)

    def _same_metric_keys(self, out: Screened, replies: list[Message], server_round: int | None) -> list[Message]:
        if not replies:
            return replies
        keysets = [frozenset(next(iter(m.content.metric_records.values())).keys()) for m in replies]
        counts = Counter(keysets)
        top = max(counts.values())
        tied = [k for k, n in counts.items() if n == top]
        keep = self._metric_keys if self._metric_keys in tied else min(tied, key=sorted)
        self._metric_keys = keep
        kept = []
        for msg, keys in zip(replies, keysets, strict=True):
            if keys == keep:
                kept.append(msg)
            else:
                odd = sorted(keys ^ keep)
                self._reject(out, msg, "bad-metric", f"metric keys differ from the round's ({', '.join(odd)})",
                             server_round)
        return kept

    def _norm_bounded(self, out: Screened, replies: list[Message], sent: ArrayRecord | None,
                      server_round: int | None) -> list[Message]:
        if sent is None or not replies or set(sent.keys()) != set(self.spec.shapes):
            return replies
        base = {k: sent[k].numpy().astype(np.float64) for k in sent.keys()}
        norms = [update_norm(next(iter(m.content.array_records.values())), base) for m in replies]
        limit, ratio = self.settings.max_update_norm, self.settings.update_norm_ratio
        kept = []
        for i, (msg, norm) in enumerate(zip(replies, norms, strict=True)):
            others = [n for j, n in enumerate(norms) if j != i and n > 0]
            bound = ratio * statistics.median(others) if ratio > 0 and others else math.inf
            if limit > 0:
                bound = min(bound, limit)
            if norm > bound:
                self._reject(out, msg, "update-norm", f"update norm {norm:.4g} > bound {bound:.4g}", server_round)
            else:
                kept.append(msg)
        return kept

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, replies: Iterable[Message], server_round: int | None = None) -> Screened:
        """Sort evaluation replies: accuracies ``acc-*`` in [0, 1], ``num-examples`` finite and >= 0."""
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

    @staticmethod
    def _reject(out: Screened, msg: Message, reason: str, detail: str, server_round: int | None) -> None:
        out.rejected.append((msg, reason))
        log.warning("round %s: reply from node %s rejected (%s): %s", server_round if server_round is not None
                    else "?", msg.metadata.src_node_id, reason, detail)


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


def _metrics_problem(content: Any) -> tuple[str, str] | None:
    if len(content.metric_records) != 1:
        return "bad-metric", f"{len(content.metric_records)} MetricRecords (expected 1)"
    metrics = next(iter(content.metric_records.values()))
    for key, value in metrics.items():
        if not _finite_scalar(value):
            if key == NUM_EXAMPLES:
                return "bad-weight", f"{NUM_EXAMPLES}={value!r}"
            return "bad-metric", f"{key}={value!r} is not a finite scalar"
    return None


def _evaluate_problem(content: Any) -> tuple[str, str] | None:
    if (problem := _metrics_problem(content)) is not None:
        return problem
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(NUM_EXAMPLES)
    if weight is None or weight < 0:
        return "bad-weight", f"{NUM_EXAMPLES}={weight!r} (must be a finite number >= 0)"
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
