"""Input that is not UTF-8 JSON text: one line naming the file and line, exit 2, nothing written (issue 12,
kind 1), through the real CLI entry point for each command that reads a pair file or a state file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpersona.cli import main

ROW = {"user_id": "u", "prompt": "héllo wörld", "chosen": "a", "rejected": "b"}
LINE = json.dumps(ROW, ensure_ascii=False) + "\n"

BAD = {
    "utf-16": (LINE.encode("utf-16"), "UTF-16 text"),
    "latin-1": (LINE.encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    "binary": (bytes(range(11, 256)) + b"\n", "not UTF-8 text"),
    "lone surrogate": (b'{"user_id": "u", "prompt": "\\ud800", "chosen": "a", "rejected": "b"}\n', "lone surrogate"),
    "5000-digit int": (('{"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "b", "n": ' + "9" * 5000 + "}\n").encode(),
                       "out of range"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
}


def one_line_exit_2(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize("command", ["import", "inspect", "simulate"])
def test_undecodable_pair_files_are_one_line(tmp_path, capsys, kind, command):
    data, expected = BAD[kind]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(data)
    state = tmp_path / "state"
    argv = {"import": ["feedback", "import", str(path), "--state", str(state)],
            "inspect": ["data", "inspect", str(path)],
            "simulate": ["simulate", "--data", str(path)]}[command]
    line = one_line_exit_2(capsys, argv)
    assert expected in line and str(path) in line, line
    assert not (state / "memory.sqlite").exists() or command != "import" or _pairs(state) == 0


def _pairs(state: Path) -> int:
    from fedpersona.device.state import DeviceState

    with DeviceState(state, create=False) as st:
        return st.memory.count()


def test_a_utf8_bom_is_not_content(tmp_path, capsys):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({**ROW, "chosen": f"a{i}"}) + "\n" for i in range(3)).encode())
    with pytest.raises(SystemExit) as done:
        main(["feedback", "import", str(path), "--state", str(tmp_path / "s")])
    assert done.value.code == 0
    assert "imported 3 pairs" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["counters.json", "meta.json"])
def test_a_state_file_that_is_not_utf8_is_one_line(tmp_path, capsys, name):
    path = tmp_path / "pairs.jsonl"
    path.write_text(LINE, encoding="utf-8")
    state = tmp_path / "state"
    with pytest.raises(SystemExit):
        main(["feedback", "import", str(path), "--state", str(state)])
    capsys.readouterr()
    (state / name).write_bytes(b'{"x": "\xff\xfe"}')
    line = one_line_exit_2(capsys, ["feedback", "stats", "--state", str(state)])
    assert name in line and "not UTF-8" in line


def test_command_line_text_that_is_not_unicode_is_one_line(tmp_path, capsys):
    line = one_line_exit_2(capsys, ["feedback", "add", "--state", str(tmp_path / "s"), "-p", "caf\udce9",
                                    "-c", "a", "-r", "b"])
    assert "--prompt" in line and "0xe9" in line
