"""Honest replies: does the server's reply screen drop or bend honest users' replies, in the default
simulation and in skewed populations?

No user attacks here. Each scenario is the default simulation (32 users, 15 rounds, half the users a round,
scheme split, FedAvg, the default screen) on another population:

* ``default``: ``synthetic:conflicting`` (Dirichlet alpha 0.1, 8-160 pairs a user, log-normal);
* ``majority-minority``: 80% of users at one pole, 20% at the other;
* ``alpha-0.01`` (on request, ``--scenarios``): ``--set dirichlet-alpha=0.01``, every user at its pole;
* ``8-vs-160``: the default scenario's users with exactly 8 (even users) or 160 (odd users) training
  pairs, from a pair file this script writes (``pairs_8_vs_160``), no generation check.

Columns: replies rejected (per reason), accepted replies clipped and weight-capped
(``fedpersona.strategies.influence``), and the accuracies. Run it on the code before bounded influence
(the same command with that checkout first on ``PYTHONPATH``) for the "before" rows: there the screen
rejected updates above 10x the median norm of the round's other replies.

    .venv/bin/python benchmarks/honest_replies.py --out runs/honest_replies.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedpersona.config import RunConfig

SCENARIOS = ("default", "majority-minority", "alpha-0.01", "8-vs-160")
DEFAULT_SCENARIOS = ("default", "majority-minority", "8-vs-160")  # what one run takes (~4 CPU-minutes each)


def pairs_8_vs_160(path: Path, num_users: int = 32, seed: int = 0) -> Path:
    """Write the ``8-vs-160`` pair file: the conflicting scenario's users, even ones with 8 training pairs,
    odd ones with 160, each with its 24 held-out test pairs."""
    from fedpersona.data.schema import write_pairs_jsonl
    from fedpersona.data.synthetic import SCENARIOS as POPULATIONS, PreferenceSimulator

    scenario = dataclasses.replace(POPULATIONS["conflicting"], min_train_pairs=160, median_train_pairs=160,
                                   max_train_pairs=160)
    simulator = PreferenceSimulator(scenario, num_users=num_users, seed=seed)
    pairs = []
    for index in range(num_users):
        data = simulator.user_data(index)
        pairs += data.train[:8 if index % 2 == 0 else 160] + data.test
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pairs_jsonl(pairs, path)
    return path


def scenario_config(name: str, base: RunConfig, work: Path) -> RunConfig:
    """The default run configuration on scenario ``name``."""
    if name == "default":
        return base
    if name == "majority-minority":
        return base.replace(data="synthetic:majority-minority")
    if name == "alpha-0.01":
        return base.replace(dirichlet_alpha=0.01)
    if name == "8-vs-160":
        return base.replace(data=str(pairs_8_vs_160(work / "pairs-8-vs-160.jsonl")), gen_prompts=0)
    raise SystemExit(f"unknown scenario {name}; choose from {', '.join(SCENARIOS)}")


def row(name: str, summary: dict[str, Any] | BaseException, seconds: float) -> dict[str, Any]:
    """One result: what the screen did to honest replies, and the accuracies."""
    if isinstance(summary, BaseException):
        return {"scenario": name, "error": f"{type(summary).__name__}: {str(summary)[:200]}", "seconds": seconds}
    keys = ("rejected_replies", "rejected_reasons", "clipped_replies", "weight_capped_replies", "train_answers",
            "personalized_accuracy_mean", "personalized_accuracy_p10", "global_accuracy_mean")
    return {"scenario": name, **{k: summary.get(k) for k in keys}, "error": None, "seconds": round(seconds, 1)}


def markdown(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = ["| scenario | replies | rejected | clipped | weight-capped | personalized | p10 | global |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['scenario']} | run failed: {r['error']} | | | | | | |")
            continue
        reasons = ", ".join(f"{k} {v}" for k, v in (r.get("rejected_reasons") or {}).items())
        rejected = f"{r['rejected_replies']}" + (f" ({reasons})" if reasons else "")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        dash = lambda v: "-" if v is None else str(v)  # noqa: E731 - older code reports no bounding
        lines.append(f"| {r['scenario']} | {r['train_answers']} | {rejected} | {dash(r.get('clipped_replies'))} | "
                     f"{dash(r.get('weight_capped_replies'))} | {fmt(r['personalized_accuracy_mean'])} | "
                     f"{fmt(r['personalized_accuracy_p10'])} | {fmt(r['global_accuracy_mean'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help=f"comma list from {', '.join(SCENARIOS)} (default: %(default)s)")
    p.add_argument("--out", default="runs/honest_replies.json", help="JSON results; the table goes beside it (.md)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per simulated client (Ray actor)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every scenario (e.g. reply-weight-ratio=8), as fedpersona simulate --set")
    args = p.parse_args(argv)
    from fedpersona.simulations.session import simulate_session

    out = Path(args.out)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    base = RunConfig.from_flat(dict(item.split("=", 1) for item in args.set), source="--set") if args.set else RunConfig()
    configs = [scenario_config(n, base, out.parent / "honest-replies-data") for n in names]
    results: list[dict[str, Any]] = []
    clock = [time.monotonic()]

    def on_run(i: int, config: RunConfig, outcome: dict[str, Any] | BaseException) -> None:
        now = time.monotonic()
        results.append(row(names[i], outcome, now - clock[0]))
        clock[0] = now
        print(markdown(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)

    simulate_session(configs, [None] * len(configs), num_cpus=args.num_cpus, on_run=on_run)
    table = markdown(results)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "honest_replies", "command": " ".join(["benchmarks/honest_replies.py",
                                                                                   *(argv or sys.argv[1:])]),
                               "results": results}, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
