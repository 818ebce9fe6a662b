"""Per-round checkpoints of a federation, so a killed server continues from its last finished round.

Flower has no built-in checkpoint/resume (flwr issue #599). After every round the ServerApp saves:

- ``shared.safetensors``: the aggregated shared adapter (the only tensors the server ever holds;
  private tensors never leave the devices, so they cannot be here);
- ``strategy.safetensors``: the strategy's array state (FedAdam/FedYogi/FedAdagrad ``m_t``/``v_t``,
  FedAvgM ``momentum_vector``, ``current_arrays``, ...), found generically: every instance attribute
  that is an ndarray, a dict or list of ndarrays, or an ArrayRecord, also inside wrapped strategies;
- ``state.json``: the round number, the run configuration, and the recorder's running totals.

Atomicity: a round is written into a fresh temp folder, every file fsynced, the folder renamed to
``round-NNNNN`` and the parent fsynced; only then does ``latest.json`` (written atomically) point at
it. A crash at any moment leaves ``latest.json`` naming a complete round. Older rounds are pruned.
Everything is safetensors or JSON: loading a checkpoint never unpickles anything.

A checkpoint is data like any reply: on resume (``sound_checkpoint``) its shared tensors must have the
run's keys, shapes and dtypes and finite values, and its strategy state finite values
(``fedpersona.strategies.validation.tensor_problem``). A round that fails falls back to the newest earlier
round kept on disk that passes, said in one log line; with none, the resume is refused in one line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpersona.errors import UsageError
from fedpersona.io import fsync_dir
from fedpersona.io import atomic_write_json
from fedpersona.strategies.validation import TensorSpec, tensor_problem

log = logging.getLogger(__name__)

FORMAT = "fedpersona.checkpoint/1"
LATEST = "latest.json"
SHARED_FILE = "shared.safetensors"
STRATEGY_FILE = "strategy.safetensors"
STATE_FILE = "state.json"
KEEP = 2  # finished rounds kept on disk (the newest is the one resumed from)


@dataclass
class Checkpoint:
    """One finished round, as loaded from disk."""

    round: int
    arrays: ArrayRecord
    strategy_state: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.state.get("config", {}))

    @property
    def recorder(self) -> dict[str, Any]:
        return dict(self.state.get("recorder", {}))


# ---------------------------------------------------------------------------- strategy state


def _is_strategy(value: Any) -> bool:
    from flwr.serverapp.strategy import Strategy

    return isinstance(value, Strategy)


def strategy_state(strategy: Any, prefix: str = "") -> dict[str, Any]:
    """The strategy's array-valued instance attributes (recursing into wrapped strategies).

    Only arrays: hyperparameters (scalars) come from the run configuration on resume, so an operator
    can change e.g. the round timeout; the learned state (moments, momentum, last model) comes back.
    """
    found: dict[str, Any] = {}
    for name, value in vars(strategy).items():
        if callable(value) and not _is_strategy(value):
            continue
        key = f"{prefix}{name}"
        if isinstance(value, ArrayRecord):
            found[key] = value
        elif isinstance(value, np.ndarray):
            found[key] = value
        elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            found[key] = value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) for v in value):
            found[key] = list(value)
        elif _is_strategy(value):
            found.update(strategy_state(value, prefix=f"{key}."))
    return found


def restore_strategy_state(strategy: Any, state: dict[str, Any]) -> list[str]:
    """Set the saved attributes back on ``strategy`` (and wrapped ones); returns the names restored."""
    restored = []
    for key, value in state.items():
        target, *path = key.split(".")
        obj, name = strategy, target
        for part in path:
            obj, name = getattr(obj, name), part
        setattr(obj, name, value)
        restored.append(key)
    return restored


def _pack(state: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Flatten attribute values into named arrays plus a layout that says how to rebuild them."""
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, Any] = {}
    for attr, value in state.items():
        if isinstance(value, ArrayRecord):
            keys = list(value.keys())
            layout[attr] = {"kind": "arrayrecord", "keys": keys}
            items = [(k, value[k].numpy()) for k in keys]
        elif isinstance(value, np.ndarray):
            layout[attr] = {"kind": "ndarray"}
            items = [("", value)]
        elif isinstance(value, dict):
            keys = list(value.keys())
            layout[attr] = {"kind": "dict", "keys": keys}
            items = list(value.items())
        else:
            layout[attr] = {"kind": "list", "length": len(value)}
            items = [(str(i), v) for i, v in enumerate(value)]
        for sub, array in items:
            tensors[f"{attr}/{sub}"] = np.ascontiguousarray(array)
    return tensors, layout


