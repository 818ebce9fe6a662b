"""Plug-ins: methods a researcher brings from their own files, by name, without touching fedpersona.

The field moves by new methods, so every kind of method here is open the way Flower takes strategies and
Opacus takes ``register_grad_sampler``: one registry per kind (personalization schemes, pairwise losses,
data formats, simulated attacks, aggregation strategies), filled by the same decorator that is the public
extension point, and the same spelling everywhere a method is named (command line, TOML, ``fp.simulate``):

* ``NAME``: a registered name (``dpo``, ``split``, ``FedAvg``, ``hh-rlhf``, ...);
* ``package.module:ATTR``: an object in a module, imported from the working directory first (as
  ``python -m`` does), then the installed packages; ``ATTR`` may itself be registered on import;
* either followed by arguments, ``NAME(key=value, ...)``: typed from the object's signature and passed to
  it (a loss gets them as keyword arguments, a factory or class as constructor arguments).

A spec is resolved where it is used (the server, each simulation worker, each device), so a plug-in module
must be importable there: simulation workers inherit this process's ``sys.path`` (the working directory
included); a real device needs the module installed or in its working directory.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from fedpersona.errors import UsageError

T = TypeVar("T")
_SPEC = re.compile(r"^\s*(?P<name>[^()\s]+?)\s*(?:\((?P<args>.*)\))?\s*$", re.S)


@dataclass(frozen=True)
class Spec:
    """A parsed method spec: ``name`` (registered name or ``module:ATTR``) and its string arguments.

    Attributes:
        name: a registered name (``dpo``) or an import path (``mylosses:dpop``).
        args: the ``key=value`` arguments as written, untyped (``typed_arguments`` types them).
    """

    name: str
    args: dict[str, str] = field(default_factory=dict)

    @property
    def is_import_path(self) -> bool:
        """Whether the name points into a module (``package.module:ATTR``)."""
        return ":" in self.name

    def __str__(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.args.items())
        return f"{self.name}({inner})" if self.args else self.name


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside parentheses: ``"a,b(x=1,y=2)"`` -> ``["a", "b(x=1,y=2)"]``.

    Args:
        text: a comma-separated list of specs.
        sep: the separator.

    Returns:
        The stripped, non-empty parts.

    Raises:
        UsageError: unbalanced parentheses.
    """
    parts, depth, current = [], 0, []
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise UsageError(f"{text!r}: a ')' without its '('")
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise UsageError(f"{text!r}: a '(' without its ')'")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_spec(text: str, what: str = "method") -> Spec:
    """Parse ``NAME`` or ``NAME(key=value, ...)``.

    Args:
        text: the spec as written by the user.
        what: how the error names the place (``--scheme``, ``loss``, ...).

    Returns:
        The ``Spec``; argument keys with dashes are spelled with underscores.

    Raises:
        UsageError: empty text, unbalanced parentheses or an argument that is not ``key=value``.
    """
    match = _SPEC.match(text or "")
    if match is None or not match.group("name"):
        raise UsageError(f"{what} {text!r}: expected NAME or NAME(key=value, ...)")
    args: dict[str, str] = {}
    for item in split_top_level(match.group("args") or ""):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} {text!r}: argument {item!r} is not key=value")
        args[key.strip().replace("-", "_")] = value.strip()
    return Spec(match.group("name"), args)


def import_object(path: str, what: str = "plug-in") -> Any:
    """The object ``ATTR`` of ``package.module:ATTR``, the working directory searched first.

    Args:
        path: ``package.module:ATTR`` (``ATTR`` may be dotted: ``module:Class.factory``).
        what: how the error names the place.

    Returns:
        The object.

    Raises:
        UsageError: the module cannot be imported (with the reason: a missing file, or an error raised
            while importing it) or has no such attribute.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{what} {path!r}: expected package.module:NAME")
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:  # as `python -m` does: the working directory first
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise UsageError(f"{what} {path}: no module {module_name!r} in the working directory {cwd} or the "
                             "installed packages; check the spelling, or run from the folder that holds it") from None
        raise UsageError(f"{what} {path}: importing {module_name} failed: {err}") from None
    except Exception as err:  # noqa: BLE001 - a broken plug-in is the user's to fix: one line, not a traceback
        where = _user_frame(err)
        raise UsageError(f"{what} {path}: importing {module_name} failed ({type(err).__name__}: {err}{where}); "
                         "fix the module") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{what} {path}: module {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def _user_frame(err: BaseException) -> str:
    """`` at FILE:LINE`` of the innermost frame of ``err`` outside this package, or ``""``."""
    tb, found = err.__traceback__, ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if "importlib" not in filename and "/fedpersona/" not in filename:
            found = f" at {filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def coerce(value: str, annotation: Any, where: str) -> Any:
    """A string argument converted to what ``annotation`` asks for (bool, int, float, str, Optional).

    Args:
        value: the text after ``=``.
        annotation: the parameter's type hint (``str`` when unknown).
        where: how the error names the argument.

    Returns:
        The typed value.

    Raises:
        UsageError: the text cannot be read as the annotated type.
    """
    options = list(typing.get_args(annotation)) or [annotation]
    if type(None) in options and value.lower() in ("none", "null"):
        return None
    for kind in (bool, int, float, str):
        if kind in options or any(getattr(o, "__origin__", None) is kind for o in options):
            try:
                if kind is bool:
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                        continue
                    return value.lower() in ("true", "1", "yes", "on")
                return kind(value)
            except ValueError:
                continue
    if annotation in (Any, inspect.Parameter.empty, None) or not options:
        return literal(value)
    name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    raise UsageError(f"{where}: cannot read {value!r} as {name}")


def literal(value: str) -> bool | int | float | str:
    """An untyped argument read as what it looks like: ``true``/``false``, an int, a float, else the text.

    Args:
        value: the argument as written.

    Returns:
        A bool, an int, a float, or ``value`` itself.
    """
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def type_hints(obj: Any) -> dict[str, Any]:
    """Type hints of a callable's parameters (a class: its ``__init__``); ``{}`` where they cannot be read."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - a user's callable with unresolvable annotations: arguments stay strings
        return {}


