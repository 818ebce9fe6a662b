"""The device decides, over real processes: ``fedpersona server`` (TLS) asks, ``fedpersona client``s decline.

Each device here has its own policy (``fedpersona client`` flags, saved in STATE/policy.json). A server
asking for less privacy than a device accepts gets a declined reply with the device's reason, recorded
in metrics.jsonl, and the device's ledger and private adapter stay untouched.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TINY = ("--set", "max-steps=2", "--set", "epochs=1", "--set", "max-length=40", "--set", "batch-size=4")


def run_round(tmp_path: Path, procs, certs, h, devices: list[Path], policies: list[list[str]],
              *server_flags: str) -> dict:
    """One round of one server with these devices; returns metrics.jsonl's row of round 1."""
    port = h.free_port()
    server_state = tmp_path / "server"
    logs = [tmp_path / "server.log", *(tmp_path / f"client-{i}.log" for i in range(len(devices))),
            server_state / "logs" / "superlink.log"]
    server = procs.fedpersona("server", "--state", str(server_state), "--certificates", str(certs), "--host",
                              "127.0.0.1", "--port", str(port), "--fraction", "1.0", "--round-timeout", "300",
                              "--quiet", "--rounds", "1", "--min-users", str(len(devices)), *TINY, *server_flags,
                              log=logs[0])
    h.wait_for(lambda: h.port_open(port), timeout=90, what="the SuperLink", alive=[server], logs=logs)
    for i, (device, policy) in enumerate(zip(devices, policies, strict=True)):
        procs.fedpersona("client", "--server", f"127.0.0.1:{port}", "--state", str(device), "--root-certificates",
                         str(certs / "ca.crt"), "--heartbeat-interval", "10", *policy, log=logs[1 + i])
    assert server.wait(timeout=300) == 0, h.tails(logs)
    return json.loads((server_state / "out" / "metrics.jsonl").read_text().splitlines()[0])


def test_a_server_asking_for_a_larger_epsilon_or_delta_is_declined(tmp_path, procs, certs, make_device, h):
    devices = [make_device(i) for i in range(3)]
    policies = [[],  # the defaults: epsilon <= 8, delta <= 1e-5
                ["--max-epsilon", "30"],
                ["--max-epsilon", "30", "--max-delta", "1e-3", "--share-evaluation"]]
    row = run_round(tmp_path, procs, certs, h, devices, policies,
                    "--dp", "--target-epsilon", "20", "--set", "dp-delta=1e-4")
    assert row["train_replies"] == 1, row
    assert row["train_declined_reasons"] == {"epsilon-above-policy": 1, "delta-above-policy": 1}, row
    assert row["eval_users"] == 1  # the two others keep their accuracies (evaluation-private)
    for device in devices[:2]:  # nothing trained, nothing spent
        assert not (device / "ledger.json").exists() and not (device / "private_adapter.safetensors").exists()
    trained = json.loads((devices[2] / "ledger.json").read_text())
    # the run's 20 caps its rounds; the ledger's lasting target is the device's policy (client.device.prepare_ledger)
    assert trained["target_epsilon"] == 30.0 and trained["delta"] == 1e-4 and trained["history"]
    assert json.loads((devices[0] / "policy.json").read_text())["max_epsilon"] == 8.0

    # what each device's terminal said (issue 23): the trainer's phases, the decliners' whole reasons
    terminal = (tmp_path / "client-2.log").read_text()
    for line in ("round 1: computing reference log-probs of 16 pairs", "round 1: training step 1 of 2",
                 "round 1: training step 2 of 2", "round 1: trained on your 16 training pairs",
                 "evaluating on your held-out pairs"):
        assert line in terminal, f"{line!r} not on the device's terminal:\n{terminal[-3000:]}"
    said = (tmp_path / "client-0.log").read_text()
    assert "declined to train: the round asks for epsilon 20; this device accepts at most 8 " \
           "(epsilon-above-policy)" in said, said[-2000:]
    # ... and the server holds only codes: no device's folder, no reason text, in its database, logs, outputs
    for path in (tmp_path / "server").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"this device accepts" not in data and not any(str(d).encode() in data for d in devices), path
    device = procs.started[1]  # Ctrl-C on an idle device: a stop line, exit 0, no traceback
    device.send_signal(signal.SIGINT)
    assert device.wait(timeout=60) == 0
    said = (tmp_path / "client-0.log").read_text()
    assert "stopping (Ctrl-C): no round was running" in said and "Traceback" not in said, said[-2000:]

    # forget + re-import keeping the spent epsilon: tests/client/test_policy.py (the real CLI, in process)


def test_a_server_asking_for_no_dp_is_declined_unless_the_user_allows_it(tmp_path, procs, certs, make_device, h):
    devices = [make_device(i) for i in range(2)]
    row = run_round(tmp_path, procs, certs, h, devices, [[], ["--allow-no-dp"]], "--no-dp")
    assert row["train_replies"] == 1 and row["train_declined_reasons"] == {"dp-required": 1}, row
    assert not (devices[0] / "private_adapter.safetensors").exists()
    assert (devices[1] / "private_adapter.safetensors").exists() and not (devices[1] / "ledger.json").exists()


@pytest.mark.parametrize("damage", ["delete", "empty"])
def test_a_device_whose_ledger_was_lost_refuses_to_start(tmp_path, make_device, h, damage):
    import torch

    from fedpersona.device.state import DeviceState

    device = make_device(0)
    with DeviceState(device) as state:
        state.bind("embedded", "split")
        state.save_ledger({"version": 1})
        state.save_private({"x": torch.zeros(4)}, rounds_trained=1)
    ledger = device / "ledger.json"
    ledger.unlink() if damage == "delete" else ledger.write_text("{}")
    done = subprocess.run([sys.executable, "-m", "fedpersona.cli", "client", "--server", f"127.0.0.1:{h.free_port()}",
                           "--state", str(device), "--insecure"], capture_output=True, text=True, timeout=60,
                          env=h.child_env())
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "privacy ledger" in lines[0] and "reset-budget" in lines[0], done.stderr
