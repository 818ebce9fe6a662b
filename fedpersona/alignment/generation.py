"""Personalized generation: base + shared + private adapter, personalized two ways.

* ``method="weights"`` (the strength knob): ``strength`` moves the private tensors from their initial
  values (0: the global model, base + shared) to the user's trained values (1: fully personal), the
  weight-space mixing of global and personal behaviour of Personalized Soups (arXiv 2310.11564) reduced to
  one adapter. 0 and 1 are exact; in between, the private A and B matrices both interpolate, so the
  adapter's effect grows smoothly, not linearly. One forward per token.
* ``method="logits"`` (Decoding-time Realignment, arXiv 2402.02992; ``fedpersona.alignment.mixing``): the
  next token is drawn from ``softmax(w * log p_personal + (1 - w) * log p_global)``, ``w`` = ``strength``
  from 0 to ``MAX_MIX_WEIGHT`` (above 1 extrapolates). Two forwards per token.

``generate`` answers whole prompts (``model.generate`` for the weights method, so its results are those of
earlier releases); ``generate_batch`` answers many prompts at once (left padding, one seeded draw per
batch: the generation evaluation and its benchmark); ``decode`` and ``stream_text`` are the token loop both
methods share (KV cache, seeded sampling on the CPU so a seed gives the same answer on any device), used by
the chat and the benchmark.

Decoding defaults against loops (``REPETITION_PENALTY``, ``NO_REPEAT_NGRAM`` in
``fedpersona.alignment.settings``; measured in docs/explanation/personal-generation.md): every path applies
them (transformers' ``RepetitionPenaltyLogitsProcessor`` (CTRL, arXiv 1909.05858) and
``NoRepeatNGramLogitsProcessor``), so ``fedpersona generate``, the chat and the evaluation decode alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch

from fedpersona.alignment.mixing import MAX_MIX_WEIGHT, mix_logprobs, private_views
from fedpersona.alignment.settings import NO_REPEAT_NGRAM, REPETITION_PENALTY
from fedpersona.model.adapters import Role
from fedpersona.model.resident import ResidentModel

METHODS = ("weights", "logits")
METHOD_HELP = ("weights: scale your private adapter's tensors (--strength 0..1, one forward per token); "
               f"logits: mix the personal and global models' next-token log-probs (--strength 0..{MAX_MIX_WEIGHT:g}, "
               "above 1 extrapolates; two forwards per token)")


def check_personalization(method: str, strength: float) -> None:
    """A UsageError naming the flag for an unknown method or a strength outside the method's range."""
    from fedpersona.errors import UsageError

    if method not in METHODS:
        raise UsageError(f"--method {method}: must be one of {', '.join(METHODS)}")
    if method == "weights" and not 0.0 <= strength <= 1.0:
        raise UsageError(f"--strength {strength}: must be between 0 (global) and 1 (fully personal)")
    if method == "logits" and not 0.0 <= strength <= MAX_MIX_WEIGHT:
        raise UsageError(f"--strength {strength}: with --method logits must be between 0 (global) and "
                         f"{MAX_MIX_WEIGHT:g} (1 is the personal model, above 1 extrapolates)")


def stop_token_ids(resident: ResidentModel) -> set[int]:
    """Tokens that end an answer: the tokenizer's end of sequence and the model's generation config's."""
    stops = set()
    for value in (getattr(resident.tokenizer, "eos_token_id", None),
                  getattr(getattr(resident.model, "generation_config", None), "eos_token_id", None)):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None:
                stops.add(int(token))
    return stops


