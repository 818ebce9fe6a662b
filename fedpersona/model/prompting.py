"""How a prompt and a response become one token sequence: the same for training, reference log-probs,
evaluation, generation and the reference cache key.

Two formats:

* **chat**: when the tokenizer has a chat template (and ``chat-template`` is on), the prompt becomes chat
  messages and the template renders them with its generation prompt (``add_generation_prompt=True``); the
  response follows as the assistant's text plus the end-of-sequence token. A prompt in the multi-turn
  layout of Anthropic's HH-RLHF (``"Human: ...\\n\\nAssistant: ...\\n\\nHuman: ..."``) becomes alternating
  user/assistant turns; any other prompt is one user turn.
* **plain**: ``"user : <prompt> assistant :"`` after the BOS token, and a space before the response: the
  format the embedded model was pre-trained on.

User text is text: a prompt or response containing a special token's spelling (``</s>``, ``<pad>``,
``<|im_end|>``, ...) is tokenized as ordinary characters (``split_special_tokens``), so it can never end
the scored response, open a turn or become an attended pad. In the chat format the template's own markup
keeps its special tokens: the messages are rendered with placeholders, and only the text between them is
the users'.

Prompt and response are tokenized apart, so the prompt/response boundary is exact for any tokenizer
(a joint tokenization could merge tokens across it). Too long a sequence keeps its response (up to
``max_length - 1`` tokens, or half the length when the prompt needs it in chat format), drops whole
conversation turns oldest first, then cuts the rest of the prompt from the left.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_SLOT = re.compile("\ue000(\\d+)\ue001")  # a message's place in a rendered template (private-use characters)


def text_ids(tokenizer, text: str) -> list[int]:
    """Ids of user text: special tokens' spellings in it stay characters (never control tokens)."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _holds_special(tokenizer, texts: list[str]) -> bool:
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    specials += [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                 if getattr(t, "special", False) and t.content]
    return any(s in text for s in set(specials) for text in texts)


def format_prompt(prompt: str) -> str:
    """The plain format (no chat template): ``"user : <prompt> assistant :"``."""
    return f"user : {prompt.strip()} assistant :"


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """Chat messages for ``prompt``: HH-RLHF's ``Human:``/``Assistant:`` turns become user/assistant
    messages (a trailing empty ``Assistant:`` cue is dropped); any other text is one user message."""
    text = prompt.strip()
    if not text.startswith("Human:"):
        return [{"role": "user", "content": text}]
    parts = _HH_TURN.split(text)  # ["", "Human", "hi", "Assistant", "hello", ...]
    messages = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
                for who, body in zip(parts[1::2], parts[2::2], strict=True)]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages or [{"role": "user", "content": text}]


@dataclass(frozen=True)
class PromptFormat:
    """The one formatting function of a tokenizer: prompt ids, response ids and their joint encoding.

    ``use_chat_template`` asks for the chat format; it is used only if the tokenizer has a template
    (``self.chat`` says which format is in force)."""

    tokenizer: object
    use_chat_template: bool = True

    @property
    def chat(self) -> bool:
        return bool(self.use_chat_template and getattr(self.tokenizer, "chat_template", None))

    @property
    def name(self) -> str:
        return "chat" if self.chat else "plain"

    def prompt_ids(self, prompt: str, *, first_turn: int = 0, max_tokens: int | None = None) -> list[int]:
        """Token ids of the prompt up to where the response starts (BOS and generation prompt included).
        ``first_turn`` drops that many leading conversation turns (chat format only). ``max_tokens``: the
        plain format keeps only the text that can fill the last ``max_tokens`` (it is cut from the left
        anyway); a chat prompt is cut by whole turns in ``encode``, so its text is kept whole."""
        tok = self.tokenizer
        if max_tokens is not None and not self.chat and len(prompt) > self.text_bound(max_tokens):
            prompt = prompt[-self.text_bound(max_tokens):]
        if self.chat:
            messages = chat_messages(prompt)[first_turn:]
            if _holds_special(tok, [m["content"] for m in messages]):
                return self._chat_ids_with_text_slots(messages)
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        ids = text_ids(tok, format_prompt(prompt))
        return [tok.bos_token_id, *ids] if tok.bos_token_id is not None else list(ids)

    def _chat_ids_with_text_slots(self, messages: list[dict[str, str]]) -> list[int]:
        """The template rendered around placeholders: its markup tokenized with special tokens, each
        message's text in its slot tokenized as text (for contents that spell a special token)."""
        tok = self.tokenizer
        slotted = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        rendered = tok.apply_chat_template(slotted, tokenize=False, add_generation_prompt=True)
        ids: list[int] = []
        parts = _SLOT.split(rendered)  # [markup, index, markup, index, ..., markup]
        for k, part in enumerate(parts):
            if k % 2:
                ids += text_ids(tok, messages[int(part)]["content"])
            elif part:
                ids += list(tok(part, add_special_tokens=False)["input_ids"])
        return ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry in characters: no token covers more text than this (byte-level
        entries are at least as long as the text they stand for)."""
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        return max((len(token) for token in vocab), default=64)

    def text_bound(self, max_tokens: int) -> int:
        """Characters of text that certainly hold its first ``max_tokens`` tokens, with room for a token
        cut at the end: tokenizing more is wasted work (a 5 MB response cost 11 s per encoding)."""
        return 2 * max_tokens * self.max_token_chars + 1024

    def response_ids(self, response: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of the response and the end-of-sequence token (what is scored); with ``max_tokens``
        only the text that can fill them is tokenized (the ids kept by ``encode`` are the same)."""
        tok = self.tokenizer
        text = response.strip() if self.chat else " " + response.strip()
        if max_tokens is not None and len(text) > self.text_bound(max_tokens):
            text = text[: self.text_bound(max_tokens)]
        ids = text_ids(tok, text)
        return [*ids, tok.eos_token_id] if tok.eos_token_id is not None else ids

    def encode(self, prompt: str, response: str, max_length: int,
               prompt_ids: list[int] | None = None) -> tuple[list[int], int]:
        """``(ids, prompt_length)``: prompt + response + EOS in at most ``max_length`` tokens; the first
        ``prompt_length`` ids are the prompt (not scored). ``prompt_ids``: ``self.prompt_ids(prompt)`` when
        the caller has it already (both sides of a pair share their prompt)."""
        prompt_ids = self.prompt_ids(prompt, max_tokens=max_length) if prompt_ids is None else prompt_ids
        response_ids = self.response_ids(response, max_tokens=max_length)
        if len(prompt_ids) + len(response_ids) <= max_length:
            return prompt_ids + response_ids, len(prompt_ids)
        if not self.chat:  # the embedded model's rule: keep the response, cut the prompt from the left
            response_ids = response_ids[: max_length - 1]
            prompt_ids = prompt_ids[-(max_length - len(response_ids)):]
            return prompt_ids + response_ids, len(prompt_ids)
        turns = len(chat_messages(prompt))
        response_ids = response_ids[: max_length - min(len(prompt_ids), max_length // 2)]
        room = max_length - len(response_ids)
        for first in range(2, turns, 2):  # drop user/assistant exchanges, oldest first (roles keep alternating)
            if len(prompt_ids) <= room:
                break
            prompt_ids = self.prompt_ids(prompt, first_turn=first)
        prompt_ids = prompt_ids[-room:]
        return prompt_ids + response_ids, len(prompt_ids)

