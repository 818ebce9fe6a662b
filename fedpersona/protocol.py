"""What travels between the server and a user's device: the records of a reply, and why a device declines.

A training reply is a ``RecordDict`` with

* ``arrays`` (ArrayRecord): the shared tensors, exactly the run's shared keys; empty when declined;
* ``metrics`` (MetricRecord): ``num-examples`` (the aggregation weight; 0 when declined), ``declined``
  (0/1) and the few non-private counters ``fedpersona.client.app.train_reply`` documents;
* ``status`` (ConfigRecord, declined replies only): ``reason``, one of ``DECLINE_REASONS``, and nothing
  else.

An evaluation reply carries ``metrics``; a device whose policy keeps its accuracies to itself replies
with ``declined=1`` and a ``status`` record instead of accuracies.

A device whose task fails replies with a Flower error (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``) whose
reason is one of ``FAILURE_REASONS``, nothing else. Why codes only: a server chooses the message, so any
text a device derives from its data or its file system (pair counts, a sample rate, the state folder's
path, an exception's text) would let a server learn for free what DP hides, by asking for rounds that
fail (a ``min-pairs`` of a million, a count noise of 1e-6). The full reason stays on the device: its
terminal and ``STATE/logs`` (``fedpersona.client.watch``).

The device decides (``fedpersona.device.policy``); the server records what it is told and validates what
it aggregates (``fedpersona.strategies.validation``). Neither side trusts the other's message.
"""

from __future__ import annotations

from typing import Any

ARRAYS = "arrays"
METRICS = "metrics"
STATUS = "status"
NUM_EXAMPLES = "num-examples"
DECLINED = "declined"
REASON = "reason"
DETAIL = "detail"  # no longer sent: a device sends the code alone (kept for old readers)
# Simulation only (fedpersona.server.user_grid): the users one message is for, and where their replies sit
# in the cohort's reply (one record per user and kind: ``user-7.arrays``, ``user-7.metrics``, ...)
COHORT = "fedpersona.cohort"  # ConfigRecord {"users": [user indices]}
COHORT_ERROR = "error"  # a user's record kind in a cohort reply when its part failed: ConfigRecord {"reason": ...}
RUN_LINEAGE = "run-lineage"  # message config: one id for a run and every resumption of it (deployment)
# Train config keys a strategy adds to ask something of the devices (fedpersona.round.train.RoundOptions)
TRAIN_LOSS_KEY = "train-loss-key"  # the reply metric key a strategy wants each user's pre-training loss under
PROXIMAL_MU_KEY = "proximal-mu"  # FedProx's mu: the proximal term on the shared tensors
# Secure aggregation (fedpersona.server.secure sends, fedpersona.client.secure answers): the four SecAgg+
# stages travel as ``train.secure_aggregation`` messages; a request and a reply are one ConfigRecord each
# (fedpersona.secagg.messages keys), the masked vector one ArrayRecord. A device's reply holds nothing else.
SECURE_AGGREGATION_ACTION = "secure_aggregation"  # message type "train.secure_aggregation"
SECAGG_REQUEST = "secagg.request"  # ConfigRecord: this user's request of the stage (per user)
SECAGG_PLAN = "secagg.plan"  # ConfigRecord, masked-input stage: clip-norm, weight-cap, max-summands, modulus-bits
SECAGG_REPLY = "secagg.reply"  # ConfigRecord: the user's reply of the stage
SECAGG_VECTOR = "secagg.vector"  # ArrayRecord, masked-input reply: the masked vector, packed to b bits
# Records addressed to one user (a simulation packs them per user into a cohort message, fedpersona.server.user_grid)
# and the records of a user's reply a cohort reply may hold beside arrays/metrics/status
PER_USER_RECORDS = (SECAGG_REQUEST,)
PER_USER_REPLY_RECORDS = (SECAGG_REPLY, SECAGG_VECTOR)

