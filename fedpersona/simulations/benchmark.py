"""``fedpersona benchmark``: several schemes and strategies on one scenario, same seeds, one table.

Every run is a full simulation (``fedpersona.simulations.launcher.simulate``) of the same population
with the same seed; only the scheme and the strategy change. Each run writes its usual outputs under
``OUT/runs/<scheme>-<strategy>/``; the benchmark adds:

* ``benchmark.md``: one row per run (personalized mean / p10 / worst, global mean, users with few vs many
  training pairs, new-user accuracy, generation win rate, private parameters per user, bytes up per
  client-round, epsilon, wall time), then the data-quantity view (where federation helps);
* ``benchmark.json``: the same numbers, the base configuration and the per-user pair counts;
* PNG plots (``fedpersona.simulations.plots``): accuracy per round per run, the per-user accuracy
  distribution per run, and accuracy against the number of training pairs.

"Few" and "many" pairs are the bottom and top third of the training users by number of training pairs
(thresholds in the JSON). The pair counts come from the data source on the researcher's side, as any
analysis of a simulation would; clients never send them.

Strategies may carry their own arguments: ``FedAvg,FedProx(proximal_mu=0.01),Krum(num_malicious_nodes=1)``.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpersona.config import RunConfig
from fedpersona.errors import UsageError
from fedpersona.io import atomic_write_json, atomic_write_text
from fedpersona.plugins import parse_spec, split_top_level


@dataclass(frozen=True)
class RunSpec:
    """One run of a benchmark: a scheme and a strategy spec (``NAME`` or ``NAME(key=value,...)``)."""

    scheme: str
    strategy: str

    @property
    def label(self) -> str:
        return f"{self.scheme} / {self.strategy}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{self.scheme}-{self.strategy}").strip("_")


def parse_strategies(text: str) -> list[str]:
    """``"FedAvg,FedProx(proximal_mu=0.01)"`` -> ``["FedAvg", "FedProx(proximal_mu=0.01)"]`` (each checked).

    Raises:
        UsageError: unbalanced parentheses or a malformed spec.
    """
    specs = split_top_level(text)
    for spec in specs:
        parse_spec(spec, "--strategies")
    return specs


def plan(schemes: Sequence[str], strategies: Sequence[str]) -> list[RunSpec]:
    """Every (scheme, strategy) pair, each once.

    Raises:
        UsageError: no scheme or strategy, or a run listed twice.
    """
    if not schemes or not strategies:
        raise UsageError("fedpersona benchmark: give at least one scheme and one strategy")
    specs = [RunSpec(scheme, strategy) for scheme in schemes for strategy in strategies]
    seen: set[str] = set()
    for spec in specs:
        if spec.slug in seen:
            raise UsageError(f"fedpersona benchmark: run {spec.label} is listed twice")
        seen.add(spec.slug)
    return specs


def run_config(base: RunConfig, spec: RunSpec) -> RunConfig:
    """``base`` with this run's scheme and strategy (everything else is shared)."""
    return base.replace(scheme=spec.scheme, strategy=spec.strategy)


# ---- analysis ------------------------------------------------------------------------------------------
def train_pair_counts(config: RunConfig) -> dict[int, int]:
    """Training pairs per training user (researcher-side knowledge of the simulated population)."""
    from fedpersona.round.users import population_user

    return {i: len(population_user(config, i).train) for i in range(config.num_users)}


