"""Aggregation strategies by name: every Flower Message-API strategy, or a user's ``module:Class``.

Hyperparameters come as ``key=value`` strings and are typed from the strategy's own ``__init__``
signature, so every Flower argument is settable and a typo is caught before the run starts.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from typing import Any

from fedpersona.errors import UsageError

BUILTIN = ("FedAvg", "FedAvgM", "FedProx", "FedAdam", "FedYogi", "FedAdagrad", "QFedAvg", "FedMedian",
           "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan")
# Arguments the run configuration owns: set from --fraction-train / --min-users, not by strategy args.
MANAGED = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes")


def strategy_class(name: str) -> type:
    """Resolve a built-in name (case-insensitive) or ``package.module:Class`` to a Strategy subclass."""
    from flwr.serverapp.strategy import Strategy

    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise UsageError(f"--strategy {name}: cannot import it ({err}); use package.module:ClassName") from None
    else:
        match = {b.lower(): b for b in BUILTIN}.get(name.lower())
        if match is None:
            raise UsageError(f"--strategy {name}: unknown strategy; choose one of {', '.join(BUILTIN)} "
                             "or give package.module:ClassName")
        cls = getattr(importlib.import_module("flwr.serverapp.strategy"), match)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise UsageError(f"--strategy {name}: not a subclass of flwr.serverapp.strategy.Strategy")
    return cls


def parse_strategy_args(text: str) -> dict[str, str]:
    """``"a=1,b=x"`` -> ``{"a": "1", "b": "x"}`` (also accepts a list of ``key=value`` items)."""
    items = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else list(text)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--strategy-arg {item!r}: expected key=value")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _coerce(value: str, annotation: Any, where: str) -> Any:
    options = [a for a in typing.get_args(annotation)] or [annotation]
    if type(None) in options and value.lower() in ("none", "null"):
        return None
    for kind in (bool, int, float, str):
        if kind in options or any(getattr(o, "__origin__", None) is kind for o in options):
            try:
                if kind is bool:
                    if value.lower() not in ("true", "false", "1", "0"):
                        continue
                    return value.lower() in ("true", "1")
                return kind(value)
            except ValueError:
                continue
    raise UsageError(f"{where}: cannot read {value!r} as {annotation}")


def build_strategy(name: str, args: str | dict[str, str], **managed: Any):
    """Instantiate strategy ``name`` with the run's managed arguments plus typed user arguments."""
    cls = strategy_class(name)
    signature = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    accepted = {n for n in signature.parameters if n != "self"}
    user = parse_strategy_args(args) if isinstance(args, str) else dict(args)
    kwargs: dict[str, Any] = {k: v for k, v in managed.items() if k in accepted}
    for key, value in user.items():
        if key in MANAGED:
            raise UsageError(f"--strategy-arg {key}: set through the run configuration (fraction-train, min-users)")
        if key not in accepted:
            raise UsageError(f"--strategy-arg {key}: {cls.__name__} has no such argument; it takes "
                             f"{', '.join(sorted(accepted - set(MANAGED))) or 'no extra arguments'}")
        kwargs[key] = _coerce(value, hints.get(key, str), f"--strategy-arg {key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--strategy {name}: {err}") from None
