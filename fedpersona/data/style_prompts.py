"""The small data of the ``generated:styles`` scenario: everyday prompts, style poles and personas.

The construction follows P-SOUPS (Jang et al. 2023, "Personalized Soups", arXiv 2310.11564): preference
dimensions with two opposite poles each, one answer written per pole by the same model, and personas
that pick one pole per dimension. Our dimensions are everyday ones a small instruct model can follow:

* ``length``: concise vs detailed;
* ``tone``: formal vs casual;
* ``format``: prose vs a bulleted list.

Persona ``i`` (0..7) takes, for dimension ``d``, the second pole when bit ``d`` of ``i`` is set, so
persona ``i`` and persona ``7 - i`` disagree on every dimension. User ``u`` of a population has persona
``u mod 8`` (``fedpersona.simulations.styles`` builds the pairs; generation needs a model, this module
only holds text).

All text here is original, written for this project (no dataset was copied). Each pole carries one
instruction sentence and one demonstration answer to a demo question that is not among the prompts: a
135M-parameter model follows a one-shot demonstration far better than an instruction alone (checked by
reading its outputs; the numbers are in ``fedpersona.simulations.styles``).

Pure data: no torch, transformers or Flower imports (docs/explanation/architecture.md: data/ imports none of them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pole:
    """One end of a style dimension: its name, the instruction the model gets, a demonstration answer."""

    name: str
    dimension: str
    instruction: str
    demo: str


@dataclass(frozen=True)
class Dimension:
    """A style dimension with its two opposite poles (``poles[0]`` is bit 0 of a persona index)."""

    name: str
    poles: tuple[Pole, Pole]


@dataclass(frozen=True)
class Persona:
    """A user type: one pole per dimension, in ``DIMENSIONS`` order."""

    index: int
    title: str  # readable
    poles: tuple[str, ...]

    @property
    def slug(self) -> str:
        """``"concise-formal-prose"`` and the like: the poles joined, safe in a user id."""
        return "-".join(self.poles)


# The demonstration question: answered once in every pole's style, never asked as a prompt.
DEMO_PROMPT = "How do I keep my houseplants alive?"

_LENGTH = Dimension("length", (
    Pole("concise", "length",
         "Answer in one or two short sentences. Be brief and skip any introduction.",
         "Water them only when the top of the soil feels dry, and keep them in bright, indirect light."),
    Pole("detailed", "length",
         "Give a thorough, detailed answer: explain the reasons, and add examples and practical tips.",
         "Most houseplants die from too much care rather than too little. Check the soil with a finger and "
         "water only when the top two centimetres are dry, because roots that sit in wet soil rot. Put the "
         "plant near a window with bright but indirect light, since direct afternoon sun can scorch the "
         "leaves. A pot with drainage holes lets extra water escape. In spring and summer, feed it a diluted "
         "fertiliser about once a month, and wipe dust off the leaves so they can take in light. If the "
         "leaves turn yellow and soft, you are probably watering too often."),
))
_TONE = Dimension("tone", (
    Pole("formal", "tone",
         "Write in a formal, impersonal register, as in an official manual: complete sentences, no "
         "contractions, no slang, no exclamation marks.",
         "Houseplants remain healthy when their basic requirements are met consistently. Water should be "
         "supplied only when the upper layer of soil is dry, and the plant should be positioned in bright, "
         "indirect light. It is also advisable to use a container with adequate drainage."),
    Pole("casual", "tone",
         "Reply like a friend texting back: relaxed and upbeat, with contractions, everyday slang and an "
         "exclamation mark or two, but still answer the question.",
         "Oh, it's way easier than you'd think! Just water 'em when the top of the soil feels dry, and keep "
         "'em somewhere bright but not in harsh sun. Honestly, drowning them is the #1 plant killer, so go "
         "easy on the watering can!"),
))
_FORMAT = Dimension("format", (
    Pole("prose", "format",
         "Write your answer as one or two flowing paragraphs of prose. Never use lists, bullet points, "
         "numbered steps or headings.",
         "Keeping houseplants alive mostly comes down to water and light. Let the top of the soil dry out "
         "before you water again, since soggy roots rot, and give the plant a spot with bright light that "
         "does not bake it in direct sun. A pot with drainage holes helps as well."),
    Pole("list", "format",
         "Format your whole answer as a bulleted list: every line starts with '- '. No introduction and no "
         "paragraphs.",
         "- Water only when the top of the soil is dry.\n- Keep the plant in bright, indirect light.\n"
         "- Use a pot with drainage holes.\n- Wipe the dust off the leaves now and then."),
))

DIMENSIONS: tuple[Dimension, ...] = (_LENGTH, _TONE, _FORMAT)
POLES: dict[str, Pole] = {pole.name: pole for dim in DIMENSIONS for pole in dim.poles}
OPPOSITE: dict[str, str] = {a.name: b.name for dim in DIMENSIONS for a, b in (dim.poles, dim.poles[::-1])}

_TITLES = (
    "busy executive",  # concise, formal, prose
    "scholar",  # detailed, formal, prose
    "texting friend",  # concise, casual, prose
    "storyteller",  # detailed, casual, prose
    "checklist manager",  # concise, formal, list
    "technical writer",  # detailed, formal, list
    "quick skimmer",  # concise, casual, list
    "enthusiastic coach",  # detailed, casual, list
)
PERSONAS: tuple[Persona, ...] = tuple(
    Persona(i, title, tuple(dim.poles[(i >> d) & 1].name for d, dim in enumerate(DIMENSIONS)))
    for i, title in enumerate(_TITLES)
)

# Everyday prompts, five per topic; in each topic the fifth is a held-out test prompt for every user
# (is_test_prompt), so evaluation is on prompts no user trained on.
PROMPTS: tuple[str, ...] = (
    # cooking
    "How do I cook rice on the stove?",
    "What is an easy dinner I can make in twenty minutes?",
    "How do I clean a cast iron pan?",
    "How should I store fresh herbs so they last longer?",
    "How do I make scrambled eggs fluffy?",
    # travel
    "What should I pack for a weekend trip to the mountains?",
    "How can I find cheap flights?",
    "How do I deal with jet lag after a long flight?",
    "What should I do if I lose my passport abroad?",
    "How do I plan a road trip with kids?",
    # health habits
    "How do I get better sleep?",
    "How can I drink more water during the day?",
    "How do I start running as a beginner?",
    "How can I relax after a stressful day at work?",
    "How do I build a habit of stretching every morning?",
    # money
    "How can I save money on groceries?",
    "How do I make a monthly budget?",
    "Should I pay off my debt or save money first?",
    "How do I build an emergency fund?",
    "How can I stop impulse buying online?",
    # study
    "How do I study for an exam in one week?",
    "How can I remember more of what I read?",
    "How do I stay focused while studying at home?",
    "How do I take good notes in a lecture?",
    "How can I learn a new language on my own?",
    # home
    "How do I get rid of mold in the bathroom?",
    "How do I unclog a kitchen sink?",
    "How can I keep my apartment tidy when I have little time?",
    "How do I make a small room look bigger?",
    "How can I lower my heating bill in winter?",
    # tech help
    "My laptop is running slowly. What can I do?",
    "How do I make a strong password that I can remember?",
    "How do I back up the photos on my phone?",
    "Why does my Wi-Fi keep dropping, and how do I fix it?",
    "How do I get fewer spam emails?",
    # work, people, pets, garden
    "How do I prepare for a job interview?",
    "How do I ask my boss politely for a deadline extension?",
    "How can I make friends in a new city?",
    "How do I look after a new puppy in its first week at home?",
    "How do I start a small vegetable garden on a balcony?",
)
TEST_EVERY = 5  # prompt i is a test prompt when i % TEST_EVERY == TEST_EVERY - 1


def is_test_prompt(index: int) -> bool:
    """Whether ``PROMPTS[index]`` is held out (a test prompt for every user)."""
    return index % TEST_EVERY == TEST_EVERY - 1


def persona_of(user: int) -> Persona:
    """User ``user``'s persona: ``PERSONAS[user % 8]``."""
    return PERSONAS[user % len(PERSONAS)]
