"""``fedpersona data synthetic``: one synthetic user's pair file for a device, the pairs the simulator gives that
user; bad input is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpersona.data.schema import load_users
from fedpersona.data.synthetic import PreferenceSimulator


def test_writes_the_simulators_pairs_under_the_given_name(cli, tmp_path: Path) -> None:
    out = tmp_path / "alice.jsonl"
    code, stdout, err = cli("data", "synthetic", "--user", "1", "--users", "2", "--user-id", "alice", "--out", str(out))
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = PreferenceSimulator("conflicting", 2, 0).user_data(1)
    assert [(r["prompt"], r["chosen"], r["rejected"], r["split"]) for r in rows] == [
        (p.prompt, p.chosen, p.rejected, p.split) for p in expected.train + expected.test]
    assert {r["user_id"] for r in rows} == {"alice"}
    assert f"wrote {len(rows)} pairs of user 1" in stdout and f"{len(expected.test)} test" in stdout
    # the file is a valid pair file a device can import
    (user,) = load_users(out)
    assert (user.user_id, len(user.train), len(user.test)) == ("alice", len(expected.train), len(expected.test))


def test_scenario_seed_and_default_name(cli, tmp_path: Path) -> None:
    out = tmp_path / "u.jsonl"
    code, _, err = cli("data", "synthetic", "--scenario", "mixed", "--seed", "3", "--out", str(out))
    assert code == 0, err
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    pair = PreferenceSimulator("mixed", 32, 3).user_data(0).train[0]
    assert (first["user_id"], first["prompt"], first["chosen"]) == ("user-00000", pair.prompt, pair.chosen)


@pytest.mark.parametrize("args,message", [
    (["--user", "2", "--users", "2"], "--user 2: outside the population's users 0..1"),
    (["--user", "-1"], "--user -1: outside"),
    (["--users", "0"], "--users 0: need at least 1 user"),
    (["--scenario", "nope"], "--scenario nope: unknown; use one of conflicting, majority-minority"),
    (["--user-id", " "], "--user-id: empty"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "x.jsonl"
    code, _, err = cli("data", "synthetic", *args, "--out", str(out))
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and message in err, err
    assert not out.exists()
