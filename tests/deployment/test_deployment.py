"""End to end over real processes: ``fedpersona server`` (a SuperLink, TLS) and ``fedpersona client``s.

Tiny settings (embedded model, 2 optimizer steps a round, short sequences) keep each test short on a
2-core machine; most of the time is process start-up (Python, torch, the model) and, in the kill
test, the SuperLink noticing the killed SuperNode is gone (its heartbeat lapses after 2 x 10 s).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

pytestmark = pytest.mark.e2e

TINY = ("--set", "max-steps=2", "--set", "epochs=1", "--set", "max-length=40", "--set", "batch-size=4")


def server_args(state: Path, certs: Path, port: int, *extra: str) -> list[str]:
    return ["server", "--state", str(state), "--certificates", str(certs), "--host", "127.0.0.1", "--port", str(port),
            "--fraction", "1.0", "--round-timeout", "300", "--quiet", *TINY, *extra]


def client_args(state: Path, certs: Path, port: int, log: Path) -> list[str]:
    # --heartbeat-interval 10: the SuperLink notices a killed device after 20 s instead of 60 s;
    # --share-evaluation: these devices' policies send held-out accuracies (a DP device keeps them by default)
    return ["client", "--server", f"127.0.0.1:{port}", "--state", str(state), "--root-certificates",
            str(certs / "ca.crt"), "--log", str(log), "--verbose", "--heartbeat-interval", "10",
            "--share-evaluation"]


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as handle:
        return dict(handle.metadata() or {})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_three_tls_devices_keep_private_state_and_a_killed_one_rejoins(tmp_path, procs, certs, make_device, h):
    started = time.monotonic()
    port = h.free_port()
    devices = [make_device(i) for i in range(3)]
    server_state = tmp_path / "server"
    server_log = tmp_path / "server.log"
    client_logs = [tmp_path / f"client-{i}.log" for i in range(3)]
    node_logs = [tmp_path / f"supernode-{i}.log" for i in range(3)]
    logs = [server_log, *client_logs, *node_logs, server_state / "logs" / "superlink.log"]

    server = procs.fedpersona(*server_args(server_state, certs, port, "--rounds", "2", "--min-users", "3",
                                           "--dp", "--target-epsilon", "8", "--scheme", "split",
                                           "--set", "eval-every=2"), log=server_log)
    h.wait_for(lambda: h.port_open(port), timeout=90, what="the SuperLink", alive=[server], logs=logs)
    clients = [procs.fedpersona(*client_args(devices[i], certs, port, node_logs[i]), log=client_logs[i])
               for i in range(3)]
    checkpoint = server_state / "checkpoints" / "latest.json"
    h.wait_for(lambda: checkpoint.exists(), timeout=240, what="round 1's checkpoint", alive=[server, *clients],
               logs=logs)
    round_one = time.monotonic() - started

    # Round 2's training messages are going out now: kill device 0 the hard way, then bring it back.
    procs.kill(clients[0])
    h.wait_for(lambda: not h.leftovers(devices[0]), timeout=30, what="device 0's SuperNode to die with its client",
               logs=logs)
    restarted_at = time.time()
    procs.fedpersona(*client_args(devices[0], certs, port, node_logs[0]), log=client_logs[0])
    try:
        code = server.wait(timeout=300)
    except Exception:
        pytest.fail(f"the run did not finish after the restart\n{h.tails(logs)}")
    assert code == 0, h.tails(logs)
    total = time.monotonic() - started
    print(f"\nround 1 done after {round_one:.0f} s; run finished after {total:.0f} s")

    summary = json.loads((server_state / "out" / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert summary["evaluated_users"] == 3 and summary["num_users"] == 3  # the restarted device took part
    assert summary["epsilon_max"] is not None and summary["epsilon_max"] <= 8.0 + 1e-6
    last = rows(server_state / "out" / "metrics.jsonl")[-1]
    assert last["round"] == 2 and last["eval_users"] == 3
    assert last["train_replies"] + last["train_failures"] + last.get("train_declined", 0) == 3

    # The restarted device received round 2's global adapter (the evaluation message) after restarting.
    shared0 = devices[0] / "shared_adapter.safetensors"
    assert metadata(shared0).get("server_round") == "2" and shared0.stat().st_mtime >= restarted_at

    # Private adapters and ledgers: each in its own state folder, nowhere else.
    private = {i: read_tensors(d / "private_adapter.safetensors") for i, d in enumerate(devices)}
    for i, device in enumerate(devices):
        assert (device / "ledger.json").is_file()
        assert all(".private." in name for name in private[i])
        secrets = [a.tobytes() for a in private[i].values() if a.size >= 16 and np.any(a)]
        assert secrets
        elsewhere = [p for j, d in enumerate(devices) if j != i for p in all_files(d)] + all_files(server_state)
        for path in elsewhere:
            data = path.read_bytes()
            leaked = [k for k, secret in enumerate(secrets) if secret in data]
            assert not leaked, f"device {i}'s private tensor found in {path}"
        ledger = (device / "ledger.json").read_bytes()
        assert not any(ledger in p.read_bytes() for p in elsewhere), f"device {i}'s ledger found elsewhere"

    # The server's checkpoint holds shared tensors only (the same names the devices received).
    shared_names = set(read_tensors(shared0))
    assert shared_names and all(".shared." in n for n in shared_names)
    round_dir = server_state / "checkpoints" / json.loads(checkpoint.read_text())["dir"]
    assert set(read_tensors(round_dir / "shared.safetensors")) == shared_names
    names = [n for p in all_files(server_state / "checkpoints") if p.suffix == ".safetensors"
             for n in read_tensors(p)]
    assert not any(".private." in n for n in names)
    assert total < 300


def test_killed_server_resumes_from_last_finished_round(tmp_path, procs, certs, make_device, h):
    started = time.monotonic()
    port = h.free_port()
    devices = [make_device(i) for i in range(2)]
    server_state = tmp_path / "server"
    server_logs = [tmp_path / "server-1.log", tmp_path / "server-2.log"]
    node_logs = [tmp_path / f"supernode-{i}.log" for i in range(2)]
    client_logs = [tmp_path / f"client-{i}.log" for i in range(2)]
    logs = [*server_logs, *client_logs, *node_logs, server_state / "logs" / "superlink.log"]
    run = ("--rounds", "2", "--min-users", "2", "--strategy", "FedAdam(eta=0.01)")

    server = procs.fedpersona(*server_args(server_state, certs, port, *run), log=server_logs[0])
    h.wait_for(lambda: h.port_open(port), timeout=90, what="the SuperLink", alive=[server], logs=logs)
    clients = [procs.fedpersona(*client_args(devices[i], certs, port, node_logs[i]), log=client_logs[i])
               for i in range(2)]
    latest = server_state / "checkpoints" / "latest.json"
    h.wait_for(lambda: latest.exists(), timeout=240, what="round 1's checkpoint", alive=[server, *clients], logs=logs)

    procs.kill(server)  # SIGKILL: the SuperLink and ServerApp go with it
    h.wait_for(lambda: not h.port_open(port), timeout=30, what="the SuperLink to die with its server", logs=logs)
    done = json.loads(latest.read_text())["round"]
    assert done == 1
    round_dir = server_state / "checkpoints" / json.loads(latest.read_text())["dir"]
    strategy_state = read_tensors(round_dir / "strategy.safetensors")
    assert any(k.startswith("m_t/") for k in strategy_state) and any(k.startswith("v_t/") for k in strategy_state)

    server = procs.fedpersona(*server_args(server_state, certs, port, *run, "--resume"), log=server_logs[1])
    assert server.wait(timeout=300) == 0, h.tails(logs)
    print(f"\nresumed after round {done}; finished after {time.monotonic() - started:.0f} s")

    numbers = [row["round"] for row in rows(server_state / "out" / "metrics.jsonl")]
    assert numbers == [1, 2], numbers  # continued from the checkpoint: none repeated, none missing
    summary = json.loads((server_state / "out" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["resumed_from_round"] == done
    assert summary["evaluated_users"] == 2
    assert json.loads(latest.read_text())["round"] == 2
    for device in devices:  # the devices trained on after the server came back
        assert json.loads((device / "counters.json").read_text())["last_round"] == 2
        # and paid for each round once: a round 2 trained for the dead run was answered again from the stored
        # reply (same run lineage), not trained a second time (max-steps=2: 2 DP-SGD steps a round)
        history = json.loads((device / "ledger.json").read_text())["history"]
        assert sum(steps for _, _, steps in history) == 2 * 2, history