def _unpack(tensors: dict[str, np.ndarray], layout: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for attr, spec in layout.items():
        kind = spec["kind"]
        if kind == "arrayrecord":
            state[attr] = ArrayRecord({k: Array(tensors[f"{attr}/{k}"]) for k in spec["keys"]})
        elif kind == "ndarray":
            state[attr] = tensors[f"{attr}/"]
        elif kind == "dict":
            state[attr] = {k: tensors[f"{attr}/{k}"] for k in spec["keys"]}
        else:
            state[attr] = [tensors[f"{attr}/{i}"] for i in range(int(spec["length"]))]
    return state


# ---------------------------------------------------------------------------- files


def _save_arrays(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def _round_dir(directory: Path, server_round: int) -> Path:
    return directory / f"round-{server_round:05d}"


def save_checkpoint(directory: str | Path, server_round: int, arrays: ArrayRecord, strategy: Any, *,
                    config: dict[str, Any], recorder: dict[str, Any] | None = None,
                    num_rounds: int | None = None) -> Path:
    """Write round ``server_round`` atomically and point ``latest.json`` at it; returns its folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = _round_dir(directory, server_round)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory))
    try:
        shared = {k: np.ascontiguousarray(arrays[k].numpy()) for k in arrays.keys()}
        _save_arrays(tmp / SHARED_FILE, shared, {"format": FORMAT, "order": json.dumps(list(shared))})
        tensors, layout = _pack(strategy_state(strategy))
        _save_arrays(tmp / STRATEGY_FILE, tensors, {"format": FORMAT, "layout": json.dumps(layout),
                                                     "strategy": type(strategy).__name__})
        state = {"format": FORMAT, "round": int(server_round), "num_rounds": num_rounds,
                 "strategy_class": type(strategy).__name__, "config": config, "recorder": recorder or {},
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(tmp / STATE_FILE, state)
        fsync_dir(tmp)
        if final.exists():  # a round re-run after a crash between rename and pointer update
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(directory / LATEST, {"format": FORMAT, "round": int(server_round), "dir": final.name,
                                           "num_rounds": num_rounds, "strategy": config.get("strategy"),
                                           "created": state["created"]})
    fsync_dir(directory)
    _prune(directory, keep_from=server_round)
    return final


def _round_folders(directory: Path) -> list[Path]:
    """The saved ``round-NNNNN`` folders, oldest first."""
    return sorted(p for p in directory.glob("round-*") if p.is_dir() and p.name[6:].isdigit())


def _prune(directory: Path, keep_from: int) -> None:
    rounds = _round_folders(directory)
    for path in rounds[:-KEEP]:
        if int(path.name[6:]) < keep_from:
            shutil.rmtree(path, ignore_errors=True)
    for stray in directory.glob(".round-*.tmp"):  # temp folders of interrupted writes
        shutil.rmtree(stray, ignore_errors=True)


def latest_info(directory: str | Path) -> dict[str, Any] | None:
    """``latest.json`` (round, folder, strategy), None without a checkpoint. Cheap: reads no arrays."""
    path = Path(directory) / LATEST
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: checkpoint pointer is not valid JSON ({err.msg}); delete it to resume "
                         "from the newest complete round-NNNNN folder, or start afresh") from None
    if not isinstance(info, dict) or "round" not in info or "dir" not in info:
        raise UsageError(f"{path}: not a fedpersona checkpoint pointer; point --checkpoint-dir elsewhere")
    return info


def load_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The newest finished round under ``directory``; None if there is none."""
    directory = Path(directory)
    info = latest_info(directory)
    if info is None:
        return None
    return load_round(directory / str(info["dir"]))


def load_round(folder: Path) -> Checkpoint:
    """One saved round folder (``round-NNNNN``); UsageError if it is incomplete."""
    try:
        shared, shared_meta = _load_arrays(folder / SHARED_FILE)
        tensors, meta = _load_arrays(folder / STRATEGY_FILE)
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise UsageError(f"{folder}: checkpoint folder is incomplete ({Path(err.filename).name} missing); "
                         "restore it from a backup or start afresh") from None
    order = json.loads(shared_meta.get("order", "[]")) or sorted(shared)
    arrays = ArrayRecord({k: Array(shared[k]) for k in order})
    return Checkpoint(round=int(state["round"]), arrays=arrays,
                      strategy_state=_unpack(tensors, json.loads(meta.get("layout", "{}"))),
                      state=state, path=folder)


def _state_problem(state: dict[str, Any]) -> str | None:
    for attr, value in state.items():
        arrays = ([value[k].numpy() for k in value.keys()] if isinstance(value, ArrayRecord) else
                  list(value.values()) if isinstance(value, dict) else
                  list(value) if isinstance(value, list) else [value])
        if not all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in arrays):
            return f"strategy state {attr!r} holds NaN or Inf"
    return None


def checkpoint_problem(checkpoint: Checkpoint, spec: TensorSpec) -> str | None:
    """Why ``checkpoint`` cannot be trusted by a run whose shared tensors are ``spec``; None if it can."""
    found = tensor_problem(checkpoint.arrays, spec, exact_dtype=False)
    if found is not None:
        return f"shared tensors: {found[1]} ({found[0]})"
    return _state_problem(checkpoint.strategy_state)


def sound_checkpoint(directory: str | Path, checkpoint: Checkpoint, spec: TensorSpec) -> Checkpoint:
    """``checkpoint`` if it passes ``checkpoint_problem``, else the newest earlier round kept under
    ``directory`` that does (one warning line); UsageError naming the folder when none does."""
    problem = checkpoint_problem(checkpoint, spec)
    if problem is None:
        return checkpoint
    bad = checkpoint.path or Path(directory)
    earlier = [p for p in _round_folders(Path(directory)) if int(p.name[6:]) < checkpoint.round]
    for folder in reversed(earlier):
        try:
            candidate = load_round(folder)
        except (UsageError, OSError, ValueError, KeyError):
            continue  # a damaged older round is no fallback either
        if checkpoint_problem(candidate, spec) is None:
            log.warning("checkpoint %s cannot be resumed (%s); resuming from round %d (%s) instead",
                        bad, problem, candidate.round, folder)
            return candidate
    raise UsageError(f"{bad}: checkpoint cannot be resumed ({problem}) and no earlier round under {directory} "
                     "passes the checks; start afresh without --resume, or restore the folder from a backup")
