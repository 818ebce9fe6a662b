"""Secure aggregation on devices, in process: the real ClientApp in device mode (``state-dir``) answers the
SecAgg+ stages a real ``SecureAggregationGrid`` sends; the device's policy decides, its secrets stay in
its state folder between stages and are gone after the round. (Real processes over TLS:
tests/deployment/test_secure_aggregation.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedpersona.client import device as device_module
from fedpersona.client.app import app as client_app
from fedpersona.config import SIMULATION_ONLY, RunConfig
from fedpersona.device.policy import policy_for
from fedpersona.device.state import SECURE_AGGREGATION_FILE, DeviceState
from fedpersona.model.adapters import Role
from fedpersona.protocol import SECAGG_REPLY, SECAGG_VECTOR, decline_reason
from fedpersona.secagg import messages as m
from fedpersona.server.progress_grid import ProgressGrid
from fedpersona.server.secure import SECURE_TRAIN, SecureAggregationGrid, SecureSettings, flatten

TINY = RunConfig(max_steps=2, epochs=1, max_length=40, batch_size=4, fraction_train=1.0, dp_epsilon=8.0,
                 secure_aggregation=True)
DEPLOYED = {k: v for k, v in TINY.to_flat().items() if k.replace("-", "_") not in SIMULATION_ONLY}


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(autouse=True)
def _fresh_device_objects():
    device_module._OPEN.clear()
    yield
    for state in device_module._OPEN.values():
        state.close()
    device_module._OPEN.clear()


def make_device(root: Path, i: int) -> Path:
    from fedpersona.data.synthetic import PreferenceSimulator

    user = PreferenceSimulator("conflicting", 3, 0).user_data(i)
    pairs = root / f"pairs-{i}.jsonl"
    pairs.write_text("".join(json.dumps({"user_id": p.user_id, "prompt": p.prompt, "chosen": p.chosen,
                                         "rejected": p.rejected, "split": p.split}) + "\n"
                             for p in [*user.train[:12], *user.test[:4]]), encoding="utf-8")
    state = root / f"device-{i}"
    with DeviceState(state) as st:
        st.memory.import_file(pairs)
    return state


class Devices:
    """A grid whose nodes are device state folders in this process (node id 101 + i), answered by the real
    ClientApp in device mode; after each stage, ``seen`` records which devices hold secrets."""

    def __init__(self, states: list[Path]) -> None:
        self.states = {101 + i: s for i, s in enumerate(states)}
        self.replies, self.received, self.count, self.holding = {}, [], 0, []

    def get_node_ids(self):
        return list(self.states)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata.__dict__["_message_id"] = f"d{self.count}"
            node = msg.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={"state-dir": str(self.states[node])},
                              state=RecordDict(), run_config={})
            self.replies[msg.metadata.message_id] = client_app(msg, context)
            ids.append(msg.metadata.message_id)
        self.holding.append(sorted(n for n, s in self.states.items() if (s / SECURE_AGGREGATION_FILE).exists()))
        return ids

    def pull_messages(self, ids):
        out = [self.replies.pop(i) for i in list(ids) if i in self.replies]
        self.received.extend(out)
        return out


def test_devices_answer_every_stage_keep_their_secrets_home_and_decide(tmp_path, split_resident):
    states = [make_device(tmp_path, i) for i in range(3)]
    policy_for(states[0], require_secure_aggregation=True)  # this user trains under secure aggregation only
    policy_for(states[2], max_epsilon=4.0)  # this one declines the round's epsilon 8: a zero contribution
    initial = ArrayRecord({k: v.detach().clone() for k, v in split_resident.adapters.tensors(Role.SHARED).items()})
    devices = Devices(states)
    reports = []
    grid = SecureAggregationGrid(ProgressGrid(devices), SecureSettings.from_config(TINY), on_round=reports.append)
    strategy = FedAvg(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3)
    messages = strategy.configure_train(1, initial, ConfigRecord({**DEPLOYED, "server-round": 1}), grid)
    replies = list(grid.send_and_receive(messages, timeout=300))

    (report,) = reports
    assert report.failed is None and report.included == 3 and not report.refused, report
    (reply,) = replies
    aggregate = strategy.aggregate_train(1, replies)[0]
    assert np.all(np.isfinite(flatten(aggregate))) and np.abs(flatten(aggregate) - flatten(initial)).max() > 0
    # devices 0 and 1 trained (DP-SGD: their ledgers exist); device 2 declined and spent nothing, yet its reply
    # looked like the others: a masked vector of the same size, no reason, no metrics
    assert (states[0] / "ledger.json").exists() and (states[1] / "ledger.json").exists()
    assert not (states[2] / "ledger.json").exists() and not (states[2] / "private_adapter.safetensors").exists()
    assert 0 < reply.content["metrics"]["secagg-weight-sum"] <= 2 * 1000
    for msg in devices.received:
        assert msg.metadata.message_type == SECURE_TRAIN
        assert set(msg.content.keys()) <= {SECAGG_REPLY, SECAGG_VECTOR} and SECAGG_REPLY in msg.content
        if msg.content[SECAGG_REPLY][m.STAGE] == m.MASKED_INPUT:
            assert msg.content[SECAGG_VECTOR][m.MASKED_VECTOR].numpy().dtype == np.uint32
    # each device held its round's secrets in its own state folder between stages, and none after the round
    assert devices.holding[:3] == [[101, 102, 103]] * 3 and devices.holding[3] == []
    for state in states:
        assert not (state / SECURE_AGGREGATION_FILE).exists()

    # a plain round is declined by the device that requires secure aggregation (and trained by the others)
    plain = ConfigRecord({**DEPLOYED, "server-round": 2, "secure-aggregation": False})
    msg = Message(content=RecordDict({"arrays": initial, "config": plain}), dst_node_id=101,
                  message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=101, node_config={"state-dir": str(states[0])}, state=RecordDict(),
                      run_config={})
    content = client_app(msg, context).content
    assert decline_reason(content) == "secure-aggregation-required"
    assert json.loads((states[0] / "policy.json").read_text())["require_secure_aggregation"] is True


def test_a_device_refuses_a_repeated_masked_input_request_before_training(tmp_path, split_resident):
    """A server that asks twice cannot make a device train (and spend its budget) twice in one round."""
    states = [make_device(tmp_path, i) for i in range(2)]
    initial = ArrayRecord({k: v.detach().clone() for k, v in split_resident.adapters.tensors(Role.SHARED).items()})
    devices = Devices(states)
    sent = []
    push = devices.push_messages

    def push_twice(messages):  # the masked-input messages reach device 101 a second time
        messages = list(messages)
        ids = push(messages)
        again = [m_ for m_ in messages if m_.content.config_records["secagg.request"][m.STAGE] == m.MASKED_INPUT
                 and m_.metadata.dst_node_id == 101]
        for msg in again:
            copy = Message(content=msg.content, dst_node_id=101, message_type=SECURE_TRAIN)
            push([copy])
            sent.append(devices.replies.pop(copy.metadata.message_id))
        return ids

    devices.push_messages = push_twice
    grid = SecureAggregationGrid(ProgressGrid(devices), SecureSettings.from_config(TINY))
    strategy = FedAvg(fraction_train=1.0, min_available_nodes=2, min_train_nodes=2)
    replies = list(grid.send_and_receive(strategy.configure_train(
        1, initial, ConfigRecord({**DEPLOYED, "server-round": 1}), grid), timeout=300))
    assert len(replies) == 1 and len(sent) == 1
    assert len(sent[0].content) == 0  # the repeated request got nothing
    history = json.loads((states[0] / "ledger.json").read_text())["history"]
    assert sum(steps for _, _, steps in history) == 2  # max-steps=2: one round's training, once
