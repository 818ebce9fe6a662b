"""No message can lock a device out or make it pay for nothing (issue 23, item 2).

Requests the device cannot serve (an epsilon no noise reaches given what is spent, a delta that makes the
round's epsilon pass what it asks, absurd values or sizes of any field) are declined before anything is
spent and change nothing stored; the next ordinary round trains. Driven through the real ClientApp in
device mode with real DP-SGD, as ``test_policy.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpersona.client import device as device_module
from fedpersona.client.app import app as client_app
from fedpersona.config import SIMULATION_ONLY, RunConfig
from fedpersona.device.state import DeviceState
from fedpersona.model.adapters import Role
from fedpersona.protocol import RUN_LINEAGE, decline_reason

TINY = RunConfig(max_steps=2, epochs=1, max_length=40, batch_size=4, rounds=3, fraction_train=1.0)
DEPLOYED = {k: v for k, v in TINY.to_flat().items() if k.replace("-", "_") not in SIMULATION_ONLY}
DP = {"dp-epsilon": 8.0}


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


@pytest.fixture
def shared(split_resident):
    split_resident.adapters.reset(Role.SHARED)
    return split_resident.adapters.tensors(Role.SHARED)


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """A device holding 12 training and 4 test pairs (``fresh``), and the same after one DP round at
    epsilon 8 (``trained``); each test works on a copy."""
    from fedpersona.data.synthetic import PreferenceSimulator
    from fedpersona.round.resident import resident_for

    root = tmp_path_factory.mktemp("bounds")
    user = PreferenceSimulator("conflicting", 3, 0).user_data(0)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"user_id": p.user_id, "prompt": p.prompt, "chosen": p.chosen,
                                         "rejected": p.rejected, "split": p.split}) + "\n"
                             for p in [*user.train[:12], *user.test[:4]]), encoding="utf-8")
    fresh = root / "fresh"
    with DeviceState(fresh) as st:
        st.memory.import_file(pairs)
    trained = root / "trained"
    shutil.copytree(fresh, trained)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    resident = resident_for(RunConfig())
    resident.adapters.reset(Role.SHARED)
    send(trained, resident.adapters.tensors(Role.SHARED), **DP, **{RUN_LINEAGE: "run-a"})
    for state in device_module._OPEN.values():
        state.close()
    device_module._OPEN.clear()
    return {"fresh": fresh, "trained": trained}


@pytest.fixture
def device(templates, tmp_path: Path) -> Path:
    """A fresh copy of the device (no round yet)."""
    shutil.copytree(templates["fresh"], tmp_path / "device")
    return tmp_path / "device"


@pytest.fixture
def trained(templates, tmp_path: Path) -> Path:
    """A fresh copy of the device after one DP round (lineage run-a, round 1)."""
    shutil.copytree(templates["trained"], tmp_path / "trained")
    return tmp_path / "trained"


def spent(state: Path) -> float:
    from fedpersona.privacy.ledger import PrivacyLedger

    return PrivacyLedger.from_json((state / "ledger.json").read_text()).spent_epsilon()


def send(state: Path, shared, server_round: int = 1, **settings):
    config = ConfigRecord({**DEPLOYED, **settings, "server-round": server_round})
    msg = Message(content=RecordDict({"arrays": ArrayRecord(shared), "config": config}), dst_node_id=7,
                  message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={"state-dir": str(state)}, state=RecordDict(), run_config={})
    reply = client_app(msg, context)
    assert not reply.has_error(), reply.error
    return reply.content


def stored(state: Path) -> dict[str, bytes]:
    """Every state file a round could write (the SQLite files change on any open, so they are left out)."""
    return {p.name: p.read_bytes() for p in sorted(state.iterdir())
            if p.is_file() and p.suffix in (".json", ".safetensors")}


def epsilon_of(content) -> float:
    return float(content.metric_records["metrics"]["epsilon"])


def test_a_tiny_epsilon_is_declined_and_locks_nothing(trained, shared):
    """dp-epsilon=1e-300 used to lower the ledger's stored target for good: every later round of any server
    was declined budget-spent until `reset-budget`, which deletes the private adapter."""
    first = spent(trained)
    before = stored(trained)
    content = send(trained, shared, server_round=2, **{"dp-epsilon": 1e-300})
    assert decline_reason(content) == "epsilon-unreachable"
    assert stored(trained) == before, "a declined round changed what the device stores"
    later = send(trained, shared, server_round=3, **DP)  # any later server's ordinary round trains
    assert decline_reason(later) is None and epsilon_of(later) > first


@pytest.mark.parametrize("settings", [{"dp-epsilon": 1e-300}, {**DP, "dp-count-noise": 1e-6}],
                         ids=["epsilon-1e-300", "count-noise-1e-6"])
def test_a_first_round_no_noise_can_serve_starts_no_ledger(device, shared, settings):
    content = send(device, shared, **settings)
    assert decline_reason(content) == "epsilon-unreachable"
    assert not (device / "ledger.json").exists() and not (device / "private_adapter.safetensors").exists()
    meta = json.loads((device / "meta.json").read_text()) if (device / "meta.json").exists() else {}
    assert not meta.get("ledger_started"), "a declined round marked a ledger as started"
    assert decline_reason(send(device, shared, server_round=2, **DP)) is None


def test_a_huge_run_lineage_is_declined_before_training_or_paying(trained, shared):
    """A 100 MB run-lineage made the device train and pay (epsilon 6.238 -> 7.188), then fail to store the
    reply, so nothing was sent. Now every field is bounded first."""
    before = stored(trained)
    content = send(trained, shared, server_round=2, **DP, **{RUN_LINEAGE: "x" * 1_000_000})
    assert decline_reason(content) == "message-too-large"
    assert stored(trained) == before


def test_a_smaller_delta_is_served_only_if_its_epsilon_fits(trained, shared):
    """A round asking for more privacy than the policy: its epsilon and delta cap that round; the round
    trains only if the epsilon after it, accounted at the smaller delta, stays within what it asks."""
    from fedpersona.privacy.accountant import sample_rate_for
    from fedpersona.privacy.ledger import PrivacyLedger

    device = trained
    ledger = PrivacyLedger.from_json((device / "ledger.json").read_text())
    steps, rate = TINY.train_settings.steps_for(12), sample_rate_for(TINY.batch_size, 12)
    asked = ledger.epsilon_after(steps, rate) * 1.02  # enough at the ledger's own delta, not at 1e-20
    before = stored(device)
    content = send(device, shared, server_round=2, **{"dp-epsilon": asked, "dp-delta": 1e-20})
    assert decline_reason(content) == "epsilon-unreachable"
    assert stored(device) == before
    content = send(device, shared, server_round=2, **{"dp-epsilon": asked})
    assert decline_reason(content) is None and epsilon_of(content) <= asked
    assert json.loads((device / "ledger.json").read_text())["target_epsilon"] == 8.0  # the lasting target stays


@pytest.mark.parametrize("settings, code", [
    ({"shared-rank": 1_000_000}, "bad-request"),
    ({"max-steps": 10**9}, "bad-request"),
    ({"max-length": 10**7}, "bad-request"),
    ({"epochs": 10**6}, "bad-request"),
    ({"lr": float("inf")}, "bad-request"),
    ({"scheme": "os:getcwd"}, "bad-request"),
    ({"model": "m" * 5000}, "message-too-large"),
    ({RUN_LINEAGE: "a/b"}, "bad-request"),
    ({"x" * 100: 1}, "message-too-large"),
    ({"extra": list(range(5000))}, "message-too-large"),
], ids=lambda v: str(v)[:30])
def test_absurd_fields_are_declined_before_anything_is_read(trained, shared, settings, code):
    before = stored(trained)
    assert decline_reason(send(trained, shared, server_round=2, **DP, **settings)) == code
    assert stored(trained) == before


def test_oversized_shared_tensors_are_declined(trained, shared, monkeypatch):
    """Array records: only the run's shared tensors, with a bound on their total bytes (checked before they
    are even converted), and exactly the model's names and shapes (checked before they are stored)."""
    from fedpersona.client import request

    before = stored(trained)
    monkeypatch.setattr(request, "MAX_SHARED_BYTES", 1024)  # the bound, scaled down to the embedded model
    assert decline_reason(send(trained, shared, server_round=2, **DP)) == "message-too-large"
    assert stored(trained) == before


def test_no_sequence_of_messages_locks_a_device_out(trained, shared):
    """The issue's probes one after another on one device; then an ordinary round trains."""
    other = trained
    for settings in ({"dp-epsilon": 1e-300}, {"dp-epsilon": 1e-9, "dp-delta": 1e-300},
                     {**DP, RUN_LINEAGE: "y" * 100_000}, {**DP, "min-pairs": 10**9}):
        send(other, shared, server_round=2, **settings)
    assert decline_reason(send(other, shared, server_round=2, **DP)) is None
