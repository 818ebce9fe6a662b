"""Several runs in one Flower simulation: one Ray start-up and warm actors, for test suites and sweeps.

A simulation pays its Ray start-up and every actor's model build once (tens of seconds on a small
machine); a sweep of short runs is dominated by that. ``simulate_session`` runs several configurations
one after another inside a single ``run_simulation`` (one ServerApp main calling ``run_federation`` per
run) on the same worker nodes. Runs need not agree on anything: users are not nodes
(``fedpersona.server.user_grid``), and each run keeps its users' private state in a user store of its
own, so no run sees another's. Wall times of the first run include the actors' start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context

from fedpersona.config import RunConfig


def simulate_session(configs: Sequence[RunConfig], out_dirs: Sequence[str | Path | None], *,
                     num_cpus: float = 1.0, total_cpus: int | None = None, verbose: bool = False,
                     on_run: Callable[[int, RunConfig, dict[str, Any] | BaseException], None] | None = None
                     ) -> list[dict[str, Any] | BaseException]:
    """Run every configuration in one simulation; returns each run's summary, or the exception it raised."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedpersona.server.federation import run_federation
    from fedpersona.client.app import app as client_app
    from fedpersona.simulations.launcher import (Resources, _quiet_libraries, prepare_config, start_ray, stop_ray,
                                                 worker_pool_size)

    prepared = [prepare_config(c).replace(run_tag=f"session-run-{i}") for i, c in enumerate(configs)]
    results: list[dict[str, Any] | BaseException] = []
    server = ServerApp()

    pool = {"size": 1}

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for i, (config, out) in enumerate(zip(prepared, out_dirs, strict=True)):
            try:
                result: dict[str, Any] | BaseException = run_federation(grid, config, out_dir=out,
                                                                        pool_size=pool["size"]).summary
            except Exception as err:  # noqa: BLE001 - one failed run must not stop the session
                result = err
            results.append(result)
            if on_run:
                on_run(i, config, result)

    from fedpersona.display import RunLog

    if RunLog.active is not None:
        RunLog.active.commit()
    _quiet_libraries(verbose)
    # INFO only where a run log takes it (Ray's console then shows CRITICAL only, see start_ray)
    init_args: dict[str, Any] = {"logging_level": "INFO" if verbose or RunLog.active else "WARNING",
                                 "log_to_driver": verbose}
    if total_cpus:
        init_args["num_cpus"] = total_cpus
    started = start_ray(init_args)  # keeps this process's signal handlers (a clean SIGTERM)
    try:
        population = max(c.num_users + c.new_users for c in prepared)
        pool["size"] = worker_pool_size(Resources(num_cpus=num_cpus), population)
        run_simulation(server_app=server, client_app=client_app, num_supernodes=pool["size"],
                       backend_name="ray", verbose_logging=verbose,
                       backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": 0.0},
                                       "init_args": init_args})
    finally:
        if started:
            stop_ray()
    if len(results) != len(prepared):
        raise RuntimeError(f"the session ended after {len(results)} of {len(prepared)} runs; rerun with verbose=True")
    return results
