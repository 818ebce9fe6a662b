"""Robustness: a share of malicious users against FedAvg and the robust rules, with and without validation.

Rows: attack x strategy x reply validation (on / off), plus one clean row ("none") per strategy. Each
attack is made by the first ``round(users * malicious)`` users every round (``fedpersona.strategies.attacks``:
NaN, Inf, x1e6 boosted updates, sign flip, a claimed weight of 1e9, a shape-[1] tensor, ...). Columns:
personalized and global mean accuracy over all users after the last round, the replies the server
rejected (``fedpersona.strategies.validation``), and the run's wall time; a run that crashed says so.

Every user trains every round (fraction 1.0), so Krum and Bulyan see all n updates; their assumed number
of malicious nodes f is the real one where their theory allows it (Krum n >= 2f + 3, Blanchard et al.
2017; Bulyan n >= 4f + 3, El Mhamdi et al. 2018) and the largest allowed f otherwise (the table's f
column). FedTrimmedAvg trims the malicious share from each end (beta, below 0.5). All runs share one
Flower simulation on Ray (``simulate_session``: one start-up; runs need the same number of users).

    .venv/bin/python benchmarks/robustness.py --out runs/robustness.json
    .venv/bin/python benchmarks/robustness.py --attacks nan --strategies FedAvg --rounds 2 --max-steps 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.config import RunConfig
from fedpersona.strategies.attacks import ATTACKS

STRATEGIES = ("FedAvg", "FedMedian", "FedTrimmedAvg", "Krum", "Bulyan")
DEFAULT_ATTACKS = ("none", "nan", "inf", "scale", "sign-flip", "weight-huge", "wrong-shape")


@dataclass(frozen=True)
class Row:
    attack: str  # "none": the clean run
    strategy: str
    validation: bool
    assumed_malicious: int  # f given to Krum / Bulyan (0 for the others)
    config: RunConfig


def strategy_args(strategy: str, users: int, malicious: int) -> tuple[str, int]:
    """``(strategy_args, f)``: each robust rule told about ``malicious`` of ``users`` updates per round."""
    if strategy == "Krum":
        f = min(malicious, max(0, (users - 3) // 2))
        return f"num_malicious_nodes={f}", f
    if strategy == "Bulyan":
        f = min(malicious, max(0, (users - 3) // 4))
        return f"num_malicious_nodes={f}", f
    if strategy == "FedTrimmedAvg":
        return f"beta={min(malicious / users, 0.45):.4g}", 0
    return "", 0


def plan(args: argparse.Namespace) -> list[Row]:
    """Every row's run configuration, in table order."""
    base = RunConfig.from_toml(args.config) if args.config else RunConfig()
    base = base.replace(num_users=args.users, rounds=args.rounds, fraction_train=1.0, eval_every=args.rounds,
                        gen_prompts=0, seed=args.seed, data=args.data or base.data,
                        **({"max_steps": args.max_steps} if args.max_steps is not None else {}))
    malicious = round(args.users * args.malicious)
    rows = []
    for strategy in args.strategies:
        extra, f = strategy_args(strategy, args.users, malicious)
        for attack in args.attacks:
            for validation in ((True,) if attack == "none" else (True, False)):
                config = base.replace(strategy=f"{strategy}({extra})" if extra else strategy, validate_replies=validation,
                                      **({"attack": attack, "attack_users": malicious} if attack != "none" else {}))
                rows.append(Row(attack, strategy, validation, f, config))
    return rows


def result_of(row: Row, outcome: dict[str, Any] | BaseException, seconds: float) -> dict[str, Any]:
    """One JSON result: the row's settings and what the run reported (or how it failed)."""
    out: dict[str, Any] = {"attack": row.attack, "strategy": row.strategy, "validation": row.validation,
                           "strategy_spec": row.config.strategy, "assumed_malicious": row.assumed_malicious,
                           "malicious_users": row.config.attack_users, "seconds": round(seconds, 1)}
    if isinstance(outcome, BaseException):
        return {**out, "error": f"{type(outcome).__name__}: {str(outcome).splitlines()[0][:200] if str(outcome) else ''}"}
    keys = ("personalized_accuracy_mean", "global_accuracy_mean", "rejected_replies", "rejected_reasons")
    return {**out, **{k: outcome.get(k) for k in keys}, "error": None}


def _acc(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table (one line per row)."""
    lines = ["| attack | strategy | f | validation | personalized | global | rejected | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        accs = ([_acc(r["personalized_accuracy_mean"]), _acc(r["global_accuracy_mean"]), str(r["rejected_replies"])]
                if r["error"] is None else ["run failed", r["error"].split(":")[0], "-"])
        lines.append(f"| {r['attack']} | {r['strategy']} | {r['assumed_malicious'] or '-'} | "
                     f"{'on' if r['validation'] else 'off'} | {' | '.join(accs)} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"--{what} {text}: choose from {', '.join(known)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS),
                   help=f"comma list from none, {', '.join(ATTACKS)} (default: %(default)s)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma list (default: %(default)s)")
    p.add_argument("--users", type=int, default=20, help="simulated users, all trained every round")
    p.add_argument("--malicious", type=float, default=0.25, help="share of malicious users (the first ones)")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds")
    p.add_argument("--max-steps", type=int, default=None, help="cap on local steps per round (default: the config's)")
    p.add_argument("--data", default=None, help="pair file or synthetic:<scenario> (default: the config's)")
    p.add_argument("--config", help="a settings TOML as the base of every run (scheme, learning rates, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per simulated client (Ray actor)")
    p.add_argument("--out", default="runs/robustness.json", help="JSON results; the markdown table goes beside it (.md)")
    args = p.parse_args(argv)
    args.attacks = _names(args.attacks, ("none", *ATTACKS), "attacks")
    args.strategies = _names(args.strategies, STRATEGIES, "strategies")
    if not 0.0 < args.malicious < 0.5:
        p.error("--malicious must be in (0, 0.5): a majority of attackers defeats every robust rule")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from fedpersona.simulations.session import simulate_session

    args = parse_args(argv)
    rows = plan(args)
    started = time.monotonic()
    clock = [started]
    results: list[dict[str, Any]] = []

    def on_run(i: int, config: RunConfig, outcome: dict[str, Any] | BaseException) -> None:
        now = time.monotonic()
        results.append(result_of(rows[i], outcome, now - clock[0]))
        clock[0] = now
        r = results[-1]
        state = r["error"] or (f"personalized {_acc(r['personalized_accuracy_mean'])} global "
                               f"{_acc(r['global_accuracy_mean'])} rejected {r['rejected_replies']}")
        print(f"[{i + 1}/{len(rows)}] {r['attack']} {r['strategy']} validation "
              f"{'on' if r['validation'] else 'off'}: {state} ({r['seconds']:.0f}s)", file=sys.stderr, flush=True)

    simulate_session([row.config for row in rows], [None] * len(rows), num_cpus=args.num_cpus, on_run=on_run)
    table = markdown(results)
    report = {"benchmark": "robustness", "command": " ".join(["benchmarks/robustness.py", *(argv or sys.argv[1:])]),
              "users": args.users, "malicious_users": round(args.users * args.malicious), "rounds": args.rounds,
              "seed": args.seed, "seconds": round(time.monotonic() - started, 1), "results": results}
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(f"json: {out}  table: {out.with_suffix('.md')}  total {report['seconds']:.0f}s", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
