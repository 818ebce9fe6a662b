"""The Flower ServerApp. ``app`` is what ``flwr run .`` and a SuperLink load; ``make_server_app`` lets
``fedpersona simulate`` hand in a validated configuration, an output folder and a progress display.

Besides RunConfig's settings, the run config may carry the keys of a run rather than of the
training (popped before validation): ``out-dir`` (metrics.jsonl, summary.json), ``checkpoint-dir``
(per-round checkpoints), ``resume`` (continue from the last checkpoint) and ``deployment`` (the users
are real devices; ``fedpersona server`` sets it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpersona.config import RunConfig
from fedpersona.server.federation import run_federation

RESULT: dict[str, Any] = {}  # the last summary produced in this process (for the simulation launcher)
RUN_KEYS = ("out-dir", "checkpoint-dir", "resume", "deployment")


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")


def split_run_config(run_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training settings for RunConfig.from_flat, run keys such as out-dir) from a flat run config."""
    settings = {k: v for k, v in run_config.items() if k not in RUN_KEYS}
    run = {k: run_config[k] for k in RUN_KEYS if k in run_config}
    return settings, run


def make_server_app(config: RunConfig | None = None, out_dir: str | Path | None = None,
                    reporter: Any = None, pool_size: int = 1) -> ServerApp:
    """The ServerApp of a run; ``pool_size``: the simulation nodes (workers) to wait for before round 1."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings, run = split_run_config(dict(context.run_config))
        target = out_dir or run.get("out-dir") or f"runs/flwr-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = config or RunConfig.from_flat(settings, source="run config")
        RESULT.clear()
        RESULT.update(run_federation(grid, cfg, out_dir=target, reporter=reporter,
                                     checkpoint_dir=run.get("checkpoint-dir") or None,
                                     resume=_flag(run.get("resume", False)),
                                     deployment=_flag(run.get("deployment", False)), pool_size=pool_size))

    return app


app = make_server_app()
