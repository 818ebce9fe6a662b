"""A deployment round closes at its wall-clock deadline, over real processes on loopback.

``fedpersona server`` (TLS) with ``round-deadline`` runs one round with two ``fedpersona client`` devices:
one holds a few pairs, the other hundreds (the same 20 local epochs make it train about 25 times longer, far
past the deadline). The round must close at the deadline with the fast device's update, count the slow
device as late, and the run finish with that in ``metrics.jsonl`` and ``summary.json``.

The deadline leaves the fast device room: on a 2-core machine its first task takes ~12 s from the round's
start (the device loads the model then; training itself ~3 s). Once the round has closed (the fast device
is evaluating), the late device leaves (SIGTERM: its SuperNode deactivates, so the final evaluation gets
Flower's node-unavailable reply at once instead of waiting ``round-timeout`` for a device that is still
busy training a round nobody will pull).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

DEADLINE_S = 20.0
# no step cap: each device trains epochs x its own batches (the slow one: ~100 batches an epoch)
WORK = ("--set", "max-steps=0", "--set", "min-steps=0", "--set", "epochs=20", "--set", "max-length=32",
        "--set", "batch-size=4")


def slow_device(tmp_path: Path) -> Path:
    """A device whose memory holds ~400 training pairs (synthetic users' pairs under one user id)."""
    from fedpersona.data.synthetic import PreferenceSimulator
    from fedpersona.device.state import DeviceState

    simulator = PreferenceSimulator("conflicting", 12, 1)
    rows = [p for i in range(12) for p in simulator.user_data(i).train][:400]
    rows += simulator.user_data(0).test[:4]
    pairs = tmp_path / "feedback-slow.jsonl"
    pairs.write_text("".join(json.dumps({"user_id": "slow-user", "prompt": p.prompt, "chosen": p.chosen,
                                         "rejected": p.rejected, "split": p.split}) + "\n" for p in rows),
                     encoding="utf-8")
    state = tmp_path / "device-slow"
    with DeviceState(state) as device:
        device.memory.import_file(pairs)
    return state


def test_a_round_closes_at_its_deadline_and_counts_the_late_device(tmp_path, procs, certs, make_device, h):
    port = h.free_port()
    fast, slow = make_device(0), slow_device(tmp_path)
    server_state = tmp_path / "server"
    logs = [tmp_path / "server.log", tmp_path / "client-fast.log", tmp_path / "client-slow.log",
            server_state / "logs" / "superlink.log"]
    server = procs.fedpersona("server", "--state", str(server_state), "--certificates", str(certs), "--host",
                              "127.0.0.1", "--port", str(port), "--fraction", "1.0", "--round-timeout", "30",
                              "--quiet", "--rounds", "1", "--min-users", "2", "--no-dp", *WORK,
                              "--set", f"round-deadline={DEADLINE_S}", log=logs[0])
    h.wait_for(lambda: h.port_open(port), timeout=90, what="the SuperLink", alive=[server], logs=logs)
    devices = [procs.fedpersona("client", "--server", f"127.0.0.1:{port}", "--state", str(device),
                                "--root-certificates", str(certs / "ca.crt"), "--heartbeat-interval", "10",
                                "--allow-no-dp", "--share-evaluation", log=log)
               for device, log in ((fast, logs[1]), (slow, logs[2]))]
    started = time.monotonic()
    # the fast device evaluates only once the server has closed the training round: the late device may go
    h.wait_for(lambda: "round 1: evaluating" in logs[1].read_text(errors="replace"), timeout=150,
               what="the round to close", alive=[server, *devices], logs=logs)
    devices[1].send_signal(signal.SIGTERM)
    assert server.wait(timeout=240) == 0, h.tails(logs)
    print(f"\nrun finished {time.monotonic() - started:.0f} s after the devices started")

    row = json.loads((server_state / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["selected"] == 2 and row["train_replies"] == 1 and row["late_users"] == 1, row
    assert row["surplus_users"] == 0 and row["round_complete"] is True
    assert DEADLINE_S - 0.5 <= row["round_seconds"] <= DEADLINE_S + 5, row  # closed at the deadline, not later
    summary = json.loads((server_state / "out" / "summary.json").read_text())
    assert summary["late_users"] == 1 and summary["clock"] == "wall" and summary["simulated_seconds"] is None
    assert summary["round_deadline_s"] == DEADLINE_S
    assert (fast / "private_adapter.safetensors").exists()  # the in-time device trained and kept its update
