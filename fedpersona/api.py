"""The Python face of the commands: ``simulate`` and ``benchmark`` as calls that return their results.

Everything ``fedpersona simulate`` and ``fedpersona benchmark`` do is a call here, so a notebook or a sweep
script needs no subprocess and no reading of output files::

    import fedpersona as fp
    result = fp.simulate(num_users=8, rounds=3, scheme="split", strategy="FedAdam(eta=0.01)")
    result.summary["personalized_accuracy_mean"]

Settings are the ``RunConfig`` fields by name (``fedpersona settings`` lists them; dash or underscore
spelling), over a ``RunConfig``, a TOML file or a dict. Each call runs its own simulation (Ray started and
stopped, its own user store and results); calls can follow one another in one process with different models
and settings, and nothing of one run leaks into the next.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpersona.config import RunConfig

ConfigLike = RunConfig | str | os.PathLike | Mapping[str, Any] | None


def load_config(config: ConfigLike = None, **settings: Any) -> RunConfig:
    """A validated ``RunConfig`` from a base and settings by name, as the command line builds it.

    Args:
        config: a ``RunConfig``, a TOML file (its ``[fedpersona]`` table or the whole file), a mapping of
            settings, or None (the defaults).
        **settings: any ``RunConfig`` field by name (``num_users=8``, ``dp_epsilon=8``); dash spellings go
            through a dict: ``load_config({"num-users": 8})``.

    Returns:
        The configuration. Under pair-level DP (``dp_epsilon > 0``) the DP defaults fill every DP-recipe
        setting neither ``config``'s file/mapping nor ``settings`` set (``RunConfig.with_dp_defaults``).

    Raises:
        fedpersona.errors.UsageError: an unknown setting, a bad value, or a model that cannot be found.
    """
    from fedpersona.model.loading import check_model

    explicit: set[str] = set(settings)
    if isinstance(config, RunConfig):
        base = config
    elif isinstance(config, Mapping):
        explicit |= set(config)
        base = RunConfig.from_flat(config, source="settings")
    elif config is not None:
        table = RunConfig.read_toml(config)
        explicit |= set(table)
        base = RunConfig.from_flat(table, source=str(config))
    else:
        base = RunConfig()
    cfg = RunConfig.from_flat(settings, base, source="fedpersona.simulate") if settings else base
    cfg = cfg.with_dp_defaults(explicit)
    check_model(cfg.model)
    return cfg


@dataclass(frozen=True)
class SimulationResult:
    """What one simulation produced.

    Attributes:
        summary: the ``summary.json`` dict: ``personalized_accuracy_mean``, ``global_accuracy_mean``, ... (the
            output contract, ``docs/reference/outputs.md``).
        rounds: one dict per finished round (the ``metrics.jsonl`` rows).
        per_user: each training user's final accuracies (``per_user.json``).
        new_users: held-out (cold-start) users' final accuracies, empty without them.
        config: the configuration as run (data and model resolved, user count from the data).
        out_dir: where the files were written, None when kept in memory only.
    """

    summary: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    per_user: list[dict[str, Any]] = field(default_factory=list)
    new_users: list[dict[str, Any]] = field(default_factory=list)
    config: RunConfig | None = None
    out_dir: Path | None = None

    def __repr__(self) -> str:
        s = self.summary

        def num(key: str) -> str:
            value = s.get(key)
            return f"{value:.3f}" if isinstance(value, float) else str(value)

        return (f"SimulationResult(users={s.get('num_users')}, rounds={s.get('rounds')}, scheme={s.get('scheme')!r}, "
                f"strategy={s.get('strategy')!r}, personalized={num('personalized_accuracy_mean')}, "
                f"global={num('global_accuracy_mean')}, out_dir={str(self.out_dir) if self.out_dir else None!r})")


def simulate(config: ConfigLike = None, *, out_dir: str | os.PathLike | None = None, num_cpus: float = 1.0,
             num_gpus: float = 0.0, ray_address: str | None = None, checkpoint_dir: str | os.PathLike | None = None,
             resume: bool = False, progress: bool = False, verbose: bool = False,
             **settings: Any) -> SimulationResult:
    """Simulate a federation of users on Flower's simulation engine (Ray), as ``fedpersona simulate`` does.

    Args:
        config: a ``RunConfig``, a TOML file, a mapping of settings, or None (see ``load_config``).
        out_dir: write ``metrics.jsonl``, ``summary.json``, ``per_user.json``, the per-round plot and the run's
            log there; None keeps the results in memory only.
        num_cpus: CPUs per simulation worker (one Ray actor each).
        num_gpus: GPUs per worker; fractions share a GPU (``0.25``: four workers per GPU).
        ray_address: join an existing Ray cluster (``"auto"``, ``"HOST:6379"``).
        checkpoint_dir: save every finished round there.
        resume: continue a stopped simulation after its last round in ``checkpoint_dir``.
        progress: show the live progress display on the terminal.
        verbose: Flower's and Ray's own logs on the terminal.
        **settings: any ``RunConfig`` field by name (``num_users=4``, ``rounds=1``, ``scheme="pal"``,
            ``loss="rpo(alpha=0.5)"``, ``data="hh-rlhf:dialogues.jsonl"``).

    Returns:
        The ``SimulationResult``.

    Raises:
        fedpersona.errors.UsageError: a bad setting, model, data file, plug-in or checkpoint (before Ray
            starts where that can be known).
        fedpersona.errors.RunFailed: every client training call failed.
    """
    from fedpersona.display import LOG_NAME, ConsoleReporter, QuietReporter, RunLog
    from fedpersona.simulations.launcher import Resources, simulate as run

    cfg = load_config(config, **settings)
    out = Path(out_dir) if out_dir is not None else None
    reporter = ConsoleReporter() if progress else QuietReporter()
    resources = Resources(num_cpus, num_gpus, ray_address)
    if out is None:
        result = run(cfg, out_dir=None, resources=resources, reporter=reporter, verbose=verbose,
                     checkpoint_dir=checkpoint_dir, resume=resume)
    else:
        with RunLog(out / LOG_NAME, verbose=verbose, append=resume):
            result = run(cfg, out_dir=out, resources=resources, reporter=reporter, verbose=verbose,
                         checkpoint_dir=checkpoint_dir, resume=resume)
    return SimulationResult(result.summary, result.rounds, result.per_user, result.new_users,
                            cfg, out)


def benchmark(config: ConfigLike = None, *, schemes: Sequence[str] = ("split", "global", "local"),
              strategies: Sequence[str] = ("FedAvg",), out_dir: str | os.PathLike = "runs/benchmark",
              num_cpus: float = 1.0, num_gpus: float = 0.0, ray_address: str | None = None, plots: bool = True,
              command: str = "", **settings: Any) -> dict[str, Any]:
    """Several schemes x strategies on one population with the same seed, as ``fedpersona benchmark`` does.

    Args:
        config: the shared base configuration (see ``load_config``).
        schemes: personalization schemes (registered names or ``module:NAME``).
        strategies: strategy specs, ``NAME`` or ``NAME(key=value,...)``.
        out_dir: ``benchmark.md``, ``benchmark.json``, the plots and every run's outputs under ``runs/``.
        num_cpus: CPUs per simulation worker, as for ``simulate``.
        num_gpus: GPUs per worker, as for ``simulate``.
        ray_address: an existing Ray cluster to join, as for ``simulate``.
        plots: write the PNG figures.
        command: the command line to record in ``benchmark.md`` (the CLI passes its own).
        **settings: any ``RunConfig`` field, shared by every run.

    Returns:
        The ``benchmark.json`` dict: ``runs`` (one row per run: accuracies, costs, wall time, or ``error``),
        the base ``config``, the data-quantity groups.

    Raises:
        fedpersona.errors.UsageError: a bad setting, scheme, strategy or model (before any run starts).
    """
    from fedpersona.simulations.benchmark import plan, run_benchmark
    from fedpersona.simulations.launcher import Resources

    cfg = load_config(config, **settings)
    specs = plan(list(schemes), list(strategies))
    if not command:
        given = " ".join(f"--set {k.replace('_', '-')}={v}" for k, v in settings.items())
        command = (f"fp.benchmark(schemes={list(schemes)}, strategies={list(strategies)}) "
                   f"= fedpersona benchmark --schemes {','.join(schemes)} --strategies '{','.join(strategies)}' "
                   f"{given}".rstrip())
    return run_benchmark(cfg, specs, Path(out_dir), resources=Resources(num_cpus, num_gpus, ray_address),
                         command=command, plots=plots)
