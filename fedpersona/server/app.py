"""The Flower ServerApp. ``app`` is what ``flwr run .`` and a SuperLink load; ``make_server_app`` lets
``fedpersona simulate`` hand in a validated configuration, an output folder and a progress display.

Besides RunConfig's settings, the run config may carry the keys of a run rather than of the
training (popped before validation): ``out-dir`` (metrics.jsonl, summary.json), ``checkpoint-dir``
(per-round checkpoints), ``resume`` (continue from the last checkpoint) and ``deployment`` (the users
are real devices; ``fedpersona server`` sets it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpersona.config import RunConfig
from fedpersona.server.federation import FederationResult, run_federation

RUN_KEYS = ("out-dir", "checkpoint-dir", "resume", "deployment")


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")


def split_run_config(run_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training settings for RunConfig.from_flat, run keys such as out-dir) from a flat run config."""
    settings = {k: v for k, v in run_config.items() if k not in RUN_KEYS}
    run = {k: run_config[k] for k in RUN_KEYS if k in run_config}
    return settings, run


def make_server_app(config: RunConfig | None = None, out_dir: str | Path | None = None,
                    reporter: Any = None, pool_size: int = 1,
                    on_result: Callable[[FederationResult], None] | None = None,
                    checkpoint_dir: str | Path | None = None, resume: bool = False) -> ServerApp:
    """The ServerApp of a run.

    Args:
        config: the validated configuration (None: read from Flower's run config, as ``flwr run`` gives it).
        out_dir: where outputs go (None: the run config's ``out-dir``, else ``runs/flwr-<time>``).
        reporter: the progress display (``fedpersona.display``).
        pool_size: the simulation nodes (workers) to wait for before round 1.
        on_result: called with the run's ``FederationResult`` when it ends (how ``simulate`` gets it back:
            nothing of a run is kept in module state, so several runs in one process stay apart).
        checkpoint_dir: save every finished round there (the run config's ``checkpoint-dir`` otherwise).
        resume: continue from the last checkpoint.

    Returns:
        The ``flwr.serverapp.ServerApp``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings, run = split_run_config(dict(context.run_config))
        target = out_dir or run.get("out-dir") or f"runs/flwr-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = config or RunConfig.from_flat(settings, source="run config")
        result = run_federation(grid, cfg, out_dir=target, reporter=reporter,
                                checkpoint_dir=checkpoint_dir or run.get("checkpoint-dir") or None,
                                resume=resume or _flag(run.get("resume", False)),
                                deployment=_flag(run.get("deployment", False)), pool_size=pool_size)
        if on_result is not None:
            on_result(result)

    return app


app = make_server_app()
