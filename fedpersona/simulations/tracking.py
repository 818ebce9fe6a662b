"""A researcher's run, recorded where researchers look: the per-round plot beside the outputs, and an
experiment tracker fed round by round.

Every finished round's row (the same dict ``metrics.jsonl`` receives) goes to the tracker the ``tracker``
setting names, as the round finishes:

* ``tensorboard``: TensorBoard's ``SummaryWriter`` (``torch.utils.tensorboard``; needs ``pip install
  tensorboard``), event files in ``OUT/tensorboard/`` (``tensorboard --logdir OUT/tensorboard``);
* ``wandb``: Weights & Biases (``pip install wandb``; a run of project ``fedpersona``, offline unless you
  are logged in);
* ``mlflow``: MLflow (``pip install mlflow``; the tracking URI of your environment, ``./mlruns`` by default);
* ``package.module:Class``: a tracker of your own, ``Class(config, out_dir)`` with ``log_round(row)`` and
  ``close()``.

Scalars are the row's numeric entries (accuracies, counts, bytes, epsilon); lists and per-user entries are
left to ``metrics.jsonl``. A missing library is one line before the run starts (``check_tracker``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Protocol

from fedpersona.errors import UsageError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> module it needs


class Tracker(Protocol):
    """What a tracker does: one call per finished round, one at the end."""

    def log_round(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a round row (booleans and the round number left out).

    Args:
        row: a ``metrics.jsonl`` row.

    Returns:
        ``{name: value}`` for every int/float entry that is finite.
    """
    out = {}
    for key, value in row.items():
        if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardTracker:
    """Round rows as TensorBoard scalars (step = round) in ``OUT/tensorboard``."""

    def __init__(self, config: Any, out_dir: Path | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str((out_dir or Path("runs/latest")) / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in config.to_flat().items()))

    def log_round(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=int(row.get("round", 0)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Round rows as a Weights & Biases run (step = round)."""

    def __init__(self, config: Any, out_dir: Path | None) -> None:
        import wandb

        self.run = wandb.init(project="fedpersona", config=config.to_flat(),
                              dir=str(out_dir) if out_dir else None, reinit=True)

    def log_round(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=int(row.get("round", 0)))

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """Round rows as MLflow metrics (step = round), the configuration as its parameters."""

    def __init__(self, config: Any, out_dir: Path | None) -> None:
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run()
        mlflow.log_params({k: str(v)[:250] for k, v in config.to_flat().items()})

    def log_round(self, row: dict[str, Any]) -> None:
        self.mlflow.log_metrics(scalars(row), step=int(row.get("round", 0)))

    def close(self) -> None:
        self.mlflow.end_run()


_BUILT_IN = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def check_tracker(name: str) -> None:
    """One clear line, before a run starts, when the ``tracker`` setting cannot work here.

    Raises:
        UsageError: an unknown tracker, its library not installed, or a ``module:Class`` that cannot be
            imported.
    """
    if not name:
        return
    if ":" in name:
        from fedpersona.plugins import import_object

        import_object(name, "tracker")
        return
    if name not in TRACKERS:
        raise UsageError(f"tracker {name}: unknown; choose tensorboard, wandb, mlflow or package.module:Class")
    if importlib.util.find_spec(TRACKERS[name]) is None:
        raise UsageError(f"tracker {name}: the {TRACKERS[name]} package is not installed; pip install "
                         f"{TRACKERS[name]} (or leave tracker empty)")


def open_tracker(config: Any, out_dir: Path | None) -> Tracker | None:
    """The tracker ``config.tracker`` names, opened (None without one).

    Raises:
        UsageError: see ``check_tracker``.
    """
    name = config.tracker
    if not name:
        return None
    check_tracker(name)
    if ":" in name:
        from fedpersona.plugins import import_object

        return import_object(name, "tracker")(config, out_dir)
    return _BUILT_IN[name](config, out_dir)


class TrackedReporter:
    """A progress reporter that also sends every finished round's row to a tracker."""

    def __init__(self, reporter: Any, tracker: Tracker) -> None:
        self.reporter = reporter
        self.tracker = tracker

    def round_done(self, row: dict[str, Any]) -> None:
        self.tracker.log_round(row)
        self.reporter.round_done(row)

    def stop(self) -> None:
        try:
            self.reporter.stop()
        finally:
            self.tracker.close()

    def __getattr__(self, name: str) -> Any:  # start, phase, replies, ...: the wrapped reporter's
        return getattr(self.reporter, name)


def run_plot(out_dir: Path | None, label: str = "this run") -> Path | None:
    """``OUT/accuracy_per_round.png``: personalized (solid) and global (dashed) mean accuracy per evaluated
    round, from ``OUT/metrics.jsonl`` (None without an output folder or evaluated rounds)."""
    if out_dir is None or not (out_dir / "metrics.jsonl").is_file():
        return None
    from fedpersona.simulations.plots import accuracy_per_round

    return accuracy_per_round(out_dir, [{"run": label, "out": "."}])