def typed_arguments(obj: Callable[..., Any], args: dict[str, str], what: str,
                    reserved: tuple[str, ...] = (), named_only: bool = False) -> dict[str, Any]:
    """``args`` checked against ``obj``'s signature and typed from its annotations.

    Args:
        obj: the callable the arguments are for (a class: its constructor).
        args: string arguments from a spec.
        what: how errors name the place.
        reserved: parameters fedpersona passes itself (refused as arguments).
        named_only: accept only parameters ``obj`` names, even when it also takes ``**kwargs`` (losses and
            attacks take ``**_`` to ignore what fedpersona passes; a misspelt argument must not vanish there).

    Returns:
        Keyword arguments ready for ``obj``.

    Raises:
        UsageError: an unknown or reserved argument, or a value of the wrong type.
    """
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return dict(args)
    params = signature.parameters
    takes_any = not named_only and any(p.kind is p.VAR_KEYWORD for p in params.values())
    known = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - set(reserved)
    hints = type_hints(obj)
    out: dict[str, Any] = {}
    for key, value in args.items():
        if key in reserved:
            raise UsageError(f"{what}: argument {key} is set by fedpersona itself")
        if key not in known and not takes_any:
            raise UsageError(f"{what}: no argument {key!r}; it takes {', '.join(sorted(known)) or 'none'}")
        annotation = hints.get(key)
        if annotation is None and key in params:
            default = params[key].default
            annotation = type(default) if default not in (params[key].empty, None) else params[key].annotation
        out[key] = coerce(value, annotation, f"{what} {key}")
    return out


@dataclass(frozen=True)
class LazyImport:
    """A registry entry imported on first use (``package.module:ATTR``): registering a library's method
    (Flower's strategies) does not import the library until a run names it."""

    path: str


class Registry(Generic[T]):
    """Named methods of one kind, open to plug-ins (see the module docstring).

    Args:
        kind: what the registry holds, for messages ("scheme", "loss", ...).
        setting: the setting or flag that names one (``--scheme``, ``loss``), for messages.
        check: validates (and may convert) what is registered or imported; raises ``TypeError`` or
            ``ValueError`` with the reason when an object is not of this kind.
    """

    def __init__(self, kind: str, setting: str, check: Callable[[Any], T] | None = None) -> None:
        self.kind = kind
        self.setting = setting
        self._check = check
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: Any = None, *, replace: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, a decorator.

        Args:
            name: the name users write (case kept; lookups are case-insensitive).
            obj: the method; omitted, ``register`` returns a decorator that registers what it decorates.
            replace: allow replacing an existing entry (else ``ValueError``).

        Returns:
            ``obj`` (or the decorator).

        Raises:
            ValueError: the name is taken, or not a plain name (no ``:`` or parentheses).
            TypeError: ``obj`` is not a method of this kind (the registry's check).
        """
        if obj is None:
            return lambda target: self.register(name, target, replace=replace)
        if not name or any(c in name for c in ":(), "):
            raise ValueError(f"{self.kind} name {name!r}: use a plain name (no ':', ',', spaces or parentheses)")
        if not replace and self._find(name) is not None:
            raise ValueError(f"{self.kind} {name!r} is registered already (replace=True to override it)")
        self._items[name] = obj if isinstance(obj, LazyImport) else self._checked(obj, name)
        return obj

    def _checked(self, obj: Any, where: str) -> T:
        if self._check is None:
            return obj
        try:
            return self._check(obj)
        except (TypeError, ValueError) as err:
            raise UsageError(f"{self.setting} {where}: not a {self.kind} ({err})") from None

    def _find(self, name: str) -> str | None:
        if name in self._items:
            return name
        folded = {n.lower(): n for n in self._items}
        return folded.get(name.lower())

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return self._find(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def get(self, text: str) -> tuple[T, dict[str, str]]:
        """Resolve a spec to ``(method, string arguments)``.

        Args:
            text: ``NAME``, ``package.module:ATTR`` or either with ``(key=value, ...)``.

        Returns:
            The registered or imported object (checked) and the spec's arguments (untyped).

        Raises:
            UsageError: an unknown name (with the known ones), an import that fails, or an object that is
                not of this kind.
        """
        spec = parse_spec(text, self.setting)
        if spec.is_import_path:
            return self._checked(import_object(spec.name, self.setting), spec.name), spec.args
        found = self._find(spec.name)
        if found is None:
            raise UsageError(f"{self.setting} {spec.name}: unknown {self.kind}; choose one of "
                             f"{', '.join(self._items)} or give package.module:NAME (a file of yours)")
        item = self._items[found]
        if isinstance(item, LazyImport):
            item = self._items[found] = self._checked(import_object(item.path, self.setting), found)
        return item, spec.args

    def canonical(self, text: str) -> str:
        """The spec with a registered name spelled as registered (``fedavg`` -> ``FedAvg``).

        Args:
            text: a spec, ``NAME`` or ``module:ATTR``, with or without arguments.

        Returns:
            The spec as registered (an import path or an unknown name: ``text``, stripped).
        """
        spec = parse_spec(text, self.setting)
        found = None if spec.is_import_path else self._find(spec.name)
        return str(Spec(found, spec.args)) if found else text.strip()
