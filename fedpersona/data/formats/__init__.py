"""Loaders for published preference-data formats, each mapping a local file to :class:`PreferencePair` s.

==============  ==========================================================  ==========================
name            what a row is                                               options
==============  ==========================================================  ==========================
pairs           this project's pair file (DESIGN.md): user_id, prompt,      (none)
                chosen, rejected, optional split
personalllm     PersonalLLM (2409.20296): a prompt, response_1..8 and       num_users, alpha,
                reward-model scores; users are simulated                    pairs_per_user, seed,
                                                                            prompt_pool
psoups          P-SOUPS (2310.11564): uid + prompt/chosen/rejected          user_field, user
prism           PRISM (2404.16019): one conversation with rated responses   history_turns
hh-rlhf         Anthropic HH-RLHF: {"chosen": dialogue, "rejected": ...}    users, assign
==============  ==========================================================  ==========================

:func:`load_format` loads a file in a named format (or ``"auto"``: :func:`detect_format` sniffs the first
row). Files are read locally only (JSONL, a JSON array, or Parquet when pyarrow is installed); every
malformed input raises :class:`~fedpersona.errors.UsageError` with one line naming the file, the line (or
row) and the problem.
"""

from __future__ import annotations

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

AUTO = "auto"


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """This project's JSONL pair file (the DESIGN.md contract), validated row by row."""
    pairs = list(iter_pairs_jsonl(path))
    if not pairs:
        raise UsageError(f"{path}: the pair file has no rows")
    return pairs


@dataclass(frozen=True)
class Format:
    """One supported dataset format: its loader, a one-line summary and the options the loader takes."""

    name: str
    summary: str
    load: Callable[..., list[PreferencePair]]
    options: tuple[str, ...] = ()


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("pairs", "fedpersona pair file: user_id, prompt, chosen, rejected[, split]", load_pairs),
        Format("personalllm", "PersonalLLM prompts x 8 scored responses; Dirichlet-simulated users",
               load_personal_llm, ("num_users", "alpha", "pairs_per_user", "seed", "prompt_pool")),
        Format("psoups", "P-SOUPS pairwise rows with a preference-profile uid", load_psoups, ("user_field", "user")),
        Format("prism", "PRISM conversations with rated responses per turn", load_prism, ("history_turns",)),
        Format("hh-rlhf", "Anthropic HH-RLHF chosen/rejected dialogues; users assigned by rule",
               load_hh_rlhf, ("users", "assign")),
    )
}


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
    """Load ``path`` in format ``fmt`` (a :data:`FORMATS` name, or ``"auto"``/None to detect it).

    ``options`` go to the format's loader; options set to None are ignored (so a CLI can pass every flag),
    any other option the format does not take is a UsageError.
    """
    name = detect_format(path) if fmt in (None, AUTO) else fmt
    if name not in FORMATS:
        raise UsageError(f"unknown dataset format {name!r}; choose one of {', '.join(FORMATS)} or {AUTO}")
    spec = FORMATS[name]
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(spec.options))
    if unknown:
        takes = ", ".join(spec.options) if spec.options else "no options"
        raise UsageError(f"option {', '.join(unknown)} does not apply to format {name!r} (it takes: {takes})")
    return spec.load(path, **given)


__all__ = ["AUTO", "FORMATS", "Format", "detect_format", "load_format", "load_pairs", "sniff"]
