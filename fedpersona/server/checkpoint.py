"""Per-round checkpoints of a federation, so a killed server continues from its last finished round.

Flower has no built-in checkpoint/resume (flwr issue #599). After every round the ServerApp saves:

- ``shared.safetensors``: the aggregated shared adapter (the only tensors the server ever holds;
  private tensors never leave the devices, so they cannot be here);
- ``strategy.safetensors``: the strategy's array state (FedAdam/FedYogi/FedAdagrad ``m_t``/``v_t``,
  FedAvgM ``momentum_vector``, ``current_arrays``, ...), found generically: every instance attribute
  that is an ndarray, a dict or list of ndarrays, or an ArrayRecord, also inside wrapped strategies
  (``fedpersona.server.strategy_state``);
- ``state.json``: the round number, the run configuration, and the recorder's running totals.

Atomicity: a round is written into a fresh temp folder, every file fsynced, the folder renamed to
``round-NNNNN`` and the parent fsynced; only then does ``latest.json`` (written atomically) point at
it. A crash at any moment leaves ``latest.json`` naming a complete round. Older rounds are pruned.
Everything is safetensors or JSON: loading a checkpoint never unpickles anything.

Damage (a disk filling up, a copy cut short, a hand edit) is expected: on resume ``load_checkpoint``
takes the round ``latest.json`` names, and when the pointer or a file of that round cannot be loaded
(missing, truncated, not UTF-8, not JSON, not safetensors) the newest earlier round that loads, said in
one warning line naming the damaged file. A checkpoint is data like any reply: on resume
(``sound_checkpoint``) its shared tensors must have the run's keys, shapes and dtypes and finite values,
and its strategy state finite values (``fedpersona.strategies.validation.tensor_problem``); a round that
fails falls back the same way. With no round left, the resume is refused in one line (UsageError).

Only what this module writes is ever deleted (``discard_checkpoints``, pruning): the files of a
``round-NNNNN`` folder, temp files and folders of interrupted writes, ``latest.json``; a user's files in
the folder stay.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpersona.errors import UsageError
from fedpersona.io import atomic_write_json, fsync_dir
from fedpersona.server.strategy_state import pack_state, state_problem, strategy_state, unpack_state
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


# ---------------------------------------------------------------------------- files

ROUND_NAME = re.compile(r"round-(\d{5,})")  # what save_checkpoint names a round's folder
_ROUND_TMP = re.compile(r"\.round-\d{5,}\..+\.tmp")  # save_checkpoint's temp folders
_ROUND_FILES = (SHARED_FILE, STRATEGY_FILE, STATE_FILE)
_MISSING = "file missing"
_JSON_KIND = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


class DamagedCheckpoint(UsageError):
    """A checkpoint file that cannot be loaded: ``path`` names it, ``problem`` says what is wrong with it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: checkpoint cannot be resumed ({problem})")
        self.path, self.problem = path, problem


def _why(err: BaseException) -> str:
    """A third-party error in a few words (its first line, cut short), never raising itself."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:120]}" if lines else type(err).__name__


def _tmp_of(name: str) -> re.Pattern[str]:
    """The temp names ``fedpersona.io``'s atomic writes give ``name`` while writing it."""
    return re.compile(rf"\.{re.escape(name)}\..+\.tmp")


