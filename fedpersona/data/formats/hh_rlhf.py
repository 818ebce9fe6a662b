"""Anthropic HH-RLHF comparison rows (Bai et al., "Training a Helpful and Harmless Assistant with RLHF",
arXiv 2204.05862; the ``Anthropic/hh-rlhf`` release).

Each row is ``{"chosen": DIALOGUE, "rejected": DIALOGUE}``: two transcripts
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: <final reply>"`` that share every
turn but the final assistant reply. Fields read: ``chosen`` and ``rejected`` (strings); any other field is
ignored, and an optional ``split`` ("train"/"test") is kept.

Mapping:

* ``prompt`` = the chosen transcript up to (not including) its last ``"\\n\\nAssistant:"``, stripped,
  e.g. ``"Human: hi\\n\\nAssistant: hello\\n\\nHuman: how are you?"``. The final ``Assistant:`` cue is
  dropped because :func:`fedpersona.model.prompting.format_prompt` adds its own assistant cue.
* ``chosen`` / ``rejected`` = the text after the last ``"\\n\\nAssistant:"`` of each transcript, stripped.

Rows carry no annotator, so users are assigned by a deterministic rule over ``users`` users named
``hh-0 .. hh-(N-1)`` (zero-padded to equal width):

* ``assign="hash"`` (default): user = SHA-256 of the row's chosen + rejected transcripts, modulo N. A row
  gets the same user whatever the file order or subset, so a user's data is stable across runs.
* ``assign="round-robin"``: the k-th usable row (0-based, in file order) goes to user k mod N, which
  gives every user the same number of pairs (+/- 1).

These users are exchangeable (no real preference heterogeneity); HH-RLHF is a homogeneous control.

A row without ``"\\n\\nAssistant:"`` in a transcript raises UsageError. Rows whose two transcripts differ
before the final reply, whose final replies are identical, or whose prompt or a reply is empty (all
present in the public release) are skipped and counted in one warning.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedpersona.data.formats.rows import (
    SkipLog,
    check_split,
    iter_rows,
    no_pairs_error,
    require_object,
    require_str,
    usable_text,
)
from fedpersona.data.schema import PreferencePair
from fedpersona.errors import UsageError

NAME = "hh-rlhf"
ASSISTANT = "\n\nAssistant:"
HINT = 'HH-RLHF rows are {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}'
ASSIGN_RULES = ("hash", "round-robin")


def split_dialogue(text: str, key: str, where: str) -> tuple[str, str]:
    """(prompt, final reply) of one transcript: the parts before and after its last ``\\n\\nAssistant:``."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise UsageError(f"{where}: field '{key}' has no \"\\n\\nAssistant:\" turn ({HINT})")
    return text[:cut].strip(), text[cut + len(ASSISTANT):].strip()


def user_name(index: int, users: int) -> str:
    """The name of user ``index`` of ``users`` (``hh-07`` for index 7 of 12)."""
    return f"hh-{index:0{len(str(users - 1))}d}"


def hash_user(chosen: str, rejected: str, users: int) -> int:
    """The hash rule: a stable user index in [0, users) for one row's two transcripts."""
    digest = hashlib.sha256(f"{chosen}\x00{rejected}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % users


def load_hh_rlhf(path: str | Path, *, users: int = 10, assign: str = "hash") -> list[PreferencePair]:
    """All usable pairs of an HH-RLHF file, spread over ``users`` users by the ``assign`` rule."""
    if isinstance(users, bool) or not isinstance(users, int) or users < 1:
        raise UsageError(f"option users must be a positive integer, got {users!r}")
    if assign not in ASSIGN_RULES:
        raise UsageError(f"option assign must be one of {', '.join(ASSIGN_RULES)}, got {assign!r}")
    skipped = SkipLog(str(path))
    pairs: list[PreferencePair] = []
    for row in iter_rows(path):
        obj = require_object(row, HINT)
        chosen_text = require_str(obj, "chosen", row.where, HINT)
        rejected_text = require_str(obj, "rejected", row.where, HINT)
        split = check_split(obj, row.where)
        prompt, chosen = split_dialogue(chosen_text, "chosen", row.where)
        rejected_prompt, rejected = split_dialogue(rejected_text, "rejected", row.where)
        if rejected_prompt != prompt:
            skipped.skip("rows whose transcripts differ before the final reply", row.where)
        elif not (usable_text(prompt) and usable_text(chosen) and usable_text(rejected)):
            skipped.skip("rows with an empty prompt or reply", row.where)
        elif chosen == rejected:
            skipped.skip("rows with identical final replies", row.where)
        else:
            index = hash_user(chosen_text, rejected_text, users) if assign == "hash" else len(pairs) % users
            pairs.append(PreferencePair(user_name(index, users), prompt, chosen, rejected, split))
    skipped.report()
    if not pairs:
        raise no_pairs_error(path, NAME, skipped)
    return pairs
