"""Judges of generated text: did the personal model write at the user's pole, and is the text still text?

Why here and why so simple. Pairwise accuracy (the DPO implicit reward ranking a held-out pair) and what
a user reads part ways (reward accuracy correlates weakly with policy behaviour, arXiv 2512.23067;
likelihood displacement after DPO makes small models repeat themselves), so the generations of the
personal and global models are judged directly. The generated scenarios' poles were built to differ in
*measurable* properties of the text, so a judge per dimension reads that property off an answer; no
judge model is needed, and every verdict can be checked by hand:

* ``generated:styles`` (``fedpersona.data.style_prompts``): words for concise/detailed (an answer cut at
  the token limit counts as detailed: it had more to say), list structure for prose/list, informal
  markers (contractions, exclamation marks, slang) per 100 words for formal/casual;
* ``generated:stances`` (``fedpersona.data.stance_prompts``): caution markers (warnings, risks, "consult a
  professional") per 100 words for bold/cautious, money words minus time/effort words for
  convenient/frugal (a tie is undecided: half a case for either pole).

Thresholds sit between the poles' means on SmolLM2-135M-Instruct's own pole answers (the scenario's
construction, seed 0; ``pole_feature_means`` recomputes them). A user's poles come from its user id
(``user0007-detailed-casual-list``): a user without poles in its id (a real device's ``alice``) has no
judge, and only the degeneration measures apply.

Degeneration measures (any text): the share of a text's word 3-grams that repeat an earlier one (a loop
scores near 1; fluent text near 0), distinct-2 over a set of texts (Li et al. 2016, arXiv 1510.03055),
mean words, and the share of answers cut at the token limit.

Pure Python (``re``, ``statistics``): no torch, no Flower.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fedpersona.data import stance_prompts, style_prompts

# ---- surface features of the styles scenario (its construction validated them) -----------------------------
_LIST_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S", re.M)
_INLINE_NUMBERED = re.compile(r"(?:^|\s)1[.)]\s+\S.*?\s2[.)]\s+\S", re.S)  # "1. Eat well. 2. Sleep." on one line
_INFORMAL = re.compile(
    r"!|\b\w+n't\b|\b\w+'(?:s|re|ll|ve|d|m)\b|'em\b|\b(?:gonna|wanna|yeah|yep|nope|hey|lol|awesome|cool|stuff|"
    r"super|kinda|totally|buddy|dude|honestly|chill|guys?|oh|wow|tons?|epic|okay|ok)\b", re.I)
_CAUTION = re.compile(
    r"\b(?:careful(?:ly)?|caution(?:s|ary)?|cautious|warn(?:s|ing|ings)?|safe(?:ly|ty)?|risks?|risky|dangers?|"
    r"dangerous|hazard(?:s|ous)?|avoid(?:s|ing)?|never|toxic|harm(?:ful)?|injur(?:y|ies|e|ed)|burns?|protect(?:ive)?|"
    r"gloves|consult|professional(?:s)?|doctor|emergency|mistakes?|beware|precautions?)\b", re.I)
_MONEY = re.compile(
    r"\$|\b(?:money|cheap(?:er|est|ly)?|costs?|prices?|budget(?:s|ing)?|free|afford(?:able)?|spend(?:ing)?|"
    r"savings?|discounts?|deals?|coupons?|inexpensive|dollars?|second-hand|secondhand|thrift|sales?|reuse|"
    r"bargains?|frugal)\b", re.I)
_EFFORT = re.compile(
    r"\b(?:time|quick(?:er|est|ly)?|fast(?:er|est)?|minutes?|hours?|easy|easier|easiest|easily|effort(?:less)?|"
    r"convenien(?:t|ce)|busy|deliver(?:y|ed)?|services?|automatic(?:ally)?|ready-made|pre-made|instant(?:ly)?|"
    r"hire|shortcuts?|low-effort|hassle)\b", re.I)
_WORD = re.compile(r"\w+(?:'\w+)*")


def _per_100_words(pattern: re.Pattern[str], text: str) -> float:
    return 100.0 * len(pattern.findall(text)) / max(len(text.split()), 1)


def answer_features(text: str) -> dict[str, float]:
    """Surface features of one answer (the styles scenario's construction measures these).

    Args:
        text: the answer.

    Returns:
        ``words`` (white-space separated), ``is_list`` (1.0 when two or more lines start with a list marker
        or items are numbered inline, else 0.0) and ``informal`` (contractions, exclamation marks and slang
        per 100 words: a formality proxy).
    """
    words = len(text.split())
    is_list = len(_LIST_LINE.findall(text)) >= 2 or bool(_INLINE_NUMBERED.search(text))
    return {"words": float(words), "is_list": float(is_list), "informal": _per_100_words(_INFORMAL, text)}


def content_features(text: str) -> dict[str, float]:
    """What the stances scenario's poles say, as rates per 100 words.

    Args:
        text: the answer.

    Returns:
        ``caution`` (warnings, risks, "consult a professional"), ``money`` (cost and saving words),
        ``effort`` (time and effort words) and ``money_minus_effort``.
    """
    money, effort = _per_100_words(_MONEY, text), _per_100_words(_EFFORT, text)
    return {"caution": _per_100_words(_CAUTION, text), "money": money, "effort": effort,
            "money_minus_effort": money - effort}


# ---- pole judges ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoleJudge:
    """Reads one dimension's pole off a text: ``high`` when ``measure(text)`` is above ``threshold``, ``low``
    below it; exactly at it, undecided (None) when ``tie_undecided``, else ``high``.

    Attributes:
        dimension: the dimension's name (``length``, ``tone``, ``format``, ``risk``, ``priority``).
        low, high: its two poles.
        feature: what ``measure`` returns, readable (for reports).
        measure: text -> float.
        threshold: the boundary between the poles.
        cut_is_high: an answer cut at the token limit is ``high`` whatever it measures (length: it had more
            to say).
        tie_undecided: a text exactly at the threshold is undecided (counted half for either pole).
    """

    dimension: str
    low: str
    high: str
    feature: str
    measure: Callable[[str], float]
    threshold: float
    cut_is_high: bool = False
    tie_undecided: bool = False

    def pole(self, text: str, cut: bool = False) -> str | None:
        """The pole ``text`` lands at (None: undecided).

        Args:
            text: the generated answer.
            cut: it stopped at the token limit, not at the end-of-sequence token.

        Returns:
            ``self.low``, ``self.high`` or None.
        """
        if cut and self.cut_is_high:
            return self.high
        value = self.measure(text)
        if value == self.threshold and self.tie_undecided:
            return None
        return self.high if value >= self.threshold else self.low

    def at_pole(self, text: str, pole: str, cut: bool = False) -> float:
        """1.0 when ``text`` lands at ``pole``, 0.5 when undecided, else 0.0."""
        if pole not in (self.low, self.high):
            raise ValueError(f"pole {pole!r} is not one of {self.dimension}'s ({self.low}, {self.high})")
        verdict = self.pole(text, cut)
        return 0.5 if verdict is None else float(verdict == pole)


# Thresholds: between the pole means of SmolLM2-135M-Instruct's pole answers (generated:styles seed 0:
# concise 26.6 vs detailed 89.2 words, informal 1.9 vs 10.3 per 100 words; lists 78% vs 0%). The length
# boundary is the poles' geometric mean (48.7 words), the tone boundary likewise (4.4).
JUDGES: dict[str, PoleJudge] = {j.dimension: j for j in (
    PoleJudge("length", "concise", "detailed", "words", lambda t: answer_features(t)["words"], 48.7,
              cut_is_high=True),
    PoleJudge("tone", "formal", "casual", "informal markers per 100 words",
              lambda t: answer_features(t)["informal"], 4.4),
    PoleJudge("format", "prose", "list", "list structure", lambda t: answer_features(t)["is_list"], 0.5),
    PoleJudge("risk", "bold", "cautious", "caution markers per 100 words",
              lambda t: content_features(t)["caution"], 3.0),
    PoleJudge("priority", "convenient", "frugal", "money minus effort words per 100 words",
              lambda t: content_features(t)["money_minus_effort"], 0.0, tie_undecided=True),
)}
POLE_JUDGES: dict[str, PoleJudge] = {pole: j for j in JUDGES.values() for pole in (j.low, j.high)}
SCENARIO_DATA = {"styles": style_prompts, "stances": stance_prompts}  # the generated scenarios' data modules

for _data in SCENARIO_DATA.values():  # every pole of a generated scenario has a judge that knows it
    for _dim in _data.DIMENSIONS:
        if {p.name for p in _dim.poles} != {JUDGES[_dim.name].low, JUDGES[_dim.name].high}:
            raise RuntimeError(f"judge of {_dim.name} does not match the scenario's poles")


def user_poles(user_id: str) -> dict[str, str]:
    """The poles a user id names, by dimension: ``{"length": "detailed", "tone": "casual", ...}`` for
    ``user0007-detailed-casual-list``; ``{}`` for an id that names none (no judge applies).

    Args:
        user_id: the user's id as its pairs carry it.

    Returns:
        dimension -> pole, for every pole named (a dimension named twice keeps its first pole).
    """
    poles: dict[str, str] = {}
    for word in re.findall(r"[a-z]+", user_id.lower()):
        judge = POLE_JUDGES.get(word)
        if judge is not None:
            poles.setdefault(judge.dimension, word)
    return poles


def pole_shares(texts: Sequence[str], cuts: Sequence[bool], poles: Mapping[str, str]) -> dict[str, float]:
    """Per dimension, the share of ``texts`` at the user's pole (undecided counts half).

    Args:
        texts: one user's generated answers (one per held-out prompt).
        cuts: whether each stopped at the token limit.
        poles: dimension -> the user's pole (``user_poles``).

    Returns:
        dimension -> share in [0, 1] (NaN without texts).
    """
    out = {}
    for dim, pole in poles.items():
        judge = JUDGES[dim]
        scores = [judge.at_pole(t, pole, c) for t, c in zip(texts, cuts, strict=True)]
        out[dim] = statistics.fmean(scores) if scores else math.nan
    return out


def judged_win_rate(personal: Sequence[str], global_: Sequence[str], personal_cuts: Sequence[bool],
                    global_cuts: Sequence[bool], poles: Mapping[str, str]) -> float:
    """Win rate of the personal over the global answers by the judges: per prompt each answer scores the
    share of the user's dimensions it lands at; the personal answer wins when it scores higher, a tie
    counts half (as ``fedpersona.round.evaluate.win_rate`` with a hidden utility).

    Args:
        personal, global_: the two models' answers to the same prompts, in the same order.
        personal_cuts, global_cuts: whether each answer stopped at the token limit.
        poles: dimension -> the user's pole.

    Returns:
        The win rate in [0, 1] (NaN without prompts or poles).
    """
    if not personal or not poles:
        return math.nan

    def score(text: str, cut: bool) -> float:
        return statistics.fmean(JUDGES[d].at_pole(text, p, cut) for d, p in poles.items())

    wins = 0.0
    for p, g, pc, gc in zip(personal, global_, personal_cuts, global_cuts, strict=True):
        a, b = score(p, pc), score(g, gc)
        wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / len(personal)


# ---- degeneration --------------------------------------------------------------------------------------------
def word_tokens(text: str) -> list[str]:
    """Lower-cased words (apostrophes kept inside a word), the unit of the n-gram measures."""
    return [w.lower() for w in _WORD.findall(text)]


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that repeat an earlier one: 0 for text without repeats, near 1 for a
    loop ("habit habit habit ..."). A text shorter than ``n`` words scores 0.

    Args:
        text: one generated answer.
        n: the n-gram order.

    Returns:
        ``1 - distinct / total`` over the text's n-grams, in [0, 1).
    """
    grams = _ngrams(word_tokens(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n of a set of texts (Li et al. 2016, arXiv 1510.03055): distinct word n-grams over all
    n-grams, pooled over the texts (low: the texts say the same things over and over).

    Returns:
        A share in [0, 1]; NaN when the texts hold no n-gram.
    """
    grams = [g for text in texts for g in _ngrams(word_tokens(text), n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def degeneration(texts: Sequence[str], cuts: Sequence[bool]) -> dict[str, float]:
    """Degeneration measures of one model's answers.

    Args:
        texts: the answers.
        cuts: whether each stopped at the token limit.

    Returns:
        ``rep3`` (mean repeated-3-gram share per answer), ``distinct2`` (pooled), ``words`` (mean per
        answer) and ``cut`` (share cut at the token limit); NaN without texts.
    """
    if not texts:
        return {"rep3": math.nan, "distinct2": math.nan, "words": math.nan, "cut": math.nan}
    return {"rep3": statistics.fmean(repeated_ngram_share(t, 3) for t in texts),
            "distinct2": distinct_n(texts, 2),
            "words": statistics.fmean(len(t.split()) for t in texts),
            "cut": statistics.fmean(float(c) for c in cuts)}


def pole_feature_means(rows: Sequence[Mapping[str, object]]) -> dict[str, dict[str, float]]:
    """Per pole of a generated scenario's answers (rows with ``pole`` and ``answer``, as the answers cache
    holds them): the mean of its judge's measure and the share its judge places at that pole. How far
    apart the poles are is what bounds any personal model's pole share.

    Returns:
        pole -> ``{"measure": mean, "at_pole": share, "answers": count}``.
    """
    out: dict[str, dict[str, float]] = {}
    for pole, judge in POLE_JUDGES.items():
        texts = [str(r["answer"]) for r in rows if r.get("pole") == pole]
        cuts = [not bool(r.get("finished", True)) for r in rows if r.get("pole") == pole]
        if texts:
            out[pole] = {"measure": statistics.fmean(judge.measure(t) for t in texts),
                         "at_pole": statistics.fmean(judge.at_pole(t, pole, c) for t, c in zip(texts, cuts)),
                         "answers": float(len(texts))}
    return out