def _save_arrays(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of one safetensors file; DamagedCheckpoint when it is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        raise DamagedCheckpoint(path, _MISSING)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean "cannot be loaded"
        raise DamagedCheckpoint(path, f"truncated or not a safetensors file; {_why(err)}") from None


def _load_json(path: Path) -> Any:
    """A JSON file's content; DamagedCheckpoint when it is missing, empty, not UTF-8 or not JSON."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DamagedCheckpoint(path, _MISSING) from None
    except OSError as err:
        raise DamagedCheckpoint(path, f"cannot be read: {err.strerror or _why(err)}") from None
    if not raw.strip():
        raise DamagedCheckpoint(path, "empty file")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DamagedCheckpoint(path, "not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise DamagedCheckpoint(path, f"truncated or not JSON: {err}") from None
    except Exception as err:  # noqa: BLE001 - RecursionError on absurd nesting, ...
        raise DamagedCheckpoint(path, f"not usable JSON; {_why(err)}") from None


def _round_number(path: Path) -> int | None:
    match = ROUND_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


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
        tensors, layout = pack_state(strategy_state(strategy))
        _save_arrays(tmp / STRATEGY_FILE, tensors, {"format": FORMAT, "layout": json.dumps(layout),
                                                     "strategy": type(strategy).__name__})
        state = {"format": FORMAT, "round": int(server_round), "num_rounds": num_rounds,
                 "strategy_class": type(strategy).__name__, "config": config, "recorder": recorder or {},
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(tmp / STATE_FILE, state)
        fsync_dir(tmp)
        if final.exists() and not _remove_round(final):  # a round re-run after a crash before the pointer moved
            aside = final.with_name(f"{final.name}.kept-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
            final.rename(aside)  # it holds files fedpersona did not write: keep them
            log.warning("%s held files fedpersona did not write; moved to %s", final, aside)
        os.replace(tmp, final)
        fsync_dir(directory)
    except BaseException:
        _remove_round(tmp)
        raise
    atomic_write_json(directory / LATEST, {"format": FORMAT, "round": int(server_round), "dir": final.name,
                                           "num_rounds": num_rounds, "strategy": config.get("strategy"),
                                           "created": state["created"]})
    fsync_dir(directory)
    _prune(directory, keep_from=server_round)
    return final


def _round_folders(directory: Path) -> list[Path]:
    """The saved ``round-NNNNN`` folders, oldest first."""
    try:
        found = [p for p in directory.iterdir()
                 if _round_number(p) is not None and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    return sorted(found, key=lambda p: _round_number(p) or 0)


def has_rounds(directory: str | Path) -> bool:
    """Whether ``directory`` holds a ``round-NNNNN`` folder (a checkpoint, maybe without its pointer)."""
    return bool(_round_folders(Path(directory)))


def _remove_round(folder: Path) -> bool:
    """Delete the files fedpersona writes in a round (or temp round) folder, then the folder if that
    emptied it; anything else stays. True when the folder is gone."""
    if folder.is_symlink() or not folder.is_dir():
        return not folder.exists()
    temps = [_tmp_of(name) for name in _ROUND_FILES]
    for entry in folder.iterdir():
        if entry.name in _ROUND_FILES or any(t.fullmatch(entry.name) for t in temps):
            if entry.is_file() or entry.is_symlink():
                entry.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def _prune(directory: Path, keep_from: int) -> None:
    rounds = _round_folders(directory)
    for path in rounds[:-KEEP]:
        if (_round_number(path) or 0) < keep_from:
            _remove_round(path)
    for stray in directory.iterdir():  # temp folders of interrupted writes
        if _ROUND_TMP.fullmatch(stray.name):
            _remove_round(stray)


def discard_checkpoints(directory: str | Path) -> tuple[int, list[str]]:
    """Remove what fedpersona wrote under ``directory`` and nothing else: ``round-NNNNN`` folders (only
    the files saved in them), interrupted writes' temp folders and files, ``latest.json``.

    Returns (round folders removed, names of the entries left in ``directory``, e.g. a user's notes).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0, []
    removed = 0
    latest_tmp = _tmp_of(LATEST)
    for entry in sorted(directory.iterdir()):
        if _round_number(entry) is not None or _ROUND_TMP.fullmatch(entry.name):
            removed += int(_remove_round(entry) and _round_number(entry) is not None)
        elif (entry.name == LATEST or latest_tmp.fullmatch(entry.name)) and (entry.is_file() or entry.is_symlink()):
            entry.unlink(missing_ok=True)
    if removed or not any(directory.iterdir()):
        fsync_dir(directory)
    return removed, sorted(p.name for p in directory.iterdir())


def read_pointer(directory: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """``latest.json`` as ``(info, None)``; ``(None, None)`` without one; ``(None, what is wrong)`` when it
    is unreadable, not JSON, or names no ``round-NNNNN`` folder and its round. Never raises."""
    try:
        info = _load_json(Path(directory) / LATEST)
    except DamagedCheckpoint as err:
        return None, (None if err.problem == _MISSING else err.problem)
    if not isinstance(info, dict):
        return None, f"{_JSON_KIND.get(type(info), 'not an object')}, not a checkpoint pointer"
    name, number = info.get("dir"), info.get("round")
    match = ROUND_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None or type(number) is not int or int(match.group(1)) != number:
        return None, "names no round-NNNNN folder and its round"
    return info, None


def latest_info(directory: str | Path) -> dict[str, Any] | None:
    """``latest.json`` (round, folder, strategy), None without a checkpoint. Cheap: reads no arrays.

    Raises UsageError naming ``latest.json`` when it is damaged (see ``read_pointer``)."""
    info, problem = read_pointer(directory)
    if problem is not None:
        raise UsageError(f"{Path(directory) / LATEST}: checkpoint pointer damaged ({problem}); --resume continues "
                         "from the newest round-NNNNN folder that loads, or start afresh")
    return info


def load_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The newest finished round under ``directory`` that loads; None when it holds no checkpoint at all.

    That is the round ``latest.json`` names unless the pointer or that round is damaged (missing,
    truncated, not UTF-8, not JSON, not safetensors): then the newest earlier ``round-NNNNN`` folder that
    loads (any folder, when the pointer itself is damaged), said in one warning line naming the damaged
    file and the round resumed from. Raises UsageError naming the damaged file and what to do when no
    round loads, or when ``directory`` is not a folder.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"checkpoint-dir {directory}: a file, not a folder; point it at the run's checkpoint folder")
    info, problem = read_pointer(directory)
    folders = _round_folders(directory)
    if info is None and problem is None and not folders:
        return None
    if info is None:  # no usable pointer: every round folder is a candidate
        return _fallback(directory, directory / LATEST, problem or _MISSING, folders, earlier=False)
    try:
        return load_round(directory / info["dir"])
    except DamagedCheckpoint as err:
        damage = err
    earlier = [p for p in folders if (_round_number(p) or 0) < info["round"]]
    return _fallback(directory, damage.path, damage.problem, earlier)  # outside the except: no chained context


def load_round(folder: Path) -> Checkpoint:
    """One saved round folder (``round-NNNNN``).

    Raises DamagedCheckpoint (a UsageError) naming the file that is missing or cannot be loaded: the
    folder itself, a truncated or foreign safetensors file, a ``state.json`` that is not this round's
    JSON object, a tensor order or strategy layout that does not match the tensors.
    """
    folder = Path(folder)
    number = _round_number(folder)
    if number is None or not folder.is_dir():
        raise DamagedCheckpoint(folder, "folder missing" if number is not None else "not a round-NNNNN folder")
    state = _load_json(folder / STATE_FILE)
    if not isinstance(state, dict):
        raise DamagedCheckpoint(folder / STATE_FILE, f"{_JSON_KIND.get(type(state), 'not an object')}, "
                                                     "not a round's state")
    if type(state.get("round")) is not int or state["round"] != number:
        raise DamagedCheckpoint(folder / STATE_FILE, f"names round {state.get('round')!r}, not {number}")
    for key in ("config", "recorder"):
        if not isinstance(state.get(key, {}), dict):
            raise DamagedCheckpoint(folder / STATE_FILE, f"{key!r} is not an object")
    shared, shared_meta = _load_arrays(folder / SHARED_FILE)
    tensors, meta = _load_arrays(folder / STRATEGY_FILE)
    try:
        order = json.loads(shared_meta.get("order", "[]")) or sorted(shared)
        if not isinstance(order, list) or sorted(order) != sorted(shared):
            raise ValueError("its tensor order does not list its tensors")
        arrays = ArrayRecord({k: Array(shared[k]) for k in order})
    except Exception as err:  # noqa: BLE001 - any inconsistency means the file cannot be trusted
        raise DamagedCheckpoint(folder / SHARED_FILE, f"inconsistent; {_why(err)}") from None
    try:
        strategy = unpack_state(tensors, json.loads(meta.get("layout", "{}")))
    except Exception as err:  # noqa: BLE001
        raise DamagedCheckpoint(folder / STRATEGY_FILE, f"layout does not match its tensors; {_why(err)}") from None
    return Checkpoint(round=number, arrays=arrays, strategy_state=strategy, state=state, path=folder)


def _fallback(directory: Path, bad: Path, problem: str, folders: list[Path], *, spec: TensorSpec | None = None,
              earlier: bool = True) -> Checkpoint:
    """The newest of ``folders`` that loads (and passes ``checkpoint_problem`` with a ``spec``), said in
    one warning line; UsageError naming ``bad``, its problem and what to do when none does."""
    for folder in reversed(folders):
        try:
            candidate = load_round(folder)
        except DamagedCheckpoint:
            continue  # a damaged older round is no fallback either
        if spec is not None and checkpoint_problem(candidate, spec) is not None:
            continue
        log.warning("checkpoint %s cannot be resumed (%s); resuming from round %d (%s) instead",
                    bad, problem, candidate.round, folder)
        return candidate
    raise UsageError(f"{bad}: checkpoint cannot be resumed ({problem}) and no {'earlier ' if earlier else ''}round "
                     f"under {directory} {'passes the checks' if spec is not None else 'loads'}; start afresh "
                     "(without --resume; fedpersona server: --fresh), or restore the folder from a backup")


def checkpoint_problem(checkpoint: Checkpoint, spec: TensorSpec) -> str | None:
    """Why ``checkpoint`` cannot be trusted by a run whose shared tensors are ``spec``; None if it can."""
    try:
        found = tensor_problem(checkpoint.arrays, spec, exact_dtype=False)
        if found is not None:
            return f"shared tensors: {found[1]} ({found[0]})"
        return state_problem(checkpoint.strategy_state)
    except Exception as err:  # noqa: BLE001 - e.g. a tensor dtype numpy cannot check: not trusted either
        return f"tensors cannot be checked; {_why(err)}"


def sound_checkpoint(directory: str | Path, checkpoint: Checkpoint, spec: TensorSpec) -> Checkpoint:
    """``checkpoint`` if it passes ``checkpoint_problem``, else the newest earlier round kept under
    ``directory`` that loads and does (one warning line); UsageError naming the folder when none does."""
    problem = checkpoint_problem(checkpoint, spec)
    if problem is None:
        return checkpoint
    earlier = [p for p in _round_folders(Path(directory)) if (_round_number(p) or 0) < checkpoint.round]
    return _fallback(Path(directory), checkpoint.path or Path(directory), problem, earlier, spec=spec)
