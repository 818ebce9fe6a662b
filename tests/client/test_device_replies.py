"""A device tells the server codes, not facts (issue 23, item 1).

Every way a round can end on a device without an update (each decline reason, each failure: damaged
state files, a held lock, a full disk, a model it cannot load, an exception inside training or
evaluation, a message it cannot read or that is too large) is driven through the real ClientApp in device
mode (``state-dir`` in the node config, real Flower Messages, real DP-SGD on the embedded model), and what
would be sent is scanned: a decline holds exactly ``num-examples=0``, ``declined=1`` and the reason code;
a failure is a Flower error whose reason is exactly the code. Neither holds the state folder's path, the
pair counts, a sample rate or an exception's text; the device's own log keeps the full reason.

Faults the test cannot cause for real in a unit test (a full disk, an exception raised inside training)
are injected at one call (patched to raise), which tests our handling of them, not the disk.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpersona.client import device as device_module
from fedpersona.client.app import app as client_app
from fedpersona.config import SIMULATION_ONLY, RunConfig
from fedpersona.device.policy import policy_for
from fedpersona.device.state import DeviceState
from fedpersona.model.adapters import Role

TINY = RunConfig(max_steps=2, epochs=1, max_length=40, batch_size=4, rounds=3, fraction_train=1.0)
DEPLOYED = {k: v for k, v in TINY.to_flat().items() if k.replace("-", "_") not in SIMULATION_ONLY}
DP = {"dp-epsilon": 8.0}
TRAIN_PAIRS, TEST_PAIRS = 12, 4  # what the device's memory holds: numbers a reply must not carry
FAILURES = {"state-damaged", "state-busy", "storage-unwritable", "model-unavailable", "train-failed",
            "evaluate-failed", "unsupported-message", "task-failed"}


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


def _shared() -> dict[str, torch.Tensor]:
    from fedpersona.round.resident import resident_for

    resident = resident_for(RunConfig())
    resident.adapters.reset(Role.SHARED)
    return resident.adapters.tensors(Role.SHARED)


def _message(shared, kind=MessageType.TRAIN, *, server_round: int = 2, content: RecordDict | None = None,
             **settings) -> Message:
    if content is None:
        config = ConfigRecord({**DEPLOYED, **settings, "server-round": server_round})
        content = RecordDict({"arrays": ArrayRecord(shared), "config": config})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _call(state: Path, msg: Message) -> Message:
    context = Context(run_id=1, node_id=7, node_config={"state-dir": str(state)}, state=RecordDict(), run_config={})
    return client_app(msg, context)


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """Two device states, copied for each case: ``fresh`` (pairs only) and ``trained`` (one DP round done:
    ledger, private adapter, bound model and scheme)."""
    from fedpersona.data.synthetic import PreferenceSimulator

    root = tmp_path_factory.mktemp("templates")
    user = PreferenceSimulator("conflicting", 3, 0).user_data(0)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"user_id": p.user_id, "prompt": p.prompt, "chosen": p.chosen,
                                         "rejected": p.rejected, "split": p.split}) + "\n"
                             for p in [*user.train[:TRAIN_PAIRS], *user.test[:TEST_PAIRS]]), encoding="utf-8")
    fresh = root / "fresh"
    with DeviceState(fresh) as st:
        st.memory.import_file(pairs)
    trained = root / "trained"
    shutil.copytree(fresh, trained)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    reply = _call(trained, _message(_shared(), server_round=1, **DP))
    assert not reply.has_error() and not reply.content.metric_records["metrics"]["declined"]
    for state in device_module._OPEN.values():
        state.close()
    device_module._OPEN.clear()
    return {"fresh": fresh, "trained": trained}


def sent_texts(reply: Message) -> list[str]:
    """Every string a reply would carry: record names, keys, config values, the error's reason."""
    if reply.has_error():
        return [str(reply.error.reason)]
    out = []
    for name, record in reply.content.items():
        out.append(name)
        for key, value in record.items():
            out.append(str(key))
            if isinstance(value, (str, bytes)):
                out.append(str(value))
            elif isinstance(value, list):
                out.extend(str(v) for v in value)
    return out


