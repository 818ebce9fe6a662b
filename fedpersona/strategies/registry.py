"""Aggregation strategies by name: every Flower Message-API strategy, or a user's ``module:Class``.

One spelling everywhere (``--strategy``, TOML ``strategy``, ``fp.simulate(strategy=...)``, ``benchmark
--strategies``): ``NAME`` or ``NAME(key=value, ...)``, e.g. ``FedAdam(eta=0.01,tau=0.001)``. Hyperparameters
are typed from the strategy's own ``__init__`` signature, so every Flower argument is settable and a typo is
caught before the run starts. The built-in names are Flower's Message-API strategies (``BUILTIN``); a strategy
of your own is ``package.module:Class`` (a ``flwr.serverapp.strategy.Strategy`` subclass) or registered
with ``fedpersona.register_strategy``.

What fedpersona adds around a strategy (``build_strategy``; aggregation math is never changed):

* derived defaults: QFedAvg's required ``client_learning_rate`` defaults to the run's ``shared-lr`` (the
  learning rate the clients train the aggregated tensors with; q-FedAvg estimates L = 1 / that);
* checks against the run before it starts: Krum and MultiKrum need ``n >= 2f + 3`` users trained per
  round, Bulyan ``n >= 4f + 3`` (``f = num_malicious_nodes``; Blanchard et al. 2017, El Mhamdi et al.
  2018); ``n`` counts the worst case where every new user (who declines training) is sampled;
* the training loss, only for strategies that weight users by it (QFedAvg, or any strategy with a
  ``train_loss_key`` attribute): ``configure_train`` adds ``train-loss-key`` to the train config, and the
  clients then reply with their pre-training loss under that key (``fedpersona.round``); never
  with DP on, because DP-SGD does not protect that number;
* schemes that share nothing (``local``): replies carry empty ArrayRecords, and aggregation is the
  identity on them (robust rules such as Krum cannot rank empty updates).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from fedpersona.errors import UsageError
from fedpersona.plugins import LazyImport, Registry, coerce, split_top_level, type_hints
from fedpersona.protocol import TRAIN_LOSS_KEY

BUILTIN = ("FedAvg", "FedAvgM", "FedProx", "FedAdam", "FedYogi", "FedAdagrad", "QFedAvg", "FedMedian",
           "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan")
# Arguments the run configuration owns: set from --fraction-train / --min-users, not by strategy args.
MANAGED = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes")

# Required arguments fedpersona can derive from the run configuration (class name -> argument -> value).
DERIVED_DEFAULTS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "QFedAvg": {"client_learning_rate": lambda config: config.shared_lr},
}


def _check_strategy(obj: object) -> type:
    from flwr.serverapp.strategy import Strategy

    if not (inspect.isclass(obj) and issubclass(obj, Strategy)):
        raise TypeError("not a subclass of flwr.serverapp.strategy.Strategy")
    return obj


STRATEGIES: Registry[type] = Registry("strategy", "--strategy", _check_strategy)
for _name in BUILTIN:
    STRATEGIES.register(_name, LazyImport(f"flwr.serverapp.strategy:{_name}"))


def register_strategy(name: str, cls: type | None = None, *, replace: bool = False) -> Any:
    """Register an aggregation strategy (usable as ``--strategy NAME``); a decorator without ``cls``.

    Args:
        name: the strategy's name.
        cls: a ``flwr.serverapp.strategy.Strategy`` subclass (its ``__init__`` arguments become the spec's
            ``NAME(key=value)`` arguments).
        replace: replace an existing strategy of that name.

    Returns:
        ``cls`` (or the decorator).

    Raises:
        ValueError: the name is taken.
    """
    return STRATEGIES.register(name, cls, replace=replace)


def strategy_class(spec: str) -> type:
    """The Strategy subclass a spec names (a built-in, case-insensitive, or ``package.module:Class``).

    Raises:
        UsageError: unknown, not importable, or not a Strategy subclass.
    """
    return STRATEGIES.get(spec)[0]


def parse_strategy_args(text: str | Iterable[str]) -> dict[str, str]:
    """``"a=1,b=x"`` -> ``{"a": "1", "b": "x"}`` (also accepts a list of ``key=value`` items).

    Raises:
        UsageError: an item that is not ``key=value``.
    """
    items = split_top_level(text) if isinstance(text, str) else list(text)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"strategy argument {item!r}: expected key=value")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def managed_arguments(config: Any) -> dict[str, Any]:
    """The strategy arguments the run configuration decides (what ``server.federation`` passes)."""
    return {"fraction_train": config.fraction_train, "fraction_evaluate": 1.0,
            "min_train_nodes": config.min_users, "min_evaluate_nodes": config.min_users,
            "min_available_nodes": config.min_users}


def trained_per_round(config: Any) -> int:
    """Users whose updates reach aggregation each round, in the worst case (every new user sampled)."""
    total = config.num_users + config.new_users
    sample = min(total, max(int(total * config.fraction_train), config.min_users))
    return max(0, sample - config.new_users)


def build_strategy(name: str, args: str | dict[str, str] = "", config: Any = None, **managed: Any):
    """Instantiate a strategy with the run's managed arguments plus typed user arguments.

    Args:
        name: the strategy spec, ``NAME`` or ``NAME(key=value, ...)``.
        args: more ``key=value`` arguments (a string or a dict), merged over the spec's.
        config: the run configuration; with it, required arguments are derived where possible, the
            strategy is checked against the run and adapted (see the module docstring).
        **managed: the arguments the run decides (``managed_arguments``).

    Returns:
        The strategy instance.

    Raises:
        UsageError: an unknown strategy or argument, a value of the wrong type, a missing required argument,
            or a strategy the run cannot serve.
    """
    cls, spec_args = STRATEGIES.get(name)
    signature = inspect.signature(cls.__init__)
    hints = type_hints(cls)
    accepted = {n for n, p in signature.parameters.items()
                if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    extra = parse_strategy_args(args) if isinstance(args, str) else {k.replace("-", "_"): v for k, v in args.items()}
    user = {**spec_args, **extra}
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        accepted |= set(MANAGED)  # a user's class passing **kwargs on to FedAvg still gets the run's sampling
    kwargs: dict[str, Any] = {k: v for k, v in managed.items() if k in accepted}
    for key, value in user.items():
        if key in MANAGED:
            raise UsageError(f"--strategy {name}: argument {key} is set through the run configuration "
                             "(fraction-train, min-users)")
        if key not in accepted:
            raise UsageError(f"--strategy {name}: {cls.__name__} has no argument {key!r}; it takes "
                             f"{', '.join(sorted(accepted - set(MANAGED))) or 'no extra arguments'}")
        kwargs[key] = coerce(value, hints.get(key, str), f"--strategy {name}: argument {key}")
    if config is not None:
        for key, derive in DERIVED_DEFAULTS.get(cls.__name__, {}).items():
            if key in accepted and key not in kwargs:
                kwargs[key] = derive(config)
    missing = [n for n, p in signature.parameters.items()
               if n != "self" and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and n not in kwargs]
    if missing:
        raise UsageError(f"--strategy {name}: {cls.__name__} needs " + ", ".join(f"{m}=..." for m in missing)
                         + f"; write --strategy '{cls.__name__}({missing[0]}=...)'")
    try:
        strategy = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--strategy {name}: {err}") from None
    if config is None:
        return strategy
    check_against_run(strategy, name, config)
    return adapt(strategy)


def strategy_for(config: Any):
    """The run's strategy, built, checked and adapted (raises UsageError on a bad name or argument)."""
    return build_strategy(config.strategy, config=config, **managed_arguments(config))


