"""The command line as a user meets it: exit codes and one-line errors (real subprocesses)."""

import json
import subprocess
import sys

import pytest


def fedpersona(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fedpersona.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_malformed_pair_file_exits_2_with_file_and_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    good = {"user_id": "u1", "prompt": "p", "chosen": "a", "rejected": "b"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": 3}) + "\n")
    line = one_line_error(fedpersona("simulate", "--data", str(bad), "--out", str(tmp_path / "out")))
    assert f"{bad}:2" in line and "'chosen' must be a string" in line
    assert not (tmp_path / "out").exists(), "a failed run must leave no half-written output"


def test_not_json_names_the_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"user_id": "u"\n')
    line = one_line_error(fedpersona("simulate", "--data", str(bad)))
    assert f"{bad}:1" in line and "not valid JSON" in line


@pytest.mark.parametrize("args, expected", [
    (["simulate", "--strategy", "FedNope"], "unknown strategy"),
    (["simulate", "--scheme", "nope"], "scheme"),
    (["simulate", "--set", "colour=blue"], "unknown setting 'colour'"),
    (["simulate", "--rounds", "0"], "rounds=0 is invalid"),
    (["simulate", "--strategy", "FedAvgM", "--strategy-arg", "server_momentum=fast"], "server_momentum"),
    (["privacy", "--sample-rate", "0.1", "--steps", "10"], "exactly one of --noise"),
])
def test_bad_usage_is_one_line_exit_2(args, expected):
    assert expected in one_line_error(fedpersona(*args))


def test_privacy_calculator_reproduces_reference_values():
    result = fedpersona("privacy", "--noise", "1.5", "--sample-rate", "0.04", "--steps", "2250", "--delta", "1e-5",
                        "--json")
    assert result.returncode == 0, result.stderr
    assert abs(json.loads(result.stdout)["epsilon"] - 7.32911117143) < 1e-11  # printed to 11 places
    result = fedpersona("privacy", "--epsilon", "8", "--sample-rate", "0.04", "--steps", "2000", "--json")
    assert round(json.loads(result.stdout)["noise_multiplier"], 4) == 1.3562
