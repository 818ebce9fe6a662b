"""Robustness: what a few malicious users do to the default strategy, and what bounds them.

One table of the worst cases, honestly: federations of 4 users with 1 attacker, 16 with 1 and 16 with 4
(every user trained every round, the first users attack every round), attacks that pass any validation of
form (``fedpersona.strategies.attacks``): ``sign-flip`` (the update reversed, an honest norm), ``scale``
(the update x1e6), ``random`` (random tensors of plausible magnitude), and weight inflation: the update
reversed *and* a claimed weight of 99,999 (``inflate``) or of the cap itself, 1e5 (``inflate-cap``), beside
honest weights of 8-160 pairs. Columns, one run each (``VARIANTS``):

* ``FedAvg, no validation``: ``validate-replies=false``, every reply aggregated as sent;
* ``FedAvg, validation only``: replies checked for form (``fedpersona.strategies.validation``), nothing
  bounded (``update-norm-ratio=0 reply-weight-ratio=0``);
* ``FedAvg, bounded``: the default: updates clipped to the server's norm bound and weights capped at 4 x
  the round's median (``fedpersona.strategies.influence``);
* ``FedMedian``: coordinate-wise median (Yin et al. 2018), with the default screen.

``--baseline FILE`` adds a column from an earlier result file of this script (``FedAvg`` run on the code
before bounded influence: "FedAvg as it was"). The cell is the global model's mean accuracy over all users
after the last round (what poisoning the shared adapter hurts; the personalized accuracy is in the JSON
and the second table). All runs share one Flower simulation on Ray (``simulate_session``).

    .venv/bin/python benchmarks/robustness.py --out runs/robustness.json
    .venv/bin/python benchmarks/robustness.py --federations 16:1 --attacks sign-flip --variants bounded --rounds 2
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

import numpy as np

from fedpersona.config import RunConfig

# label -> (strategy, settings): the columns of the table
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "no-validation": ("FedAvg", {"validate_replies": False}),
    "validation-only": ("FedAvg", {"update_norm_ratio": 0.0, "reply_weight_ratio": 0.0}),
    "bounded": ("FedAvg", {}),
    "FedMedian": ("FedMedian", {}),
}
TITLES = {"no-validation": "FedAvg, no validation", "validation-only": "FedAvg, validation only",
          "bounded": "FedAvg, bounded (default)", "FedMedian": "FedMedian"}
# attack name -> the attack setting (a registered attack or this file's weight inflation, NAME(key=value))
ATTACKS: dict[str, str] = {
    "none": "",
    "sign-flip": "sign-flip",
    "scale": "scale",
    "random": "random",
    "inflate": "robustness:inflated_weight(weight=99999)",
    "inflate-cap": "robustness:inflated_weight(weight=100000)",
}
FEDERATIONS = ("4:1", "16:1", "16:4")


def inflated_weight(trained: dict[str, np.ndarray], sent: dict[str, np.ndarray], num_examples: float, *,
                    weight: float = 99999.0, **_: Any) -> tuple[dict[str, np.ndarray], float]:
    """A simulated attack (``fedpersona.strategies.attacks`` signature): the update reversed, as
    ``sign-flip``, sent with a claimed weight of ``weight`` pairs (at most ``max-reply-weight``, so it passes
    validation of form)."""
    return {k: (2 * sent.get(k, np.zeros_like(v)) - v).astype(v.dtype) for k, v in trained.items()}, weight


@dataclass(frozen=True)
class Row:
    federation: str  # "users:attackers"
    attack: str  # a key of ATTACKS ("none": the clean run)
    variant: str  # a key of VARIANTS
    config: RunConfig


def federation(text: str) -> tuple[int, int]:
    """``"16:4"`` -> (16 users, 4 attackers)."""
    users, _, bad = text.partition(":")
    return int(users), int(bad)


def plan(args: argparse.Namespace) -> list[Row]:
    """Every run's configuration, in table order (federation, attack, variant)."""
    base = RunConfig.from_toml(args.config) if args.config else RunConfig()
    base = base.replace(rounds=args.rounds, fraction_train=1.0, eval_every=args.rounds, gen_prompts=0, seed=args.seed,
                        data=args.data or base.data, **({"max_steps": args.max_steps} if args.max_steps else {}))
    rows = []
    for fed in args.federations:
        users, attackers = federation(fed)
        for attack in args.attacks:
            for variant in args.variants:
                strategy, settings = VARIANTS[variant]
                spec = ATTACKS[attack]
                config = base.replace(num_users=users, strategy=strategy, **settings,
                                      **({"attack": spec, "attack_users": attackers} if spec else {}))
                rows.append(Row(fed, attack, variant, config))
    return rows


