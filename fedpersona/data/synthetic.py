"""Synthetic heterogeneous users: a preference simulator with hidden per-user utilities.

Every response to a prompt is written in a *style* ``s`` with four dimensions in {-1, +1}:

=============  ===========================  ==============================
dimension      -1                           +1
=============  ===========================  ==============================
length         one short sentence           four sentences
formality      casual ("hey", "cheers")     formal ("certainly", "regards")
structure      prose ("also", "then")       a numbered list ("1 .", "2 .")
technical      plain words                  technical vocabulary
=============  ===========================  ==============================

and is either *helpful* (on topic) or *evasive*. A user's hidden utility is
``u(r) = w_user . s(r) + w_help * helpful(r)``: every user wants helpful answers (the part federation
can learn for everyone) and each user has their own taste over the styles (the part only a private head
can learn). ``w_user`` mixes persona prototypes with Dirichlet(alpha) weights: small alpha puts users at
their persona's pole, large alpha blends personas (the heterogeneity knob). Labels follow Bradley-Terry:
``P(a preferred to b) = sigmoid(rationality * (u(a) - u(b)))``. Pairs per user are log-normally skewed.

A user's data is a pure function of (seed, user index): 10,000 users cost no memory until asked for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedpersona.data.schema import PreferencePair, UserData

STYLE_DIMENSIONS = ("length", "formality", "structure", "technical")

TOPICS = (
    "sleep", "budget", "garden", "python", "running", "cooking", "travel", "reading", "music", "coffee",
    "taxes", "painting", "chess", "hiking", "email", "meetings", "networking", "baking", "cycling", "yoga",
    "saving", "writing", "photography", "camping", "interviews", "studying", "swimming", "recycling",
    "parenting", "gaming", "databases", "security", "backups", "spreadsheets", "podcasts", "languages",
)
PROMPT_TEMPLATES = (
    "how do i get better at {t} ?",
    "what should i know about {t} ?",
    "can you explain {t} to me ?",
    "give me advice on {t} .",
    "what is a good way to start with {t} ?",
    "why does {t} matter ?",
)
OPENINGS = {+1: ("certainly .", "good question ."), -1: ("hey !", "sure thing !")}
CLOSINGS = {+1: ("i hope this helps .", "kind regards ."), -1: ("cheers !", "have fun !")}
SIMPLE_TIPS = (
    "keep your {t} simple and easy .",
    "start small with {t} every day .",
    "ask a friend who likes {t} .",
    "take short breaks from {t} .",
    "write down what you like about {t} .",
    "make {t} a fun habit .",
)
TECHNICAL_TIPS = (
    "measure your {t} metrics and track the variance .",
    "optimize the {t} workflow with a systematic baseline .",
    "benchmark each {t} iteration against a quantitative protocol .",
    "calibrate the {t} parameters using empirical feedback loops .",
    "profile the {t} pipeline to remove the bottleneck .",
    "model the {t} constraints as a structured optimization .",
)
EVASIVE = ("i do not really know about {t} .", "{t} is hard to say anything about .", "maybe look it up somewhere .")
PROSE_JOINERS = ("also", "then", "and")


@dataclass(frozen=True)
class Scenario:
    """A population of users: persona prototypes, how users mix them, and how much data each has."""

    name: str
    personas: tuple[tuple[float, ...], ...]  # one weight vector over STYLE_DIMENSIONS per persona
    persona_shares: tuple[float, ...]  # how often each persona is a user's dominant one
    dirichlet_alpha: float = 0.1  # heterogeneity knob: small = users at their persona's pole
    helpfulness_weight: float = 1.5  # the preference every user shares
    rationality: float = 4.0  # Bradley-Terry inverse temperature (label noise)
    min_train_pairs: int = 8
    median_train_pairs: int = 32
    max_train_pairs: int = 160
    test_pairs: int = 24
    evasive_rate: float = 0.25  # chance that one side of a pair is evasive


_POLE = (1.0, 1.0, 1.0, 1.0)
_ANTI = tuple(-x for x in _POLE)

SCENARIOS: dict[str, Scenario] = {
    # Two personas at opposite poles of every style dimension: a single global model must sit near chance
    # on style-only pairs.
    "conflicting": Scenario("conflicting", personas=(_POLE, _ANTI), persona_shares=(0.5, 0.5)),
    # A majority and a minority at opposite poles: global models serve the majority, fail the minority.
    "majority-minority": Scenario("majority-minority", personas=(_POLE, _ANTI), persona_shares=(0.8, 0.2)),
    # Personas that mostly agree (they differ on one dimension only).
    "low-disagreement": Scenario(
        "low-disagreement", personas=((1.0, 1.0, 1.0, 1.0), (1.0, 1.0, 1.0, -1.0)), persona_shares=(0.5, 0.5)
    ),
    # Four personas on different axes, well mixed: a continuum of tastes.
    "mixed": Scenario(
        "mixed",
        personas=((1.0, 0.0, 1.0, 0.0), (-1.0, 0.0, -1.0, 0.0), (0.0, 1.0, 0.0, 1.0), (0.0, -1.0, 0.0, -1.0)),
        persona_shares=(0.25, 0.25, 0.25, 0.25),
        dirichlet_alpha=0.5,
    ),
}


@dataclass(frozen=True)
class Response:
    text: str
    style: tuple[int, int, int, int]
    helpful: bool


@dataclass(frozen=True)
class SyntheticUser:
    index: int
    user_id: str
    persona: int
    weights: tuple[float, ...]  # hidden utility weights over STYLE_DIMENSIONS
    num_train_pairs: int


def write_response(topic: str, style: tuple[int, ...], helpful: bool, rng: np.random.Generator) -> str:
    """Render a response to a prompt about ``topic`` in the given style."""
    length, formality, structure, technical = style
    if not helpful:
        sentences = [str(rng.choice(EVASIVE)).format(t=topic)]
    else:
        bank = TECHNICAL_TIPS if technical > 0 else SIMPLE_TIPS
        count = 4 if length > 0 else 1
        picks = rng.choice(len(bank), size=count, replace=False)
        sentences = [bank[i].format(t=topic) for i in picks]
    if structure > 0 and len(sentences) > 1:
        body = " ".join(f"{i} . {s}" for i, s in enumerate(sentences, start=1))
    else:
        body = sentences[0] + "".join(f" {rng.choice(PROSE_JOINERS)} {s}" for s in sentences[1:])
    return f"{rng.choice(OPENINGS[formality])} {body} {rng.choice(CLOSINGS[formality])}"


def utility(weights: tuple[float, ...], helpfulness_weight: float, response: Response) -> float:
    return float(np.dot(weights, response.style)) + helpfulness_weight * (1.0 if response.helpful else -1.0)


class PreferenceSimulator:
    """Deterministic, lazy population of synthetic users for one scenario and seed.

    A user's data is a pure function of (scenario, seed, user index): users cost nothing until asked for, and
    every process (server, simulation worker, ``fedpersona data synthetic``) makes the same pairs.

    Args:
        scenario: ``conflicting``, ``majority-minority``, ``low-disagreement``, ``mixed``, or a ``Scenario``.
        num_users: users in the population (indices ``0 .. num_users - 1``).
        seed: the population's seed.
    """

    def __init__(self, scenario: str | Scenario = "conflicting", num_users: int = 40, seed: int = 0) -> None:
        self.scenario = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
        self.num_users = num_users
        self.seed = seed

    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *stream])

    def user(self, index: int) -> SyntheticUser:
        """The hidden profile of user ``index`` (persona, utility weights, data quantity).

        Args:
            index: the user, ``0 <= index < num_users``.

        Returns:
            The user's ``SyntheticUser``.

        Raises:
            IndexError: ``index`` outside the population.
        """
        if not 0 <= index < self.num_users:
            raise IndexError(f"user index {index} outside 0..{self.num_users - 1}")
        sc = self.scenario
        rng = self._rng(1, index)
        persona = int(rng.choice(len(sc.personas), p=np.asarray(sc.persona_shares) / sum(sc.persona_shares)))
        mix = rng.dirichlet([sc.dirichlet_alpha] * len(sc.personas))
        # The user's own persona takes the largest share of the mix, so persona groups stay recognisable.
        top = int(np.argmax(mix))
        mix[[persona, top]] = mix[[top, persona]]
        weights = tuple(float(x) for x in mix @ np.asarray(sc.personas))
        sigma = math.log(sc.max_train_pairs / sc.median_train_pairs) / 2.0
        n = int(round(sc.median_train_pairs * math.exp(rng.normal(0.0, sigma))))
        n = max(sc.min_train_pairs, min(sc.max_train_pairs, n))
        return SyntheticUser(index, f"user-{index:05d}", persona, weights, n)

    def _response(self, topic: str, helpful: bool, rng: np.random.Generator) -> Response:
        style = tuple(int(x) for x in rng.choice((-1, 1), size=len(STYLE_DIMENSIONS)))
        # The utility reads the style as rendered: an evasive or one-sentence answer shows no list, length
        # or technical terms, whatever was drawn, and users can only prefer what they can see.
        return parse_response(write_response(topic, style, helpful, rng))

    def _pair(self, user: SyntheticUser, rng: np.random.Generator, split: str) -> PreferencePair:
        sc = self.scenario
        topic = str(rng.choice(TOPICS))
        prompt = str(rng.choice(PROMPT_TEMPLATES)).format(t=topic)
        evasive_side = int(rng.integers(2)) if rng.random() < sc.evasive_rate else -1
        # Draw until the two responses differ in the user's utility: a tie carries no preference.
        for _ in range(16):
            a = self._response(topic, evasive_side != 0, rng)
            b = self._response(topic, evasive_side != 1, rng)
            gap = utility(user.weights, sc.helpfulness_weight, a) - utility(user.weights, sc.helpfulness_weight, b)
            if abs(gap) > 0.25 and a.text != b.text:
                break
        prefer_a = rng.random() < 1.0 / (1.0 + math.exp(-sc.rationality * gap))
        chosen, rejected = (a, b) if prefer_a else (b, a)
        return PreferencePair(user.user_id, prompt, chosen.text, rejected.text, split)

    def user_data(self, index: int) -> UserData:
        """Generate user ``index``'s train and test pairs (the same every call).

        Args:
            index: the user, ``0 <= index < num_users``.

        Returns:
            The user's ``UserData``: 8 to 160 training pairs (log-normally skewed) and the scenario's test pairs.
        """
        user = self.user(index)
        rng = self._rng(2, index)
        train = [self._pair(user, rng, "train") for _ in range(user.num_train_pairs)]
        test = [self._pair(user, rng, "test") for _ in range(self.scenario.test_pairs)]
        return UserData(user.user_id, train, test)

    def utility_of(self, index: int, text: str) -> float:
        """The user's hidden utility of any text, from the style markers it contains (for generation checks)."""
        user = self.user(index)
        return utility(user.weights, self.scenario.helpfulness_weight, parse_response(text))

    @cached_property
    def corpus_sample(self) -> list[str]:
        """Prompt + response texts covering every style, for pre-training the embedded model."""
        rng = self._rng(3)
        texts = []
        for _ in range(4096):
            topic = str(rng.choice(TOPICS))
            prompt = str(rng.choice(PROMPT_TEMPLATES)).format(t=topic)
            texts.append((prompt, self._response(topic, rng.random() > 0.2, rng).text))
        return texts  # type: ignore[return-value]


