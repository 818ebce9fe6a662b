"""The device decides: its privacy policy, a budget that cannot be reset by accident, idempotent rounds.

Every test drives the real ClientApp (device mode: ``state-dir`` in the node config) with real Flower
Messages, real DP-SGD (Opacus) and the embedded model, and looks at what the reply carries and what the
state folder holds afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpersona.client import device as device_module
from fedpersona.client.app import app as client_app
from fedpersona.device.state import DeviceState
from fedpersona.deploy.node import ClientOptions, check_device
from fedpersona.device.policy import DevicePolicy, policy_for
from fedpersona.config import SIMULATION_ONLY, RunConfig
from fedpersona.errors import UsageError
from fedpersona.model.adapters import Role
from fedpersona.protocol import RUN_LINEAGE, decline_reason

TINY = RunConfig(max_steps=2, epochs=1, max_length=40, batch_size=4, rounds=3, fraction_train=1.0)
# what a deployment server sends: no simulation-only setting (fedpersona.server.federation)
DEPLOYED = {k: v for k, v in TINY.to_flat().items() if k.replace("-", "_") not in SIMULATION_ONLY}


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(autouse=True)
def _fresh_device_objects():
    device_module._OPEN.clear()  # one DeviceState per directory per process: none left from another test
    yield
    for state in device_module._OPEN.values():
        state.close()
    device_module._OPEN.clear()


@pytest.fixture
def shared(split_resident):
    return split_resident.adapters.tensors(Role.SHARED)


@pytest.fixture
def device(tmp_path: Path) -> Path:
    from fedpersona.data.synthetic import PreferenceSimulator

    user = PreferenceSimulator("conflicting", 3, 0).user_data(0)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"user_id": p.user_id, "prompt": p.prompt, "chosen": p.chosen,
                                         "rejected": p.rejected, "split": p.split}) + "\n"
                             for p in [*user.train[:12], *user.test[:4]]), encoding="utf-8")
    state = tmp_path / "device"
    with DeviceState(state) as st:
        st.memory.import_file(pairs)
    return state


def send(state: Path, shared, kind=MessageType.TRAIN, server_round: int = 1, **settings):
    config = ConfigRecord({**DEPLOYED, **settings, "server-round": server_round})
    msg = Message(content=RecordDict({"arrays": ArrayRecord(shared), "config": config}), dst_node_id=7,
                  message_type=kind)
    context = Context(run_id=1, node_id=7, node_config={"state-dir": str(state)}, state=RecordDict(), run_config={})
    reply = client_app(msg, context)
    assert not reply.has_error(), reply.error
    return reply.content


def ledger_bytes(state: Path) -> bytes | None:
    path = state / "ledger.json"
    return path.read_bytes() if path.exists() else None


def epsilon_of(content) -> float:
    return float(content.metric_records["metrics"]["epsilon"])


@pytest.mark.parametrize("settings, reason", [
    ({}, "dp-required"),
    ({"user-dp-noise": 1.0}, "dp-required"),  # the server's own noise does not protect against the server
    ({"dp-epsilon": 1000.0}, "epsilon-above-policy"),
    ({"dp-epsilon": 8.0, "dp-delta": 1e-3}, "delta-above-policy"),
    ({"dp-epsilon": 8.0, "dp-reproducible": True}, "simulation-setting"),
    ({"dp-epsilon": 8.0, "data": "/etc/passwd"}, "simulation-setting"),
    ({"dp-epsilon": 8.0, "train-loss-key": "loss"}, "loss-requested"),
])
def test_rounds_less_private_than_the_policy_are_declined_and_cost_nothing(device, shared, settings, reason):
    first = send(device, shared, **{"dp-epsilon": 8.0})  # a normal DP round: the ledger exists
    assert decline_reason(first) is None
    before = ledger_bytes(device)
    content = send(device, shared, server_round=2, **settings)
    assert decline_reason(content) == reason
    assert len(content.array_records["arrays"]) == 0
    metrics = content.metric_records["metrics"]
    assert metrics["num-examples"] == 0 and "train-steps" not in metrics and "loss" not in metrics
    assert ledger_bytes(device) == before, "a declined round changed the ledger"


def test_a_stricter_round_is_trained_and_a_noise_floor_is_kept(device, shared):
    policy_for(device, min_noise_multiplier=50.0)
    content = send(device, shared, **{"dp-epsilon": 8.0})
    assert decline_reason(content) == "noise-below-policy"
    assert ledger_bytes(device) is None
    policy_for(device, min_noise_multiplier=0.0, max_epsilon=4.0)
    content = send(device, shared, **{"dp-epsilon": 2.0})  # asks for more privacy than the policy: trained
    assert decline_reason(content) is None and 0 < epsilon_of(content) <= 2.0
    # the run's 2.0 caps its rounds; the ledger's lasting target is the policy's (client.device.prepare_ledger)
    assert json.loads(ledger_bytes(device))["target_epsilon"] == 4.0


def test_another_model_or_scheme_is_declined_once_private_state_exists(device, shared):
    assert decline_reason(send(device, shared, **{"dp-epsilon": 8.0})) is None
    assert decline_reason(send(device, shared, server_round=2, **{"dp-epsilon": 8.0, "scheme": "fedsa"})) == \
        "scheme-mismatch"
    policy_for(device, model="some/other-model")
    assert decline_reason(send(device, shared, server_round=2, **{"dp-epsilon": 8.0})) == "model-mismatch"


def test_evaluation_results_stay_on_the_device_under_dp_unless_shared(device, shared):
    send(device, shared, **{"dp-epsilon": 8.0})
    content = send(device, shared, kind=MessageType.EVALUATE, **{"dp-epsilon": 8.0})
    assert decline_reason(content) == "evaluation-private"
    assert not any(key.startswith("acc-") for key in content.metric_records["metrics"])
    assert (device / "shared_adapter.safetensors").exists()  # generation offline still has the newest adapter
    policy_for(device, share_evaluation=True)
    content = send(device, shared, kind=MessageType.EVALUATE, **{"dp-epsilon": 8.0})
    assert decline_reason(content) is None and "acc-personalized" in content.metric_records["metrics"]


def test_a_repeated_round_of_the_same_run_is_answered_without_paying_again(device, shared):
    lineage = {RUN_LINEAGE: "run-a"}
    first = send(device, shared, **{"dp-epsilon": 8.0}, **lineage)
    spent = ledger_bytes(device)
    again = send(device, shared, **{"dp-epsilon": 8.0}, **lineage)  # a resumed server asks round 1 again
    assert ledger_bytes(device) == spent
    assert epsilon_of(again) == epsilon_of(first)
    sent = {k: a.numpy() for k, a in first.array_records["arrays"].items()}
    resent = {k: a.numpy() for k, a in again.array_records["arrays"].items()}
    assert sent.keys() == resent.keys() and all((sent[k] == resent[k]).all() for k in sent)
    later = send(device, shared, server_round=2, **{"dp-epsilon": 8.0}, **lineage)
    assert epsilon_of(later) > epsilon_of(first)


@pytest.mark.parametrize("damage", ["delete", "empty"])
def test_a_lost_ledger_is_refused_not_restarted(device, shared, damage):
    send(device, shared, **{"dp-epsilon": 8.0})
    ledger = device / "ledger.json"
    ledger.unlink() if damage == "delete" else ledger.write_text("{}")
    content = send(device, shared, server_round=2, **{"dp-epsilon": 8.0})
    assert decline_reason(content) == "ledger-missing"
    assert not ledger.exists() or ledger.read_text() == "{}"
    with pytest.raises(UsageError, match="reset-budget") as err:
        check_device(ClientOptions(server="127.0.0.1:1", state=device))
    assert "\n" not in str(err.value)


def test_a_device_that_trained_without_dp_restarts_and_still_declines_dp_rounds(device, shared):
    """A policy admitting rounds without DP trains without a ledger; `fedpersona client` must start again on
    that state (it used to refuse: "ledger is missing"), and a DP round is then declined, never restarted."""
    policy_for(device, require_dp=False)
    send(device, shared)  # no DP: a private adapter and a round trained, no ledger
    assert not (device / "ledger.json").exists()
    assert check_device(ClientOptions(server="127.0.0.1:1", state=device)).require_dp is False
    assert decline_reason(send(device, shared, server_round=2, **{"dp-epsilon": 8.0})) == "ledger-missing"
    with pytest.raises(UsageError, match="reset-budget"):  # the user asks for DP again: the budget question comes
        check_device(ClientOptions(server="127.0.0.1:1", state=device, policy=(("require_dp", True),)))
    assert DevicePolicy.load(device).require_dp is False  # a refused start saves nothing


def test_a_damaged_state_file_fails_before_anything_is_spent(device, shared):
    send(device, shared, **{"dp-epsilon": 8.0})
    before = ledger_bytes(device)
    (device / "counters.json").write_bytes(b"{not json")
    # an error reply with the code alone; the file's name stays on the device (fedpersona.client.failures)
    config = ConfigRecord({**DEPLOYED, "dp-epsilon": 8.0, "server-round": 2})
    msg = Message(content=RecordDict({"arrays": ArrayRecord(shared), "config": config}), dst_node_id=7,
                  message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={"state-dir": str(device)}, state=RecordDict(), run_config={})
    reply = client_app(msg, context)
    assert reply.has_error() and reply.error.reason == "state-damaged"
    assert ledger_bytes(device) == before


def test_forget_and_reimport_does_not_lower_the_spent_epsilon(device, shared, tmp_path):
    from typer.testing import CliRunner

    from fedpersona.cli import app as cli

    spent = epsilon_of(send(device, shared, **{"dp-epsilon": 8.0}))
    runner = CliRunner()
    assert runner.invoke(cli, ["feedback", "forget", "--state", str(device), "--yes"]).exit_code == 0
    assert not (device / "ledger.json").exists() and (device / "privacy_record.json").exists()
    assert "prompt" not in (device / "privacy_record.json").read_text()  # hashes, not text
    result = runner.invoke(cli, ["feedback", "import", str(tmp_path / "pairs.jsonl"), "--state", str(device)])
    assert result.exit_code == 0, result.output
    stats = json.loads(runner.invoke(cli, ["feedback", "stats", "--state", str(device), "--json"]).output)
    assert stats["epsilon_spent"] >= spent - 1e-9
    again = epsilon_of(send(device, shared, **{"dp-epsilon": 8.0}))
    assert again > spent  # the earlier spend is the new ledger's prior, this round adds to it


def test_reset_budget_is_explicit_and_only_for_a_lost_ledger(device, shared):
    from typer.testing import CliRunner

    from fedpersona.cli import app as cli

    runner = CliRunner()
    send(device, shared, **{"dp-epsilon": 8.0})
    from fedpersona.cli import main

    with pytest.raises(SystemExit) as refused:  # main: a UsageError is one line and exit code 2
        main(["feedback", "reset-budget", "--state", str(device), "--yes"])
    assert refused.value.code == 2
    (device / "ledger.json").unlink()
    done = runner.invoke(cli, ["feedback", "reset-budget", "--state", str(device), "--yes"])
    assert done.exit_code == 0, done.output
    assert not (device / "private_adapter.safetensors").exists()
    assert decline_reason(send(device, shared, server_round=2, **{"dp-epsilon": 8.0})) is None


def test_policy_file_round_trip_and_damage(tmp_path):
    assert DevicePolicy.load(tmp_path) is None
    policy = policy_for(tmp_path, max_epsilon=4.0)
    assert DevicePolicy.load(tmp_path) == policy and policy.require_dp
    (tmp_path / "policy.json").write_text('{"max_epsilon": "lots"}')
    with pytest.raises(UsageError, match="policy.json"):
        DevicePolicy.load(tmp_path)
    with pytest.raises(UsageError, match="max-epsilon"):
        DevicePolicy(max_epsilon=float("inf")).validate()


def test_a_non_finite_shared_adapter_from_the_server_is_neither_stored_nor_trained_on(device, shared):
    import torch

    send(device, shared, **{"dp-epsilon": 8.0})
    before = {p.name: p.read_bytes() for p in device.iterdir() if p.suffix in (".json", ".safetensors")}
    poisoned = {name: torch.full_like(t, float("nan")) if i == 0 else t for i, (name, t) in enumerate(shared.items())}
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        content = send(device, poisoned, kind=kind, server_round=2, **{"dp-epsilon": 8.0})
        assert decline_reason(content) == "bad-shared"
    after = {p.name: p.read_bytes() for p in device.iterdir() if p.suffix in (".json", ".safetensors")}
    assert after == before  # no NaN shared adapter kept for `generate`, nothing spent


def test_a_round_that_diverges_keeps_the_old_private_adapter_and_sends_nothing(device, shared):
    import torch

    policy_for(device, require_dp=False)
    send(device, shared)  # a first round creates the private adapter
    with DeviceState(device) as st:
        kept = st.load_private()
    # finite but huge shared values: the forward overflows, the loss and every gradient turn NaN
    huge = {name: torch.full_like(t, 3e38) for name, t in shared.items()}
    content = send(device, huge, server_round=2)
    assert decline_reason(content) == "diverged"
    assert len(content.array_records["arrays"]) == 0
    with DeviceState(device) as st:
        assert all(torch.equal(kept[k], v) for k, v in st.load_private().items())


def test_forget_and_new_feedback_while_the_client_runs(device, shared, tmp_path):
    """Issue 12 kind 4: `feedback forget` from another process while this process (the long-lived
    client) holds the state open; the next round trains on the newly imported pairs, not on 0 pairs."""
    import subprocess
    import sys

    from fedpersona.data.synthetic import PreferenceSimulator

    policy_for(device, require_dp=False)
    first = send(device, shared)
    assert first.metric_records["metrics"]["num-examples"] == 12
    cli = [sys.executable, "-m", "fedpersona.cli"]
    done = subprocess.run([*cli, "feedback", "forget", "--state", str(device), "--yes"], capture_output=True, text=True)
    assert done.returncode == 0 and "forgot 16 pairs" in done.stdout, done.stderr
    # the running process sees the forgotten memory as empty, never the old rows
    assert send(device, shared, server_round=2).metric_records["metrics"]["num-examples"] == 0
    user = PreferenceSimulator("conflicting", 3, 0).user_data(1)
    pairs = tmp_path / "new.jsonl"
    pairs.write_text("".join(json.dumps({"user_id": p.user_id, "prompt": p.prompt, "chosen": p.chosen,
                                         "rejected": p.rejected, "split": p.split}) + "\n"
                             for p in [*user.train[:7], *user.test[:2]]),
                     encoding="utf-8")
    done = subprocess.run([*cli, "feedback", "import", str(pairs), "--state", str(device)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    content = send(device, shared, server_round=3)
    assert decline_reason(content) is None and content.metric_records["metrics"]["num-examples"] == 7
