"""Launch a run on Flower's simulation engine, on Ray: this machine, many GPUs, or an existing cluster.

Each Ray actor keeps one resident model (base loaded once, adapters built once); a simulated user only
swaps tensors in. Client resources (CPUs, fractional GPUs) decide how many actors run at once.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.config import RunConfig
from fedpersona.data.sources import count_users
from fedpersona.errors import UsageError
from fedpersona.model.loading import resolve_model_path
from fedpersona.strategies.registry import strategy_for
from fedpersona.strategies.schemes import get_scheme


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

            if not torch.cuda.is_available() and not self.ray_address:
                raise UsageError(f"--num-gpus {self.num_gpus}: no CUDA device here; use --num-gpus 0")


def prepare_config(config: RunConfig) -> RunConfig:
    """Resolve what workers must agree on before they start: absolute data path (a ``generated:`` spec
    becomes the pair file it generates, cached), user count, model built.

    Scheme and strategy are checked here too, so a typo fails in a second, not after Ray has started.
    """
    get_scheme(config.scheme)
    if config.is_generated:  # the run model writes its pair file once, here, before Ray starts
        from fedpersona.simulations.styles import ensure_style_pairs

        # new users are a pair file's last users (below), so the file holds them too
        path = ensure_style_pairs(config.model, config.num_users + config.new_users, config.seed)
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
    if verbose:
        return
    flwr = logging.getLogger("flwr")
    flwr.setLevel(logging.WARNING)
    flwr.addFilter(_NotDeprecationBanner())
    # Library deprecation notices (Ray's accelerator tip, transformers' is_gradient_checkpointing, ...) are
    # for their developers, not for someone running a simulation; --verbose shows them. The environment
    # variable carries the filter into Ray's worker processes, which start their own interpreters.
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def simulate(config: RunConfig, *, out_dir: str | Path | None, resources: Resources = Resources(),
             reporter: Any = None, verbose: bool = False) -> dict[str, Any]:
    """Run the federation for ``config`` on Ray and return its summary (also written to ``out_dir``)."""
    from flwr.simulation import run_simulation

    from fedpersona.client.app import app as client_app
    from fedpersona.server.app import RESULT, make_server_app

    resources.validate()
    config = prepare_config(config)
    _quiet_libraries(verbose)
    init_args: dict[str, Any] = {"logging_level": "WARNING" if not verbose else "INFO", "log_to_driver": verbose}
    if resources.ray_address:
        init_args["address"] = resources.ray_address
    elif resources.total_cpus:
        init_args["num_cpus"] = resources.total_cpus
    backend_config = {
        "client_resources": {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus},
        "init_args": init_args,
    }
    RESULT.clear()
    run_simulation(
        server_app=make_server_app(config, out_dir, reporter),
        client_app=client_app,
        num_supernodes=config.num_users + config.new_users,  # new users come last (client.local)
        backend_name="ray",
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    if not RESULT:
        raise RuntimeError("the simulation ended without a summary; rerun with --verbose to see Flower's log")
    from fedpersona.server.federation import check_clients_answered

    check_clients_answered(RESULT, out_dir)
    return dict(RESULT)

