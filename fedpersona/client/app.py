"""The Flower ClientApp: shared tensors in the reply, private tensors kept local.

On a real device (``fedpersona client``: node config ``state-dir``) a node is one user, whose pairs,
private adapter and ledger live in the device's state directory (``fedpersona.client.device``). In a
simulation a message names a cohort of users (``fedpersona.client.cohort``; users are not nodes, see
``fedpersona.server.user_grid``) whose private state lives in the run's user store; a message naming no
cohort is for the node's own user (``node_config["partition-id"]``, private state in the node's
``Context.state``: Flower's own one-user-per-node simulation). The reply carries one ArrayRecord
(shared tensors only) and one MetricRecord: ``num-examples`` and counters, never a raw loss, a pair
or a per-example value.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from fedpersona.client.device import device_for, evaluate_on_device, read_request, train_on_device
from fedpersona.client.failures import DeviceClientApp
from fedpersona.client.cohort import cohort_of, evaluate_cohort, evaluation_metrics, train_cohort, user_view
from fedpersona.round.train import RoundResult, declined_result, train_round
from fedpersona.round.users import population_user
from fedpersona.device.policy import Decline
from fedpersona.config import RunConfig
from fedpersona.protocol import (ARRAYS, DECLINED, METRICS, NUM_EXAMPLES, SECURE_AGGREGATION_ACTION, STATUS,
                                 status_record)
from fedpersona.privacy.user_level import CLIPPING_NORM_KEY, clip_user_reply, clipping_mod_when_asked

PRIVATE_KEY = "fedpersona.private"
COUNTERS_KEY = "fedpersona.counters"
LEDGER_KEY = "fedpersona.ledger"


class ContextStore:
    """PrivateStore over a Flower node's ``Context.state`` (simulation)."""

    def __init__(self, context: Context) -> None:
        self.state = context.state

    def load_private(self) -> dict[str, torch.Tensor] | None:
        record = self.state.array_records.get(PRIVATE_KEY)
        return None if record is None else record.to_torch_state_dict()

    def save_private(self, tensors: Mapping[str, torch.Tensor], rounds_trained: int) -> None:
        self.state[PRIVATE_KEY] = ArrayRecord(dict(tensors))
        self.state[COUNTERS_KEY] = ConfigRecord({"rounds-trained": rounds_trained})

    def rounds_trained(self) -> int:
        counters = self.state.config_records.get(COUNTERS_KEY)
        return int(counters["rounds-trained"]) if counters else 0

    def load_ledger(self) -> str | None:
        record = self.state.config_records.get(LEDGER_KEY)
        return None if record is None else str(record["json"])

    def save_ledger(self, ledger_json: str) -> None:
        self.state[LEDGER_KEY] = ConfigRecord({"json": ledger_json})


def user_index(context: Context) -> int:
    for key in ("partition-id", "user-index"):
        if key in context.node_config:
            return int(context.node_config[key])
    raise ValueError("node_config has neither 'partition-id' (simulation) nor 'user-index'")


def _shared_from(msg: Message) -> dict[str, torch.Tensor] | None:
    record = msg.content.array_records.get("arrays")
    return None if record is None or not len(record) else record.to_torch_state_dict()


def train_reply(config: RunConfig, result: RoundResult) -> RecordDict:
    """The only content a training reply carries: shared tensors and non-private counters
    (``fedpersona.protocol``).

    ``num-examples`` is the user's pair count without DP; under pair-level DP the count released with
    Gaussian noise inside the user's budget (``PrivacyLedger``; 1 with ``dp-count-noise 0``); under
    user-level DP a constant 1 (weighting by data size would break its analysis). A user who declines
    (budget spent, a round its policy refuses, ...) replies with no tensors, ``declined=1`` and a
    ``status`` record with the reason: nothing of its data, not even its pair count.
    """
    if result.declined:  # the code alone: its detail stays on the device (fedpersona.client.watch)
        metrics = {NUM_EXAMPLES: 0, DECLINED: 1}
        if config.dp_epsilon > 0 and result.epsilon is not None:
            metrics["epsilon"] = float(result.epsilon)
        return RecordDict({ARRAYS: ArrayRecord(), METRICS: MetricRecord(metrics),
                           STATUS: ConfigRecord(status_record(result.reason or "budget-spent"))})
    dp = config.dp_epsilon > 0 or config.user_dp_noise > 0
    weight = 1 if config.user_dp_noise > 0 else result.num_examples
    metrics: dict[str, float | int] = {NUM_EXAMPLES: weight, DECLINED: 0}
    if not dp:
        metrics["train-steps"] = result.stats.steps
    if config.dp_epsilon > 0:
        metrics["epsilon"] = float(result.epsilon or 0.0)
    metrics.update(result.metrics)  # only values the strategy asked for (QFedAvg's loss; see client.local)
    return RecordDict({ARRAYS: ArrayRecord(result.shared), METRICS: MetricRecord(metrics)})


