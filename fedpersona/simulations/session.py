"""Several runs in one Flower simulation: one Ray start-up and warm actors, for test suites and sweeps.

A simulation pays its Ray start-up and every actor's model build once (tens of seconds on a small
machine); a sweep of short runs is dominated by that. ``simulate_session`` runs several configurations
one after another inside a single ``run_simulation`` (one ServerApp main calling ``run_federation`` per
run) on the same supernodes. Each run carries its own ``run-tag`` in every message, and the session's
ClientApp clears a node's ``Context.state`` (private tensors, counters, ledgers) when the tag changes,
so no run sees another's private state. Runs must agree on the number of supernodes
(``num_users + new_users``). Wall times of the first run include the actors' start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedpersona.client import app as client
from fedpersona.config import RunConfig

TAG_KEY = "fedpersona.session-tag"

session_client_app = ClientApp()


def isolate(msg: Message, context: Context) -> None:
    """Clear the node's state when a message of another run (another ``run-tag``) arrives."""
    tag = str(msg.content["config"].get("run-tag", ""))
    record = context.state.config_records.get(TAG_KEY)
    if record is None or str(record["tag"]) != tag:
        for key in list(context.state.keys()):
            del context.state[key]
        context.state[TAG_KEY] = ConfigRecord({"tag": tag})


@session_client_app.train()
def train(msg: Message, context: Context) -> Message:
    isolate(msg, context)
    return client.train(msg, context)


@session_client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    isolate(msg, context)
    return client.evaluate(msg, context)


@session_client_app.query()
def query(msg: Message, context: Context) -> Message:
    """The roster question (no state involved): which user a node holds, so seeded sampling is stable."""
    return client.query(msg, context)


def simulate_session(configs: Sequence[RunConfig], out_dirs: Sequence[str | Path | None], *,
                     num_cpus: float = 1.0, total_cpus: int | None = None, verbose: bool = False,
                     on_run: Callable[[int, RunConfig, dict[str, Any] | BaseException], None] | None = None
                     ) -> list[dict[str, Any] | BaseException]:
    """Run every configuration in one simulation; returns each run's summary, or the exception it raised."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedpersona.server.federation import run_federation
    from fedpersona.simulations.launcher import _quiet_libraries, prepare_config, start_ray, stop_ray

    prepared = [prepare_config(c).replace(run_tag=f"session-run-{i}") for i, c in enumerate(configs)]
    nodes = {c.num_users + c.new_users for c in prepared}
    if len(nodes) != 1:
        raise ValueError(f"runs of one session need the same number of users (+ new users); got {sorted(nodes)}")
    results: list[dict[str, Any] | BaseException] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for i, (config, out) in enumerate(zip(prepared, out_dirs, strict=True)):
            try:
                result: dict[str, Any] | BaseException = run_federation(grid, config, out_dir=out)
            except Exception as err:  # noqa: BLE001 - one failed run must not stop the session
                result = err
            results.append(result)
            if on_run:
                on_run(i, config, result)

    from fedpersona.server.display import RunLog

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
        run_simulation(server_app=server, client_app=session_client_app, num_supernodes=nodes.pop(),
                       backend_name="ray", verbose_logging=verbose,
                       backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": 0.0},
                                       "init_args": init_args})
    finally:
        if started:
            stop_ray()
    if len(results) != len(prepared):
        raise RuntimeError(f"the session ended after {len(results)} of {len(prepared)} runs; rerun with verbose=True")
    return results
