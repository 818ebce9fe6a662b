"""What a client sends: the real ClientApp's replies hold shared tensors and counters, nothing private."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpersona.client.app import PRIVATE_KEY
from fedpersona.client.app import app as client_app
from fedpersona.config import RunConfig
from fedpersona.model.adapters import Role

CONFIG = RunConfig(num_users=3, min_steps=2, epochs=1)


def _message(kind: str, shared, server_round: int = 1) -> Message:
    config = ConfigRecord({**CONFIG.to_flat(), "server-round": server_round})
    return Message(content=RecordDict({"arrays": ArrayRecord(shared), "config": config}),
                   dst_node_id=7, message_type=kind)


def _context(partition: int = 1) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def _reply(kind, shared, context, server_round=1):
    reply = client_app(_message(kind, shared, server_round), context)
    assert not reply.has_error(), reply.error
    return reply.content


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps messages with the current task's identity; a simulation sets it, so do we."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture
def initial_shared(split_resident):
    return split_resident.adapters.tensors(Role.SHARED)


def test_train_reply_holds_only_shared_tensors(split_resident, initial_shared):
    context = _context()
    content = _reply(MessageType.TRAIN, initial_shared, context)
    private = context.state.array_records[PRIVATE_KEY].to_numpy_ndarrays()
    assert private and any(np.abs(p).sum() > 0 for p in private), "the private adapter did not train"

    # exactly one ArrayRecord, keyed by the shared tensor names and nothing else
    assert list(content.array_records) == ["arrays"]
    sent = content.array_records["arrays"]
    assert set(sent.keys()) == set(split_resident.adapters.names(Role.SHARED))
    assert not any(".private." in name for name in sent.keys())
    # and no private tensor hides under another name: no sent array equals a trained private tensor
    for value in sent.to_numpy_ndarrays():
        assert not any(value.shape == p.shape and np.array_equal(value, p) for p in private)
    # the shared adapter moved (it is a real update, not the weights we sent)
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(sent.to_numpy_ndarrays(), initial_shared.values()))
    # metrics: counters only, no loss, no per-pair values
    assert set(content.metric_records["metrics"].keys()) == {"num-examples", "train-steps", "declined"}
    assert not content.config_records


def test_private_state_persists_between_rounds_and_evaluate_reports_aggregates(split_resident, initial_shared):
    context = _context(partition=2)
    _reply(MessageType.TRAIN, initial_shared, context)
    after_one = context.state.array_records[PRIVATE_KEY].to_numpy_ndarrays()
    _reply(MessageType.TRAIN, initial_shared, context, server_round=2)
    after_two = context.state.array_records[PRIVATE_KEY].to_numpy_ndarrays()
    assert any(not np.array_equal(a, b) for a, b in zip(after_one, after_two)), "round 2 restarted the head"

    content = _reply(MessageType.EVALUATE, initial_shared, context, server_round=2)
    assert not content.array_records
    metrics = content.metric_records["metrics"]
    assert set(metrics.keys()) == {"num-examples", "user-index", "rounds-trained", "acc-personalized",
                                   "acc-global", "acc-base"}
    assert metrics["user-index"] == 2 and metrics["rounds-trained"] == 2
    assert all(0.0 <= metrics[f"acc-{m}"] <= 1.0 for m in ("personalized", "global", "base"))


@pytest.mark.parametrize("count_noise", [5.0, 0.0])
def test_dp_reply_weighs_by_the_released_noised_count_and_nothing_else(split_resident, initial_shared, count_noise):
    import json

    from fedpersona.client.app import LEDGER_KEY
    from fedpersona.round.users import population_user

    config = RunConfig(num_users=3, min_steps=2, epochs=1, dp_epsilon=8.0, dp_count_noise=count_noise,
                       dp_reproducible=True)
    message = Message(content=RecordDict({"arrays": ArrayRecord(initial_shared),
                                          "config": ConfigRecord({**config.to_flat(), "server-round": 1})}),
                      dst_node_id=7, message_type=MessageType.TRAIN)
    context = _context()
    reply = client_app(message, context)
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records["metrics"]
    assert set(metrics.keys()) == {"num-examples", "declined", "epsilon"}  # no step count, no loss
    ledger = json.loads(context.state.config_records[LEDGER_KEY]["json"])
    pairs = len(population_user(config, 1).train)
    if count_noise:
        # the weight is the count released once, with its noise: not the true pair count
        assert ledger["count_noise"] == count_noise and ledger["released_count"] != pairs
        assert metrics["num-examples"] == max(1, round(ledger["released_count"]))
    else:
        assert ledger["released_count"] is None and metrics["num-examples"] == 1
    assert 0 < metrics["epsilon"] <= 8.0
    # round 2 (another round seed) reuses the count released in round 1: a fresh draw would leak more
    message.content["config"]["server-round"] = 2
    again = client_app(message, context).content.metric_records["metrics"]
    assert again["num-examples"] == metrics["num-examples"] and again["epsilon"] > metrics["epsilon"]
    assert json.loads(context.state.config_records[LEDGER_KEY]["json"])["released_count"] == ledger["released_count"]


