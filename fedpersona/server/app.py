"""The Flower ServerApp. ``app`` is what ``flwr run .`` and a SuperLink load; ``make_server_app`` lets
``fedpersona simulate`` hand in a validated configuration, an output folder and a progress display."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpersona.config import RunConfig
from fedpersona.server.federation import run_federation

RESULT: dict[str, Any] = {}  # the last summary produced in this process (for the simulation launcher)


def make_server_app(config: RunConfig | None = None, out_dir: str | Path | None = None,
                    reporter: Any = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        target = out_dir or run_config.pop("out-dir", None) or f"runs/flwr-{time.strftime('%Y%m%d-%H%M%S')}"
        run_config.pop("out-dir", None)
        cfg = config or RunConfig.from_flat(run_config, source="run config")
        RESULT.clear()
        RESULT.update(run_federation(grid, cfg, out_dir=target, reporter=reporter))

    return app


app = make_server_app()