def _damage(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda state: (state / name).write_bytes(data)


def _policy(**values) -> Callable[[Path], None]:
    return lambda state: policy_for(state, **values)


def _ledger_at_its_target(state: Path) -> None:
    from fedpersona.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger.from_json((state / "ledger.json").read_text())
    ledger.target_epsilon = ledger.spent_epsilon() * 1.0001  # the lasting budget is used up
    (state / "ledger.json").write_text(ledger.dumps())


def _hold_lock(state: Path, holders: list) -> None:
    from fedpersona.io import acquire_pid_lock

    fd, _ = acquire_pid_lock(state / ".lock")  # another holder: a separate open file description
    assert fd is not None
    holders.append(fd)


def _shape_changed(shared):
    name = next(iter(shared))
    return {**shared, name: torch.zeros(3, 5)}


def _unknown_key(shared):
    return {**shared, "base_model.secret.weight": torch.zeros(2)}


def _nan(shared):
    name = next(iter(shared))
    return {**shared, name: torch.full_like(shared[name], math.nan)}


def _huge(shared):  # finite, but every forward overflows: training diverges
    return {name: torch.full_like(t, 3e38) for name, t in shared.items()}


def _raise_in(target: str, text: str) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """Inject an exception whose text holds what must not leave: a rate, a count and the state's path."""
    def inject(monkeypatch: pytest.MonkeyPatch, state: Path) -> None:
        def boom(*args, **kwargs):
            raise RuntimeError(f"{text} (sample rate 0.333 of {TRAIN_PAIRS} pairs in {state})")
        monkeypatch.setattr(target, boom)
    return inject


def _disk_full(monkeypatch: pytest.MonkeyPatch, state: Path) -> None:
    from fedpersona.device import state as state_module

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(state_module, "_save_tensors", full)


CASES = [
    # (id, template, setup(state), inject(monkeypatch, state), message kind, settings, shared transform, code)
    ("no-dp", "trained", None, None, "train", {}, None, "dp-required"),
    ("epsilon-above-policy", "trained", None, None, "train", {"dp-epsilon": 1000.0}, None, "epsilon-above-policy"),
    ("delta-above-policy", "trained", None, None, "train", {**DP, "dp-delta": 1e-3}, None, "delta-above-policy"),
    ("simulation-setting", "trained", None, None, "train", {**DP, "data": "/etc/passwd"}, None, "simulation-setting"),
    ("loss-requested", "trained", None, None, "train", {**DP, "train-loss-key": "loss"}, None, "loss-requested"),
    ("scheme-mismatch", "trained", None, None, "train", {**DP, "scheme": "fedsa"}, None, "scheme-mismatch"),
    ("model-mismatch", "trained", _policy(model="some/other-model"), None, "train", DP, None, "model-mismatch"),
    ("ledger-missing", "trained", lambda s: (s / "ledger.json").unlink(), None, "train", DP, None, "ledger-missing"),
    ("not-enough-pairs", "trained", None, None, "train", {**DP, "min-pairs": 1_000_000}, None, "not-enough-pairs"),
    ("not-enough-pairs-evaluate", "trained", _policy(share_evaluation=True), None, "evaluate",
     {**DP, "min-pairs": 1_000_000}, None, "not-enough-pairs"),
    ("evaluation-private", "trained", None, None, "evaluate", DP, None, "evaluation-private"),
    ("bad-shared-nan", "trained", None, None, "train", DP, _nan, "bad-shared"),
    ("bad-shared-nan-evaluate", "trained", None, None, "evaluate", DP, _nan, "bad-shared"),
    ("bad-shared-shape", "trained", None, None, "train", DP, _shape_changed, "bad-shared"),
    ("bad-shared-unknown-key", "fresh", None, None, "train", DP, _unknown_key, "bad-shared"),
    ("budget-spent", "trained", _ledger_at_its_target, None, "train", DP, None, "budget-spent"),
    ("epsilon-unreachable", "trained", None, None, "train", {"dp-epsilon": 1e-300}, None, "epsilon-unreachable"),
    ("epsilon-unreachable-new-ledger", "fresh", None, None, "train", {"dp-epsilon": 1e-300}, None,
     "epsilon-unreachable"),
    ("count-noise-1e-6", "fresh", None, None, "train", {**DP, "dp-count-noise": 1e-6}, None, "epsilon-unreachable"),
    ("noise-below-policy", "fresh", _policy(min_noise_multiplier=50.0), None, "train", DP, None,
     "noise-below-policy"),
    ("diverged", "trained", _policy(require_dp=False), None, "train", {}, _huge, "diverged"),
    ("bad-value", "trained", None, None, "train", {**DP, "batch-size": -1}, None, "bad-request"),
    ("bad-type", "trained", None, None, "evaluate", {**DP, "epochs": "lots"}, None, "bad-request"),
    ("not-finite", "trained", None, None, "train", {**DP, "lr": math.nan}, None, "bad-request"),
    ("plugin-import", "trained", None, None, "train", {**DP, "loss": "os:getcwd"}, None, "bad-request"),
    ("huge-rank", "trained", None, None, "train", {**DP, "shared-rank": 1_000_000}, None, "bad-request"),
    ("long-lineage", "trained", None, None, "train", {**DP, "run-lineage": "x" * 200_000}, None, "message-too-large"),
    ("many-keys", "trained", None, None, "train", {**DP, **{f"k{i}": i for i in range(600)}}, None,
     "message-too-large"),
    ("no-config", "trained", None, None, "train", None, None, "bad-request"),
    # failures: an error reply whose reason is the code
    ("damaged-counters", "trained", _damage("counters.json", b"{not json"), None, "train", DP, None, "state-damaged"),
    ("damaged-counters-evaluate", "trained", _damage("counters.json", b"{not json"), None, "evaluate", DP, None,
     "state-damaged"),
    ("damaged-policy", "trained", _damage("policy.json", b'{"max_epsilon": "lots"}'), None, "train", DP, None,
     "state-damaged"),
    ("damaged-memory", "trained", _damage("memory.sqlite", b"SQLite format 3\x00" + b"\x07" * 4096), None,
     "train", DP, None, "state-damaged"),
    ("damaged-ledger", "trained", _damage("ledger.json", b'{"version": 1, "accountant": "rdp"}'), None, "train",
     DP, None, "state-damaged"),
    ("lock-held", "trained", "hold-lock", None, "train", DP, None, "state-busy"),
    ("disk-full", "trained", None, _disk_full, "train", DP, None, "storage-unwritable"),
    ("model-unavailable", "fresh", None, None, "train", {**DP, "model": "/nonexistent/models/m"}, None,
     "model-unavailable"),
    ("exception-in-training", "trained", None, _raise_in("fedpersona.privacy.dp_training.train_local_dp",
                                                         "opacus failed"), "train", DP, None, "train-failed"),
    ("exception-in-evaluation", "trained", _policy(share_evaluation=True),
     _raise_in("fedpersona.round.evaluate.evaluate_round", "evaluation failed"), "evaluate", DP, None,
     "evaluate-failed"),
    ("unsupported-message", "trained", None, None, "query", DP, None, "unsupported-message"),
    ("state-folder-gone", "trained", lambda s: shutil.rmtree(s), None, "train", DP, None, "state-damaged"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_what_a_device_sends_when_it_does_not_train_is_a_code(case, templates, tmp_path, monkeypatch, caplog,
                                                               split_resident):
    name, template, setup, inject, kind, settings, transform, code = case
    state = tmp_path / "alice-device"
    shutil.copytree(templates[template], state)
    holders: list[int] = []
    if setup == "hold-lock":
        _hold_lock(state, holders)
    elif setup is not None:
        setup(state)
    if inject is not None:
        inject(monkeypatch, state)
    shared = _shared()
    if transform is not None:
        shared = transform(shared)
    message_type = {"train": MessageType.TRAIN, "evaluate": MessageType.EVALUATE, "query": MessageType.QUERY}[kind]
    if settings is None:
        msg = _message(shared, message_type, content=RecordDict({"arrays": ArrayRecord(shared)}))
    else:
        msg = _message(shared, message_type, **settings)
    caplog.set_level(logging.INFO, logger="fedpersona")
    try:
        reply = _call(state, msg)
    finally:
        for fd in holders:
            import os

            os.close(fd)

    if code in FAILURES:
        assert reply.has_error(), f"{name}: expected an error reply"
        assert reply.error.code == 2 and reply.error.reason == code, reply.error.reason
    else:
        assert not reply.has_error(), f"{name}: {reply.error.reason}"
        content = reply.content
        assert set(content.keys()) <= {"arrays", "metrics", "status"}
        assert len(content.array_records.get("arrays", ArrayRecord())) == 0
        assert dict(content.metric_records["metrics"]) == {"num-examples": 0, "declined": 1}
        assert dict(content.config_records["status"]) == {"reason": code}
    texts = " ".join(sent_texts(reply))
    for secret in (str(tmp_path), "alice", "0.333", "sample rate", "Error", "Traceback", "/"):
        assert secret not in texts, f"{name}: the reply carries {secret!r}: {texts[:300]}"
    for count in (TRAIN_PAIRS, TEST_PAIRS + TRAIN_PAIRS):
        assert str(count) not in texts.replace(code, ""), f"{name}: the reply carries the count {count}"
    # the device keeps the whole reason: its log names it (with the code the server was told)
    logged = [r.getMessage() for r in caplog.records if r.name == "fedpersona.client.watch"]
    assert any(code in line for line in logged), f"{name}: nothing noted on the device: {logged}"


def test_a_server_reading_the_old_detail_key_finds_nothing(templates, tmp_path, split_resident):
    """The status record is the code alone: no 'detail' line for a server's log."""
    state = tmp_path / "d"
    shutil.copytree(templates["trained"], state)
    reply = _call(state, _message(_shared(), **{**DP, "min-pairs": 1_000_000}))
    assert "detail" not in reply.content.config_records["status"]


def test_a_cohort_error_keeps_its_text_in_a_simulation_only(split_resident):
    """Simulation mode (the researcher's own process) keeps a one-line exception reason; the device guard
    does not apply there (no state-dir in the node config)."""
    from fedpersona.client.failures import is_device

    sim = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    device = Context(run_id=1, node_id=7, node_config={"state-dir": "/x"}, state=RecordDict(), run_config={})
    assert not is_device(sim) and is_device(device)
    with pytest.raises(ValueError, match="No query function"):
        client_app(_message({}, MessageType.QUERY), sim)


def test_arrays_other_than_the_shared_ones_are_declined(templates, tmp_path, split_resident):
    state = tmp_path / "d"
    shutil.copytree(templates["trained"], state)
    shared = _shared()
    config = ConfigRecord({**DEPLOYED, **DP, "server-round": 2})
    extra = ArrayRecord({"x": Array(torch.zeros(4).numpy())})
    reply = _call(state, _message(shared, content=RecordDict({"arrays": ArrayRecord(shared), "more": extra,
                                                              "config": config})))
    assert dict(reply.content.config_records["status"]) == {"reason": "bad-request"}
