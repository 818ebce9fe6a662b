"""Damaged device state through the CLI (issue 12, kind 2): every command that reads the damaged file
says so in one line naming it and what to do, exits 2, and writes nothing; `fedpersona client`
refuses at start-up, before it connects or spends anything; `feedback forget` still clears it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

PROMPT = "how do I learn python?"
MEMORY = "memory.sqlite"
PRIVATE = "private_adapter.safetensors"
SHARED = "shared_adapter.safetensors"


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def snapshot(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state.iterdir()) if p.is_file()}


def overwrite_middle_page(path: Path) -> None:
    """What a bad sector or a stray write does: one page in the middle of the file turns to garbage."""
    data = bytearray(path.read_bytes())
    page = 4096
    middle = (len(data) // page // 2) * page
    assert middle > 0, "the database must span several pages"
    data[middle:middle + page] = b"\xab" * page
    path.write_bytes(bytes(data))


def truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def poison(value: float):
    def damage(path: Path) -> None:
        tensors = load_file(str(path))
        name = sorted(tensors)[0]
        tensors[name] = torch.full_like(tensors[name], value)
        save_file(tensors, str(path))
    return damage


@pytest.fixture
def big_state(trained: Path, tmp_path: Path, cli) -> Path:
    """The trained state with enough pairs that its database spans many pages."""
    state = tmp_path / "state"
    shutil.copytree(trained, state)
    rows = tmp_path / "more.jsonl"
    user = _user(state)
    with rows.open("w", encoding="utf-8") as out:
        for i in range(300):
            out.write(json.dumps({"user_id": user, "prompt": f"question {i} " + "about cooking " * 20,
                                  "chosen": f"good {i} " + "yes " * 30, "rejected": f"bad {i} " + "no " * 30}) + "\n")
    code, _, err = cli("feedback", "import", str(rows), "--state", str(state))
    assert code == 0, err
    assert (state / MEMORY).stat().st_size > 16 * 4096
    return state


def _user(state: Path) -> str:
    from fedpersona.device.memory import PreferenceMemory

    with PreferenceMemory(state / MEMORY) as memory:
        user = memory.user_id()
    assert user
    return user


# (file, damage, words the one line must hold)
DAMAGES = {
    "memory page overwritten": (MEMORY, overwrite_middle_page, "preference memory is damaged"),
    "memory truncated": (MEMORY, truncate_half, "preference memory is damaged"),
    "private adapter NaN": (PRIVATE, poison(float("nan")), "NaN or Inf"),
    "private adapter Inf": (PRIVATE, poison(float("inf")), "NaN or Inf"),
    "shared adapter NaN": (SHARED, poison(float("nan")), "NaN or Inf"),
    "private adapter truncated": (PRIVATE, truncate_half, "unreadable"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_client_refuses_damaged_state_at_start_up(big_state: Path, cli, case: str) -> None:
    name, damage, words = DAMAGES[case]
    damage(big_state / name)
    before = snapshot(big_state)
    # A closed port: a client that got past its start-up checks would sit retrying it.
    code, _, err = cli("client", "--state", str(big_state), "--server", "127.0.0.1:9", "--insecure")
    line = one_line(err)
    assert code == 2 and name in line and words in line, err
    assert "Traceback" not in err and ("restore it from a backup" in line)
    assert snapshot(big_state) == before  # nothing written, nothing spent


@pytest.mark.parametrize("case", ["memory page overwritten", "memory truncated"])
def test_feedback_commands_name_the_damaged_memory(big_state: Path, cli, case: str) -> None:
    name, damage, words = DAMAGES[case]
    damage(big_state / name)
    before = snapshot(big_state)
    for argv in (["feedback", "stats"], ["feedback", "list", "--limit", "0", "--json"],
                 ["feedback", "add", "-p", "p", "-c", "a", "-r", "b"]):
        code, out, err = cli(*argv, "--state", str(big_state))
        if code == 0:  # a page that a command never reads may well work; it must not half-work
            assert argv[1] == "list", (argv, out, err)
            continue
        line = one_line(err)
        assert code == 2 and name in line and words in line and "feedback forget" in line, (argv, err)
    assert snapshot(big_state) == before
    # ... and the way out it names works
    code, out, err = cli("feedback", "forget", "--state", str(big_state), "--yes")
    assert code == 0 and MEMORY in out, err
    code, out, err = cli("feedback", "stats", "--state", str(big_state), "--json")
    assert code == 0, err


@pytest.mark.parametrize("case", ["private adapter NaN", "shared adapter NaN"])
def test_generate_refuses_non_finite_adapter(big_state: Path, cli, case: str) -> None:
    name, damage, words = DAMAGES[case]
    damage(big_state / name)
    code, out, err = cli("generate", PROMPT, "--state", str(big_state), "--device", "cpu", "--max-new-tokens", "4")
    line = one_line(err)
    assert code == 2 and not out.strip() and name in line and words in line, (out, err)
