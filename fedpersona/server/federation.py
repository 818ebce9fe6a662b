"""The server side of a run: strategy over shared tensors, per-round records, the summary contract."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedpersona.client.local import resident_for
from fedpersona.config import RunConfig
from fedpersona.data.sources import count_users
from fedpersona.model.adapters import Role
from fedpersona.server.display import QuietReporter
from fedpersona.server.progress_grid import ProgressGrid
from fedpersona.server.recorder import RoundRecorder, attach_recorder, write_outputs
from fedpersona.strategies.registry import build_strategy


def make_strategy(config: RunConfig, recorder: RoundRecorder):
    """The configured strategy, managed by the run configuration and recording into ``recorder``."""
    strategy = build_strategy(
        config.strategy, config.strategy_args,
        fraction_train=config.fraction_train, fraction_evaluate=1.0,
        min_train_nodes=config.min_users, min_evaluate_nodes=config.min_users,
        min_available_nodes=config.min_users,
    )
    return attach_recorder(strategy, recorder)


def run_federation(grid: Grid, config: RunConfig, *, out_dir: str | Path | None = None,
                   reporter: Any = None) -> dict[str, Any]:
    """Run ``config.rounds`` rounds on ``grid``; write outputs to ``out_dir``; return the summary."""
    started = time.monotonic()
    reporter = reporter or QuietReporter()
    random.seed(config.seed)  # Flower samples nodes with the `random` module: same seed, same users
    np.random.seed(config.seed)
    resident = resident_for(config)  # same seed as every client: identical initial adapters
    recorder = RoundRecorder(num_rounds=config.rounds, eval_every=config.eval_every, out_dir=out_dir,
                             on_round=reporter.round_done, on_phase=reporter.phase)
    strategy = make_strategy(config, recorder)
    message_config = config.to_flat()
    reporter.start(config.rounds)
    try:
        strategy.start(
            grid=ProgressGrid(grid, on_reply=reporter.replies),
            initial_arrays=ArrayRecord(resident.adapters.tensors(Role.SHARED)),
            num_rounds=config.rounds,
            timeout=config.round_timeout,
            train_config=ConfigRecord(dict(message_config)),
            evaluate_config=ConfigRecord(dict(message_config)),
        )
    finally:
        reporter.stop()
    summary: dict[str, Any] = {
        "num_users": count_users(config.data, num_users=config.num_users, test_fraction=config.test_fraction,
                                 min_pairs=config.min_pairs),
        "rounds": config.rounds,
        "scheme": config.scheme,
        "strategy": config.strategy,
        **recorder.summary_stats(),
        "shared_parameters": resident.adapters.count(Role.SHARED),
        "private_parameters_per_user": resident.adapters.count(Role.PRIVATE),
        "wall_seconds": round(time.monotonic() - started, 2),
        "model": config.model,
        "data": config.data,
        "seed": config.seed,
        "evaluated_users": len(recorder.per_user()),
        "dp": {"pair_level_target_epsilon": config.dp_epsilon or None,
               "delta": (config.dp_delta or "min(1e-5, 1/(10 n)) per user") if config.dp_epsilon else None,
               "accountant": config.dp_accountant if config.dp_epsilon else None},
    }
    if out_dir:
        write_outputs(out_dir, summary, recorder.per_user())
    return summary
