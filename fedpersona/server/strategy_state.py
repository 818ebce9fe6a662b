"""A Flower strategy's own state, captured and restored for checkpoints.

Some strategies learn as they go: FedAdam/FedYogi/FedAdagrad keep moments (``m_t``/``v_t``), FedAvgM a
``momentum_vector``, most the last ``current_arrays``. ``strategy_state`` finds that state generically
(every instance attribute that is an ndarray, a dict or list of ndarrays, or an ArrayRecord, also inside
wrapped strategies) and ``restore_strategy_state`` sets it back on a fresh strategy. For a file,
``pack_state`` flattens it into named numpy arrays plus a JSON-able layout (what safetensors holds as
tensors and metadata) and ``unpack_state`` rebuilds it; ``state_problem`` says whether it is finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpersona.errors import UsageError


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
    """Set the saved attributes back on ``strategy`` (and wrapped ones); returns the names restored.

    Raises UsageError when a saved name has no place in ``strategy`` (another strategy's state)."""
    restored = []
    for key, value in state.items():
        target, *path = key.split(".")
        obj, name = strategy, target
        try:
            for part in path:
                obj, name = getattr(obj, name), part
            setattr(obj, name, value)
        except AttributeError:
            raise UsageError(f"checkpoint strategy state {key!r} does not fit a {type(strategy).__name__}; resume "
                             "with the strategy the run started with, or start afresh") from None
        restored.append(key)
    return restored


def pack_state(state: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
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


def unpack_state(tensors: dict[str, np.ndarray], layout: dict[str, Any]) -> dict[str, Any]:
    """The attribute values ``pack_state`` flattened; raises (KeyError, ...) when ``layout`` does not
    match ``tensors``."""
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


def state_problem(state: dict[str, Any]) -> str | None:
    """Which attribute of ``state`` holds NaN or Inf; None when all its values are finite."""
    for attr, value in state.items():
        arrays = ([value[k].numpy() for k in value.keys()] if isinstance(value, ArrayRecord) else
                  list(value.values()) if isinstance(value, dict) else
                  list(value) if isinstance(value, list) else [value])
        if not all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in arrays):
            return f"strategy state {attr!r} holds NaN or Inf"
    return None
