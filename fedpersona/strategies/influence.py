"""Bounded influence: what one reply can do to an aggregate is bounded, without dropping honest replies.

Why not reject large replies. A population's honest updates are spread wide by nature (pair counts differ
20-fold; a user whose private head has fitted its pairs sends a near-zero shared update while one with 160
pairs moves far), so a cut relative to the round's median dropped the users who trained most (7 of 16 in
a round of the default simulation), and it let the repliers choose the reference. Instead every accepted
training reply is *bounded*, the norm-bounding defence of Sun et al. 2019 ("Can you really backdoor
federated learning?", arXiv 1911.07963) and the weight cap of DP-FedAvg (McMahan et al. 2018, "Learning
differentially private recurrent language models", arXiv 1710.06963: ``w_k = min(n_k / w_hat, 1)``):

* **update clipping**: the update ``u = reply - sent`` (over all shared tensors, L2) is scaled to at most
  ``C``: ``sent + u * min(1, C / ||u||)``. ``C`` comes from the server's own expectations, never from the
  round's replies: ``max-update-norm`` when set; otherwise ``update-norm-ratio`` (k) x the reference
  norm, the largest of the last ``REFERENCE_ROUNDS`` rounds' median *clipped* norms (``NormReference``);
  before any round, the a-priori bound ``shared-lr x sqrt(shared parameters) x steps``: the distance that
  ``steps`` (min-steps, or max-steps when smaller) AdamW steps of ``shared-lr`` in every coordinate go in
  a straight line (Adam's step is about the learning rate per coordinate; Kingma & Ba 2015, section 2.1).
  Clipped norms are at most ``C``, so the reference, and the bound with it, grow at most k-fold a round
  whatever the replies say; with fewer than half the replies of a round malicious, its median is an
  honest reply's norm. Under user-level DP a device clips its own update to ``user-dp-clip`` before
  sending (DP-FedAvg), so that is ``C``: a larger update cannot be honest, and it is clipped all the same.
* **weight cap**: ``num-examples`` is capped at ``reply-weight-ratio`` (c) x the median weight of the
  round's accepted replies. The median of a multiset does not depend on the order of the replies, and with
  fewer than half of them inflated it is an honest weight. Under pair-level DP the weights are the devices'
  released noisy counts (``n + N(0, s^2)``, at least 1): the cap is a function of released values only, so
  it is post-processing (no privacy cost, nothing for the accountant), and ``c`` leaves room for the noise.
  Under user-level DP every weight is 1 by protocol (its analysis needs constant weights): the screen
  rejects any other weight, so the cap never acts there.

Together one reply moves a FedAvg aggregate by at most ``share x C`` with ``share <= c m / (c m + W)``
(``m`` the round's median weight, ``W`` the other replies' total weight). What one reply cannot do stays
rejected by ``fedpersona.strategies.validation`` (non-finite, wrong shapes, keys, dtypes, weights or
metrics). Bounding applies in front of every strategy (FedMedian and Krum get clipped updates too) and
is off with ``validate-replies=false`` (the "no validation" rows of ``benchmarks/robustness.py``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedpersona.protocol import NUM_EXAMPLES

REFERENCE_ROUNDS = 3  # the reference norm: the largest median of this many most recent rounds


@dataclass(frozen=True)
class InfluenceBounds:
    """How far one reply may move an aggregate (see the module docstring).

    Attributes:
        max_update_norm: > 0: clip every update to this L2 norm (shared tensors' units); 0: from history.
        update_norm_ratio: k: clip to k x the reference norm of earlier rounds; 0: no clipping.
        initial_update_norm: the clip bound before any round has a reference (0: none then).
        reply_weight_ratio: c: cap each weight at c x the round's median weight; 0: no cap.
    """

    max_update_norm: float = 0.0
    update_norm_ratio: float = 3.0
    initial_update_norm: float = 0.0
    reply_weight_ratio: float = 4.0

    @property
    def active(self) -> bool:
        """Whether anything is bounded (a clip norm or a weight cap)."""
        return self.max_update_norm > 0 or self.update_norm_ratio > 0 or self.reply_weight_ratio > 0


def a_priori_update_norm(shared_lr: float, shared_parameters: int, min_steps: int, max_steps: int = 0) -> float:
    """The first round's clip bound: ``shared_lr * sqrt(shared_parameters) * steps``.

    Args:
        shared_lr: AdamW's learning rate of the shared tensors.
        shared_parameters: how many shared parameters a reply carries.
        min_steps: the optimizer steps every user takes at least per round.
        max_steps: the cap on steps per round (0: none; when below ``min_steps`` it is the count).

    Returns:
        The L2 distance ``steps`` AdamW steps of ``shared_lr`` per coordinate cover in a straight line
        (0 when nothing is shared or no step is known).
    """
    steps = min(min_steps, max_steps) if max_steps > 0 else min_steps
    return float(shared_lr * math.sqrt(max(shared_parameters, 0)) * max(steps, 0))


class NormReference:
    """The server's expectation of an honest update's norm, from earlier rounds only.

    ``medians`` holds one entry per round that had accepted replies with a non-zero update: the median of
    their *clipped* norms. It is a plain list so that the recorder can checkpoint and restore it."""

    def __init__(self, medians: list[float] | None = None) -> None:
        self.medians: list[float] = medians if medians is not None else []

    def bound(self, bounds: InfluenceBounds) -> float:
        """The clip bound ``C`` of the coming round.

        Args:
            bounds: the settings.

        Returns:
            ``max_update_norm`` when set; else ``update_norm_ratio`` x the largest median of the last
            ``REFERENCE_ROUNDS`` rounds; before any round ``initial_update_norm``; ``math.inf``: no clipping.
        """
        if bounds.max_update_norm > 0:
            return bounds.max_update_norm
        if bounds.update_norm_ratio <= 0:
            return math.inf
        if self.medians:
            return bounds.update_norm_ratio * max(self.medians[-REFERENCE_ROUNDS:])
        return bounds.initial_update_norm if bounds.initial_update_norm > 0 else math.inf

    def observe(self, clipped_norms: Sequence[float]) -> None:
        """Add a round's clipped update norms (zero norms, users who trained nothing, give no scale).

        Args:
            clipped_norms: the L2 norms of the round's accepted updates after clipping.
        """
        moved = [n for n in clipped_norms if n > 0]
        if moved:
            self.medians.append(float(statistics.median(moved)))


@dataclass(frozen=True)
class Bounded:
    """What bounding did to one reply: its update norm before, the factor it was scaled by (1: none), and
    its weight before and after the cap."""

    norm: float
    scale: float
    weight: float
    capped_weight: float

    @property
    def clipped(self) -> bool:
        return self.scale < 1.0

    @property
    def capped(self) -> bool:
        return self.capped_weight < self.weight


def weight_cap(weights: Sequence[float], ratio: float) -> float:
    """The weight cap of a round.

    Args:
        weights: the round's accepted weights (``num-examples``).
        ratio: c.

    Returns:
        ``ratio`` x the median of ``weights`` (``math.inf`` without weights or with ratio 0).
    """
    if ratio <= 0 or not weights:
        return math.inf
    return ratio * float(statistics.median(weights))


def clip_update(record: ArrayRecord, base: Mapping[str, np.ndarray], bound: float) -> tuple[ArrayRecord, float, float]:
    """``(record', norm, scale)``: ``record`` with its update ``record - base`` scaled to L2 norm at most
    ``bound`` (each tensor in its own dtype, keys in their order), the update's norm before, and the factor
    (1.0: ``record`` itself is returned).

    Args:
        record: a reply's shared tensors (validated: the keys, shapes and dtypes of ``base``, finite).
        base: the global tensors sent this round (float64 arrays).
        bound: the clip norm ``C`` (``math.inf``: no clipping).

    Returns:
        The (possibly new) record, the update's L2 norm before clipping, and the scale applied.
    """
    arrays = {key: record[key].numpy() for key in record.keys()}
    diffs = {key: arrays[key].astype(np.float64) - base[key] for key in arrays}
    norm = math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in diffs.values()))
    if not norm > bound:
        return record, norm, 1.0
    scale = bound / norm
    clipped = {key: Array(np.ascontiguousarray((base[key] + scale * diffs[key]).astype(arrays[key].dtype)))
               for key in arrays}
    return ArrayRecord(clipped), norm, scale


def bound_replies(replies: Sequence[Message], sent: ArrayRecord | None, bound: float,
                  bounds: InfluenceBounds) -> list[Bounded]:
    """Clip each reply's update to ``bound`` and cap its weight at ``bounds.reply_weight_ratio`` x the
    round's median weight, in place (each reply's one ArrayRecord and ``num-examples`` are replaced).

    Args:
        replies: the round's accepted training replies (validated: one ArrayRecord of the run's tensors, one
            MetricRecord with a positive finite ``num-examples``).
        sent: the global tensors of this round (None: no update is known, nothing is clipped).
        bound: the clip norm ``C`` from ``NormReference.bound`` (``math.inf``: none).
        bounds: the settings (the weight ratio).

    Returns:
        One ``Bounded`` per reply, in order. The result depends on the set of replies, not their order.
    """
    metrics = [next(iter(m.content.metric_records.values())) for m in replies]
    weights = [float(mr[NUM_EXAMPLES]) for mr in metrics]
    cap = weight_cap(weights, bounds.reply_weight_ratio)
    base = None if sent is None else {k: sent[k].numpy().astype(np.float64) for k in sent.keys()}
    out = []
    for msg, mr, weight in zip(replies, metrics, weights, strict=True):
        norm, scale = 0.0, 1.0
        if base is not None:
            name, record = next(iter(msg.content.array_records.items()))
            clipped, norm, scale = clip_update(record, base, bound)
            if clipped is not record:
                msg.content[name] = clipped
        capped = min(weight, cap)
        if capped < weight:
            mr[NUM_EXAMPLES] = capped
        out.append(Bounded(norm=norm, scale=scale, weight=weight, capped_weight=capped))
    return out
