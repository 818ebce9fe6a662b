"""The documented deployment demo on real processes: the server's defaults, two devices, and what they write.

As docs/explanation/personal-generation.md gives it: ``fedpersona server`` with its defaults (it asks for
pair-level DP at epsilon 8, so the DP defaults choose the scheme), two devices alice and bob whose
policies are the defaults too (DP required, epsilon <= 8) except ``--share-evaluation``, each importing
one synthetic user's pairs with ``fedpersona data synthetic``: two users of opposite personas (users 0
and 1 of the old demo shared a persona, so no personalization could show). The run must end with the
personalized model ahead of the global one by 0.10, and the personal models' answers to held-out prompts
(``fedpersona generate``'s code, greedy and sampled) must not loop: their repeated-3-gram share at most
the global model's + 0.05.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

DEMO_USERS = {"alice": 2, "bob": 15}  # conflicting, seed 0: persona 1 (53 training pairs) and persona 0 (34)


def test_demo_with_server_defaults_personalizes_and_does_not_loop(tmp_path, procs, certs, h):
    from fedpersona.alignment.generation import generate
    from fedpersona.alignment.judges import repeated_ngram_share
    from fedpersona.commands.device import load_state_resident
    from fedpersona.device.state import DeviceState

    port = h.free_port()
    env = h.child_env()
    states, prompts = {}, []
    for name, user in DEMO_USERS.items():
        pairs = tmp_path / f"{name}.jsonl"
        subprocess.run([sys.executable, "-m", "fedpersona.cli", "data", "synthetic", "--user", str(user),
                        "--user-id", name, "--out", str(pairs)], check=True, env=env, capture_output=True, timeout=120)
        states[name] = tmp_path / name
        with DeviceState(states[name]) as device:
            device.memory.import_file(pairs)
        prompts += [json.loads(line)["prompt"] for line in pairs.read_text().splitlines()
                    if json.loads(line)["split"] == "test"]
    server_state = tmp_path / "server-state"
    logs = [tmp_path / "server.log", *(tmp_path / f"{n}.log" for n in states), server_state / "logs" / "fedpersona.log"]
    server = procs.fedpersona("server", "--state", str(server_state), "--certificates", str(certs), "--host",
                              "127.0.0.1", "--port", str(port), "--rounds", "5", "--min-users", "2", "--fraction",
                              "1.0", "--quiet", log=logs[0])
    h.wait_for(lambda: h.port_open(port), timeout=90, what="the SuperLink", alive=[server], logs=logs)
    for (name, state), log in zip(states.items(), logs[1:3], strict=True):
        procs.fedpersona("client", "--server", f"127.0.0.1:{port}", "--state", str(state), "--root-certificates",
                         str(certs / "ca.crt"), "--share-evaluation", "--heartbeat-interval", "10", log=log)
    assert server.wait(timeout=600) == 0, h.tails(logs)

    summary = json.loads((server_state / "out" / "summary.json").read_text())
    assert summary["epsilon_max"] is not None and summary["epsilon_max"] <= 8.0 + 1e-6  # the server asked for DP
    gap = summary["personalized_accuracy_mean"] - summary["global_accuracy_mean"]
    assert gap >= 0.10, summary

    held_out = list(dict.fromkeys(prompts))[:8]
    first_answer = {}
    for name, state in states.items():
        with DeviceState(state, create=False) as device:
            resident, _, has_private = load_state_resident(device, "cpu")
        assert has_private
        for temperature in (0.0, 0.7):
            shares = {}
            for strength in (1.0, 0.0):
                texts = generate(resident, held_out, strength=strength, max_new_tokens=64, temperature=temperature,
                                 seed=3)
                shares[strength] = sum(repeated_ngram_share(t) for t in texts) / len(texts)
                if temperature == 0.0 and strength == 1.0:
                    first_answer[name] = texts[0]
            assert shares[1.0] <= shares[0.0] + 0.05, (name, temperature, shares)
    # and the command line says the same as the code it runs
    out = subprocess.run([sys.executable, "-m", "fedpersona.cli", "generate", "--state", str(states["alice"]),
                          held_out[0], "--strength", "1", "--max-new-tokens", "64"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == first_answer["alice"]
