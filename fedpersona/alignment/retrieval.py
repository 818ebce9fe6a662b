"""Personalization without training: the user's own chosen answers to similar prompts, put in the prompt.

What a user with no training budget (no rounds, no DP budget, no compute) can still have: the device's
preference memory holds the answers the user picked; for a new prompt, the most similar earlier prompts
and the answers chosen for them are placed before it as earlier turns of the conversation, and the model
(base, or the global model a federation hands out) answers in their manner. This is retrieval-augmented
in-context personalization, the baseline trained personalization must beat (LaMP, Salemi et al. 2023,
arXiv 2304.11406, retrieves a user's profile items into the prompt the same way).

The examples are HH-RLHF turns (``Human: ...\\n\\nAssistant: ...``), which ``PromptFormat`` renders through
the model's chat template as alternating user/assistant messages (the plain format of the embedded model
keeps them as text). Similarity is TF-IDF cosine over content words of the prompts (no model needed, a
few microseconds per pair).

Pure Python: no torch.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from fedpersona.data.schema import PreferencePair

MEMORY_SHOTS = 3  # examples put in the prompt (each ~100 tokens of SmolLM2 text): few enough for a short context
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_STOP = frozenset("a an and are as at be but by can do does for from had has have how i if in is it its me my "
                  "of on or should so that the their them then there these they this to up was we what when "
                  "where which who why will with would you your".split())


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def _vector(terms: list[str], idf: dict[str, float]) -> dict[str, float]:
    counts = Counter(terms)
    vec = {t: c * idf.get(t, 0.0) for t, c in counts.items()}
    norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
    return {t: v / norm for t, v in vec.items()}


def retrieve(pairs: Sequence[PreferencePair], prompt: str, k: int = MEMORY_SHOTS) -> list[PreferencePair]:
    """The ``k`` stored pairs whose prompts are most like ``prompt``: one pair for each of the ``k`` most
    similar distinct prompts (TF-IDF cosine; ties keep memory order). A prompt stored with several pairs
    (one per preference dimension, say) gives its j-th pair to the j-th place it fills, so the examples
    show different choices of the user.

    Args:
        pairs: the user's stored pairs (its training split: what the device remembers).
        prompt: the new prompt.
        k: how many examples.

    Returns:
        At most ``k`` pairs, most similar first; none with the new prompt's exact text.
    """
    by_prompt: dict[str, list[PreferencePair]] = {}
    for pair in pairs:
        if pair.prompt.strip() != prompt.strip():
            by_prompt.setdefault(pair.prompt, []).append(pair)
    if not by_prompt or k < 1:
        return []
    docs = {p: _terms(p) for p in by_prompt}
    df = Counter(t for terms in docs.values() for t in set(terms))
    idf = {t: math.log((1 + len(docs)) / (1 + n)) + 1.0 for t, n in df.items()}
    query = _vector(_terms(prompt), idf)
    scored = [(sum(query.get(t, 0.0) * v for t, v in _vector(terms, idf).items()), order, p)
              for order, (p, terms) in enumerate(docs.items())]
    scored.sort(key=lambda item: (-item[0], item[1]))
    picked = []
    for place, (_, _, p) in enumerate(scored[:k]):
        options = by_prompt[p]
        picked.append(options[place % len(options)])
    return picked


def memory_prompt(prompt: str, examples: Sequence[PreferencePair]) -> str:
    """``prompt`` preceded by the examples as earlier turns: ``Human: <their prompt>\\n\\nAssistant: <the
    answer the user chose>`` each, then ``Human: <prompt>`` (the prompt alone when there are none).

    Args:
        prompt: the new prompt (one user message).
        examples: pairs from ``retrieve``.

    Returns:
        The prompt text in HH-RLHF turns, which ``PromptFormat`` renders through the chat template.
    """
    if not examples:
        return prompt
    turns = [f"Human: {_one_turn(e.prompt)}\n\nAssistant: {_one_turn(e.chosen)}" for e in examples]
    return "\n\n".join([*turns, f"Human: {_one_turn(prompt)}"])


def _one_turn(text: str) -> str:
    # a blank line followed by "Human:"/"Assistant:" inside a text would open a turn of its own
    return re.sub(r"\n\s*\n(?=[ \t]*(?:Human|Assistant):)", "\n", text.strip())


def memory_prompts(pairs: Sequence[PreferencePair], prompts: Sequence[str], k: int = MEMORY_SHOTS) -> list[str]:
    """``memory_prompt(p, retrieve(pairs, p, k))`` for every prompt."""
    return [memory_prompt(p, retrieve(pairs, p, k)) for p in prompts]
