"""The simulated clock's round decisions: deadline, over-selection, dropout, windows, declines, memory."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedpersona.errors import UsageError
from fedpersona.population import (Population, RoundPolicy, RunTally, SimulatedClock, Status, group_report,
                                   load_population_file)

TIERS = """
[[tier]]
name = "fast"
share = 0.3
seconds_per_pair = 0.5
memory_mb = 8000
[[tier]]
name = "mid"
share = 0.4
seconds_per_pair = 1.5
download_bytes_per_s = 1e6
upload_bytes_per_s = 5e5
memory_mb = 4000
[[tier]]
name = "slow"
share = 0.3
seconds_per_pair = 5.0
memory_mb = 2000
"""


def population(tmp_path: Path, text: str, users: int, seed: int = 0) -> Population:
    path = tmp_path / "pop.toml"
    path.write_text(text, encoding="utf-8")
    return Population(load_population_file(path), users, seed)


def test_a_deadline_the_slow_tier_cannot_meet_makes_every_slow_user_late(tmp_path):
    pop = population(tmp_path, TIERS, 300)
    clock = SimulatedClock(pop, RoundPolicy(deadline_s=100.0))
    tally = RunTally(pop.num_users)
    rng = np.random.default_rng(0)
    slow = pop.tier == 2
    slow_selected = 0
    for rnd in range(1, 21):
        plan = clock.plan_round(60)
        selected = rng.choice(plan.candidates, plan.num_select, replace=False)
        # 40 pairs: fast 20 s, mid 60 s + 4 s down + 4 s up, slow 200 s
        outcome = clock.close_round(rnd, plan.start_s, selected, work=40, bytes_down=4e6, bytes_up=2e6)
        assert np.all(outcome.status[slow[selected]] == Status.LATE)
        assert np.all(outcome.status[~slow[selected]] == Status.OK)
        assert outcome.end_s == plan.start_s + 100.0  # replies are missing: the round closes at the deadline
        mid = pop.tier[selected] == 1
        np.testing.assert_allclose(outcome.finish_s[mid] - plan.start_s, 60.0 + 4.0 + 4.0)
        slow_selected += int(slow[selected].sum())
        tally.add(outcome)
        clock.advance(outcome)
    assert clock.now == 20 * 100.0 and tally.summary()["simulated_seconds"] == 2000.0
    assert tally.summary()["late_users"] == slow_selected > 0
    report = group_report(pop.groups().values(), {"rounds_trained": tally.rounds_trained})
    assert report["tier:slow"]["rounds_trained"] == 0 and report["tier:fast"]["rounds_trained"] > 0
    # without the deadline every reply counts and the round waits for the slowest
    free = SimulatedClock(pop).close_round(1, 0.0, np.arange(300), work=40, bytes_down=4e6, bytes_up=2e6)
    assert free.count(Status.OK) == 300 and free.end_s == 200.0


def test_over_selection_restores_the_replies_under_30_percent_dropout():
    pop = Population.load({"dropout": {"probability": 0.3}}, 10_000, seed=5)
    rng = np.random.default_rng(1)
    reached = {}
    for factor in (1.0, 1.5):
        clock = SimulatedClock(pop, RoundPolicy(over_selection=factor, min_replies=900))
        full, dropped, selected_total = 0, 0, 0
        for rnd in range(1, 101):
            plan = clock.plan_round(1000)
            selected = rng.choice(plan.candidates, plan.num_select, replace=False)
            outcome = clock.close_round(rnd, plan.start_s, selected, work=10, bytes_down=0, bytes_up=0, wanted=1000)
            full += outcome.count(Status.OK) == 1000
            dropped += outcome.count(Status.DROPPED)
            selected_total += len(selected)
            counted = outcome.count(Status.OK) + outcome.count(Status.SURPLUS) + outcome.count(Status.DROPPED)
            assert counted == len(selected)
        reached[factor] = full
        assert abs(dropped / selected_total - 0.3) < 0.01
    # 1,500 selected, 70% reply: P(at least 1,000) = 0.998 per round (binomial); 1x never gets 1,000 of 1,000
    assert reached[1.5] >= 97 and reached[1.0] == 0


def test_over_selection_keeps_the_first_finishers_and_closes_at_the_kth(tmp_path):
    pop = population(tmp_path, TIERS, 100)
    clock = SimulatedClock(pop, RoundPolicy(over_selection=1.5))
    users = np.arange(100)
    assert clock.num_to_select(40, 100) == 60 and clock.num_to_select(40, 50) == 50
    assert RoundPolicy(over_selection=1.1).num_to_select(10, 100) == 11  # 10 x 1.1 is 11.000000000000002
    work = np.linspace(1, 10, 100)
    outcome = clock.close_round(1, 0.0, users, work=work, bytes_down=0, bytes_up=0, wanted=40)
    ok = outcome.status == Status.OK
    assert ok.sum() == 40 and (outcome.status == Status.SURPLUS).sum() == 60
    assert outcome.finish_s[ok].max() <= outcome.finish_s[~ok].min()
    assert outcome.end_s == outcome.finish_s[ok].max()


def test_same_seed_and_round_same_fates_independent_of_the_others_selected():
    pop = Population.load("cross-device", 2000, seed=9)
    clock = SimulatedClock(pop, RoundPolicy(deadline_s=120.0))
    plan = clock.plan_round(200)
    users = plan.candidates[:300]
    a = clock.close_round(3, plan.start_s, users, work=30, bytes_down=1e6, bytes_up=1e6)
    b = SimulatedClock(Population.load("cross-device", 2000, seed=9), RoundPolicy(deadline_s=120.0)).close_round(
        3, plan.start_s, users, work=30, bytes_down=1e6, bytes_up=1e6)
    np.testing.assert_array_equal(a.status, b.status)
    np.testing.assert_array_equal(a.finish_s, b.finish_s)
    other_round = clock.close_round(4, plan.start_s, users, work=30, bytes_down=1e6, bytes_up=1e6)
    assert not np.array_equal(a.status == Status.DROPPED, other_round.status == Status.DROPPED)
    half = clock.close_round(3, plan.start_s, users[::2], work=30, bytes_down=1e6, bytes_up=1e6)
    np.testing.assert_array_equal(half.status == Status.DROPPED, a.status[::2] == Status.DROPPED)
    before = clock.fate_before_work(3, plan.start_s, users)
    decided = before != Status.PENDING
    np.testing.assert_array_equal(before[decided], a.status[decided])
    assert not np.isin(a.status[~decided], [Status.DROPPED, Status.UNAVAILABLE, Status.UNFIT]).any()


TWO_DEVICES = """
[devices]
file = "dev.csv"
[availability]
model = "trace"
file = "day.json"
"""


def traced(tmp_path: Path, users: int = 3) -> Population:
    (tmp_path / "dev.csv").write_text("tier,seconds_per_pair,download_bytes_per_s,upload_bytes_per_s,memory_mb\n"
                                      "phone,1.0,1e6,1e6,4000\nphone,1.0,1e6,1e6,4000\nold,1.0,1e6,1e6,500\n")
    (tmp_path / "day.json").write_text('{"format": "fedpersona-availability/1", "period_s": 1000, "devices": ['
                                       '{"active": [0], "inactive": [100]}, {"active": [0, 500], "inactive": '
                                       '[500, 1000]}, {"active": [200], "inactive": [300]}]}')
    return population(tmp_path, TWO_DEVICES, users)


def test_window_closing_before_the_reply_loses_it_and_unavailable_unfit_users_never_train(tmp_path):
    pop = traced(tmp_path)
    clock = SimulatedClock(pop, model_bytes=1e9)  # the "old" device (500 MB) cannot hold 1 GB
    assert clock.unfit_users == 1 and list(clock.available_users(50.0)) == [0, 1]
    # 50 pairs at 1 s + 1 s down + 1 s up = 52 s: device 0 goes offline at 100 while busy from 60
    outcome = clock.close_round(1, 60.0, [0, 1, 2], work=50, bytes_down=1e6, bytes_up=1e6)
    assert [Status(s) for s in outcome.status] == [Status.OFFLINE, Status.OK, Status.UNFIT]
    np.testing.assert_allclose(outcome.finish_s, [100.0, 112.0, 60.0])
    assert outcome.end_s == 112.0 and outcome.unavailable_users == 1
    # device 1's windows touch ([0, 500) + [500, 1000), and on into the next period): never cut
    assert clock.close_round(1, 480.0, [1], work=50, bytes_down=0, bytes_up=0).status[0] == Status.OK
    late_start = clock.close_round(2, 150.0, [0, 1], work=10, bytes_down=0, bytes_up=0)
    assert [Status(s) for s in late_start.status] == [Status.UNAVAILABLE, Status.OK]
    assert late_start.unavailable_users == 2


def test_plan_round_waits_in_simulated_time_for_enough_users(tmp_path):
    pop = traced(tmp_path, users=6)  # devices 0, 1, 2, 0, 1, 2
    clock = SimulatedClock(pop, RoundPolicy(min_replies=4))
    clock.now = 150.0  # only device 1 (users 1, 4) is online; device 2 (users 2, 5) comes at 200
    plan = clock.plan_round(4)
    assert plan.start_s == 200.0 and plan.waited_s == 50.0 and list(plan.candidates) == [1, 2, 4, 5]
    clock.now = 300.0  # device 2 has just gone; device 0 comes back at 1000 (the next period)
    assert clock.plan_round(4).start_s == 1000.0
    with pytest.raises(UsageError, match="never 5 users online"):
        clock.plan_round(6, need=5)


def test_declines_reply_after_the_download_and_uniform_rounds_take_no_time(tmp_path):
    pop = population(tmp_path, TIERS, 10)
    declined = np.arange(10) % 2 == 0
    outcome = SimulatedClock(pop).close_round(1, 5.0, np.arange(10), work=40, bytes_down=2e6, bytes_up=1e6,
                                              declined=declined)
    assert np.all(outcome.status[declined] == Status.DECLINED) and np.all(outcome.status[~declined] == Status.OK)
    np.testing.assert_allclose(outcome.finish_s[declined] - 5.0, outcome.download_s[declined])
    assert outcome.row()["declined_users"] == 5 and outcome.complete
    uniform = Population.load("uniform", 1000, seed=0)
    clock = SimulatedClock(uniform, RoundPolicy(min_replies=2))
    plan = clock.plan_round(100)
    assert plan.start_s == 0.0 and plan.num_select == 100 and len(plan.candidates) == 1000
    done = clock.close_round(1, 0.0, plan.candidates[:100], work=400, bytes_down=1e9, bytes_up=1e9)
    assert done.count(Status.OK) == 100 and done.end_s == 0.0 and done.unavailable_users == 0
    assert clock.advance(done) == 0.0


def test_min_replies_marks_a_round_incomplete_and_the_policy_is_validated(tmp_path):
    pop = population(tmp_path, TIERS, 100)
    clock = SimulatedClock(pop, RoundPolicy(deadline_s=50.0, min_replies=50, server_gap_s=7.0))
    outcome = clock.close_round(1, 0.0, np.arange(100), work=40, bytes_down=0, bytes_up=0)
    assert outcome.count(Status.OK) == 30 and not outcome.complete  # only the fast tier makes 50 s
    assert clock.advance(outcome) == 57.0
    tally = RunTally(100)
    tally.add(outcome)
    assert tally.summary()["incomplete_rounds"] == 1 and tally.summary()["late_users"] == 70
    for kwargs, setting in (({"over_selection": 0.5}, "over-selection"), ({"deadline_s": -1.0}, "round-deadline"),
                            ({"deadline_s": math.inf}, "round-deadline"), ({"min_replies": -2}, "min-replies")):
        with pytest.raises(UsageError, match=setting):
            RoundPolicy(**kwargs)
    with pytest.raises(ValueError, match="distinct"):
        clock.close_round(1, 0.0, [1, 1], work=1, bytes_down=0, bytes_up=0)