def result_of(row: Row, outcome: dict[str, Any] | BaseException, seconds: float) -> dict[str, Any]:
    """One JSON result: the row's settings and what the run reported (or how it failed)."""
    out: dict[str, Any] = {"federation": row.federation, "attack": row.attack, "variant": row.variant,
                           "attack_spec": row.config.attack, "strategy": row.config.strategy,
                           "seconds": round(seconds, 1)}
    if isinstance(outcome, BaseException):
        first = str(outcome).splitlines()[0][:200] if str(outcome) else ""
        return {**out, "error": f"{type(outcome).__name__}: {first}"}
    keys = ("personalized_accuracy_mean", "global_accuracy_mean", "base_accuracy_mean", "rejected_replies",
            "rejected_reasons", "clipped_replies", "weight_capped_replies")
    return {**out, **{k: outcome.get(k) for k in keys}, "error": None}


def _acc(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _cell(result: dict[str, Any] | None, key: str) -> str:
    if result is None:
        return ""
    if result.get("error"):
        return f"run failed ({result['error'].split(':')[0]})"
    text = _acc(result.get(key))
    rejected = result.get("rejected_replies") or 0
    return f"{text} (rejected {rejected})" if rejected else text


def markdown(results: list[dict[str, Any]], key: str = "global_accuracy_mean",
             baseline: list[dict[str, Any]] | None = None) -> str:
    """A pivot table: one line per (federation, attack), one column per variant (and the baseline's
    ``bounded``-strategy FedAvg as "as it was" first); a cell is the accuracy ``key``, with the count of
    rejected replies where there were any."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    before = {(r["federation"], r["attack"]): r for r in baseline or [] if r["variant"] == "bounded"}
    columns = (["FedAvg as it was"] if before else []) + [TITLES.get(v, v) for v in variants]
    lines = ["| users:attackers | attack | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    cells: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in results:
        cells.setdefault((r["federation"], r["attack"]), {})[r["variant"]] = r
    for (fed, attack), by_variant in cells.items():
        values = ([_cell(before.get((fed, attack)), key)] if before else []) + \
                 [_cell(by_variant.get(v), key) for v in variants]
        lines.append(f"| {fed} | {attack} | " + " | ".join(values) + " |")
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
    p.add_argument("--federations", default=",".join(FEDERATIONS),
                   help="comma list of USERS:ATTACKERS (default: %(default)s)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma list (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="federated rounds")
    p.add_argument("--max-steps", type=int, default=8, help="cap on local steps per round (0: the config's)")
    p.add_argument("--data", default=None, help="pair file or synthetic:<scenario> (default: the config's)")
    p.add_argument("--config", help="a settings TOML as the base of every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per simulated client (Ray actor)")
    p.add_argument("--baseline", help="an earlier result file of this script: its 'bounded' runs become the "
                                      "'FedAvg as it was' column (run on the code before bounded influence)")
    p.add_argument("--out", default="runs/robustness.json", help="JSON results; the markdown tables go beside it (.md)")
    args = p.parse_args(argv)
    args.attacks = _names(args.attacks, tuple(ATTACKS), "attacks")
    args.variants = _names(args.variants, tuple(VARIANTS), "variants")
    args.federations = tuple(f.strip() for f in args.federations.split(",") if f.strip())
    for fed in args.federations:
        try:
            users, bad = federation(fed)
        except ValueError:
            p.error(f"--federations {fed}: expected USERS:ATTACKERS, e.g. 16:4")
        if not (users >= 2 and 0 < bad < users / 2):
            p.error(f"--federations {fed}: needs 2+ users and 1 to fewer than half of them attacking")
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
        state = r["error"] or (f"global {_acc(r['global_accuracy_mean'])} personalized "
                               f"{_acc(r['personalized_accuracy_mean'])} rejected {r['rejected_replies']} clipped "
                               f"{r.get('clipped_replies')} capped {r.get('weight_capped_replies')}")
        print(f"[{i + 1}/{len(rows)}] {r['federation']} {r['attack']} {r['variant']}: {state} ({r['seconds']:.0f}s)",
              file=sys.stderr, flush=True)

    simulate_session([row.config for row in rows], [None] * len(rows), num_cpus=args.num_cpus, on_run=on_run)
    baseline = json.loads(Path(args.baseline).read_text(encoding="utf-8"))["results"] if args.baseline else None
    tables = (f"Global model, mean accuracy over users:\n\n{markdown(results, 'global_accuracy_mean', baseline)}\n\n"
              f"Personalized models, mean accuracy over users:\n\n"
              f"{markdown(results, 'personalized_accuracy_mean', baseline)}")
    report = {"benchmark": "robustness", "command": " ".join(["benchmarks/robustness.py", *(argv or sys.argv[1:])]),
              "federations": list(args.federations), "rounds": args.rounds, "max_steps": args.max_steps,
              "seed": args.seed, "seconds": round(time.monotonic() - started, 1), "results": results}
    print(tables)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(tables + "\n", encoding="utf-8")
    print(f"json: {out}  tables: {out.with_suffix('.md')}  total {report['seconds']:.0f}s", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