def _tip_pattern(template: str) -> re.Pattern[str]:
    prefix, suffix = template.split("{t}")
    return re.compile(re.escape(prefix) + r"\w+" + re.escape(suffix))


_SIMPLE_PATTERNS = tuple(_tip_pattern(t) for t in SIMPLE_TIPS)
_TECHNICAL_PATTERNS = tuple(_tip_pattern(t) for t in TECHNICAL_TIPS)


def parse_response(text: str) -> Response:
    """Recover a response's style and helpfulness from its markers (the inverse of ``write_response``).

    Used to score free generations with a user's hidden utility; text with no tip counts as evasive.
    """
    simple = sum(len(p.findall(text)) for p in _SIMPLE_PATTERNS)
    technical = sum(len(p.findall(text)) for p in _TECHNICAL_PATTERNS)
    formal = sum(text.count(m) for m in (*OPENINGS[1], *CLOSINGS[1]))
    casual = sum(text.count(m) for m in (*OPENINGS[-1], *CLOSINGS[-1]))
    style = (
        1 if simple + technical >= 3 else -1,
        1 if formal > casual else -1,
        1 if re.search(r"\b1 \. .*\b2 \. ", text) else -1,
        1 if technical > simple else -1,
    )
    return Response(text, style, simple + technical > 0)  # type: ignore[arg-type]


def vocabulary() -> list[str]:
    """Every word the simulator can write, for building the embedded tokenizer."""
    words: set[str] = set()
    banks = (*PROMPT_TEMPLATES, *SIMPLE_TIPS, *TECHNICAL_TIPS, *EVASIVE, *PROSE_JOINERS,
             *OPENINGS[1], *OPENINGS[-1], *CLOSINGS[1], *CLOSINGS[-1])
    for text in banks:
        words.update(text.replace("{t}", " ").split())
    words.update(TOPICS)
    words.update(str(i) for i in range(10))
    return sorted(words)
