"""Population model and simulated clock: what they cost at 10,000+ users, and what the round policies do.

Not a test: it prints figures. Part 1 times, per preset and population size, the pure-numpy work a
simulation adds per run and per round (no Flower, no training): reading the spec, drawing every user's
properties, planning a round (who is online, waiting in simulated time until enough are), and closing it
(durations, dropouts, windows, deadline, over-selection). Medians of ``--repeats`` runs, in milliseconds.

Part 2 runs ``--rounds`` clock-only rounds of a population (no training: every selected user does
``--work`` pairs; a message of ``--mb`` MB each way) under several round policies, and prints how many
rounds collected the wanted replies, the simulated round time, and the slow tier's share of accepted
replies: the effects issue 25 asks the full benchmark to show with accuracies.

Usage::

    python benchmarks/population_clock.py                       # 1,000 / 10,000 / 100,000 users
    python benchmarks/population_clock.py --users 10000 --rounds 200
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from fedpersona.population import (PRESETS, Population, RoundPolicy, SimulatedClock, Status, load_population_spec)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def build(preset: str, users: int, seed: int) -> Population:
    pop = Population(load_population_spec(preset), users, seed)
    for values in (pop.tier, pop.seconds_per_unit, pop.upload_bytes_per_s, pop.on_fraction, pop.dropout_probability,
                   pop.privacy_group):
        assert len(values) == users
    return pop


def cost_table(sizes: list[int], repeats: int, fraction: float) -> None:
    print(f"Part 1: cost in ms (median of {repeats}); a round selects {fraction:.0%} of the users x 1.3, "
          "deadline 600 s")
    print(f"{'preset':<20}{'users':>8}{'spec':>8}{'draw all':>10}{'plan':>8}{'close':>8}{'per round':>11}")
    for preset in PRESETS:
        for users in sizes:
            spec_ms = median_ms(lambda preset=preset: load_population_spec(preset), repeats)
            draw_ms = median_ms(lambda preset=preset, users=users: build(preset, users, 0), repeats)
            pop = build(preset, users, 0)
            wanted = max(1, int(users * fraction))
            rng = np.random.default_rng(0)
            clocks = [SimulatedClock(pop, RoundPolicy(deadline_s=600.0, over_selection=1.3)) for _ in range(repeats)]
            plans, closes = [], []
            for rnd, clock in enumerate(clocks, start=1):
                started = time.perf_counter()
                plan = clock.plan_round(wanted)
                selected = rng.choice(plan.candidates, plan.num_select, replace=False)
                plans.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                clock.fate_before_work(rnd, plan.start_s, selected)
                clock.close_round(rnd, plan.start_s, selected, work=40, bytes_down=4e6, bytes_up=4e6, wanted=wanted)
                closes.append((time.perf_counter() - started) * 1000)
            plan_ms, close_ms = statistics.median(plans), statistics.median(closes)
            print(f"{preset:<20}{users:>8}{spec_ms:>8.2f}{draw_ms:>10.2f}{plan_ms:>8.2f}{close_ms:>8.2f}"
                  f"{plan_ms + close_ms:>11.2f}")


def effects_table(users: int, rounds: int, wanted: int, work: float, mb: float) -> None:
    policies = [("no deadline, 1x", RoundPolicy()), ("deadline 120 s, 1x", RoundPolicy(deadline_s=120.0)),
                ("no deadline, 1.3x", RoundPolicy(over_selection=1.3)),
                ("deadline 120 s, 1.3x", RoundPolicy(deadline_s=120.0, over_selection=1.3)),
                ("deadline 120 s, 1.5x", RoundPolicy(deadline_s=120.0, over_selection=1.5)),
                ("deadline 120 s, 2x", RoundPolicy(deadline_s=120.0, over_selection=2.0))]
    print(f"\nPart 2: cross-device, {users} users, {rounds} rounds wanting {wanted} replies; {work:g} pairs and "
          f"{mb:g} MB each way per user")
    print(f"{'policy':<24}{'full rounds':>12}{'replies':>9}{'round s':>9}{'sim. hours':>11}{'slow share':>11}"
          f"{'late':>7}{'dropped':>9}")
    pop = Population.load("cross-device", users, seed=0)
    slow = pop.tier == pop.tier_names.index("slow")
    for name, policy in policies:
        clock = SimulatedClock(pop, policy)
        rng = np.random.default_rng(1)
        full, replies, slow_ok, late, dropped, durations = 0, 0, 0, 0, 0, []
        for rnd in range(1, rounds + 1):
            plan = clock.plan_round(wanted)
            selected = rng.choice(plan.candidates, plan.num_select, replace=False)
            outcome = clock.close_round(rnd, plan.start_s, selected, work=work, bytes_down=mb * 1e6,
                                        bytes_up=mb * 1e6, wanted=wanted)
            ok = outcome.accepted
            full += len(ok) == wanted
            replies += len(ok)
            slow_ok += int(slow[ok].sum())
            late += outcome.count(Status.LATE)
            dropped += outcome.count(Status.DROPPED) + outcome.count(Status.OFFLINE)
            durations.append(outcome.duration_s)
            clock.advance(outcome)
        print(f"{name:<24}{full / rounds:>12.0%}{replies / rounds:>9.1f}{statistics.mean(durations):>9.1f}"
              f"{clock.now / 3600:>11.1f}{slow_ok / max(replies, 1):>11.0%}{late / rounds:>7.1f}"
              f"{dropped / rounds:>9.1f}")
    print(f"(slow tier: {slow.mean():.0%} of the users)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fraction", type=float, default=0.01, help="share of the users a round wants")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--wanted", type=int, default=100)
    parser.add_argument("--work", type=float, default=20.0, help="pairs each selected user trains")
    parser.add_argument("--mb", type=float, default=2.0, help="MB each way per user")
    args = parser.parse_args()
    cost_table(args.users, args.repeats, args.fraction)
    effects_table(10_000 if 10_000 in args.users else max(args.users), args.rounds, args.wanted, args.work, args.mb)


if __name__ == "__main__":
    main()