def quantity_groups(counts: dict[int, int]) -> dict[str, Any]:
    """Bottom and top third of users by training pairs (ties broken by user index)."""
    order = sorted(counts, key=lambda u: (counts[u], u))
    third = max(1, len(order) // 3)
    few, many = order[:third], order[-third:]
    return {"few": few, "many": many, "few_max_pairs": counts[few[-1]], "many_min_pairs": counts[many[0]]}


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else None


def analyse(spec: RunSpec, summary: dict[str, Any], per_user: list[dict[str, Any]], groups: dict[str, Any],
            elapsed: float) -> dict[str, Any]:
    by_user = {int(e["user_index"]): e for e in per_user}
    few = [by_user[u]["personalized"] for u in groups["few"] if u in by_user]
    many = [by_user[u]["personalized"] for u in groups["many"] if u in by_user]
    keys = ("personalized_accuracy_mean", "personalized_accuracy_p10", "personalized_accuracy_min",
            "global_accuracy_mean", "base_accuracy_mean", "new_users", "new_user_accuracy_mean",
            "new_user_accuracy_p10", "new_user_global_accuracy_mean", "generation_win_rate",
            "new_user_generation_win_rate", "private_parameters_per_user", "shared_parameters",
            "bytes_up_per_client_round", "epsilon_max", "wall_seconds")
    return {"run": spec.label, "scheme": spec.scheme, "strategy": spec.strategy,
            **{k: summary.get(k) for k in keys},
            "few_pairs_accuracy_mean": _mean(few), "many_pairs_accuracy_mean": _mean(many),
            "elapsed_seconds": round(elapsed, 1), "out": f"runs/{spec.slug}"}


# ---- report --------------------------------------------------------------------------------------------
def _fmt(value: Any, kind: str = "acc") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if kind == "acc":
        return f"{value:.3f}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "eps":
        return f"{value:.2f}"
    return f"{value:.0f}"


COLUMNS = (
    ("run", "run", None),
    ("personalized mean", "personalized_accuracy_mean", "acc"),
    ("p10", "personalized_accuracy_p10", "acc"),
    ("worst", "personalized_accuracy_min", "acc"),
    ("global mean", "global_accuracy_mean", "acc"),
    ("few-pair users", "few_pairs_accuracy_mean", "acc"),
    ("many-pair users", "many_pairs_accuracy_mean", "acc"),
    ("new users mean", "new_user_accuracy_mean", "acc"),
    ("new users p10", "new_user_accuracy_p10", "acc"),
    ("gen win rate", "generation_win_rate", "acc"),
    ("private params/user", "private_parameters_per_user", "int"),
    ("bytes up/client-round", "bytes_up_per_client_round", "int"),
    ("epsilon", "epsilon_max", "eps"),
    ("wall s", "wall_seconds", "s"),
)


def markdown(result: dict[str, Any]) -> str:
    base = result["config"]
    groups = result["quantity"]
    lines = [
        "# fedpersona benchmark",
        "",
        f"Scenario `{base['data']}`, model `{base['model']}`, {base['num-users']} training users + "
        f"{base['new-users']} new users ({base['new-user-shots']} pairs each), {base['rounds']} rounds, "
        f"fraction-train {base['fraction-train']}, seed {base['seed']} (the same for every run)"
        + (f", DP epsilon {base['dp-epsilon']}" if base.get("dp-epsilon") else "") + ".",
        "",
        "Accuracy = held-out pairwise preference accuracy per user; mean / p10 / worst over the training users. "
        "\"global\" = base + shared adapter. Few-pair users: the bottom third by training pairs "
        f"(<= {groups['few_max_pairs']} pairs); many-pair users: the top third (>= {groups['many_min_pairs']}). "
        "New users take no part in training and fit only their personal part on their first pairs. "
        "Gen win rate: the personalized model's generations against the global model's on held-out prompts, "
        "scored with each synthetic user's hidden utility (ties count half).",
        "",
        "| " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|" + "|".join("---" if c[2] is None else "---:" for c in COLUMNS) + "|",
    ]
    for row in result["runs"]:
        if row.get("error"):
            lines.append(f"| {row['run']} | failed: {row['error']} |" + " |" * (len(COLUMNS) - 2))
            continue
        lines.append("| " + " | ".join(row[key] if kind is None else _fmt(row.get(key), kind)
                                        for _, key, kind in COLUMNS) + " |")
    lines += ["", f"Total wall time {result['total_seconds']:.0f} s. Command: `{result.get('command', '')}`", ""]
    return "\n".join(lines)


# ---- driver --------------------------------------------------------------------------------------------
def run_benchmark(base: RunConfig, specs: Sequence[RunSpec], out_dir: str | Path, *,
                  simulate: Callable[..., Any] | None = None,
                  reporter_for: Callable[[str], Any] | None = None, resources: Any = None,
                  verbose: bool = False, command: str = "", log: Callable[[str], None] = lambda line: None,
                  plots: bool = True) -> dict[str, Any]:
    """Run every spec on ``base`` (same population and seed), write the report, return its data."""
    from fedpersona.simulations.launcher import Resources, prepare_config
    from fedpersona.simulations.launcher import simulate as launch

    simulate = simulate or launch
    out = Path(out_dir)
    configs = [run_config(base, spec) for spec in specs]
    prepared = [prepare_config(c) for c in configs]  # every name and argument checked before any run starts
    counts = train_pair_counts(prepared[0])
    groups = quantity_groups(counts)
    result: dict[str, Any] = {"config": prepared[0].to_flat(), "command": command, "quantity": groups,
                              "train_pairs": {str(u): n for u, n in counts.items()}, "runs": [], "total_seconds": 0.0}
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    for i, (spec, config) in enumerate(zip(specs, configs, strict=True), start=1):
        label = f"run {i}/{len(specs)} {spec.label}"
        log(f"{label}: starting")
        run_dir = out / "runs" / spec.slug
        t0 = time.monotonic()
        try:
            outcome = simulate(config, out_dir=run_dir, resources=resources or Resources(),
                               reporter=reporter_for(label) if reporter_for else None, verbose=verbose)
            summary = getattr(outcome, "summary", outcome)  # a FederationResult, or a summary dict
            per_user = json.loads((run_dir / "per_user.json").read_text())
            row = analyse(spec, summary, per_user, groups, time.monotonic() - t0)
        except UsageError:
            raise
        except Exception as err:  # one failed run must not lose the others
            (run_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "error.txt", traceback.format_exc())
            row = {"run": spec.label, "scheme": spec.scheme, "strategy": spec.strategy,
                   "error": f"{type(err).__name__}: {err}".splitlines()[0][:200], "out": f"runs/{spec.slug}"}
        result["runs"].append(row)
        result["total_seconds"] = round(time.monotonic() - started, 1)
        log(f"{label}: " + (f"failed ({row['error']})" if row.get("error") else
                            f"personalized {_fmt(row['personalized_accuracy_mean'])}, "
                            f"global {_fmt(row['global_accuracy_mean'])} [{row['elapsed_seconds']:.0f}s]"))
        atomic_write_json(out / "benchmark.json", result)  # partial results survive an interrupted benchmark
        atomic_write_text(out / "benchmark.md", markdown(result))
    if plots:
        from fedpersona.simulations.plots import write_plots

        result["plots"] = write_plots(out, result)
    atomic_write_json(out / "benchmark.json", result)
    atomic_write_text(out / "benchmark.md", markdown(result) + _plots_md(result.get("plots", [])))
    return result


def _plots_md(plots: Sequence[str]) -> str:
    return "".join(f"![{Path(p).stem}]({p})\n\n" for p in plots)