def context_length(resident: ResidentModel) -> int:
    """Tokens the model can attend to: its ``max_position_embeddings`` (else the tokenizer's limit, else 2048)."""
    config = getattr(resident.model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(resident.tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 10**7 else 2048


def repetition_processors(repetition_penalty: float = REPETITION_PENALTY,
                          no_repeat_ngram_size: int = NO_REPEAT_NGRAM) -> list:
    """transformers' logits processors for the anti-loop settings (an empty list when both are off).

    Args:
        repetition_penalty: > 1 divides a positive logit (multiplies a negative one) of every token already
            in the context (prompt and answer), CTRL's penalty (Keskar et al. 2019, arXiv 1909.05858); 1: off.
        no_repeat_ngram_size: an n-gram of this many tokens may occur once in the sequence; 0: off.

    Returns:
        Processors, each ``(input_ids [B, T], scores [B, V]) -> scores``.
    """
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    out: list = []
    if repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram_size > 0:
        out.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    return out


def _pick(scores: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy (``temperature`` 0) or a draw from ``softmax(scores / temperature)`` (on the CPU: seeded
    draws are the same on any device)."""
    if temperature <= 0:
        return int(scores.argmax(-1))
    probs = torch.softmax(scores.float() / temperature, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def decode(resident: ResidentModel, prompt_ids: Sequence[int], *, method: str = "weights", strength: float = 1.0,
           max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
           stop_ids: set[int] | None = None, repetition_penalty: float = REPETITION_PENALTY,
           no_repeat_ngram_size: int = NO_REPEAT_NGRAM) -> Iterator[int]:
    """Yield the answer's token ids one at a time (the stop token is not yielded).

    The model's adapters are set for this answer while the generator runs and restored when it finishes or
    is closed (close it, e.g. with ``contextlib.closing``, before using the resident model for anything
    else when stopping early). Stops at a stop token, after ``max_new_tokens``, or at the model's context.
    ``repetition_penalty`` and ``no_repeat_ngram_size``: see ``repetition_processors`` (applied to the
    mixed scores with the logits method).
    """
    check_personalization(method, strength)
    model = resident.model
    model.eval()
    stops = stop_token_ids(resident) if stop_ids is None else stop_ids
    generator = torch.Generator().manual_seed(int(seed)) if temperature > 0 else None
    room = min(max_new_tokens, context_length(resident) - len(prompt_ids))
    ids = torch.tensor([list(prompt_ids)], device=resident.device)
    processors = repetition_processors(repetition_penalty, no_repeat_ngram_size)
    history = ids  # prompt and answer so far: what the processors look back on

    def forward(step_ids: torch.Tensor, cache):
        # logits of the last position only: memory never scales with prompt length x vocabulary
        out = model(input_ids=step_ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], out.cache

    with ExitStack() as stack:
        # weights at any strength, and logits at 0 (global) or 1 (personal): one model, one forward per token
        two = method == "logits" and strength not in (0.0, 1.0)
        views = stack.enter_context(private_views(resident.adapters)) if two else None
        if views is None:
            stack.enter_context(resident.adapters.private_strength(strength))
        caches: list = [None, None]
        for _ in range(max(room, 0)):
            if views is not None:
                views.use("personal")
                personal, caches[0] = forward(ids, caches[0])
                views.use("global")
                global_, caches[1] = forward(ids, caches[1])
                scores = mix_logprobs(personal, global_, strength)[0]
            else:
                logits, caches[0] = forward(ids, caches[0])
                scores = logits[0]
            for processor in processors:
                scores = processor(history, scores[None].float())[0]
            token = _pick(scores, temperature, generator)
            if token in stops:
                return
            yield token
            ids = torch.tensor([[token]], device=resident.device)
            if processors:
                history = torch.cat([history, ids], dim=1)


class TextStream:
    """Token ids in, text pieces out: each ``push`` returns the text the new token added (leading white
    space of the answer dropped; a piece that ends inside a multi-byte character waits for the rest)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def finish(self) -> str:
        """What is left to show of the final text (the answer stripped, as ``generate`` returns it)."""
        text = self._text().rstrip()
        piece = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return piece

    @property
    def text(self) -> str:
        return self._text().strip()


def stream_text(resident: ResidentModel, prompt_ids: Sequence[int], **options) -> Iterator[str]:
    """``decode``'s tokens as text pieces; their concatenation (stripped) is the answer."""
    stream = TextStream(resident.tokenizer)
    tokens = decode(resident, prompt_ids, **options)
    try:
        for token in tokens:
            piece = stream.push(token)
            if piece:
                yield piece
        if piece := stream.finish():
            yield piece
    finally:
        tokens.close()


@torch.no_grad()
def generate(resident: ResidentModel, prompts: Sequence[str], *, strength: float = 1.0, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int = 0, method: str = "weights",
             repetition_penalty: float = REPETITION_PENALTY, no_repeat_ngram_size: int = NO_REPEAT_NGRAM) -> list[str]:
    """Generate one response per prompt; greedy when ``temperature`` is 0 (deterministic); each prompt
    seeded with ``seed``. ``repetition_penalty``, ``no_repeat_ngram_size``: see ``repetition_processors``."""
    check_personalization(method, strength)
    tokenizer = resident.tokenizer
    if method == "logits":
        return [tokenizer.decode(list(decode(resident, resident.prompt_format.prompt_ids(prompt), method=method,
                                             strength=strength, max_new_tokens=max_new_tokens,
                                             temperature=temperature, seed=seed,
                                             repetition_penalty=repetition_penalty,
                                             no_repeat_ngram_size=no_repeat_ngram_size)),
                                 skip_special_tokens=True).strip() for prompt in prompts]
    return [generate_batch(resident, [prompt], strength=strength, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, repetition_penalty=repetition_penalty,
                           no_repeat_ngram_size=no_repeat_ngram_size)[0].text for prompt in prompts]


@dataclass(frozen=True)
class Generation:
    """One generated answer: its text (stripped), its token count (stop token excluded) and whether it was
    ``cut`` at ``max_new_tokens`` instead of ending with a stop token."""

    text: str
    tokens: int
    cut: bool


@torch.no_grad()
def generate_batch(resident: ResidentModel, prompts: Sequence[str], *, strength: float = 1.0,
                   max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
                   repetition_penalty: float = REPETITION_PENALTY, no_repeat_ngram_size: int = NO_REPEAT_NGRAM,
                   base: bool = False, batch_size: int = 8) -> list[Generation]:
    """Answer ``prompts`` in batches of ``batch_size`` (left-padded, ``model.generate`` with the KV cache).

    Args:
        resident: the model, its adapters as loaded (the private tensors scaled by ``strength``).
        prompts: prompt texts in the training layout (``PromptFormat.prompt_ids``: a chat template, HH-RLHF
            turns for a conversation).
        strength: private tensors from their initial values (0: global) to the trained ones (1).
        max_new_tokens: most tokens per answer.
        temperature: 0 greedy, else sampling at that temperature (no top-k or top-p cut), seeded with
            ``seed + batch number`` (the global RNG is restored).
        repetition_penalty, no_repeat_ngram_size: see ``repetition_processors``.
        base: the base model alone (every adapter off; ``strength`` ignored).
        batch_size: prompts per ``generate`` call.

    Returns:
        One ``Generation`` per prompt, in order.
    """
    check_personalization("weights", strength)
    tokenizer, model = resident.tokenizer, resident.model
    model.eval()
    stops = stop_token_ids(resident)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    encoded = [resident.prompt_format.prompt_ids(prompt) for prompt in prompts]
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0
                else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    out: list[Generation] = []
    with ExitStack() as stack:
        stack.enter_context(model.disable_adapter() if base else resident.adapters.private_strength(strength))
        for number, first in enumerate(range(0, len(encoded), batch_size)):
            batch = encoded[first:first + batch_size]
            width = max(len(ids) for ids in batch)
            room = min(max_new_tokens, context_length(resident) - width)
            if room < 1:
                out.extend(Generation("", 0, True) for _ in batch)
                continue
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=resident.device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=resident.device)
            with torch.random.fork_rng(devices=[]) if temperature > 0 else nullcontext():
                if temperature > 0:
                    torch.manual_seed(int(seed) + number)
                new = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=room,
                                     pad_token_id=pad, eos_token_id=sorted(stops),
                                     repetition_penalty=repetition_penalty,
                                     no_repeat_ngram_size=no_repeat_ngram_size, **sampling)[:, width:].tolist()
            for row in new:
                end = next((i for i, token in enumerate(row) if token in stops), None)
                tokens = row if end is None else row[:end]
                out.append(Generation(tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens),
                                      end is None))
    if base:  # PEFT's disable_adapter() ends by marking every adapter tensor trainable: the split policy's back
        for name, param in resident.adapters.params.items():
            param.requires_grad_(resident.adapters.roles[name] is not Role.FROZEN)
    return out
