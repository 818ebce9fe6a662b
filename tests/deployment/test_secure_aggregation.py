"""Secure aggregation over real processes: ``fedpersona server --secure-aggregation`` (SuperLink, TLS) and
four ``fedpersona client``s on 127.0.0.1. One device is killed (SIGKILL, as ``kill -9`` or a crash would)
right after it shared its keys: once its SuperNode has delivered its second reply (setup, then share-keys;
Flower's SuperNode logs "Sent successfully" when a reply and all its objects are in the SuperLink), before it
can send a masked input. The round still completes, with the other three in the sum, and nothing any device
trained is found on the server.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

pytestmark = pytest.mark.e2e

TINY = ("--set", "max-steps=2", "--set", "epochs=1", "--set", "max-length=40", "--set", "batch-size=4")


def replies_delivered(device: Path) -> int:
    """How many replies a device's SuperNode has delivered to the SuperLink (its own log says so)."""
    log = device / "logs" / "supernode.log"
    return log.read_text(errors="replace").count("Sent successfully") if log.is_file() else 0


def make_devices(root: Path, count: int) -> list[Path]:
    """State folders whose memories hold synthetic users 0..count-1 (16 training and 8 test pairs each), as
    conftest's ``make_device`` (whose scenario has 3 users)."""
    from fedpersona.data.synthetic import PreferenceSimulator
    from fedpersona.device.state import DeviceState

    simulator = PreferenceSimulator("conflicting", count, 0)
    out = []
    for i in range(count):
        user = simulator.user_data(i)
        pairs = root / f"feedback-{i}.jsonl"
        pairs.write_text("".join(json.dumps({"user_id": p.user_id, "prompt": p.prompt, "chosen": p.chosen,
                                             "rejected": p.rejected, "split": p.split}) + "\n"
                                 for p in [*user.train[:16], *user.test[:8]]), encoding="utf-8")
        with DeviceState(root / f"device-{i}") as device:
            device.memory.import_file(pairs)
        out.append(root / f"device-{i}")
    return out


def test_four_tls_devices_one_lost_after_key_sharing(tmp_path, procs, certs, h):
    started = time.monotonic()
    port = h.free_port()
    devices = make_devices(tmp_path, 4)
    server_state = tmp_path / "server"
    logs = [tmp_path / "server.log", *(tmp_path / f"client-{i}.log" for i in range(4)),
            server_state / "logs" / "superlink.log"]
    server = procs.fedpersona("server", "--state", str(server_state), "--certificates", str(certs), "--host",
                              "127.0.0.1", "--port", str(port), "--fraction", "1.0", "--round-timeout", "300",
                              "--quiet", "--rounds", "1", "--min-users", "4", "--dp", "--target-epsilon", "8",
                              "--secure-aggregation", *TINY, log=logs[0])
    h.wait_for(lambda: h.port_open(port), timeout=90, what="the SuperLink", alive=[server], logs=logs)
    clients = []
    for i, device in enumerate(devices):
        policy = ["--require-secure-aggregation"] if i == 0 else []
        clients.append(procs.fedpersona("client", "--server", f"127.0.0.1:{port}", "--state", str(device),
                                        "--root-certificates", str(certs / "ca.crt"), "--heartbeat-interval",
                                        "10", "--share-evaluation", *policy, log=logs[1 + i]))
    h.wait_for(lambda: replies_delivered(devices[3]) >= 2, timeout=240, what="device 3's share-keys reply",
               alive=[server, *clients], logs=logs)
    procs.kill(clients[3])  # SIGKILL; its SuperNode follows (PR_SET_PDEATHSIG)
    print(f"\ndevice 3 killed after {time.monotonic() - started:.0f} s")
    try:
        code = server.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not finish\n{h.tails(logs)}")
    assert code == 0, h.tails(logs)
    print(f"\nrun finished after {time.monotonic() - started:.0f} s")

    assert clients[3].returncode == -9
    client_3 = logs[4].read_text(errors="replace")
    assert "sent key shares" in client_3 and "sent the update" not in client_3, client_3
    row = json.loads((server_state / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["secure_aggregation_failed"] is None, row
    assert row["secure_aggregation_users"] == 4 and row["train_replies"] == 3, row
    assert row["secure_aggregation_dropped"] == 1 and row["secure_aggregation_refused"] == {"masked-input: no reply": 1}
    summary = json.loads((server_state / "out" / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and summary["secure_aggregation_users_included"] == 3

    # the three survivors trained (DP-SGD ledgers), hold no secrets any more, and what they trained is nowhere
    # on the server: not in the SuperLink's database, the checkpoints, the logs or the outputs
    secrets = []
    for device in devices[:3]:
        assert (device / "ledger.json").is_file() and not (device / "secure_aggregation.json").exists()
        with safe_open(str(device / "last_reply.safetensors"), framework="numpy") as handle:
            secrets += [handle.get_tensor(k).tobytes() for k in handle.keys()]
    secrets = [s for s in secrets if len(s) >= 64 and np.any(np.frombuffer(s, dtype=np.uint8))]
    assert secrets
    server_files = [p for p in server_state.rglob("*") if p.is_file()]
    assert any(p.name.startswith("superlink") for p in server_files)
    for path in server_files:
        data = path.read_bytes()
        assert not any(secret in data for secret in secrets), f"a device's trained tensor found in {path}"
    # the lost device sent no masked input (above) and its round's secrets stayed at home, never sent
    assert (devices[3] / "secure_aggregation.json").exists()
