"""Pairs that carry no preference signal once encoded, and text the model cannot represent.

A pair trains nothing when its two sides become the same token ids: every DPO-family loss here depends on
the chosen and rejected log-probs only through their difference, so the pair's gradient is zero and its
held-out accuracy a tie (0.5). Two causes, counted apart:

* **truncation**: chosen and rejected differ only past what ``max-length`` keeps (the response keeps at
  most ``max_length - 1`` tokens, or about half in chat format when the prompt is long). A larger
  max-length keeps them apart; :attr:`SignalReport.max_length_needed` is the smallest one that keeps
  every checked pair apart.
* **same ids**: the tokenizer does not tell the two texts apart at any length: they differ only in white
  space, or in characters it maps to the same ids (a word-level vocabulary's ``<unk>``: an emoji for
  another, CJK, Hebrew, words it never saw).

The unknown-token share (``<unk>`` ids among the tokens the model sees, special tokens aside) says how
much of the text a model cannot read at all; past :data:`UNKNOWN_WARN_SHARE` the warning names a model
with a byte-level tokenizer that reads any text.

The encoding is the training encoding (``alignment.batching.encode_pairs``: ``PromptFormat.prompt_ids``
with ``max_tokens`` and ``PromptFormat.encode``). The check reads at most :data:`SAMPLE_PAIRS` pairs,
chosen by a seeded reservoir, so it costs about a second even for a large data set. Such pairs stay in
training (their gradient is zero; under DP they count toward the sample rate the ledger planned with):
the reports say how many there are and which setting keeps them, they change no data.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fedpersona.data.schema import PreferencePair

SAMPLE_PAIRS = 1000  # pairs a check reads at most (a seeded reservoir sample of the rest)
UNKNOWN_WARN_SHARE = 0.05  # warn when more than this share of the tokens is <unk>
READABLE_MODEL = "smollm2-135m-instruct"  # byte-level BPE: reads emoji, any script, any word
DEFAULT_MAX_LENGTH = 96  # RunConfig.max_length's default (a test keeps them equal)
_SEARCH_TOKENS = 4096  # response tokens compared to find where two sides differ


@dataclass(frozen=True)
class SignalReport:
    """What a check found among ``checked`` pairs (a sample of ``total`` when ``checked < total``)."""

    model: str
    max_length: int
    total: int
    checked: int
    truncated: int = 0  # identical ids at max_length, apart at a larger one
    same_ids: int = 0  # identical ids at any length
    whitespace: int = 0  # of same_ids: the two texts differ only in white space
    max_length_needed: int | None = None  # smallest max-length keeping every checked truncated pair apart
    tokens: int = 0  # tokens the model sees (both sides, after truncation, special tokens aside)
    unknown_tokens: int | None = None  # of them <unk>; None when the tokenizer has no unknown token of its own

    @property
    def identical(self) -> int:
        return self.truncated + self.same_ids

    @property
    def unknown_share(self) -> float | None:
        if self.unknown_tokens is None or not self.tokens:
            return None
        return self.unknown_tokens / self.tokens

    def to_json(self) -> dict[str, Any]:
        share = self.unknown_share
        return {
            "model": self.model,
            "max_length": self.max_length,
            "pairs_total": self.total,
            "pairs_checked": self.checked,
            "identical_after_truncation": self.truncated,
            "identical_ids": self.same_ids,
            "identical_whitespace": self.whitespace,
            "max_length_needed": self.max_length_needed,
            "tokens": self.tokens,
            "unknown_tokens": self.unknown_tokens,
            "unknown_share": None if share is None else round(share, 4),
        }

    def summary_keys(self) -> dict[str, Any]:
        """The flat ``signal_*`` keys of a run's summary.json."""
        share = self.unknown_share
        return {
            "signal_pairs_checked": self.checked,
            "signal_identical_after_truncation": self.truncated,
            "signal_identical_ids": self.same_ids,
            "signal_max_length_needed": self.max_length_needed,
            "signal_unknown_token_share": None if share is None else round(share, 4),
        }

    def _of(self) -> str:
        return f"{self.checked} pairs" + (f" (a sample of {self.total})" if self.checked < self.total else "")

    def warnings(self, setting: str = "--set max-length={n}") -> list[str]:
        """At most three one-line warnings (no prefix). ``setting``: how the reader sets max-length, with
        ``{n}`` for the value (``"--set max-length={n}"`` for simulate)."""
        lines = []
        if self.truncated:
            keep = (f"{setting.format(n=self.max_length_needed)} keeps them apart" if self.max_length_needed
                    else "a larger max-length keeps them apart")
            lines.append(f"{self.truncated} of {self._of()} become the same token sequence at max-length "
                         f"{self.max_length}: chosen and rejected differ only past the tokens it keeps, so they "
                         f"carry no preference signal; {keep}")
        if self.same_ids:
            other = self.same_ids - self.whitespace
            fix = (f"a model whose tokenizer reads that text tells them apart, e.g. --model {READABLE_MODEL}"
                   if other and self.model != READABLE_MODEL else "edit or drop them")
            lines.append(f"{self.same_ids} of {self._of()} encode chosen and rejected to the same token ids with "
                         f"model {self.model} ({self.whitespace} differ only in white space, {other} only in text "
                         f"the tokenizer cannot tell apart, such as <unk>): they carry no preference signal; {fix}")
        share = self.unknown_share
        if share is not None and share > UNKNOWN_WARN_SHARE:
            use = (f"use a model that can, e.g. --model {READABLE_MODEL}" if self.model != READABLE_MODEL
                   else "use a model whose tokenizer covers it")
            lines.append(f"{share:.1%} of the tokens are unknown (<unk>) to model {self.model}: it cannot read this "
                         f"text (emoji, other scripts, words outside its vocabulary); {use}")
        return lines


