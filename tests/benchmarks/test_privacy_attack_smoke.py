"""Smoke test of benchmarks/privacy_attack.py: tiny settings, end to end (train, attack, table, JSON, PNG)."""

from __future__ import annotations

import json
import math

import pytest
import torch

TINY = ["--users", "2", "--canary-users", "1", "--canaries", "2", "--candidates", "63", "--canary-length", "6",
        "--rounds", "1", "--max-train-pairs", "6", "--min-steps", "10", "--epsilons", "8", "--permutations", "20",
        "--seed", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, load_benchmark):
    out_dir = tmp_path_factory.mktemp("privacy_attack")
    out, png = out_dir / "attack.json", out_dir / "attack.png"
    threads = torch.get_num_threads()
    bench = load_benchmark("privacy_attack")
    try:
        bench.main([*TINY, "--out", str(out), "--plot", str(png)])
    finally:
        torch.set_num_threads(threads)
    return bench, json.loads(out.read_text(encoding="utf-8")), png


def test_help_lists_the_flags(capsys, load_benchmark):
    bench = load_benchmark("privacy_attack")
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--users", "--canaries", "--rounds", "--seed", "--out", "--plot", "--epsilons"):
        assert flag in text


def test_json_has_every_setting_and_sane_values(run):
    _, report, png = run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["benchmark"] == "privacy_attack"
    results = {r["setting"]: r for r in report["results"]}
    assert list(results) == ["no-dp", "dp-eps8"]
    for r in results.values():
        exp, mia, util = r["exposure"], r["mia"], r["utility"]
        assert exp["max_possible"] == pytest.approx(6.0)
        assert len(exp["canaries"]) == 2 and {c["user"] for c in exp["canaries"]} == {0}
        for c in exp["canaries"]:
            assert 1 <= c["rank"] <= 64
            assert 0.0 <= c["exposure"] <= exp["max_possible"] + 1e-9
            assert c["other_user"] == 1  # the user who never held a canary
        assert 0.0 <= exp["mean"] <= exp["max"] <= exp["max_possible"] + 1e-9
        assert 1.3 < exp["chance"] < exp["chance_max"] < exp["max_possible"]
        assert 0.0 < exp["p_mean"] <= 1.0 and 0.0 < exp["p_max"] <= 1.0
        assert 0.0 <= mia["auc"] <= 1.0 and 0.0 <= mia["advantage"] <= 1.0
        assert mia["auc_advantage"] == pytest.approx(2 * (mia["auc"] - 0.5))
        assert mia["members"] == 12 and mia["nonmembers"] == 48  # 6 + 6 trained, 24 + 24 held out
        assert 0.0 <= mia["null"]["advantage_p95"] <= 1.0
        assert 0.0 < mia["null"]["p_advantage"] <= 1.0 and 0.0 < mia["null"]["p_auc"] <= 1.0
        for key in ("canary_users_personalized", "all_users_personalized", "all_users_global"):
            assert 0.0 <= util[key] <= 1.0
        assert all(steps == 10 for steps in r["local_steps_per_user"].values())  # min-steps, one round
    dp = results["dp-eps8"]
    assert dp["epsilon_target"] == 8.0
    for user in dp["ledger"].values():
        assert 0.0 < user["epsilon"] <= 8.0 * (1 + 1e-6)
        assert user["noise"] > 0 and user["delta"] <= 1e-5 and user["steps"] == 10
    assert 0.46 < dp["dp_bound"]["mia_advantage_max"] <= 1.0
    assert results["no-dp"]["epsilon_target"] is None and "ledger" not in results["no-dp"]


def test_without_dp_the_canaries_are_exposed(run):
    """The memorizable setting (a user with 6 pairs + 2 canaries, 10 full-batch steps): without DP the planted
    secrets must rank near the top of their 63 candidates; a never-trained canary averages ~1.4 bits."""
    _, report, _ = run
    no_dp = report["results"][0]["exposure"]
    assert no_dp["mean"] >= 4.0, no_dp["canaries"]
    assert no_dp["p_mean"] < 0.01
    assert math.isfinite(no_dp["extrapolated_mean"])
