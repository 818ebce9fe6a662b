"""Loaders for published preference-data formats, each mapping a local file to :class:`PreferencePair` s.

==============  ==========================================================  ==========================
name            what a row is                                               options
==============  ==========================================================  ==========================
pairs           this project's pair file: user_id, prompt,                  (none)
                chosen, rejected, optional split
personalllm     PersonalLLM (2409.20296): a prompt, response_1..8 and       num_users, alpha,
                reward-model scores; users are simulated                    pairs_per_user, seed,
                                                                            prompt_pool
psoups          P-SOUPS (2310.11564): uid + prompt/chosen/rejected          user_field, user
prism           PRISM (2404.16019): one conversation with rated responses   history_turns
hh-rlhf         Anthropic HH-RLHF: {"chosen": dialogue, "rejected": ...}    users, assign
==============  ==========================================================  ==========================

:func:`load_format` loads a file in a named format (or ``"auto"``: :func:`detect_format` sniffs the first
row). A format of your own: ``@fedpersona.register_data_format("name")`` on ``load(path, **options) ->
list[PreferencePair]``, or name it by import path (``--data mymod:load_mine:FILE``, ``--format mymod:load_mine``).
Wherever a pair file is accepted (``simulate --data``, ``feedback import``, ``data inspect``), a file in
another format is named ``FORMAT:PATH`` (``hh-rlhf:dialogues.jsonl``, ``'hh-rlhf(users=8):dialogues.jsonl'``). Files are read locally only (JSONL, a JSON array, or Parquet when pyarrow is installed); every
malformed input raises :class:`~fedpersona.errors.UsageError` with one line naming the file, the line (or
row) and the problem.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.data.formats.hh_rlhf import load_hh_rlhf
from fedpersona.data.formats.personal_llm import load_personal_llm
from fedpersona.data.formats.prism import load_prism
from fedpersona.data.formats.psoups import load_psoups
from fedpersona.data.formats.rows import first_row
from fedpersona.data.schema import PreferencePair, iter_pairs_jsonl
from fedpersona.errors import UsageError
from fedpersona.plugins import Registry, typed_arguments

AUTO = "auto"


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """This project's JSONL pair file, validated row by row.

    Args:
        path: a JSONL file, one object a line: ``user_id``, ``prompt``, ``chosen``, ``rejected``, optional
            ``split`` ("train" or "test").

    Returns:
        The pairs, in file order.

    Raises:
        UsageError: a missing file, a bad row (file, line and problem in one line) or no rows.
    """
    pairs = list(iter_pairs_jsonl(path))
    if not pairs:
        raise UsageError(f"{path}: the pair file has no rows")
    return pairs


@dataclass(frozen=True)
class Format:
    """One dataset format: its loader, a one-line summary and the options the loader takes.

    Args:
        name: the format's name (``--format NAME``, ``NAME:PATH``).
        summary: one line for ``fedpersona data inspect --help`` and the docs.
        load: ``load(path, **options) -> list[PreferencePair]``.
        options: the keyword options ``load`` takes (others are refused with one line).
    """

    name: str
    summary: str
    load: Callable[..., list[PreferencePair]]
    options: tuple[str, ...] = ()


def _check_format(obj: object) -> Format:
    if isinstance(obj, Format):
        return obj
    if callable(obj):  # a plain loader function: its keyword parameters are its options
        params = inspect.signature(obj).parameters
        options = tuple(n for n, p in list(params.items())[1:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        doc = (inspect.getdoc(obj) or "").strip().splitlines()
        return Format(getattr(obj, "__name__", "format"), doc[0] if doc else "", obj, options)
    raise TypeError(f"{obj!r} is neither a Format nor a loader function load(path, **options)")


FORMATS: Registry[Format] = Registry("data format", "--format", _check_format)


def register_data_format(name: str, load: Callable[..., list[PreferencePair]] | None = None, *, summary: str = "",
                         options: tuple[str, ...] | None = None, replace: bool = False) -> Any:
    """Register a dataset format (usable as ``--format NAME`` and ``--data NAME:PATH``); a decorator
    without ``load``.

    Args:
        name: the format's name.
        load: ``load(path, **options) -> list[PreferencePair]``; raise ``UsageError`` with file, row and
            problem for a bad row.
        summary: one line (default: the first line of ``load``'s docstring).
        options: the options ``load`` takes (default: its keyword parameters after ``path``).
        replace: replace an existing format of that name.

    Returns:
        ``load`` (or the decorator).

    Raises:
        ValueError: the name is taken.
    """
    if load is None:
        return lambda fn: register_data_format(name, fn, summary=summary, options=options, replace=replace)
    base = _check_format(load)
    FORMATS.register(name, Format(name, summary or base.summary, base.load,
                                  base.options if options is None else tuple(options)), replace=replace)
    return load


for _builtin in (
    Format("pairs", "fedpersona pair file: user_id, prompt, chosen, rejected[, split]", load_pairs),
    Format("personalllm", "PersonalLLM prompts x 8 scored responses; Dirichlet-simulated users",
           load_personal_llm, ("num_users", "alpha", "pairs_per_user", "seed", "prompt_pool")),
    Format("psoups", "P-SOUPS pairwise rows with a preference-profile uid", load_psoups, ("user_field", "user")),
    Format("prism", "PRISM conversations with rated responses per turn", load_prism, ("history_turns",)),
    Format("hh-rlhf", "Anthropic HH-RLHF chosen/rejected dialogues; users assigned by rule",
           load_hh_rlhf, ("users", "assign")),
):
    FORMATS.register(_builtin.name, _builtin)


def _looks_like_hh(obj: dict[str, Any]) -> bool:
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    return (isinstance(chosen, str) and isinstance(rejected, str)
            and "\n\nAssistant:" in chosen and "\n\nAssistant:" in rejected)


def sniff(obj: object) -> str | None:
    """The format a decoded first row belongs to, or None when no rule matches."""
    if not isinstance(obj, dict):
        return None
    keys = set(obj)
    if "conversation_history" in keys:
        return "prism"
    if {"prompt", "response_1", "response_2"} <= keys:
        return "personalllm"
    if {"user_id", "prompt", "chosen", "rejected"} <= keys and isinstance(obj["user_id"], str):
        return "pairs"
    if {"prompt", "chosen", "rejected"} <= keys and keys & {"uid", "user_id"}:
        return "psoups"
    if {"user_input", "completion_a", "completion_b"} <= keys:
        return "psoups"
    if {"chosen", "rejected"} <= keys and "prompt" not in keys and _looks_like_hh(obj):
        return "hh-rlhf"
    return None


def detect_format(path: str | Path) -> str:
    """The format name of a file, from its first row; UsageError when it fits none."""
    row = first_row(path)
    name = sniff(row.data)
    if name is None:
        keys = ", ".join(sorted(row.data)[:12]) if isinstance(row.data, dict) else type(row.data).__name__
        raise UsageError(
            f"{row.where}: cannot tell the dataset format from the first row (keys: {keys}); "
            f"pass --format, one of {', '.join(FORMATS)}"
        )
    return name


def load_format(path: str | Path, fmt: str | None = AUTO, **options: Any) -> list[PreferencePair]:
    """Load ``path`` in format ``fmt``.

    Args:
        path: the dataset file (read locally only).
        fmt: a registered format (``hh-rlhf``), ``package.module:NAME`` (a ``Format`` or a loader), either
            with ``(key=value, ...)`` options, or ``"auto"``/None to detect a built-in format from the first
            row.
        **options: more options for the loader; None values are ignored (a CLI can pass every flag).

    Returns:
        The pairs.

    Raises:
        UsageError: an unknown format, an option the format does not take, or a bad file/row.
    """
    name = detect_format(path) if fmt in (None, AUTO) else fmt
    found, spec_args = FORMATS.get(name)
    given = {**typed_arguments(found.load, spec_args, f"--format {name}"), **{k: v for k, v in options.items()
                                                                             if v is not None}}
    unknown = sorted(set(given) - set(found.options))
    if unknown:
        takes = ", ".join(found.options) if found.options else "no options"
        raise UsageError(f"option {', '.join(unknown)} does not apply to format {found.name!r} (it takes: {takes})")
    pairs = found.load(path, **given)
    if not isinstance(pairs, list) or not all(isinstance(p, PreferencePair) for p in pairs):
        raise UsageError(f"--format {name}: the loader must return a list of fedpersona PreferencePair")
    return pairs


__all__ = ["AUTO", "FORMATS", "Format", "detect_format", "load_format", "load_pairs", "register_data_format", "sniff"]
