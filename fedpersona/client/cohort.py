"""A simulation message for a cohort of users: train or evaluate each named user on the resident model.

The server's ``fedpersona.server.user_grid`` sends one message per cohort (a ``fedpersona.cohort``
ConfigRecord: the users, and the folder of their private state, ``fedpersona.round.user_store``). The
reply holds each user's records under ``user-<u>.<kind>`` (``fedpersona.protocol.cohort_key``): exactly
what that user's own reply would hold (shared tensors and counters when training, accuracies when
evaluating), or ``user-<u>.error`` with one line when the user's part failed. Nothing private leaves:
the private tensors go to the user store, which stays on the simulation's machines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedpersona.round.evaluate import evaluate_round

from fedpersona.round.stores import PrivateStore

from fedpersona.round.train import RoundResult, current_epsilon, train_cohort_rounds

from fedpersona.round.users import population_user
from fedpersona.round.user_store import UserStore
from fedpersona.config import RunConfig
from fedpersona.protocol import COHORT, COHORT_ERROR, cohort_key

log = logging.getLogger(__name__)


def cohort_of(msg: Message) -> tuple[list[int], UserStore] | None:
    """The users a simulation message names and their store; None for a one-user message (a device)."""
    record = msg.content.config_records.get(COHORT)
    if record is None:
        return None
    return [int(u) for u in record["users"]], UserStore(str(record["store"]))


def _pack(reply: RecordDict, user_records: Mapping[int, RecordDict | BaseException]) -> RecordDict:
    for user, records in user_records.items():
        if isinstance(records, BaseException):
            log.error("user %s failed", user, exc_info=records)
            reason = f"{type(records).__name__}: {records}".splitlines()[0][:500]
            reply[cohort_key(user, COHORT_ERROR)] = ConfigRecord({"reason": reason})
            continue
        for kind, record in records.items():
            reply[cohort_key(user, kind)] = record
    return reply


def train_cohort(msg: Message, context: Context, config: RunConfig, extras: Mapping[str, Any],
                 shared: Mapping[str, torch.Tensor] | None,
                 user_reply: Callable[[RunConfig, int, RoundResult], RecordDict]) -> RecordDict:
    """Train every user of the cohort (one forward/backward for all where that gives the same result,
    ``fedpersona.round.train.train_cohort_rounds``); ``user_reply`` makes each user's reply records."""
    users, store = cohort_of(msg)
    server_round = int(extras.get("server-round", 0))
    try:
        work = [(u, population_user(config, u), store.user(u, server_round, as_of=server_round - 1)) for u in users]
        results = train_cohort_rounds(config, work, server_round, shared, extras)
    except Exception as err:  # noqa: BLE001 - every user of the cohort failed with it
        results = [err] * len(users)
    out: dict[int, RecordDict | BaseException] = {}
    for user, result in zip(users, results, strict=True):
        try:
            out[user] = result if isinstance(result, BaseException) else user_reply(config, user, result)
        except Exception as err:  # noqa: BLE001
            out[user] = err
    return _pack(RecordDict(), out)


def evaluate_cohort(msg: Message, config: RunConfig, extras: Mapping[str, Any],
                    shared: Mapping[str, torch.Tensor] | None) -> RecordDict:
    """Evaluate every user of the cohort, one after another on the resident model."""
    users, store = cohort_of(msg)
    server_round = int(extras.get("server-round", 0))
    out: dict[int, RecordDict | BaseException] = {}
    for user in users:
        try:
            files = store.user(user, server_round, as_of=server_round)
            out[user] = RecordDict({"metrics": evaluation_metrics(config, user, shared, files, extras)})
        except Exception as err:  # noqa: BLE001 - this user's failure only
            out[user] = err
    return _pack(RecordDict(), out)


def evaluation_metrics(config: RunConfig, index: int, shared: Mapping[str, torch.Tensor] | None,
                       store: PrivateStore, extras: Mapping[str, Any]) -> MetricRecord:
    """What a simulated user's evaluation reports: its test-pair count and index, rounds trained, the
    three accuracies and (final evaluation) the private parameter count and generation check."""
    user = population_user(config, index)
    acc = evaluate_round(config, user, shared, store, index=index, extras=extras)
    return MetricRecord({
        "num-examples": len(user.test),
        "user-index": index,
        "rounds-trained": store.rounds_trained(),
        # every reply has the same keys (Flower aggregates only consistent MetricRecords): 0.0 until trained
        **({"epsilon": current_epsilon(store) or 0.0} if config.dp_epsilon > 0 else {}),
        **{f"acc-{name}": value for name, value in acc.accuracies.items()},
        **acc.metrics,  # final evaluation only: private-params, gen-win-rate (see client.local)
    })


def user_view(msg: Message, reply: RecordDict) -> tuple[Message, Callable[[Message, Context], Message]]:
    """A one-user train message with the cohort message's content (minus the cohort record) and a
    ``call_next`` answering it with ``reply``: lets a ClientApp mod written for one user per message
    (Flower's ``fixedclipping_mod``) act on each user's reply of a cohort."""
    content = RecordDict({k: v for k, v in msg.content.items() if k != COHORT})
    view = Message(content, msg.metadata.dst_node_id, MessageType.TRAIN)
    return view, lambda m, _context: Message(reply, reply_to=m)
