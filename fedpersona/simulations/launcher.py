"""Launch a run on Flower's simulation engine, on Ray: this machine, many GPUs, or an existing cluster.

Each Ray actor keeps one resident model (base loaded once, adapters built once); a simulated user only
swaps tensors in. Client resources (CPUs, fractional GPUs) decide how many actors run at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpersona.config import RunConfig
from fedpersona.data.sources import count_users
from fedpersona.errors import UsageError
from fedpersona.model.loading import resolve_model_path
from fedpersona.strategies.registry import strategy_for
from fedpersona.strategies.schemes import get_scheme

if TYPE_CHECKING:
    from fedpersona.server.federation import FederationResult


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0  # per simulated client (one Ray actor each)
    num_gpus: float = 0.0  # per simulated client; fractions share a GPU between actors
    ray_address: str | None = None  # "auto", "ray://host:10001", or None for a local Ray
    total_cpus: int | None = None  # cap the CPUs a local Ray may use (None: all)

    def validate(self) -> None:
        if self.num_cpus <= 0:
            raise UsageError(f"--num-cpus {self.num_cpus}: must be > 0 CPUs per client")
        if not 0 <= self.num_gpus:
            raise UsageError(f"--num-gpus {self.num_gpus}: must be >= 0 (fractions share a GPU)")
        if self.num_gpus > 0:
            import torch

            # with --ray-address the GPUs are the cluster's, not this driver's: checked once Ray has started
            # (worker_pool_size: a node must fit one client)
            if not torch.cuda.is_available() and not self.ray_address:
                raise UsageError(f"--num-gpus {self.num_gpus}: no CUDA device here; use --num-gpus 0 "
                                 "(or --ray-address a cluster that has GPUs)")


def prepare_config(config: RunConfig) -> RunConfig:
    """Resolve what workers must agree on before they start: absolute data path (a ``generated:`` spec
    becomes the pair file it generates, cached), user count, model built.

    Scheme and strategy are checked here too, so a typo fails in a second, not after Ray has started.
    """
    get_scheme(config.scheme)
    if config.is_generated:  # the run model writes its pair file once, here, before Ray starts
        from fedpersona.config import GENERATED_PREFIX
        from fedpersona.simulations.styles import ensure_generated_pairs

        # new users are a pair file's last users (below), so the file holds them too
        path = ensure_generated_pairs(config.data[len(GENERATED_PREFIX):], config.model,
                                      config.num_users + config.new_users, config.seed)
        config = config.replace(data=str(path))
    if not config.is_synthetic:
        config = config.replace(data=str(Path(config.data).resolve()))
    if Path(config.model).expanduser().exists():  # a local folder or .gguf: workers may start elsewhere
        config = config.replace(model=str(Path(config.model).expanduser().resolve()))
    users = count_users(config.data, num_users=config.num_users, test_fraction=config.test_fraction,
                        min_pairs=config.min_pairs)
    if not config.is_synthetic and config.new_users:  # a pair file's last new-users users are held out
        if users - config.new_users < 1:
            raise UsageError(f"new-users {config.new_users}: the pair file has only {users} users")
        users -= config.new_users
    config = config.replace(num_users=users, min_users=min(config.min_users, users))
    strategy_for(config)  # name, arguments and their fit to this run: checked before Ray starts
    resolve_model_path(config.model)  # builds the embedded model once, before many workers want it
    warn_no_signal(config)  # pairs that train nothing, text the model cannot read: said before Ray starts
    return config


_WARNED: set[tuple] = set()  # (data, model, max-length, chat template) already warned about in this process


def warn_no_signal(config: RunConfig) -> None:
    """Before Ray starts: one stderr line per problem of how the model encodes the run's pair file (pairs
    whose sides become the same token ids, text the model cannot read), checked on a sample of at most
    ``model.signal.SAMPLE_PAIRS`` pairs (:func:`fedpersona.model.signal.check_pair_file`, cached: the run's
    summary reuses it). Synthetic data is the embedded model's own vocabulary: nothing to check. A
    benchmark's runs over the same data and model warn once."""
    if config.is_synthetic:
        return
    from fedpersona.model.signal import check_pair_file

    key = (config.data, config.model, config.max_length, config.chat_template)
    report = check_pair_file(config.data, config.model, config.max_length, config.chat_template,
                             test_fraction=config.test_fraction, min_pairs=config.min_pairs)
    if key in _WARNED:
        return
    _WARNED.add(key)
    for line in report.warnings("--set max-length={n}"):
        print(f"fedpersona: warning: {line}", file=sys.stderr, flush=True)