def train_loss_key(strategy: Any) -> str | None:
    """The metric key under which this strategy reads each user's training loss, if it reads one."""
    key = getattr(strategy, "train_loss_key", None)
    return str(key) if isinstance(key, str) and key else None


def check_against_run(strategy: Any, name: str, config: Any) -> None:
    """Refuse a strategy the run cannot serve, with one line that says how to fix it."""
    from flwr.serverapp.strategy import Bulyan, MultiKrum

    n = trained_per_round(config)
    how = (f"this run trains {n} per round (fraction-train {config.fraction_train} of "
           f"{config.num_users + config.new_users} users"
           + (f", minus up to {config.new_users} new users, who decline)" if config.new_users else ")"))
    f = int(getattr(strategy, "num_malicious_nodes", 0) or 0)
    for rule, need, formula in ((Bulyan, 4 * f + 3, "4f+3"), (MultiKrum, 2 * f + 3, "2f+3")):
        if isinstance(strategy, rule) and n < need:
            raise UsageError(f"--strategy {name}: {type(strategy).__name__} with num_malicious_nodes={f} needs at "
                             f"least {need} users trained per round ({formula}); {how}; raise --fraction or "
                             "--users, or lower num_malicious_nodes")
    select = getattr(strategy, "num_nodes_to_select", None)
    if isinstance(strategy, MultiKrum) and select is not None and select > n:
        raise UsageError(f"--strategy {name}: num_nodes_to_select={select} exceeds the users trained per round; {how}")
    if train_loss_key(strategy) and config.dp_epsilon > 0:
        raise UsageError(f"--strategy {name}: it weights users by their raw training loss, which DP-SGD does "
                         "not protect; choose another strategy with --dp")


def adapt(strategy: Any) -> Any:
    """Add fedpersona's requests and the empty-update identity to ``strategy`` (in place, same math)."""
    base = type(strategy)
    loss_key = train_loss_key(strategy)

    class Adapted(base):  # type: ignore[misc, valid-type]
        def configure_train(self, server_round: int, arrays, config, grid):
            if loss_key:
                config[TRAIN_LOSS_KEY] = loss_key
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies):
            replies = list(replies)
            ok = [m for m in replies if not m.has_error()]
            if ok and all(_shares_nothing(m) for m in ok):
                from flwr.app import ArrayRecord

                return ArrayRecord(), None  # nothing is shared (scheme local): nothing to aggregate
            return super().aggregate_train(server_round, replies)

    Adapted.__name__ = Adapted.__qualname__ = base.__name__
    Adapted.__module__ = base.__module__
    strategy.__class__ = Adapted
    return strategy


def _shares_nothing(msg: Any) -> bool:
    records = list(msg.content.array_records.values())
    return all(len(record) == 0 for record in records)