def _cohort_user_reply(msg: Message, context: Context):
    """How one user of a training cohort replies: its ``train_reply``, tampered with if the simulation makes
    it malicious, its update clipped when the server asked (user-level DP), as a one-user message would be."""
    from fedpersona.strategies.attacks import tamper

    def reply(config: RunConfig, index: int, result: RoundResult) -> RecordDict:
        content = tamper(config, index, train_reply(config, result), msg.content)
        if CLIPPING_NORM_KEY in msg.content["config"] and not result.declined:
            view, call_next = user_view(msg, content)
            clipped = clip_user_reply(view, context, call_next)
            if clipped.has_error():
                raise RuntimeError(clipped.error.reason)
            content = clipped.content
        return content

    return reply


def declined_evaluation(decline: Decline) -> RecordDict:
    """An evaluation reply that keeps the user's accuracies on the device (its policy under DP)."""
    return RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 0, DECLINED: 1}),
                       STATUS: ConfigRecord(status_record(decline.reason))})


app = DeviceClientApp()  # on a device every failure is answered with a code alone (fedpersona.client.failures)


@app.train(mods=[clipping_mod_when_asked])  # user-level DP: clip the shared update when the server asks
def train(msg: Message, context: Context) -> Message:
    if (state := device_for(context.node_config)) is not None:  # a real device: its own state and policy
        if isinstance(request := read_request(msg.content), Decline):  # every field within its bound, first
            return Message(train_reply(RunConfig(), declined_result(request.reason)), reply_to=msg)
        config, extras, simulation_keys, shared = request
        result = train_on_device(state, config, extras, shared, context.node_config, simulation_keys)
        return Message(train_reply(config, result), reply_to=msg)
    config, extras = RunConfig.from_message(msg.content["config"])
    if cohort_of(msg) is not None:  # a simulation's cohort of users (fedpersona.server.user_grid)
        return Message(train_cohort(msg, context, config, extras, _shared_from(msg), _cohort_user_reply(msg, context)),
                       reply_to=msg)
    index = user_index(context)
    store = ContextStore(context)
    result = train_round(config, population_user(config, index), index, int(extras.get("server-round", 0)),
                         _shared_from(msg), store, extras)
    from fedpersona.strategies.attacks import tamper  # simulated malicious users (settings attack, attack-users)

    return Message(tamper(config, index, train_reply(config, result), msg.content), reply_to=msg)


@app.train(SECURE_AGGREGATION_ACTION)  # a SecAgg+ stage (fedpersona.server.secure): one reply, protocol records only
def train_secure(msg: Message, context: Context) -> Message:
    from fedpersona.client.secure import answer_message

    return Message(answer_message(msg, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if (state := device_for(context.node_config)) is not None:  # a real device: its own state and policy
        if isinstance(request := read_request(msg.content), Decline):  # every field within its bound, first
            return Message(declined_evaluation(request), reply_to=msg)
        config, extras, simulation_keys, shared = request
        metrics = evaluate_on_device(state, config, extras, shared, context.node_config, simulation_keys)
        if isinstance(metrics, Decline):
            return Message(declined_evaluation(metrics), reply_to=msg)
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
    config, extras = RunConfig.from_message(msg.content["config"])
    if cohort_of(msg) is not None:  # a simulation's cohort of users (fedpersona.server.user_grid)
        return Message(evaluate_cohort(msg, config, extras, _shared_from(msg)), reply_to=msg)
    index = user_index(context)
    metrics = evaluation_metrics(config, index, _shared_from(msg), ContextStore(context), extras)
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