# Why a device declines a round. Stable strings: they are counted in metrics.jsonl and shown to operators.
DECLINE_REASONS: dict[str, str] = {
    "budget-spent": "the user's privacy budget cannot afford this round",
    "new-user": "a held-out (cold-start) user of the simulation: it trains only at the final evaluation",
    "dp-required": "the device's policy requires pair-level DP and the round asks for none",
    "epsilon-above-policy": "the round asks for a larger epsilon than the device's policy accepts",
    "delta-above-policy": "the round asks for a larger delta than the device's policy accepts",
    "noise-below-policy": "the noise the round implies is below the device's smallest noise multiplier",
    "simulation-setting": "the message carries a setting that only a simulation may use",
    "model-mismatch": "the round's model is not the one this device's state is bound to",
    "scheme-mismatch": "the round's scheme is not the one this device's state is bound to",
    "loss-requested": "the strategy asks for the raw training loss, which DP does not protect",
    "ledger-missing": "the privacy ledger is missing or empty while private state exists",
    "not-enough-pairs": "the device's preference memory holds too few pairs for a round",
    "evaluation-private": "the device's policy keeps its evaluation results to itself under DP",
    "stale-round": "the device already answered this round of this run",
    "bad-shared": "the server's shared adapter holds NaN or Inf; the device neither stores nor trains on it",
    "diverged": "local training produced NaN or Inf (learning rate too high?); nothing was kept or sent",
    "epsilon-unreachable": "the round asks for a smaller epsilon than this device can keep to (its earlier spending "
                           "already reaches it, or no noise does); nothing was spent or stored",
    "bad-request": "the message carries a value the device does not accept (a wrong type, a number out of range, "
                   "a plug-in import); nothing was spent or stored",
    "message-too-large": "a field of the message is larger than the device accepts (too many keys, a long text, "
                         "tensors beyond the run's shared ones); nothing was spent or stored",
    "secure-aggregation-required": "the device's policy requires secure aggregation and the round is plain",
}

# Why a device's task failed: the reason of its error reply (``fedpersona.client.failures``). Stable strings too.
FAILURE_REASONS: dict[str, str] = {
    "state-damaged": "a file of the device's state folder is unreadable; its owner must repair or restore it",
    "state-busy": "another process on the device is using its state folder",
    "storage-unwritable": "the device could not write its state (no space left, a quota, read-only storage)",
    "model-unavailable": "the device cannot load the round's model",
    "train-failed": "local training raised an error on the device; nothing was sent",
    "evaluate-failed": "local evaluation raised an error on the device",
    "unsupported-message": "the device answers only the train and evaluate messages of fedpersona apps",
    "task-failed": "the device's runtime could not run the task",
}


def cohort_key(user: int, kind: str) -> str:
    """The key of ``user``'s ``kind`` record (arrays, metrics, status, error) in a cohort reply."""
    return f"user-{user}.{kind}"


def status_record(reason: str) -> dict[str, str]:
    """The ``status`` ConfigRecord content of a declined reply: the code alone.

    Args:
        reason: a ``DECLINE_REASONS`` code.

    Returns:
        ``{"reason": reason}``.

    Raises:
        ValueError: ``reason`` is not a known code.
    """
    if reason not in DECLINE_REASONS:
        raise ValueError(f"unknown decline reason {reason!r}; known: {', '.join(DECLINE_REASONS)}")
    return {REASON: reason}


def failure_reason(code: str) -> str:
    """The reason string of a device's error reply: the code alone (Flower's ``Error`` needs a string).

    Args:
        code: a ``FAILURE_REASONS`` code.

    Returns:
        ``code``.

    Raises:
        ValueError: ``code`` is not a known code.
    """
    if code not in FAILURE_REASONS:
        raise ValueError(f"unknown failure reason {code!r}; known: {', '.join(FAILURE_REASONS)}")
    return code


def decline_reason(content: Any) -> str | None:
    """The decline reason of a reply's content (a flwr ``RecordDict``), None if it did not decline.

    A reply marked ``declined`` without a readable reason counts as ``budget-spent`` (older devices)."""
    metrics = content.metric_records.get(METRICS)
    status = content.config_records.get(STATUS)
    declined = bool(metrics is not None and metrics.get(DECLINED)) or status is not None
    if not declined:
        return None
    reason = str(status.get(REASON, "")) if status is not None else ""
    return reason if reason in DECLINE_REASONS else "budget-spent"