class _NotDeprecationBanner(logging.Filter):
    """Drops Flower's "DEPRECATED FEATURE: run_simulation" banner: we call it on purpose (the only API that
    runs a ServerApp object we built in-process), and the user can do nothing about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in str(record.getMessage())


def _quiet_libraries(verbose: bool) -> None:
    """Keep libraries' notices off the terminal. Under a ``RunLog`` (the commands) they go to the run's log
    instead: it has turned Flower's console down and captures warnings. Without one (a test or a script
    calling ``simulate``), Flower says only warnings and the driver ignores deprecation notices."""
    if verbose:
        return
    from fedpersona.display import RunLog

    if RunLog.active is None:
        flwr = logging.getLogger("flwr")
        flwr.setLevel(logging.WARNING)
        flwr.addFilter(_NotDeprecationBanner())
        # Library deprecation notices (Ray's accelerator tip, transformers' is_gradient_checkpointing, ...) are
        # for their developers, not for someone running a simulation; --verbose shows them.
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
    # Ray's worker processes start their own interpreters, whose output stays in Ray's session folder
    # (named in the run's log) unless --verbose forwards it: the environment carries these settings there.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_RAY: dict[str, bool] = {"started": False}  # whether a Ray this process started is running


def start_ray(init_args: dict[str, Any]) -> bool:
    """Start Ray here, as Flower's Ray backend would (which then finds it started), for two reasons.

    - Signals: ``ray.init`` installs its own SIGTERM and SIGINT handling in the driver, a C++ failure
      handler among it (it prints "*** SIGTERM received ..." with stack addresses, then exits the
      interpreter while Ray's and gRPC's native threads still run, whose destructors abort: "terminate
      called without an active exception", exit 134). The handlers this process had before are put back,
      so ``fedpersona simulate`` stops cleanly on SIGTERM (``fedpersona.cli``).
    - Logs: the ``ray`` logger does not propagate; the run's log adopts it, and names Ray's session folder
      (the simulated users' worker output).

    Returns whether Ray was started here (the caller shuts it down if Flower has not)."""
    import ray

    if ray.is_initialized():
        return False
    from fedpersona.display import RunLog

    if RunLog.active is not None:
        RunLog.active.adopt("ray")  # before ray.init, which logs its start at INFO
    main = threading.current_thread() is threading.main_thread()
    kept = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if main else {}
    # Flower's own Ray start does the same: workers import what this driver can (sys.path, PYTHONPATH)
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **{"include_dashboard": False, **init_args})
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)
    _RAY["started"] = True
    if RunLog.active is not None:
        try:
            logs = ray._private.worker._global_node.get_logs_dir_path()  # noqa: SLF001 - no public accessor
        except Exception:  # noqa: BLE001 - only a pointer in the log
            logs = "unknown"
        RunLog.active.note("Ray started; the simulated users' worker logs are in %s", logs)
    return True


def stop_ray() -> None:
    """Shut down a Ray this process started, if Flower's simulation has not already."""
    import ray

    _RAY["started"] = False
    if ray.is_initialized():
        ray.shutdown()


def kill_ray() -> None:
    """For a run stopped by a signal, which then leaves at once (``fedpersona.cli``): end the Ray processes
    this process started. Ray ties its head processes (GCS, raylet, ...) to their driver, but not what the
    raylet started: its dashboard and runtime-env agents outlived it, orphaned. So every process below
    this one is killed (psutil lists them parents first: nothing new is started meanwhile)."""
    if not _RAY["started"]:
        return
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:  # gone already, or not ours to kill
            pass


def _ray_init_args(resources: Resources, verbose: bool) -> dict[str, Any]:
    # INFO for the log (Ray's console handler shows only CRITICAL under a RunLog unless --verbose); worker
    # output is forwarded to this terminal only with --verbose
    init_args: dict[str, Any] = {"logging_level": "INFO", "log_to_driver": verbose}
    if resources.ray_address:
        init_args["address"] = resources.ray_address
    elif resources.total_cpus:
        init_args["num_cpus"] = resources.total_cpus
    return init_args


def worker_pool_size(resources: Resources, population: int) -> int:
    """Simulation nodes to start: one per actor slot of the (started) Ray cluster, at most one per user.

    Users are not nodes (``fedpersona.server.user_grid``): a node is a worker that trains and evaluates
    the cohorts of users sent to it, so the engine's cost tracks the workers, not the population."""
    import ray

    slots = sum(node_slots(resources, ray.nodes()))
    if slots == 0:  # Flower would stop with "ActorPool is empty" under a traceback: say it in one line
        have = ray.cluster_resources()
        raise UsageError(f"--num-cpus {resources.num_cpus:g} --num-gpus {resources.num_gpus:g}: no Ray node can "
                         f"host one simulated client (the cluster has CPU={have.get('CPU', 0):g}, "
                         f"GPU={have.get('GPU', 0):g} in all); lower them or add a node that has them")
    return max(1, min(slots, population))


def node_slots(resources: Resources, nodes: list[dict[str, Any]]) -> list[int]:
    """Clients each live Ray node can host at once, counted per node as Flower sizes its actor pool
    (``flwr.simulation.ray_transport.ray_actor.pool_size_from_resources``): two nodes of 1.5 CPUs host
    two 1-CPU clients, not three."""
    slots = []
    for node in nodes:
        have = node.get("Resources") or {}
        if not node.get("Alive", True) or not have:
            continue
        n = int(have.get("CPU", 0) // resources.num_cpus)
        if resources.num_gpus > 0:
            n = min(n, int(have.get("GPU", 0) // resources.num_gpus))
        slots.append(n)
    return slots


def simulate(config: RunConfig, *, out_dir: str | Path | None, resources: Resources = Resources(),
             reporter: Any = None, verbose: bool = False, checkpoint_dir: str | Path | None = None,
             resume: bool = False) -> FederationResult:
    """Run the federation for ``config`` on Flower's simulation engine on Ray.

    Args:
        config: the validated run configuration (``prepare_config`` resolves data and model first).
        out_dir: where outputs go (None: kept in memory only).
        resources: CPUs/GPUs per worker, an existing Ray cluster.
        reporter: the progress display (default quiet).
        verbose: Flower's and Ray's logs on the terminal too.
        checkpoint_dir: save every finished round there (what ``resume`` continues from).
        resume: continue a stopped simulation after its last checkpointed round.

    Returns:
        The run's ``FederationResult`` (``summary`` is also ``out_dir/summary.json``).

    Raises:
        UsageError: bad resources, data, model, strategy or checkpoint (one line, before Ray starts where it
            can be known then).
        RunFailed: every client training call failed.
    """
    from flwr.simulation import run_simulation

    from fedpersona.client.app import app as client_app
    from fedpersona.server.app import make_server_app

    resources.validate()
    config = prepare_config(config)
    from fedpersona.simulations.tracking import TrackedReporter, check_tracker, open_tracker, run_plot

    check_tracker(config.tracker)
    if resume:  # a checkpoint that cannot continue is one line now, not after Ray has started
        from fedpersona.server.resume import Checkpointing

        Checkpointing(config, checkpoint_dir, True)
    from fedpersona.display import RunLog

    if RunLog.active is not None:
        RunLog.active.commit()  # the inputs are sound: from here on the run has an output folder and a log
        RunLog.active.note("run configuration: %s", config.to_flat())
    _quiet_libraries(verbose)
    init_args = _ray_init_args(resources, verbose)
    if not verbose and RunLog.active is None:
        init_args["logging_level"] = "WARNING"  # no log to take Ray's INFO lines: keep them off the terminal
    backend_config = {
        "client_resources": {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus},
        "init_args": init_args,
    }
    results: list[FederationResult] = []  # this call's own: nothing of a run is kept in module state
    tracker = open_tracker(config, Path(out_dir) if out_dir else None)
    if tracker is not None:
        from fedpersona.display import QuietReporter

        reporter = TrackedReporter(reporter or QuietReporter(), tracker)
    started = start_ray(init_args)
    try:
        pool = worker_pool_size(resources, config.num_users + config.new_users)
        run_simulation(
            server_app=make_server_app(config, out_dir, reporter, pool_size=pool, on_result=results.append,
                                       checkpoint_dir=checkpoint_dir, resume=resume),
            client_app=client_app,
            num_supernodes=pool,  # workers, not users: each message names its users (server.user_grid)
            backend_name="ray",
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    finally:
        if started:
            stop_ray()
    if not results:
        where = f"see {RunLog.active.path}" if RunLog.active is not None else "rerun with --verbose to see Flower's log"
        raise RuntimeError(f"the simulation ended without a summary; {where}")
    from fedpersona.server.federation import check_clients_answered

    check_clients_answered(results[-1].summary, out_dir)
    run_plot(Path(out_dir) if out_dir else None)
    return results[-1]
