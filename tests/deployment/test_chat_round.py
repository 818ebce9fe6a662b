"""Issue 13's loop over real processes: a user chats (``fedpersona chat --compare --pick B``), then one
loopback deployment round (``fedpersona server`` and ``fedpersona client`` on 127.0.0.1) trains on the pick.

The same client run is issue 14's check of the device's terminal: only its own lines (connected, the
round trained and evaluated, where its logs are), none of Flower's, uvicorn's or gRPC's records.
"""

from __future__ import annotations

import io
import json
import re
import signal
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.e2e

FIRST, SECOND = "hello there", "how do I learn python?"
TINY = ("--set", "max-steps=2", "--set", "epochs=1", "--set", "max-length=40", "--set", "batch-size=4")
# a log record's level as Flower (``INFO :``), uvicorn (``INFO:``) or Python's logging prints it
RECORD = re.compile(r"^\s*(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def reply_info(state: Path) -> dict:
    """What the device's last training reply said (``last_reply.safetensors``: weight, round, lineage)."""
    with safe_open(str(state / "last_reply.safetensors"), framework="numpy") as handle:
        return {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}


def test_a_pick_in_chat_is_trained_on_in_a_deployment_round(tmp_path, procs, make_device, h, cli, monkeypatch):
    device = make_device(0)  # 16 training and 8 held-out pairs
    with open(tmp_path / "feedback-0.jsonl", encoding="utf-8") as pairs:
        assert sum(json.loads(line)["split"] == "train" for line in pairs) == 16

    # the user talks to the base model (no round yet), compares two answers and picks B
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{FIRST}\n{SECOND}\n"))
    code, out, err = cli("chat", "--state", str(device), "--model", "embedded", "--device", "cpu",
                         "--max-new-tokens", "16", "--seed", "1", "--compare", "--pick", "B")
    assert code == 0, err
    found = [json.loads(line) for line in out.splitlines() if line.strip()]
    answers = [e for e in found if e["event"] == "answer"]
    (compared,) = [e for e in found if e["event"] == "compare"]
    (picked,) = [e for e in found if e["event"] == "pick"]
    conversation = f"Human: {FIRST}\n\nAssistant: {answers[0]['text']}\n\nHuman: {SECOND}"
    assert compared["prompt"] == conversation and picked["added"] and picked["split"] == "train"
    code, out, _ = cli("feedback", "stats", "--state", str(device), "--json")
    stats = json.loads(out)
    assert (stats["train"], stats["chat_pairs"], stats["chats"]) == (17, 1, 1)
    code, out, _ = cli("feedback", "list", "--state", str(device), "--limit", "0", "--json")
    (row,) = [r for r in json.loads(out) if r["id"] == picked["pair_id"]]
    assert (row["prompt"], row["chosen"], row["rejected"]) == (conversation, compared["B"]["text"],
                                                              compared["A"]["text"])

    # one round on real processes; no DP on either side, so the reply's weight is the exact pair count
    port = h.free_port()
    server_state = tmp_path / "server"
    server_out, client_out = tmp_path / "server.out", tmp_path / "client.out"
    logs = [server_out, client_out, device / "logs" / "supernode.log", device / "logs" / "fedpersona.log",
            server_state / "logs" / "superlink.log"]
    server = procs.fedpersona("server", "--state", str(server_state), "--insecure", "--host", "127.0.0.1",
                              "--port", str(port), "--rounds", "1", "--min-users", "1", "--fraction", "1.0",
                              "--round-timeout", "300", "--no-dp", "--quiet", *TINY, log=server_out)
    h.wait_for(lambda: h.port_open(port), timeout=90, what="the SuperLink", alive=[server], logs=logs)
    client = procs.fedpersona("client", "--server", f"127.0.0.1:{port}", "--state", str(device), "--insecure",
                              "--allow-no-dp", "--share-evaluation", log=client_out)
    try:
        assert server.wait(timeout=300) == 0, h.tails(logs)
    except Exception:
        pytest.fail(f"the round did not finish\n{h.tails(logs)}")
    client.send_signal(signal.SIGTERM)  # the user stops the device: it says where its logs are
    assert client.wait(timeout=60) == 0, h.tails(logs)

    info = reply_info(device)
    assert info["round"] == 1 and info["weight"] == 17  # 16 imported pairs + the pick: trained on it
    assert json.loads((device / "counters.json").read_text())["rounds_trained"] == 1
    for path in server_state.rglob("*"):  # the conversation never left the device
        if path.is_file():
            data = path.read_bytes()
            assert FIRST.encode() not in data and SECOND.encode() not in data, path

    # issue 14: the device's terminal shows its own lines only; Flower's output went to the named log files
    terminal = ANSI.sub("", client_out.read_text(errors="replace"))
    assert "connected to the server at 127.0.0.1" in terminal, terminal
    assert "round 1: trained on your 17 training pairs" in terminal, terminal
    assert "round 1: evaluated on 8 held-out pairs" in terminal, terminal
    node_log, own_log = device / "logs" / "supernode.log", device / "logs" / "fedpersona.log"
    assert f"logs: {own_log.resolve()} (this device), {node_log} (Flower's SuperNode)" in terminal, terminal
    assert terminal.rstrip().endswith(f"log: {own_log.resolve()}"), terminal
    noise = [line for line in terminal.splitlines()
             if RECORD.match(line) or any(w in line for w in ("uvicorn", "DEPRECATED", "grpc", "Traceback"))]
    assert not noise, "\n".join(noise)
    assert "SuperNode ID" in node_log.read_text(errors="replace")
    assert "trained on your 17 training pairs" in own_log.read_text()  # the log tells the same story
