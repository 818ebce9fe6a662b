"""fedpersona: federated, privacy-preserving personalized preference alignment of language models.

The public face, stable across releases (everything else is an implementation detail that may move)::

    import fedpersona as fp

    result = fp.simulate(num_users=8, rounds=3)          # a Flower simulation on Ray; returns its results
    result.summary["personalized_accuracy_mean"]

    @fp.register_loss("my-dpo")                          # a method of your own, by name everywhere
    def my_dpo(pc, pr, rc, rr, *, beta, **_): ...

Names are imported lazily: ``import fedpersona`` loads neither torch nor Flower; the first use of a name
loads what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedpersona._version import __version__

# public name -> the module that defines it
_FACE: dict[str, str] = {
    # running
    "simulate": "fedpersona.api",
    "benchmark": "fedpersona.api",
    "load_config": "fedpersona.api",
    "SimulationResult": "fedpersona.api",
    "RunConfig": "fedpersona.config",
    "describe_settings": "fedpersona.config",
    # data
    "PreferencePair": "fedpersona.data.schema",
    "UserData": "fedpersona.data.schema",
    "write_pairs_jsonl": "fedpersona.data.schema",
    "load_pairs": "fedpersona.data.formats",
    "load_format": "fedpersona.data.formats",
    "PreferenceSimulator": "fedpersona.data.synthetic",
    # extension points (plug-ins): the same decorator a built-in uses
    "Scheme": "fedpersona.strategies.schemes",
    "register_scheme": "fedpersona.strategies.schemes",
    "get_scheme": "fedpersona.strategies.schemes",
    "AdapterLayout": "fedpersona.model.adapters",
    "Role": "fedpersona.model.adapters",
    "by_adapter_name": "fedpersona.model.adapters",
    "register_loss": "fedpersona.alignment.losses",
    "get_loss": "fedpersona.alignment.losses",
    "register_data_format": "fedpersona.data.formats",
    "register_attack": "fedpersona.strategies.attacks",
    "register_strategy": "fedpersona.strategies.registry",
    # errors
    "UsageError": "fedpersona.errors",
    "RunFailed": "fedpersona.errors",
}

__all__ = ["__version__", *_FACE]


def __getattr__(name: str) -> Any:
    module = _FACE.get(name)
    if module is None:
        raise AttributeError(f"module 'fedpersona' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from fedpersona.alignment.losses import get_loss, register_loss  # noqa: F401
    from fedpersona.api import SimulationResult, benchmark, load_config, simulate  # noqa: F401
    from fedpersona.config import RunConfig, describe_settings  # noqa: F401
    from fedpersona.data.formats import load_format, load_pairs, register_data_format  # noqa: F401
    from fedpersona.data.schema import PreferencePair, UserData, write_pairs_jsonl  # noqa: F401
    from fedpersona.data.synthetic import PreferenceSimulator  # noqa: F401
    from fedpersona.errors import RunFailed, UsageError  # noqa: F401
    from fedpersona.model.adapters import AdapterLayout, Role, by_adapter_name  # noqa: F401
    from fedpersona.strategies.attacks import register_attack  # noqa: F401
    from fedpersona.strategies.registry import register_strategy  # noqa: F401
    from fedpersona.strategies.schemes import Scheme, get_scheme, register_scheme  # noqa: F401
