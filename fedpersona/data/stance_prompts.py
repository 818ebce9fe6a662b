"""The small data of the ``generated:stances`` scenario: poles that differ in what an answer says.

``generated:styles`` (``fedpersona.data.style_prompts``) varies how an answer looks (length, tone, lists);
a model can please those users by form alone. Here the two poles of a dimension give different *content*
to the same question, the way users of P-SOUPS (Jang et al. 2023, arXiv 2310.11564) differ in
"expertise" and "informativeness" and the stances of PRISM's participants (Kirk et al. 2024, arXiv
2404.16019) differ in what they want said:

* ``risk``: ``cautious`` (what can go wrong, warnings, when to get professional help) vs ``bold`` (the
  steps, stated with confidence, no caveats);
* ``priority``: ``frugal`` (the cheapest way, free alternatives, money saved) vs ``convenient`` (the
  quickest, least effortful way, even at a price).

Persona ``i`` (0..3) takes, for dimension ``d``, the second pole when bit ``d`` of ``i`` is set, so persona
``i`` and ``3 - i`` disagree on both dimensions; user ``u`` has persona ``u mod 4``. The prompts, the demo
question and the held-out split are ``style_prompts``' (everyday questions where safety and cost both
matter), so the two scenarios hold out the same prompts. The judges that read these poles off a text
(which considerations it mentions) are in ``fedpersona.alignment.judges``.

All text here is original, written for this project. Pure data: no torch, transformers or Flower imports.
"""

from __future__ import annotations

from fedpersona.data.style_prompts import POLES as _STYLE_POLES
from fedpersona.data.style_prompts import (
    DEMO_PROMPT,
    PROMPTS,
    TEST_EVERY,
    Dimension,
    Persona,
    Pole,
    is_test_prompt,
)

__all__ = ["DEMO_PROMPT", "DIMENSIONS", "OPPOSITE", "PERSONAS", "POLES", "PROMPTS", "TEST_EVERY",
           "is_test_prompt", "persona_of"]

_RISK = Dimension("risk", (
    Pole("cautious", "risk",
         "Put safety first: point out what could go wrong, give a clear warning, say which mistakes to avoid "
         "and when to ask a professional for help.",
         "Be careful with a few risks. Some common houseplants are toxic to cats, dogs and small children, so "
         "check before you buy and keep them out of reach. Avoid overwatering: soggy soil causes root rot and "
         "mould. Wear gloves when you handle fertiliser, and never use more than the label says, because it "
         "can burn the roots. If the leaves keep dying, ask an expert at a garden centre for advice."),
    Pole("bold", "risk",
         "Be direct and confident: give the practical steps straight away, with no warnings, no caveats and "
         "no safety advice.",
         "Water them when the top of the soil is dry, put them in a bright spot, and feed them once a month "
         "in summer. Move any plant that looks pale closer to the window, and repot it when the roots fill "
         "the pot. Do that and they will thrive."),
))
_PRIORITY = Dimension("priority", (
    Pole("frugal", "priority",
         "Focus on saving money: suggest the cheapest options, free alternatives and ways to cut costs, and "
         "say how much money they save.",
         "You do not need to spend much money. Get free cuttings from a friend's plants instead of buying "
         "new ones, reuse old jars and yogurt pots as cheap planters, and make your own compost from kitchen "
         "scraps instead of paying for fertiliser. Tap water costs next to nothing and works fine, so skip "
         "expensive plant sprays and save your budget."),
    Pole("convenient", "priority",
         "Focus on saving time and effort: suggest the quickest, easiest options that need the least work, "
         "even if they cost more.",
         "Pick low-effort plants such as snake plants or cacti that need water only every few weeks. "
         "Self-watering pots and slow-release fertiliser sticks do the work for you, so it takes about a "
         "minute a week. If you are busy, a plant delivery service brings healthy plants to your door and "
         "saves you the trip."),
))

DIMENSIONS: tuple[Dimension, ...] = (_RISK, _PRIORITY)
POLES: dict[str, Pole] = {pole.name: pole for dim in DIMENSIONS for pole in dim.poles}
OPPOSITE: dict[str, str] = {a.name: b.name for dim in DIMENSIONS for a, b in (dim.poles, dim.poles[::-1])}

_TITLES = (
    "careful saver",  # cautious, frugal
    "bold bargain hunter",  # bold, frugal
    "careful busy parent",  # cautious, convenient
    "decisive professional",  # bold, convenient
)
PERSONAS: tuple[Persona, ...] = tuple(
    Persona(i, title, tuple(dim.poles[(i >> d) & 1].name for d, dim in enumerate(DIMENSIONS)))
    for i, title in enumerate(_TITLES)
)


def persona_of(user: int) -> Persona:
    """User ``user``'s persona: ``PERSONAS[user % 4]``."""
    return PERSONAS[user % len(PERSONAS)]


# no pole name of styles is reused: a user id names its poles, and the judges read them from it
if set(POLES) & set(_STYLE_POLES):
    raise RuntimeError("stance and style poles must have different names")
