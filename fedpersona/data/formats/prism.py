"""PRISM conversations (Kirk et al., "The PRISM Alignment Dataset", arXiv 2404.16019; the
``HannahRoseKirk/prism-alignment`` release, file ``conversations.jsonl``).

1,500 participants each held a few live conversations with LLMs. In every turn the participant wrote a
message, several models answered (up to four in the opening turn, two later), the participant rated
each answer on a 1-100 scale and the highest-rated one (``if_chosen``) continued the conversation.

Fields read, per conversation row: ``user_id`` (participant id, string or integer) and
``conversation_history``, a list of entries with ``turn`` (integer), ``role`` (``"user"`` or
``"model"``) and ``content`` (string); model entries also need ``score`` (number or null) and
``if_chosen`` (boolean or null), and may have ``within_turn_id``. Other fields (``conversation_id``,
``model_name``, ``model_provider``, ``conversation_type``, ``open_feedback``, ...) are ignored.

Pairs, within each turn:

* chosen = the highest-scored response (among equal top scores, the ``if_chosen`` one, else the first
  listed); rejected = each response with a strictly lower score, so a turn with k answers of distinct
  scores gives k - 1 pairs. When any response of the turn has no score, chosen = the ``if_chosen``
  response and rejected = every other one.
* prompt = the user's message of that turn. From the second turn on it is preceded by the last
  ``history_turns`` earlier exchanges (user message + the response that continued the conversation), as
  ``"User: ...\\n\\nAssistant: ...\\n\\nUser: <this turn's message>"``; ``history_turns=0`` keeps only the
  message. The pair's user_id is the participant's ``user_id``.

Pairs with an empty or identical chosen/rejected text and turns without a user message are skipped and
counted in one warning; structural problems raise UsageError naming the file, line and entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.data.formats.rows import (
    Row,
    SkipLog,
    id_string,
    is_number,
    iter_rows,
    no_pairs_error,
    require_field,
    require_object,
    require_str,
    usable_text,
)
from fedpersona.data.schema import PreferencePair
from fedpersona.errors import UsageError

NAME = "prism"
HINT = "PRISM conversation rows need user_id and conversation_history"
ENTRY_HINT = "history entries need turn, role (user or model), content; model entries also score and if_chosen"


@dataclass(frozen=True)
class Response:
    """One model answer within a turn."""

    content: str
    score: float | None
    if_chosen: bool


def _entry(raw: Any, where: str) -> tuple[int, str, str, Response | None]:
    """(turn, role, content, response-or-None) of one history entry, validated."""
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(raw).__name__} ({ENTRY_HINT})")
    turn = require_field(raw, "turn", where, ENTRY_HINT)
    if isinstance(turn, bool) or not isinstance(turn, int):
        raise UsageError(f"{where}: field 'turn' must be an integer, got {type(turn).__name__}")
    role = require_str(raw, "role", where, ENTRY_HINT)
    if role not in ("user", "model"):
        raise UsageError(f"{where}: field 'role' must be \"user\" or \"model\", got {role!r}")
    content = require_str(raw, "content", where, ENTRY_HINT)
    if role == "user":
        return turn, role, content, None
    score = require_field(raw, "score", where, ENTRY_HINT)
    if score is not None and not is_number(score):
        raise UsageError(f"{where}: field 'score' must be a number or null, got {score!r}")
    chosen = require_field(raw, "if_chosen", where, ENTRY_HINT)
    if chosen is not None and not isinstance(chosen, bool):
        raise UsageError(f"{where}: field 'if_chosen' must be true, false or null, got {chosen!r}")
    return turn, role, content, Response(content, None if score is None else float(score), bool(chosen))


def rank_turn(responses: Sequence[Response]) -> tuple[Response | None, list[Response]]:
    """(chosen, rejected list) of one turn's responses by the rule in the module docstring."""
    if len(responses) < 2:
        return (responses[0] if responses else None), []
    if all(r.score is not None for r in responses):
        top = max(r.score for r in responses)  # type: ignore[type-var]
        tops = [r for r in responses if r.score == top]
        best = next((r for r in tops if r.if_chosen), tops[0])
        return best, [r for r in responses if r.score is not None and r.score < top]
    best = next((r for r in responses if r.if_chosen), None)
    if best is None:
        return None, []
    return best, [r for r in responses if r is not best]


def build_prompt(history: Sequence[tuple[str, str]], message: str) -> str:
    """The prompt of a turn: the earlier exchanges (already trimmed) then this turn's user message."""
    if not history:
        return message.strip()
    parts = [f"User: {user.strip()}\n\nAssistant: {reply.strip()}" for user, reply in history]
    return "\n\n".join([*parts, f"User: {message.strip()}"])


def _conversation_pairs(row: Row, history_turns: int, skipped: SkipLog) -> list[PreferencePair]:
    obj = require_object(row, HINT)
    user_id = id_string(require_field(obj, "user_id", row.where, HINT), "user_id", row.where)
    entries = require_field(obj, "conversation_history", row.where, HINT)
    if not isinstance(entries, list):
        raise UsageError(
            f"{row.where}: field 'conversation_history' must be a list of turns, got {type(entries).__name__}"
        )
    turns: dict[int, tuple[list[str], list[Response]]] = {}
    for index, raw in enumerate(entries):
        turn, role, content, response = _entry(raw, f"{row.where}: conversation_history[{index}]")
        messages, responses = turns.setdefault(turn, ([], []))
        if response is None:
            messages.append(content)
        else:
            responses.append(response)
    pairs: list[PreferencePair] = []
    history: list[tuple[str, str]] = []
    for turn in sorted(turns):
        messages, responses = turns[turn]
        message = "\n\n".join(m for m in messages if m.strip())
        best, rejected = rank_turn(responses)
        if not message:
            skipped.skip("turns without a user message", f"{row.where} turn {turn}")
            continue
        if best is not None:
            kept = history[-history_turns:] if history_turns > 0 else []
            prompt = build_prompt(kept, message)
            for other in rejected:
                if not (usable_text(best.content) and usable_text(other.content)):
                    skipped.skip("pairs with an empty response", f"{row.where} turn {turn}")
                elif best.content == other.content:
                    skipped.skip("pairs with identical responses", f"{row.where} turn {turn}")
                else:
                    pairs.append(PreferencePair(user_id, prompt, best.content, other.content))
            history.append((message, best.content))
    return pairs


def load_prism(path: str | Path, *, history_turns: int = 2) -> list[PreferencePair]:
    """All within-turn pairs of a PRISM ``conversations`` file, in file and turn order."""
    if isinstance(history_turns, bool) or not isinstance(history_turns, int) or history_turns < 0:
        raise UsageError(f"option history_turns must be an integer >= 0, got {history_turns!r}")
    skipped = SkipLog(str(path))
    pairs: list[PreferencePair] = []
    for row in iter_rows(path):
        pairs.extend(_conversation_pairs(row, history_turns, skipped))
    skipped.report()
    if not pairs:
        raise no_pairs_error(path, NAME, skipped)
    return pairs
