"""Populations: what heterogeneous users do to a personalized federation (issue 25). Not a test: it prints figures.

Real simulations (the Flower engine on Ray, the ClientApp training and evaluating cohorts of users), all in one
Ray session (``fedpersona.simulations.session``) with the same data and seed, on populations written to
``OUT/populations/``; printed side by side, five parts:

1. **Deadline.** Three device tiers (fast 0.25, mid 1, slow 5 simulated s per trained pair; always online,
   no dropout) without and with a round deadline the slow tier cannot meet: its users train in no round
   and keep the untrained private head: their personalized accuracy against the other tiers'.
2. **Over-selection.** The same tiers with 30% dropout, a round wanting k replies and needing 0.8k
   (``min-replies``), selecting k (1x) or 1.5k: replies per round and the share of complete rounds.
3. **Dropout** 0 / 10 / 30%: rounds still complete (how many), and the accuracy cost.
4. **Privacy demands in one federation.** 30% of the users demand DP at epsilon <= 1, 30% at <= 8, 40%
   nothing; each trains at its own level (``privacy-demands = own-epsilon``; the round asks for no DP).
   Per group: personalized accuracy, against the same users in a run where nobody demands anything (what
   each group's demand costs it), and the no-demand users' accuracy in both runs (what the strict users
   cost the others).
5. **10,000 users** with diurnal availability, 20% dropout and over-selection 1.25 against the uniform
   population (today's simulation): whole-run wall time, and the seconds the population model itself took
   on the server (``summary.json`` ``population_seconds``). These users are small (4 training pairs, 1
   test pair each, from a pair file the script writes) so that the final evaluation of all 10,000 stays
   short; runs 1-4 use ``synthetic:conflicting``.

Usage::

    python benchmarks/populations.py                       # about 30 min on 2 CPU cores
    python benchmarks/populations.py --users 40 --rounds 6 --scale-users 1000   # a quick look

Writes ``OUT/populations.json`` (every run's summary figures) beside the printed tables, and the population
figures (``accuracy_by_simulated_time.png``, ``accuracy_by_group.png``) for parts 1-4.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

TIERS = """# three device tiers: simulated seconds per trained pair, bandwidth in bytes/s
[[tier]]
name = "fast"
share = 0.3
seconds_per_pair = 0.25
download_bytes_per_s = 12.5e6
upload_bytes_per_s = 2.5e6
[[tier]]
name = "mid"
share = 0.4
seconds_per_pair = 1.0
download_bytes_per_s = 5e6
upload_bytes_per_s = 1.25e6
[[tier]]
name = "slow"
share = 0.3
seconds_per_pair = 5.0
download_bytes_per_s = 1.25e6
upload_bytes_per_s = 2.5e5
"""
PRIVACY = """# privacy demands only: every device equal, always online
[[privacy]]
name = "eps1"
share = 0.3
require_dp = true
max_epsilon = 1.0
[[privacy]]
name = "eps8"
share = 0.3
require_dp = true
max_epsilon = 8.0
[[privacy]]
name = "no-dp"
share = 0.4
"""
AVAILABILITY = TIERS + """
[availability]
model = "diurnal"
start_s = { dist = "normal", mean = 79200, std = 10800 }
on_fraction = { dist = "uniform", low = 0.2, high = 0.6 }
[dropout]
probability = 0.2
"""


def write_populations(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"tiers": TIERS, "privacy": PRIVACY, "availability": AVAILABILITY}
    for dropout in (0.1, 0.3):
        files[f"tiers-dropout-{dropout:g}"] = TIERS + f"\n[dropout]\nprobability = {dropout}\n"
    paths = {}
    for name, text in files.items():
        path = folder / f"{name}.toml"
        path.write_text(f'name = "{name}"\n' + text, encoding="utf-8")
        paths[name] = str(path)
    return paths


def small_users_file(path: Path, users: int) -> str:
    """``users`` users of 4 training pairs and 1 test pair (synthetic users' pairs handed out in turn)."""
    from fedpersona.data.synthetic import PreferenceSimulator

    simulator = PreferenceSimulator("conflicting", 16, 0)
    sources = [simulator.user_data(i) for i in range(16)]
    lines = []
    for u in range(users):
        source, start = sources[u % 16], 4 * (u // 16)
        picked = [(source.train[(start + k) % len(source.train)], "train") for k in range(4)]
        picked.append((source.test[(u // 16) % len(source.test)], "test"))
        lines += [json.dumps({"user_id": f"u{u:05d}", "prompt": p.prompt, "chosen": p.chosen,
                              "rejected": p.rejected, "split": split}) for p, split in picked]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def plan(args: argparse.Namespace, pops: dict[str, str], scale_data: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, settings) of every run, in the order they run."""
    k = args.trained
    base = {"num-users": args.users, "rounds": args.rounds, "fraction-train": k / args.users, "seed": args.seed,
            "max-steps": 20, "eval-every": 5, "fraction-evaluate": 0.2, "gen-prompts": 0, "min-users": 2}
    need = {"min-replies": max(1, int(0.8 * k))}
    scale = {"data": scale_data, "num-users": args.scale_users, "rounds": 3, "fraction-train": 10 / args.scale_users,
             "eval-every": 3, "gen-prompts": 0, "min-users": 2, "seed": args.seed}
    return [
        ("tiers", {**base, **need, "population": pops["tiers"]}),
        (f"tiers, deadline {args.deadline:g} s", {**base, **need, "population": pops["tiers"],
                                                  "round-deadline": args.deadline}),
        ("tiers, dropout 10%", {**base, **need, "population": pops["tiers-dropout-0.1"]}),
        ("tiers, dropout 30%", {**base, **need, "population": pops["tiers-dropout-0.3"]}),
        ("tiers, dropout 30%, over-selection 1.5", {**base, **need, "population": pops["tiers-dropout-0.3"],
                                                    "over-selection": 1.5}),
        ("privacy eps 1 / 8 / none (own epsilon)", {**base, "population": pops["privacy"],
                                                    "privacy-demands": "own-epsilon"}),
        ("uniform (nobody demands privacy)", {**base}),
        (f"{args.scale_users} users, uniform", {**scale}),
        (f"{args.scale_users} users, availability + dropout", {**scale, "population": pops["availability"],
                                                               "over-selection": 1.25}),
    ]


def read_rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def figures(label: str, folder: Path, summary: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in read_rows(folder) if "selected" in r]
    groups = summary.get("accuracy_by_group") or {}
    return {
        "run": label, "out": folder.name, "wall_seconds": summary.get("wall_seconds"),
        "population_seconds": summary.get("population_seconds"),
        "personalized": summary.get("personalized_accuracy_mean"), "global": summary.get("global_accuracy_mean"),
        "simulated_hours": (summary.get("simulated_seconds") or 0) / 3600,
        "time_to_0.7_h": None if summary.get("time_to_accuracy", {}).get("0.7") is None
        else summary["time_to_accuracy"]["0.7"] / 3600,
        "selected_per_round": float(np.mean([r["selected"] for r in rows])) if rows else None,
        "accepted_per_round": float(np.mean([r["accepted"] for r in rows])) if rows else None,
        "complete_rounds": float(np.mean([bool(r["round_complete"]) for r in rows])) if rows else None,
        **{key: summary.get(key) for key in ("late_users", "dropped_users", "declined_users", "unavailable_users",
                                             "incomplete_rounds", "epsilon_max")},
        "groups": groups,
    }


def fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def group(fig: dict[str, Any], name: str, key: str = "personalized_accuracy_mean") -> Any:
    return (fig["groups"].get(name) or {}).get(key)


def tables(figs: list[dict[str, Any]], args: argparse.Namespace, per_user: dict[str, list[dict[str, Any]]],
           privacy_groups: dict[int, str]) -> str:
    tiers, deadline, drop10, drop30, over, mixed, everyone, scale_u, scale_p = figs
    out = [f"Runs 1-7: synthetic:conflicting, {args.users} users, {args.rounds} rounds, k = {args.trained} wanted a "
           f"round (min-replies {max(1, int(0.8 * args.trained))} in 1-5), max-steps 20, seed {args.seed}",
           "",
           "Part 1: a deadline the slow tier cannot meet (personalized accuracy per tier; rounds trained per user)",
           f"{'run':<28} {'sim. h':>7} {'late':>5} {'slow acc':>8} {'mid acc':>8} {'fast acc':>8} "
           f"{'slow rnds':>9} {'fast rnds':>9} {'all acc':>7}"]
    for f in (tiers, deadline):
        out.append(f"{f['run']:<28} {f['simulated_hours']:>7.2f} {f['late_users']:>5} "
                   f"{fmt(group(f, 'tier:slow')):>8} {fmt(group(f, 'tier:mid')):>8} {fmt(group(f, 'tier:fast')):>8} "
                   f"{fmt(group(f, 'tier:slow', 'rounds_trained'), '.2f'):>9} "
                   f"{fmt(group(f, 'tier:fast', 'rounds_trained'), '.2f'):>9} {fmt(f['personalized']):>7}")
    out += ["", "Part 2: over-selection with 30% dropout (k wanted, 0.8k needed)",
            f"{'run':<40} {'selected':>8} {'replies':>7} {'complete':>8} {'dropped':>7} {'acc':>6} {'sim. h':>7}"]
    for f in (drop30, over):
        out.append(f"{f['run']:<40} {f['selected_per_round']:>8.1f} {f['accepted_per_round']:>7.1f} "
                   f"{f['complete_rounds']:>8.0%} {f['dropped_users']:>7} {fmt(f['personalized']):>6} "
                   f"{f['simulated_hours']:>7.2f}")
    out += ["", "Part 3: dropout (no over-selection)",
            f"{'dropout':>7} {'replies':>7} {'complete':>8} {'dropped':>7} {'pers. acc':>9} {'global acc':>10} "
            f"{'sim. h':>7} {'h to 0.7':>8}"]
    for rate, f in (("0%", tiers), ("10%", drop10), ("30%", drop30)):
        out.append(f"{rate:>7} {f['accepted_per_round']:>7.1f} {f['complete_rounds']:>8.0%} {f['dropped_users']:>7} "
                   f"{fmt(f['personalized']):>9} {fmt(f['global']):>10} {f['simulated_hours']:>7.2f} "
                   f"{fmt(f['time_to_0.7_h'], '.2f'):>8}")
    baseline = {int(e["user_index"]): e["personalized"] for e in per_user[everyone["out"]]}
    out += ["", "Part 4: privacy demands in one federation (each user at its own epsilon) vs nobody demanding any",
            f"{'group':<8} {'users':>5} {'rounds':>6} {'acc here':>8} {'acc, nobody demands':>19} {'cost':>7}"]
    for name in ("eps1", "eps8", "no-dp"):
        members = [u for u, g in privacy_groups.items() if g == name]
        alone = float(np.mean([baseline[u] for u in members if u in baseline])) if members else None
        here = group(mixed, f"privacy:{name}")
        out.append(f"{name:<8} {len(members):>5} {fmt(group(mixed, f'privacy:{name}', 'rounds_trained'), '.2f'):>6} "
                   f"{fmt(here):>8} {fmt(alone):>19} {fmt(None if here is None or alone is None else here - alone, '+.3f'):>7}")
    out.append(f"global adapter accuracy: {fmt(mixed['global'])} with the demands, {fmt(everyone['global'])} without; "
               f"largest epsilon spent {fmt(mixed['epsilon_max'], '.2f')}")
    out += ["", f"Part 5: {args.scale_users} users (4 training pairs, 1 test pair each; 3 rounds of ~10 users; the last "
            "evaluates every user)",
            f"{'run':<42} {'wall s':>7} {'vs uniform':>10} {'model s':>7} {'replies':>7} {'unavail.':>9} {'dropped':>7}"]
    for f in (scale_u, scale_p):
        out.append(f"{f['run']:<42} {f['wall_seconds']:>7.1f} {f['wall_seconds'] / scale_u['wall_seconds'] - 1:>+10.1%} "
                   f"{fmt(f['population_seconds'], '.2f'):>7} {f['accepted_per_round']:>7.1f} "
                   f"{f['unavailable_users']:>9} {f['dropped_users']:>7}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--trained", type=int, default=20, help="replies a round wants (k)")
    parser.add_argument("--deadline", type=float, default=300.0, help="part 1's deadline, simulated seconds")
    parser.add_argument("--scale-users", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark-populations"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from fedpersona.population import Population
    from fedpersona.simulations.plots import population_plots
    from fedpersona.simulations.session import simulate_session
    from fedpersona.config import RunConfig
    from fedpersona.io import atomic_write_json

    started = time.monotonic()
    pops = write_populations(args.out / "populations")
    scale_data = small_users_file(args.out / "data" / f"users-{args.scale_users}.jsonl", args.scale_users)
    runs = plan(args, pops, scale_data)
    configs = [RunConfig.from_flat(settings) for _, settings in runs]
    folders = [args.out / "runs" / f"{i + 1}" for i in range(len(runs))]

    def progress(i: int, config: RunConfig, result: Any) -> None:
        what = (f"personalized {result.get('personalized_accuracy_mean'):.3f}, {result.get('wall_seconds')} s"
                if isinstance(result, dict) else f"FAILED {result!r}")
        print(f"run {i + 1}/{len(runs)} {runs[i][0]}: {what}", flush=True)

    summaries = simulate_session(configs, folders, num_cpus=1, on_run=progress)
    failed = [runs[i][0] for i, s in enumerate(summaries) if isinstance(s, BaseException)]
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    figs = [figures(label, folder, summary) for (label, _), folder, summary in zip(runs, folders, summaries)]
    per_user = {f.name: json.loads((f / "per_user.json").read_text()) for f in folders}
    privacy = Population.load(pops["privacy"], args.users, args.seed)
    privacy_groups = {u: privacy.privacy_names[privacy.privacy_group[u]] for u in range(args.users)}
    text = tables(figs, args, per_user, privacy_groups)
    print(text)
    plots = population_plots(args.out / "runs", [{"run": label, "out": f.name} for (label, _), f in
                                                 zip(runs[:6], folders[:6])])
    atomic_write_json(args.out / "populations.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                                      "runs": figs, "table": text, "plots": [str(p) for p in plots]})
    print(f"\ntotal {time.monotonic() - started:.0f} s; {args.out}/populations.json, plots {[p.name for p in plots]}")


if __name__ == "__main__":
    main()