class Reservoir:
    """A seeded reservoir sample of at most ``limit`` pairs from a stream seen once (``add`` each), kept in
    stream order: the same pairs for the same stream."""

    def __init__(self, limit: int = SAMPLE_PAIRS, seed: int = 0) -> None:
        self.limit, self.total = limit, 0
        self._rng = random.Random(seed)
        self._kept: list[tuple[int, PreferencePair]] = []

    def add(self, pair: PreferencePair) -> None:
        index, self.total = self.total, self.total + 1
        if len(self._kept) < self.limit:
            self._kept.append((index, pair))
        else:
            slot = self._rng.randrange(self.total)
            if slot < self.limit:
                self._kept[slot] = (index, pair)

    @property
    def pairs(self) -> list[PreferencePair]:
        return [pair for _, pair in sorted(self._kept, key=lambda item: item[0])]


def sample_pairs(pairs: Iterable[PreferencePair], limit: int = SAMPLE_PAIRS,
                 seed: int = 0) -> tuple[list[PreferencePair], int]:
    """``(at most limit pairs, how many there were)``: all of them, or a :class:`Reservoir` sample."""
    reservoir = Reservoir(limit, seed)
    for pair in pairs:
        reservoir.add(pair)
    return reservoir.pairs, reservoir.total


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


Side = tuple[list[int], int]  # (ids, prompt length), as EncodedPair holds each side


def _encode(prompt_format, pair: PreferencePair, max_length: int) -> tuple[Side, Side]:
    """Both sides exactly as ``alignment.batching.encode_pairs`` encodes them."""
    prompt_ids = prompt_format.prompt_ids(pair.prompt, max_tokens=max_length)
    return (prompt_format.encode(pair.prompt, pair.chosen, max_length, prompt_ids),
            prompt_format.encode(pair.prompt, pair.rejected, max_length, prompt_ids))


def _apart_at(prompt_format, pair: PreferencePair, max_length: int) -> bool:
    chosen, rejected = _encode(prompt_format, pair, max_length)
    return chosen != rejected


def _needed_length(prompt_format, pair: PreferencePair, differ_at: int, max_length: int) -> int | None:
    """The smallest max-length (> ``max_length``) at which the pair's sides differ. ``differ_at``: the
    first response token where they differ. Guessed from ``PromptFormat.encode``'s rule (the response
    keeps ``L - 1`` tokens in plain format, ``L - min(prompt, L // 2)`` in chat format) and checked with
    the encoder itself; if the guess fails (a changed rule), the whole prompt plus the response up to the
    difference, which keeps them apart under either rule."""
    def prompt_length() -> int:
        return len(prompt_format.prompt_ids(pair.prompt, max_tokens=max(_SEARCH_TOKENS, max_length)))

    if prompt_format.chat:
        prompt = prompt_length()  # a chat prompt is kept whole up to encode's cut: its full length counts
        guess = 2 * differ_at + 1 if differ_at <= prompt else prompt + differ_at + 1
    else:
        guess = differ_at + 2
    guess = max(guess, max_length + 1)
    if _apart_at(prompt_format, pair, guess):
        return guess
    fallback = max(prompt_length() + differ_at + 1, guess + 1)
    return fallback if _apart_at(prompt_format, pair, fallback) else None


