"""Research commands: ``fedpersona benchmark`` (several schemes and strategies side by side).

Commands of this group are added by ``register``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

Opt = typer.Option

ALL_SCHEMES = "split,global,local,fedsa,ffa,pal,finetune"


def benchmark(
    schemes: Annotated[str, Opt(help="Comma-separated schemes.")] = ALL_SCHEMES,
    strategies: Annotated[str, Opt(help="Comma-separated strategies, each NAME or NAME(key=value,...), "
                                        "e.g. 'FedAvg,FedProx(proximal_mu=0.01)'.")] = "FedAvg",
    users: Annotated[Optional[int], Opt("--users", "-n", help="Training users (synthetic data).")] = None,
    rounds: Annotated[Optional[int], Opt("--rounds", "-r", help="Federated rounds.")] = None,
    fraction: Annotated[Optional[float], Opt("--fraction", help="Fraction of users trained per round.")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed of users, sampling and initialisation (same for every run).")] = None,
    model: Annotated[Optional[str], Opt(help="'embedded' (default), an HF model id or a local folder.")] = None,
    data: Annotated[Optional[str], Opt(help="'synthetic:<scenario>' or a JSONL pair file.")] = None,
    new_users: Annotated[int, Opt(help="New users held out of training (cold start); 0: none.")] = 8,
    new_user_shots: Annotated[Optional[int], Opt(help="Training pairs a new user fits its private part on.")] = None,
    gen_prompts: Annotated[Optional[int], Opt(help="Held-out prompts per user for the generation check (0: off).")] = None,
    dp: Annotated[bool, Opt("--dp", help="Pair-level DP-SGD on every client.")] = False,
    target_epsilon: Annotated[float, Opt(help="Per-user pair-level epsilon over the run (with --dp).")] = 8.0,
    num_cpus: Annotated[float, Opt(help="CPUs per simulated client (one Ray actor each).")] = 1.0,
    num_gpus: Annotated[float, Opt(help="GPUs per simulated client; fractions share a GPU.")] = 0.0,
    ray_address: Annotated[Optional[str], Opt(help="Join an existing Ray cluster ('auto' or ray://host:port).")] = None,
    config: Annotated[Optional[Path], Opt("--config", help="TOML file of settings (shared by every run).")] = None,
    set_: Annotated[list[str], Opt("--set", help="Any setting key=value, shared by every run.")] = [],
    out: Annotated[Path, Opt("--out", "-o", help="Output folder: benchmark.md, benchmark.json, PNG plots, runs/.")]
    = Path("runs/benchmark"),
    no_plots: Annotated[bool, Opt("--no-plots", help="Skip the PNG figures.")] = False,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No live progress (one line per run still).")] = False,
    verbose: Annotated[bool, Opt("--verbose", help="Show the benchmark's log (OUT/fedpersona.log: Flower's, Ray's and the libraries' records and warnings) on the terminal too.")] = False,
) -> None:
    """Run several schemes x strategies on one scenario with the same seed; write a table and plots."""
    from fedpersona.cli import checked_config, say_log, stop_cleanly

    flags = {"num-users": users, "rounds": rounds, "fraction-train": fraction, "seed": seed, "model": model,
             "data": data, "new-users": new_users, "new-user-shots": new_user_shots, "gen-prompts": gen_prompts,
             "dp-epsilon": target_epsilon if dp else None}
    base = checked_config(config, set_, flags)  # a bad setting or --model: one line, before anything is printed
    from fedpersona.server.display import LOG_NAME, PROGRESS, ConsoleReporter, QuietReporter, RunLog
    from fedpersona.simulations.benchmark import parse_strategies, plan, run_benchmark
    from fedpersona.simulations.launcher import Resources

    specs = plan([s.strip() for s in schemes.split(",") if s.strip()], parse_strategies(strategies))

    def log(line: str) -> None:
        print(f"fedpersona benchmark: {line}", file=sys.stderr, flush=True)
        PROGRESS.info("benchmark: %s", line)  # the log's copy

    log(f"{len(specs)} runs -> {out}")
    stop_cleanly(out)
    with RunLog(out / LOG_NAME, verbose=verbose) as run_log:  # every run's records, one file
        result = run_benchmark(
            base, specs, out, resources=Resources(num_cpus, num_gpus, ray_address), verbose=verbose,
            reporter_for=(lambda label: QuietReporter()) if quiet else (lambda label: ConsoleReporter(label=label)),
            command=f"fedpersona benchmark --schemes {schemes} --strategies '{strategies}' --out {out} "
                    "(full configuration in benchmark.json)",
            log=log, plots=not no_plots,
        )
    print((out / "benchmark.md").read_text(encoding="utf-8"))
    failed = [r["run"] for r in result["runs"] if r.get("error")]
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)} (see runs/*/error.txt and {run_log.path})")
        raise typer.Exit(1)
    say_log(run_log)


def register(app: typer.Typer) -> None:
    """Add this group's commands to the ``fedpersona`` app."""
    app.command("benchmark")(benchmark)
