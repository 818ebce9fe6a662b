"""Research commands: ``fedpersona simulate`` (many users on Ray), ``benchmark`` (schemes and strategies side
by side), ``settings`` (every setting with its default and meaning) and ``privacy`` (the DP calculator).

Commands of this group are added by ``register``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from click.core import ParameterSource

from fedpersona.commands.common import checked_config, say_log, stop_cleanly, with_format
from fedpersona.config import setting_help
from fedpersona.errors import UsageError

Opt = typer.Option

def simulate(
    users: Annotated[Optional[int], Opt("--users", "--num-users", "-n", help="Number of simulated users (synthetic data; default 32).")] = None,
    rounds: Annotated[Optional[int], Opt("--rounds", "-r", help="Federated rounds (default 15).")] = None,
    fraction: Annotated[Optional[float], Opt("--fraction", "--fraction-train", help="Fraction of users trained per round (default 0.5).")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed of users, sampling and initialisation.")] = None,
    model: Annotated[Optional[str], Opt(help=setting_help("model"))] = None,
    data: Annotated[Optional[str], Opt(help=setting_help("data"))] = None,
    data_format: Annotated[Optional[str], Opt("--format", help="The --data file's format when it is not a fedpersona pair file: hh-rlhf, psoups, prism, personalllm, auto, or package.module:NAME (the same as --data FORMAT:PATH).")] = None,
    scheme: Annotated[Optional[str], Opt(help=setting_help("scheme"))] = None,
    strategy: Annotated[Optional[str], Opt(help=setting_help("strategy"))] = None,
    population: Annotated[Optional[str], Opt("--population", help=setting_help("population"))] = None,
    dp: Annotated[bool, Opt("--dp", help="Pair-level DP-SGD on every client; settings you leave unset take the DP defaults (scheme pal, ...: see summary.json dp_defaults_applied).")] = False,
    target_epsilon: Annotated[float, Opt(help="Per-user pair-level epsilon over the run (with --dp).")] = 8.0,
    delta: Annotated[Optional[float], Opt(help="Per-user delta (default min(1e-5, 1/(10 n))).")] = None,
    max_grad_norm: Annotated[Optional[float], Opt(help="Per-pair clipping norm (with --dp).")] = None,
    accountant: Annotated[Optional[str], Opt(help="rdp (default) or prv.")] = None,
    num_cpus: Annotated[float, Opt(help="CPUs per simulated client (one Ray actor each).")] = 1.0,
    num_gpus: Annotated[float, Opt(help="GPUs per simulated client; fractions share a GPU.")] = 0.0,
    ray_address: Annotated[Optional[str], Opt(help="Join an existing Ray cluster ('auto' or ray://host:port).")] = None,
    config: Annotated[Optional[Path], Opt("--config", help="TOML file of settings.")] = None,
    set_: Annotated[list[str], Opt("--set", help="Any setting key=value (`fedpersona settings` lists them).")] = [],
    out: Annotated[Path, Opt("--out", "-o", help="Output folder: metrics.jsonl, summary.json, per_user.json, accuracy_per_round.png.")] = Path("runs/latest"),
    checkpoint_dir: Annotated[Optional[Path], Opt("--checkpoint-dir", help="Save every finished round (shared adapter, strategy state, users' private state) here; default OUT/checkpoints.")] = None,
    no_checkpoints: Annotated[bool, Opt("--no-checkpoints", help="Save no checkpoints (the run cannot be resumed).")] = False,
    resume: Annotated[bool, Opt("--resume", help="Continue a stopped simulation after its last finished round (same --out, or --checkpoint-dir); --rounds may be raised to train further.")] = False,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No progress display.")] = False,
    verbose: Annotated[bool, Opt("--verbose", help="Show the run's log (OUT/fedpersona.log: Flower's, Ray's and the libraries' records and warnings) on the terminal too.")] = False,
    json_out: Annotated[bool, Opt("--json", help="Print summary.json to stdout instead of the table.")] = False,
) -> None:
    """Simulate many users with Flower's simulation engine on Ray, then print a summary table."""
    flags = {"num-users": users, "rounds": rounds, "fraction-train": fraction, "seed": seed, "model": model,
             "data": with_format(data, data_format), "scheme": scheme, "strategy": strategy, "population": population,
             "dp-epsilon": target_epsilon if dp else None, "dp-delta": delta, "dp-max-grad-norm": max_grad_norm,
             "dp-accountant": accountant}
    cfg = checked_config(config, set_, flags)
    from rich.console import Console  # the heavy imports (Flower, Ray, transformers) only once the inputs are sound

    from fedpersona.display import LOG_NAME, ConsoleReporter, QuietReporter, RunLog, summary_table
    from fedpersona.simulations.launcher import Resources, simulate as run

    if resume and no_checkpoints:
        raise UsageError("--resume continues from checkpoints: drop --no-checkpoints")
    checkpoints = None if no_checkpoints else (checkpoint_dir or out / "checkpoints")
    reporter = QuietReporter() if quiet else ConsoleReporter()
    stop_cleanly(out)
    with RunLog(out / LOG_NAME, verbose=verbose, append=resume) as log:
        summary = run(cfg, out_dir=out, resources=Resources(num_cpus, num_gpus, ray_address), reporter=reporter,
                      verbose=verbose, checkpoint_dir=checkpoints, resume=resume).summary
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        Console().print(summary_table(summary))
        Console().print(f"results: {out}/summary.json, {out}/metrics.jsonl, {out}/per_user.json")
    say_log(log)


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
    population: Annotated[Optional[str], Opt("--population", help=setting_help("population"))] = None,
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
    flags = {"num-users": users, "rounds": rounds, "fraction-train": fraction, "seed": seed, "model": model,
             "data": data, "population": population, "new-users": new_users, "new-user-shots": new_user_shots, "gen-prompts": gen_prompts,
             "dp-epsilon": target_epsilon if dp else None}
    base = checked_config(config, set_, flags)  # a bad setting or --model: one line, before anything is printed
    from fedpersona.display import LOG_NAME, PROGRESS, ConsoleReporter, QuietReporter, RunLog
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
            command=given_command(click.get_current_context()),
            log=log, plots=not no_plots,
        )
    print((out / "benchmark.md").read_text(encoding="utf-8"))
    failed = [r["run"] for r in result["runs"] if r.get("error")]
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)} (see runs/*/error.txt and {run_log.path})")
        raise typer.Exit(1)
    say_log(run_log)


def given_command(ctx: click.Context) -> str:
    """The command line as given, for ``benchmark.md``: ``fedpersona``, the command's name and every option
    and argument set on the command line (options by their long name, in declaration order), shell-quoted.

    Built from what click parsed rather than ``sys.argv``, so it is the same whether the command runs as a
    program or in-process (``fedpersona.cli.main([...])``); pasting it into a shell runs the same benchmark.

    Args:
        ctx: the command's click context (``click.get_current_context()`` inside a command).

    Returns:
        The command line, e.g. ``fedpersona benchmark --schemes split,pal --users 8 --set max-steps=2``.
    """
    words = ["fedpersona", ctx.info_name or "benchmark"]
    for param in ctx.command.params:
        if param.name is None or ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            words += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
            continue
        long = [o for o in param.opts if o.startswith("--")] or list(param.opts)
        if isinstance(param, click.Option) and param.is_flag:
            names = long if value else [o for o in param.secondary_opts if o.startswith("--")]
            words += names[:1]
        elif isinstance(value, (list, tuple)):
            for item in value:
                words += [long[0], str(item)]
        else:
            words += [long[0], str(value)]
    return shlex.join(words)


def settings(
    match: Annotated[Optional[str], typer.Argument(help="Show only settings whose name contains this.")] = None,
    json_out: Annotated[bool, Opt("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every setting (--set key=value, a --config TOML, flwr run-config, fp.simulate(key=value)) with its
    default and meaning, grouped by concern."""
    from fedpersona.config import GROUPS, describe_settings

    rows = [r for r in describe_settings() if not match or match.replace("_", "-") in r[0]]
    if not rows:
        raise UsageError(f"fedpersona settings {match}: no setting's name contains it; run `fedpersona settings`")
    if json_out:
        print(json.dumps([{"setting": n, "default": d, "meaning": m, "group": g} for n, d, m, g in rows], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="settings (--set key=value; key-name or key_name)")
    for column, style in (("setting", "bold"), ("default", None), ("meaning", None)):
        table.add_column(column, style=style, overflow="fold")
    for group, title in GROUPS.items():
        members = [row for row in rows if row[3] == group]
        if members:
            table.add_section()
            table.add_row(f"[italic]{title}[/italic]", "", "")
            for name, default, meaning, _ in members:
                table.add_row(name, default, meaning)
    Console().print(table)


def privacy(
    noise: Annotated[Optional[float], Opt("--noise-multiplier", "--noise", help="Noise multiplier z: compute epsilon.")] = None,
    epsilon: Annotated[Optional[float], Opt(help="Target epsilon: compute the noise multiplier.")] = None,
    sample_rate: Annotated[float, Opt(help="Poisson sample rate q (expected batch / pairs).")] = ...,
    steps: Annotated[int, Opt(help="Number of DP-SGD steps.")] = ...,
    delta: Annotated[float, Opt(help="Delta.")] = 1e-5,
    accountant: Annotated[str, Opt(help="rdp or prv.")] = "rdp",
    json_out: Annotated[bool, Opt("--json", help="Machine-readable output.")] = False,
) -> None:
    """Privacy calculator: epsilon of a DP-SGD run, or the noise multiplier a target epsilon needs."""
    from fedpersona.privacy.calculator import epsilon_report, format_report, noise_report

    if (noise is None) == (epsilon is None):
        raise UsageError("fedpersona privacy: give exactly one of --noise-multiplier (to get epsilon) or --epsilon "
                         "(to get the noise multiplier)")
    report = (epsilon_report(noise, sample_rate, steps, delta, accountant) if noise is not None
              else noise_report(epsilon, sample_rate, steps, delta, accountant))
    print(json.dumps(report) if json_out else format_report(report))


def register(app: typer.Typer) -> None:
    """Add this group's commands to the ``fedpersona`` app."""
    app.command("simulate")(simulate)
    app.command("benchmark")(benchmark)
    app.command("settings")(settings)
    app.command("privacy")(privacy)
