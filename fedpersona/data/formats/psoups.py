"""P-SOUPS pairwise preference rows (Jang et al., "Personalized Soups", arXiv 2310.11564).

P-SOUPS labels GPT-4 comparisons of Tulu responses to Alpaca-GPT4 prompts under preference
combinations over three dimensions (expertise, informativeness, style; P1A/P1B, P2A/P2B, P3A/P3B), so
the "users" are preference profiles at opposite poles. Two published row layouts are read:

``{"uid": 3, "prompt": ..., "chosen": ..., "rejected": ...}``
    the processed pairwise release used by the personalization benchmarks (e.g. the ``psoups`` data
    of Dong et al., arXiv 2502.19158): ``uid`` is the preference-profile id (integer or string).
``{"user_id": 3, "user_input": ..., "completion_a": ..., "completion_b": ...}``
    the P-RLHF (arXiv 2402.05133) ``allcombo`` layout and the RLPHF reward-model training files:
    ``completion_a`` is the preferred completion (RLPHF's ``training_reward_model.py`` scores
    ``completion_a`` as the winner), ``completion_b`` the other.

Fields read: the user id (``uid`` or ``user_id``, or the field named by ``user_field``), the prompt /
chosen / rejected text of either layout, and an optional ``split`` ("train"/"test"). Everything else is
ignored. ``user_id`` of a pair = ``str(uid)``. Single-profile files (one RLPHF file per preference, no id
per row) can be loaded with ``user="P1A"``, which puts every row under that user.

Rows whose chosen and rejected text are identical or empty are skipped with one warning (data quirks);
structural problems raise UsageError naming the file and line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fedpersona.data.formats.rows import (
    Row,
    SkipLog,
    check_split,
    id_string,
    iter_rows,
    no_pairs_error,
    require_object,
    require_str,
    usable_text,
)
from fedpersona.data.schema import PreferencePair
from fedpersona.errors import UsageError

NAME = "psoups"
USER_FIELDS = ("uid", "user_id")
LAYOUTS = (("prompt", "chosen", "rejected"), ("user_input", "completion_a", "completion_b"))
HINT = "P-SOUPS rows need uid (or user_id) and prompt/chosen/rejected or user_input/completion_a/completion_b"


def _user_of(obj: dict, row: Row, user_field: str | None, user: str | None) -> str:
    if user is not None:
        return user
    keys = (user_field,) if user_field else USER_FIELDS
    for key in keys:
        if key in obj:
            return id_string(obj[key], key, row.where)
    raise UsageError(
        f"{row.where}: missing field '{keys[0]}' ({HINT}; for a file of one preference profile pass user=NAME)"
    )


def _texts_of(obj: dict, row: Row) -> tuple[str, str, str]:
    for layout in LAYOUTS:
        if layout[0] in obj:
            prompt, chosen, rejected = (require_str(obj, key, row.where, HINT) for key in layout)
            return prompt, chosen, rejected
    raise UsageError(f"{row.where}: missing field 'prompt' ({HINT})")


def iter_psoups(
    path: str | Path, *, user_field: str | None = None, user: str | None = None, skipped: SkipLog | None = None
) -> Iterator[PreferencePair]:
    """Yield the pairs of a P-SOUPS file in file order (see the module docstring for the fields read)."""
    if user is not None and not user.strip():
        raise UsageError("option user must be a non-empty name")
    skipped = skipped if skipped is not None else SkipLog(str(path))
    for row in iter_rows(path):
        obj = require_object(row, HINT)
        user_id = _user_of(obj, row, user_field, user)
        prompt, chosen, rejected = _texts_of(obj, row)
        split = check_split(obj, row.where)
        if not (usable_text(prompt) and usable_text(chosen) and usable_text(rejected)):
            skipped.skip("rows with an empty prompt or response", row.where)
        elif chosen == rejected:
            skipped.skip("rows with identical chosen and rejected text", row.where)
        else:
            yield PreferencePair(user_id, prompt, chosen, rejected, split)


def load_psoups(path: str | Path, *, user_field: str | None = None, user: str | None = None) -> list[PreferencePair]:
    """All pairs of a P-SOUPS file; UsageError on a malformed row or when no pair is usable."""
    skipped = SkipLog(str(path))
    pairs = list(iter_psoups(path, user_field=user_field, user=user, skipped=skipped))
    skipped.report()
    if not pairs:
        raise no_pairs_error(path, NAME, skipped)
    return pairs
