"""The command line as a user meets it: exit codes and one-line errors (real subprocesses)."""

import json
import subprocess
import sys
from pathlib import Path

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
    (["simulate", "--strategy", "FedAvgM(server_momentum=fast)"], "server_momentum"),
    (["privacy", "--sample-rate", "0.1", "--steps", "10"], "exactly one of --noise-multiplier"),
])
def test_bad_usage_is_one_line_exit_2(args, expected):
    assert expected in one_line_error(fedpersona(*args))


def test_privacy_calculator_reproduces_reference_values():
    result = fedpersona("privacy", "--noise-multiplier", "1.5", "--sample-rate", "0.04", "--steps", "2250", "--delta", "1e-5",
                        "--json")
    assert result.returncode == 0, result.stderr
    assert abs(json.loads(result.stdout)["epsilon"] - 7.32911117143) < 1e-11  # printed to 11 places
    result = fedpersona("privacy", "--epsilon", "8", "--sample-rate", "0.04", "--steps", "2000", "--json")
    assert round(json.loads(result.stdout)["noise_multiplier"], 4) == 1.3562


def test_a_misspelled_command_is_suggested_once():
    result = fedpersona("simulat")
    assert result.returncode == 2
    assert result.stderr.count("Did you mean") == 1, result.stderr


def test_outputs_get_the_modes_open_would_give(tmp_path):
    import os

    from fedpersona.io import atomic_write_json

    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644


def test_help_states_the_real_defaults_and_every_scenario():
    from fedpersona.config import RunConfig
    from fedpersona.data.synthetic import SCENARIOS

    import os

    wide = {**os.environ, "COLUMNS": "400"}  # one line per option: no wrapping inside the phrases looked for
    text = subprocess.run([sys.executable, "-m", "fedpersona.cli", "simulate", "--help"], capture_output=True,
                          text=True, timeout=120, env=wide).stdout
    defaults = RunConfig()
    for phrase in (f"default {defaults.num_users})", f"default {defaults.rounds})", f"default {defaults.fraction_train})",
                   "--num-users", "--fraction-train"):
        assert phrase in text, phrase
    assert all(name in text for name in SCENARIOS)


def test_a_strategy_module_in_the_working_directory_is_found(tmp_path):
    """`fedpersona` (the console script: no working directory on sys.path by itself) finds mymod:MyAvg in
    the working directory, as `python -m` would; the bad argument then proves the class was imported."""
    (tmp_path / "mymod.py").write_text("from flwr.serverapp.strategy import FedAvg\n\nclass MyAvg(FedAvg):\n    pass\n")
    script = Path(sys.executable).with_name("fedpersona")
    result = subprocess.run([str(script), "simulate", "--strategy", "mymod:MyAvg(nope=1)"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "MyAvg has no argument 'nope'" in result.stderr, result.stderr
    missing = subprocess.run([str(script), "simulate", "--strategy", "nomod:X"], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    assert missing.returncode == 2 and str(tmp_path) in missing.stderr, missing.stderr


def test_settings_lists_every_setting_with_a_meaning_and_typos_get_a_suggestion():
    from dataclasses import fields

    from fedpersona.config import RunConfig

    listed = json.loads(fedpersona("settings", "--json").stdout)
    assert [r["setting"] for r in listed] == [f.name.replace("_", "-") for f in fields(RunConfig)]
    assert all(len(r["meaning"]) >= 10 for r in listed), [r for r in listed if len(r["meaning"]) < 10]
    assert "did you mean 'dp-epsilon'?" in one_line_error(fedpersona("simulate", "--set", "dp-epsiln=3"))


HEAVY = ("ray", "transformers", "peft", "opacus", "fedpersona.simulations.launcher", "fedpersona.deploy.server")


def test_a_bad_model_or_setting_is_refused_before_anything_heavy_starts(tmp_path):
    """Issue 14: a bad --model or setting is one line and exit 2, and nothing heavy (Ray, transformers, the
    launchers, a SuperLink) was imported or started for it: what made it take 5-40 s. A Hub endpoint nothing
    listens on stands for "offline" (no network involved)."""
    probe = (
        "import json, sys\n"
        "from fedpersona.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as done:\n    code = done.code\n"
        f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
        "sys.exit(code)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hf-cache"))
    server = ["server", "--insecure", "--state", str(tmp_path / "server")]
    for argv, expected in (
        (["simulate", "--model", "some-org/no-such-model"], "not in the local Hugging Face cache"),
        (["simulate", "--model", "./no-such-folder"], "no such file or folder"),
        (["simulate", "--model", "embedded:abc"], "must be a whole number"),
        (["simulate", "--set", "colour=blue"], "unknown setting 'colour'"),
        ([*server, "--model", "some-org/no-such-model"], "out of reach"),
        ([*server, "--model", "./no-such-folder"], "no such file or folder"),
        ([*server, "--set", "rounds=0"], "rounds=0 is invalid"),
        (["benchmark", "--model", "./no-such-folder"], "no such file or folder"),
        (["chat", "--state", str(tmp_path / "device"), "--model", "./no-such-folder"], "no such file or folder"),
        (["data", "styles", "--out", str(tmp_path / "styles.jsonl"), "--model", "./no-such-folder"],
         "no such file or folder"),
    ):
        result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120,
                                env=env, cwd=tmp_path)
        assert expected in one_line_error(result), (argv, result.stderr)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report == {"code": 2, "heavy": []}, (argv, report)
    assert not (tmp_path / "server").exists()  # no SuperLink started, no state folder made
    assert not (tmp_path / "device").exists() and not (tmp_path / "styles.jsonl").exists()
