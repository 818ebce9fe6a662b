"""Report helpers: time-to-accuracy, per-group means, quantile classes, run totals."""

from __future__ import annotations

import math

import numpy as np

from fedpersona.population import (Grouping, Population, RoundPolicy, RunTally, SimulatedClock, group_report,
                                   quantile_grouping, time_to_accuracy)


def test_time_to_accuracy_is_the_first_time_each_level_is_reached():
    points = [(7200.0, 0.71), (0.0, 0.5), (3600.0, 0.64), (10800.0, 0.69), (14400.0, float("nan"))]
    assert time_to_accuracy(points, [0.5, 0.6, 0.7, 0.9]) == {0.5: 0.0, 0.6: 3600.0, 0.7: 7200.0, 0.9: None}
    assert time_to_accuracy([], [0.6]) == {0.6: None}


def test_group_report_means_per_group_skipping_unmeasured_users():
    tiers = Grouping("tier", ("fast", "slow", "empty"), np.array([0, 0, 1, 1, 1]))
    accuracy = np.array([0.8, 0.6, 0.5, np.nan, 0.7])
    trained = np.array([3, 1, 0, 0, 2])
    report = group_report([tiers], {"personalized_accuracy_mean": accuracy, "rounds_trained": trained})
    assert report["tier:fast"] == {"users": 2, "personalized_accuracy_mean": 0.7, "rounds_trained": 2.0}
    assert report["tier:slow"]["users"] == 3 and math.isclose(report["tier:slow"]["personalized_accuracy_mean"], 0.6)
    assert "tier:empty" not in report
    none = group_report([tiers], {"x": np.full(5, np.nan)})
    assert none["tier:fast"]["x"] is None


def test_quantile_classes_and_population_groups():
    pairs = np.array([4, 4, 5, 8, 10, 12, 40, 41])
    grouping = quantile_grouping(pairs, "pairs")
    assert grouping.sizes() == {"q1": 2, "q2": 2, "q3": 2, "q4": 2} and grouping.label(3) == "pairs:q4"
    assert list(grouping.members("q4")) == [6, 7]
    assert quantile_grouping(np.ones(5), "availability").names == ("all",)
    groups = Population.load("cross-device", 800, seed=0).groups()
    assert set(groups) == {"tier", "availability", "privacy"}
    on = Population.load("cross-device", 800, seed=0).on_fraction
    q1, q4 = groups["availability"].members("q1"), groups["availability"].members("q4")
    assert on[q1].max() <= on[q4].min() and len(q1) == 200


def test_run_tally_sums_rounds_and_counts_users_trained():
    pop = Population.load("cross-device", 1000, seed=4)
    clock = SimulatedClock(pop, RoundPolicy(deadline_s=300.0, over_selection=1.3), model_bytes=3e9)
    tally = RunTally(pop.num_users, clock.now, clock.unfit_users)
    rng = np.random.default_rng(0)
    accepted = 0
    for rnd in range(1, 6):
        plan = clock.plan_round(50)
        selected = rng.choice(plan.candidates, plan.num_select, replace=False)
        outcome = clock.close_round(rnd, plan.start_s, selected, work=20, bytes_down=2e6, bytes_up=2e6, wanted=50)
        accepted += len(outcome.accepted)
        tally.add(outcome)
        clock.advance(outcome)
    summary = tally.summary()
    assert tally.rounds_trained.sum() == accepted and summary["simulated_seconds"] == round(clock.now, 3)
    assert summary["unfit_users"] == 300  # the slow tier's 2000 MB cannot hold 3 GB
    assert summary["unavailable_users"] >= 5 * 300 and set(summary) >= {
        "simulated_seconds", "unavailable_users", "declined_users", "dropped_users", "late_users"}
