"""The device commands through the CLI: feedback add/import/list/stats/forget, and generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpersona.device.state import DeviceState

PROMPT = "how do I learn python?"


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def row(i: int, user: str = "u1") -> dict[str, str]:
    return {"user_id": user, "prompt": f"prompt {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------- feedback


def test_add_list_stats(tmp_path: Path, cli) -> None:
    state = str(tmp_path / "state")
    code, out, _ = cli("feedback", "add", "--state", state, "--prompt", "p1", "--chosen", "yes",
                       "--rejected", "no", "--user", "alice")
    assert code == 0 and "added pair #1" in out and "'alice'" in out
    code, out, _ = cli("feedback", "add", "--state", state, "--prompt", "p1", "--chosen", "yes",
                       "--rejected", "no")
    assert code == 0 and "already stored as pair #1" in out
    code, out, _ = cli("feedback", "add", "--state", state, "-p", "p2", "-c", "short", "-r", "long",
                       "--json")
    assert code == 0 and json.loads(out)["added"] is True and json.loads(out)["user_id"] == "alice"

    code, out, _ = cli("feedback", "list", "--state", state, "--json")
    rows = json.loads(out)
    assert [(r["id"], r["prompt"], r["user_id"]) for r in rows] == [(1, "p1", "alice"), (2, "p2", "alice")]
    code, out, _ = cli("feedback", "list", "--state", state, "--limit", "1", "--offset", "1", "--json")
    assert [r["id"] for r in json.loads(out)] == [2]
    code, out, _ = cli("feedback", "list", "--state", state, "--limit", "1")
    assert code == 0 and "prompt" in out and "p1" in out and "p2" not in out and "--offset 1 for more" in out

    code, out, _ = cli("feedback", "stats", "--state", state, "--json")
    stats = json.loads(out)
    assert code == 0 and (stats["pairs"], stats["user_id"], stats["private_adapter"]) == (2, "alice", False)
    assert stats["train"] + stats["test"] == 2
    # user text is shown as typed, never read as rich markup
    cli("feedback", "add", "--state", state, "-p", "[bold]x[/bold] [1]", "-c", "a", "-r", "b")
    code, out, _ = cli("feedback", "list", "--state", state, "--offset", "2")
    assert code == 0 and "[bold]x[/bold] [1]" in out
    code, _, err = cli("feedback", "list", "--state", state, "--limit", "-1")
    assert code == 2 and "--limit" in one_line(err)
    code, out, _ = cli("feedback", "stats", "--state", state)
    assert code == 0 and "alice" in out and "rounds trained" in out


def test_add_refuses_another_user_and_missing_state(tmp_path: Path, cli) -> None:
    state = str(tmp_path / "state")
    assert cli("feedback", "add", "--state", state, "-p", "p", "-c", "a", "-r", "b", "--user", "alice")[0] == 0
    code, _, err = cli("feedback", "add", "--state", state, "-p", "q", "-c", "a", "-r", "b", "--user", "bob")
    assert code == 2 and "alice" in one_line(err)
    code, _, err = cli("feedback", "add", "--state", state, "-p", "q", "-c", "same", "-r", "same")
    assert code == 2 and "identical" in one_line(err)
    code, _, err = cli("feedback", "list", "--state", str(tmp_path / "nowhere"))
    assert code == 2 and "no device state here" in one_line(err)
    assert not (tmp_path / "nowhere").exists()


def test_import_then_duplicates_and_as_user(tmp_path: Path, cli) -> None:
    state = str(tmp_path / "state")
    first = write_jsonl(tmp_path / "a.jsonl", [row(1), row(2), "", row(3)])
    code, out, _ = cli("feedback", "import", str(first), "--state", state, "--json")
    assert code == 0 and json.loads(out) == {"file": str(first), "format": "fedpersona", "added": 3, "duplicates": 0,
                                             "pairs": 3}
    code, out, _ = cli("feedback", "import", str(first), "--state", state)
    assert code == 0 and "imported 0 pairs" in out and "3 already stored" in out
    other = write_jsonl(tmp_path / "b.jsonl", [row(4, "u2"), row(5, "u3")])
    code, _, err = cli("feedback", "import", str(other), "--state", state)
    assert code == 2 and "--as-user" in one_line(err)
    code, out, _ = cli("feedback", "import", str(other), "--state", state, "--as-user", "u1")
    assert code == 0 and "imported 2 pairs" in out and "5 pairs" in out


FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"


def test_import_of_another_dataset_format_goes_through_its_loader(tmp_path: Path, cli) -> None:
    """``--format`` reads HH-RLHF (or any registered or plug-in format) into the device's memory: the pairs the
    loader makes, one user, one transaction; a bad format or an option it does not take is one line."""
    from fedpersona.data.formats import load_format

    state = str(tmp_path / "state")
    source = FIXTURES / "hh_rlhf.jsonl"
    expected = load_format(source, "hh-rlhf(users=1)")
    code, out, err = cli("feedback", "import", str(source), "--state", state, "--format", "hh-rlhf(users=1)",
                         "--json", "--no-check")
    assert code == 0, err
    assert json.loads(out) == {"file": str(source), "format": "hh-rlhf(users=1)", "added": len(expected),
                               "duplicates": 0, "pairs": len(expected)}
    with DeviceState(state) as st:
        stored = st.memory.list(None, 0)
    assert sorted(r.prompt for r in stored) == sorted(p.prompt for p in expected)
    code, out, _ = cli("feedback", "import", str(source), "--state", state, "--format", "auto", "--as-user",
                       expected[0].user_id, "--no-check")
    assert code == 0 and f"{len(expected)} already stored" in out
    code, out, _ = cli("feedback", "import", f"hh-rlhf(users=1):{source}", "--state", state, "--no-check")
    assert code == 0 and f"{len(expected)} already stored" in out  # FORMAT:PATH, as simulate --data takes it
    code, _, err = cli("feedback", "import", str(source), "--state", state, "--format", "prism(nope=1)")
    assert code == 2 and "nope" in one_line(err)
    code, _, err = cli("feedback", "import", str(source), "--state", state, "--format", "no-such-format")
    assert code == 2 and "no-such-format" in one_line(err)


@pytest.mark.parametrize("bad, what", [({"user_id": "u1", "prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
                                       ("{not json", "not valid JSON")])
def test_malformed_import_names_file_and_line_and_imports_nothing(tmp_path: Path, cli, bad, what) -> None:
    state = tmp_path / "state"
    path = write_jsonl(tmp_path / "bad.jsonl", [row(1), row(2), bad, row(4)])
    code, out, err = cli("feedback", "import", str(path), "--state", str(state))
    line = one_line(err)
    assert code == 2 and out == ""
    assert f"{path}:3" in line and what in line and "Traceback" not in err
    with DeviceState(state) as st:
        assert st.memory.count() == 0


def test_forget_needs_confirmation(tmp_path: Path, cli, monkeypatch) -> None:
    import torch

    from fedpersona.commands import device

    state = tmp_path / "state"
    cli("feedback", "import", str(write_jsonl(tmp_path / "a.jsonl", [row(1), row(2)])), "--state", str(state))
    with DeviceState(state) as st:
        st.save_private({"x": torch.zeros(2)}, 1)
    # no terminal and no --yes: refused, nothing deleted
    code, _, err = cli("feedback", "forget", "--state", str(state))
    assert code == 2 and "--yes" in one_line(err) and "2 feedback pairs" in err
    assert (state / "private_adapter.safetensors").exists()
    # a terminal, and the person says no
    monkeypatch.setattr(device, "_interactive", lambda: True)
    monkeypatch.setattr(device.typer, "confirm", lambda *a, **k: False)
    code, _, err = cli("feedback", "forget", "--state", str(state))
    assert code == 1 and "nothing deleted" in err
    with DeviceState(state) as st:
        assert st.memory.count() == 2
    # ... and yes
    monkeypatch.setattr(device.typer, "confirm", lambda *a, **k: True)
    code, out, _ = cli("feedback", "forget", "--state", str(state))
    assert code == 0 and "forgot 2 pairs" in out and "private_adapter.safetensors" in out
    assert not (state / "private_adapter.safetensors").exists()
    code, out, _ = cli("feedback", "stats", "--state", str(state), "--json")
    assert json.loads(out)["pairs"] == 0 and json.loads(out)["user_id"] is None
    # --yes needs no terminal; nothing left to forget is fine
    monkeypatch.setattr(device, "_interactive", lambda: False)
    cli("feedback", "add", "--state", str(state), "-p", "p", "-c", "a", "-r", "b", "--user", "new")
    code, out, _ = cli("feedback", "forget", "--state", str(state), "--yes")
    assert code == 0 and "forgot 1 pairs" in out
    code, out, _ = cli("feedback", "forget", "--state", str(state), "--yes")
    assert code == 0 and "nothing to forget" in out


# ---------------------------------------------------------------------------- generate


def test_generate_text_and_strength_zero_is_global(trained: Path, cli) -> None:
    from fedpersona.alignment.generation import generate
    from fedpersona.round.resident import resident_for
    from fedpersona.config import RunConfig
    from fedpersona.model.adapters import Role

    code, personal, err = cli("generate", PROMPT, "--state", str(trained), "--device", "cpu",
                              "--max-new-tokens", "24")
    assert code == 0 and personal.strip(), err
    code, out, _ = cli("generate", PROMPT, "--state", str(trained), "--device", "cpu",
                       "--max-new-tokens", "24", "--strength", "0", "--json")
    shown = json.loads(out)
    assert code == 0 and (shown["strength"], shown["model_id"], shown["scheme"]) == (0.0, "embedded", "split")

    with DeviceState(trained) as st:
        shared, private = st.load_shared(), st.load_private()
    assert shared is not None and private is not None
    resident = resident_for(RunConfig(accelerator="cpu"))
    resident.adapters.load(shared, Role.SHARED)
    resident.adapters.load(private, Role.PRIVATE)
    assert generate(resident, [PROMPT], max_new_tokens=24)[0] == personal.strip()
    resident.adapters.reset(Role.PRIVATE)
    assert generate(resident, [PROMPT], max_new_tokens=24)[0] == shown["text"]

    # sampling is reproducible with a seed
    runs = [cli("generate", PROMPT, "--state", str(trained), "--device", "cpu", "--max-new-tokens", "12",
                "--temperature", "1.0", "--seed", "3")[1] for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].strip()


def test_generate_bad_input(trained: Path, tmp_path: Path, cli) -> None:
    code, _, err = cli("generate", PROMPT, "--state", str(trained), "--strength", "1.5")
    assert code == 2 and "--strength" in one_line(err)
    empty = tmp_path / "empty"
    cli("feedback", "add", "--state", str(empty), "-p", "p", "-c", "a", "-r", "b")
    code, _, err = cli("generate", PROMPT, "--state", str(empty))
    assert code == 2 and "no adapters yet: run `fedpersona client` first" in one_line(err)
    code, _, err = cli("generate", PROMPT, "--state", str(tmp_path / "missing"))
    assert code == 2 and "no device state here" in one_line(err)


def test_ranks_read_off_tensors() -> None:
    import torch

    from fedpersona.commands.device import adapter_ranks

    tensors = {"m.q.lora_A.shared.weight": torch.zeros(8, 64), "m.q.lora_B.shared.weight": torch.zeros(64, 8),
               "m.q.lora_B.private.weight": torch.zeros(64, 2), "m.q.lora_A.lora.weight": torch.zeros(4, 64)}
    assert adapter_ranks(tensors) == {"shared": 8, "private": 2, "lora": 4}


def test_feedback_commands_import_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from fedpersona.cli import main\n"
            "try: main(['feedback', 'add', '--state', sys.argv[1], '-p', 'p', '-c', 'a', '-r', 'b'])\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'feedback imported torch'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert done.returncode == 0, done.stderr


def test_state_config_prefers_meta_then_tensors_then_defaults(tmp_path: Path) -> None:
    import torch

    from fedpersona.commands.device import state_config
    from fedpersona.errors import UsageError

    shared = {"m.q.lora_A.shared.weight": torch.zeros(6, 64)}
    private = {"m.q.lora_B.private.weight": torch.zeros(64, 3)}
    with DeviceState(tmp_path / "s") as st:
        with pytest.raises(UsageError, match="meta.json"):
            state_config(st, shared, private)
        st.bind("embedded", "split")
        config = state_config(st, shared, private, "cpu")
        assert (config.model, config.scheme, config.shared_rank, config.private_rank, config.seed) == \
            ("embedded", "split", 6, 3, 0)
        assert (state_config(st, None, None).shared_rank, state_config(st, None, None).private_rank) == (8, 2)
        meta = {**st.meta(), "shared_rank": 4, "seed": 7}
        st.meta_path.write_text(json.dumps(meta))
        config = state_config(st, shared, private)
        assert (config.shared_rank, config.private_rank, config.seed) == (4, 3, 7)
        st.meta_path.write_text(json.dumps({**meta, "private_rank": 0}))
        with pytest.raises(UsageError, match="private_rank"):
            state_config(st, shared, private)


def test_state_config_reads_the_pal_prototype_count_off_the_tensors(tmp_path: Path) -> None:
    """A pal state trained with K != the default loads with K prototypes (was: the default, then a mismatch)."""
    import torch

    from fedpersona.commands.device import state_config

    shared = {f"m.q.lora_{m}.proto{k}.weight": torch.zeros((4, 64) if m == "A" else (64, 4))
              for k in range(3) for m in "AB"}
    with DeviceState(tmp_path / "s") as st:
        st.bind("embedded", "pal")
        config = state_config(st, shared, {"mixture": torch.zeros(3)}, "cpu")
    assert (config.scheme, config.pal_prototypes, config.shared_rank) == ("pal", 3, 4)
