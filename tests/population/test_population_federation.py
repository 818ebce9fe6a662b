"""Issue 25's acceptance, end to end in process: the real server loop and ClientApp with a population.

* three device tiers, diurnal availability, 20% dropout and mixed privacy policies for 1,000 users and 5
  rounds: the same seed gives the same run, and summary.json carries the simulated time, time-to-accuracy,
  the per-reason counts and the per-group accuracies;
* a deadline the slow tier cannot meet: the slow tier trains in no round, and the report says so;
* the default (uniform) population reports the same keys with zero counts.

(Over-selection with 30% dropout collecting the replies rounds need is measured over hundreds of rounds in
test_population_rounds.py; the benchmark runs it with training: benchmarks/populations.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

from fedpersona.config import RunConfig
from fedpersona.server.federation import run_federation

TIERS = """
[[tier]]
name = "fast"
share = 0.3
seconds_per_pair = 0.2
download_bytes_per_s = 12.5e6
upload_bytes_per_s = 2.5e6
[[tier]]
name = "mid"
share = 0.4
seconds_per_pair = 1.0
download_bytes_per_s = 5e6
upload_bytes_per_s = 1e6
[[tier]]
name = "slow"
share = 0.3
seconds_per_pair = 20.0
download_bytes_per_s = 1e6
upload_bytes_per_s = 2.5e5
"""
ACCEPTANCE = TIERS + """
[availability]
model = "diurnal"
start_s = { dist = "uniform", low = 0, high = 86400 }
on_fraction = { dist = "uniform", low = 0.2, high = 0.8 }

[dropout]
probability = 0.2

[[privacy]]
name = "strict"
share = 0.2
require_dp = true
max_epsilon = 1.0

[[privacy]]
name = "default"
share = 0.3
require_dp = true
max_epsilon = 8.0

[[privacy]]
name = "open"
share = 0.5
"""
LEAN = {"gen-prompts": 0, "max-steps": 2, "min-steps": 1, "epochs": 1, "max-length": 32, "min-users": 2,
        "batch-size": 4}
REPORTED = ("simulated_seconds", "time_to_accuracy", "unavailable_users", "declined_users", "dropped_users",
            "late_users", "accuracy_by_group")
CLOCKS = ("wall_seconds", "round_seconds", "population_seconds")


def run(pool_grid, out: Path, **settings) -> tuple[dict, list[dict], list[dict]]:
    config = RunConfig.from_flat({**LEAN, **settings})
    result = run_federation(pool_grid(), config, out_dir=out)
    written = json.loads((out / "summary.json").read_text())
    assert written == json.loads(json.dumps(result.summary))
    return result.summary, result.rounds, result.per_user


def without_clocks(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in CLOCKS} for row in rows]


def test_a_heterogeneous_population_of_1000_users_runs_the_same_with_the_same_seed(tmp_path, pool_grid,
                                                                                      many_small_users):
    population = tmp_path / "population.toml"
    population.write_text(ACCEPTANCE, encoding="utf-8")
    settings = {"data": str(many_small_users(1000)), "num-users": 1000, "rounds": 5, "fraction-train": 0.01, "eval-every": 5,
                "population": str(population), "seed": 3}
    summary, rows, per_user = run(pool_grid, tmp_path / "a", **settings)
    again, rows_again, per_user_again = run(pool_grid, tmp_path / "b", **settings)

    assert summary["num_users"] == 1000 and summary["evaluated_users"] == 1000 and len(rows) == 5
    assert without_clocks(rows) == without_clocks(rows_again) and per_user == per_user_again
    assert {k: v for k, v in summary.items() if k not in CLOCKS} == {k: v for k, v in again.items() if k not in CLOCKS}

    assert all(key in summary for key in REPORTED)
    assert summary["simulated_seconds"] > 0 and summary["late_users"] == 0  # no deadline
    assert summary["unavailable_users"] > 0 and summary["declined_users"] > 0 and summary["dropped_users"] > 0
    assert set(summary["time_to_accuracy"]) == {"0.6", "0.7", "0.8", "0.9"}
    groups = summary["accuracy_by_group"]
    assert {"tier:fast", "tier:mid", "tier:slow", "availability:q1", "availability:q4", "privacy:strict",
            "privacy:default", "privacy:open"} <= set(groups)
    assert sum(groups[f"tier:{t}"]["users"] for t in ("fast", "mid", "slow")) == 1000
    for group in groups.values():
        assert set(group) == {"users", "personalized_accuracy_mean", "global_accuracy_mean", "rounds_trained"}
    assert groups["privacy:strict"]["rounds_trained"] == 0 < groups["privacy:open"]["rounds_trained"]  # no DP asked

    declined = 0
    for row in rows:  # metrics.jsonl: simulated time, per-reason counts, bytes, per round
        assert row["simulated_end_s"] >= row["simulated_start_s"] >= 0 and row["bytes_down_per_user"] > 0
        assert row["selected"] == row["accepted"] + row["dropped_users"] + row["declined_users"] + row["late_users"] \
            + row["surplus_users"]
        assert row["train_replies"] == row["accepted"] and row["train_declined"] == row["declined_users"]
        declined += row["declined_users"]
    assert declined == summary["declined_users"] and summary["declined_reasons"] == {"dp-required": declined}


def test_a_deadline_the_slow_tier_cannot_meet_leaves_it_untrained_and_the_report_says_so(tmp_path, pool_grid,
                                                                                        many_small_users):
    population = tmp_path / "tiers.toml"
    population.write_text(TIERS, encoding="utf-8")
    # 2 steps of 4 pairs a round: fast 1.6 s, mid 8 s, slow 160 s of simulated training; deadline 60 s
    summary, rows, _ = run(pool_grid, tmp_path / "out", data=str(many_small_users(40)), rounds=3, num_users=40,
                           **{"fraction-train": 0.3, "population": str(population), "round-deadline": 60})
    groups = summary["accuracy_by_group"]
    assert groups["tier:slow"]["rounds_trained"] == 0  # from each user's own store, at the final evaluation
    assert groups["tier:fast"]["rounds_trained"] > 0 and groups["tier:mid"]["rounds_trained"] > 0
    assert summary["late_users"] == sum(r["late_users"] for r in rows) > 0
    assert all(r["simulated_round_s"] == 60.0 for r in rows)  # rounds wait for the late until the deadline


def test_the_uniform_default_reports_the_same_keys_with_zero_counts(tmp_path, pool_grid, many_small_users):
    summary, rows, _ = run(pool_grid, tmp_path / "out", data=str(many_small_users(12)), rounds=2, num_users=12)
    assert summary["population"] == "uniform" and summary["simulated_seconds"] == 0
    for key in ("unavailable_users", "declined_users", "dropped_users", "late_users", "surplus_users", "unfit_users"):
        assert summary[key] == 0, key
    assert summary["time_to_accuracy"]["0.6"] in (0.0, None)
    assert set(summary["accuracy_by_group"]) == {"tier:all", "availability:all", "privacy:no-demands", "pairs:all"}
    assert all(r["simulated_round_s"] == 0 and r["accepted"] == r["selected"] for r in rows)