def _is_whitespace_only(pair: PreferencePair) -> bool:
    return pair.chosen.split() == pair.rejected.split()


def check_pairs(prompt_format, pairs: Sequence[PreferencePair], max_length: int, *, model: str,
                total: int | None = None) -> SignalReport:
    """Count ``pairs`` (all of them: sample first with :func:`sample_pairs`) whose sides encode to the
    same ids at ``max_length``, by cause, and the unknown-token share. ``prompt_format``: a
    :class:`~fedpersona.model.prompting.PromptFormat`; ``total``: the size of the data sampled from."""
    tok = prompt_format.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    controls = {getattr(tok, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if unk in controls:  # an unknown token that is also BOS/EOS/pad (GPT-2's <|endoftext|>): not countable
        unk = None
    special = set(getattr(tok, "all_special_ids", []) or []) - {unk}
    truncated = same_ids = whitespace = tokens = unknown = 0
    needed: list[int | None] = []
    for pair in pairs:
        chosen, rejected = _encode(prompt_format, pair, max_length)
        for ids, _ in (chosen, rejected):
            seen = [i for i in ids if i not in special]
            tokens += len(seen)
            if unk is not None:
                unknown += sum(1 for i in seen if i == unk)
        if chosen != rejected:
            continue
        differ_at = _first_difference(prompt_format.response_ids(pair.chosen, max_tokens=_SEARCH_TOKENS),
                                      prompt_format.response_ids(pair.rejected, max_tokens=_SEARCH_TOKENS))
        bound = prompt_format.text_bound(_SEARCH_TOKENS)
        if differ_at is None and max(len(pair.chosen), len(pair.rejected)) <= bound:
            same_ids += 1
            whitespace += _is_whitespace_only(pair)
        else:  # apart at some length (past the first _SEARCH_TOKENS tokens: a length not searched for)
            truncated += 1
            needed.append(None if differ_at is None else _needed_length(prompt_format, pair, differ_at, max_length))
    known = [n for n in needed if n is not None]
    return SignalReport(
        model=model, max_length=max_length, total=len(pairs) if total is None else total, checked=len(pairs),
        truncated=truncated, same_ids=same_ids, whitespace=whitespace,
        max_length_needed=max(known) if known and len(known) == len(needed) else None,
        tokens=tokens, unknown_tokens=None if unk is None else unknown,
    )


@functools.lru_cache(maxsize=4)
def load_prompt_format(model: str, chat_template: bool = True):
    """The :class:`~fedpersona.model.prompting.PromptFormat` of ``model``'s tokenizer (the tokenizer only:
    no weights are loaded). Raises UsageError like ``--model`` does when the model cannot be resolved."""
    import transformers
    from transformers import AutoTokenizer

    from fedpersona.errors import UsageError
    from fedpersona.model.loading import resolve_model_path
    from fedpersona.model.prompting import PromptFormat

    transformers.logging.set_verbosity_error()
    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {model}: cannot load its tokenizer ({first})") from None
    return PromptFormat(tokenizer, chat_template)


def check_data(pairs: Iterable[PreferencePair], model: str, max_length: int = DEFAULT_MAX_LENGTH, *,
               chat_template: bool = True, limit: int = SAMPLE_PAIRS) -> SignalReport:
    """:func:`check_pairs` over a sample of ``pairs`` with ``model``'s tokenizer."""
    sample, total = sample_pairs(pairs, limit)
    return check_pairs(load_prompt_format(model, chat_template), sample, max_length, model=model, total=total)


@functools.lru_cache(maxsize=8)
def check_pair_file(path: str, model: str, max_length: int, chat_template: bool = True, *,
                    test_fraction: float = 0.2, min_pairs: int = 4) -> SignalReport:
    """:func:`check_data` over the users a run takes from pair file ``path`` (``data.sources.file_users``,
    already loaded by then); cached, so a simulation's start-up warning and its summary check once."""
    from fedpersona.data.sources import file_users

    users = file_users(path, test_fraction, min_pairs)
    return check_data((pair for user in users for pair in (*user.train, *user.test)), model, max_length,
                      chat_template=chat_template)
