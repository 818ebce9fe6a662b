"""The personal assistant loop on the device: talk to your model, compare two answers, teach it your pick.

``Assistant`` is what ``fedpersona chat`` drives (its terminal and JSON-lines front ends live in
``fedpersona.commands.chat``); it holds no terminal code, so tests and scripts can use it directly.

* **The model**: the state's resident model (base + shared + private adapter), personalized by weights
  (``strength`` scales the private tensors) or by logit mixing (DeRa, ``fedpersona.alignment.mixing``).
* **The conversation** is the context of every answer. It is rendered as one prompt in the layout the
  training code reads (``fedpersona.model.prompting``): a single message is its text; several are
  HH-RLHF's ``Human: ... \\n\\nAssistant: ...`` turns, which the chat template renders as alternating
  user/assistant messages. So a pair made in a chat is trained on exactly as the model saw it, and user
  text stays text (special tokens' spellings are never parsed from it). A message that itself contains a
  blank line followed by ``Human:`` or ``Assistant:`` has that blank line narrowed to one newline, so it
  cannot forge a turn.
* **Context limit**: before each answer the conversation is cut to the model's context (less the answer's
  ``max_new_tokens``) by whole exchanges, oldest first; a last message longer than that keeps its end.
* **Compare and pick**: two answers to the last message (the personal model's and the global model's,
  or, when the two are the same model or say the same, two samples of the model), labelled A and
  B in random order; the pick becomes a preference pair whose prompt is the conversation the model saw,
  stored in the preference memory (split ``train``: the user asked the model to learn it) with source
  ``chat:<conversation id>``. The conversation then continues with the chosen answer.
* **Storage**: conversations go to the state's ``memory.sqlite`` (``chats``, ``chat_messages``) unless
  ``save`` is off; ``feedback list --chats`` shows them, ``feedback forget`` deletes them. Nothing here
  sends anything: pairs reach the federation only through training, under the device's privacy policy.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedpersona.alignment.generation import TextStream, check_personalization, context_length, decode
from fedpersona.device.memory import CHAT_SOURCE
from fedpersona.data.schema import PreferencePair, validate_row
from fedpersona.errors import UsageError
from fedpersona.model.adapters import Role

if TYPE_CHECKING:
    from fedpersona.device.state import DeviceState
    from fedpersona.model.resident import ResidentModel

_FORGED_TURN = re.compile(r"\n\s*\n(?=[ \t]*(?:Human|Assistant):)")
MIN_PROMPT_TOKENS = 16  # a context that leaves fewer tokens for the conversation is refused
COMPARE_TEMPERATURE = 0.8  # sampling temperature of a second sample when the two models say the same
COMPARE_TRIES = 4


def _turn_text(text: str) -> str:
    """A message's text as one HH turn: a blank line before ``Human:``/``Assistant:`` cannot start a turn."""
    return _FORGED_TURN.sub("\n", text.strip())


def conversation_prompt(turns: Sequence[Turn]) -> str:
    """The prompt of a conversation ending in a user message, in the layout ``chat_messages`` reads:
    a single message as itself (unless it looks like HH text), else ``Human:``/``Assistant:`` turns."""
    if not turns or turns[-1].role != "user":
        raise ValueError("a conversation prompt ends with a user message")
    if len(turns) == 1 and not turns[0].content.strip().startswith("Human:"):
        return turns[0].content.strip()
    return "\n\n".join(f"{'Human' if t.role == 'user' else 'Assistant'}: {_turn_text(t.content)}" for t in turns)


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    content: str
    message_id: int | None = None  # its row in chat_messages, when saved
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Settings:
    method: str = "weights"  # "weights" or "logits"
    strength: float = 1.0
    temperature: float = 0.7
    max_new_tokens: int = 128
    context: int | None = None  # tokens of conversation + answer; None: the model's context
    seed: int | None = None  # None: a random seed per session

    def check(self) -> None:
        check_personalization(self.method, self.strength)
        if self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature}: must be 0 (greedy) or more")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")


@dataclass
class Answer:
    text: str
    tokens: int
    seconds: float
    prompt: str  # the conversation the model saw (after dropping turns), in the training layout
    prompt_tokens: int
    dropped_turns: int  # messages left out, oldest first, to fit the context
    truncated: bool  # the last message itself was cut (its start dropped)
    method: str
    strength: float
    seed: int
    stopped: bool = False  # interrupted by the user
    cut: bool = False  # ended by max_new_tokens, not by the model

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def info(self) -> dict[str, Any]:
        return {"method": self.method, "strength": self.strength, "seed": self.seed, "tokens": self.tokens,
                "seconds": round(self.seconds, 3), "dropped_turns": self.dropped_turns,
                "truncated": self.truncated, **({"stopped": True} if self.stopped else {}),
                **({"cut": True} if self.cut else {})}


@dataclass
class Candidate:
    text: str
    source: str  # "personal", "global" or "personal (another sample)"
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Comparison:
    prompt: str
    candidates: dict[str, Candidate]  # "A", "B"

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, **{label: {"text": c.text, "source": c.source}
                                          for label, c in self.candidates.items()}}


@dataclass
class Pick:
    label: str
    chosen: Candidate
    rejected: Candidate
    pair_id: int
    added: bool  # False: the same pair was stored before
    split: str


class Assistant:
    """One chat session on a device state: the conversation, its answers, comparisons and picks.

    ``reload()`` (optional) loads the state's adapters again and returns the resident model holding them
    (the same one, or another when the state's first adapters came for another layout); it is called
    before an answer when training (another process) replaced the adapter files since they were loaded,
    so the chat always speaks with the newest personal model.
    """

    def __init__(self, state: DeviceState, resident: ResidentModel, settings: Settings, *,
                 default_user: str = "me", save: bool = True,
                 reload: Callable[[], ResidentModel] | None = None) -> None:
        settings.check()
        self.state = state
        self.resident = resident
        self.settings = settings
        self.default_user = default_user
        self.save = save
        self.reload = reload
        self.model_context = context_length(resident)
        self.context = min(settings.context or self.model_context, self.model_context)
        if self.context - settings.max_new_tokens < MIN_PROMPT_TOKENS:
            left = self.context - settings.max_new_tokens
            raise UsageError(f"--max-new-tokens {settings.max_new_tokens}: leaves {left} "
                             f"of the {self.context}-token context for the conversation; use at most "
                             f"{self.context - MIN_PROMPT_TOKENS}")
        self.base_seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(4), "big")
        self.rng = random.Random(self.base_seed)
        self.turns: list[Turn] = []
        self.chat_id: int | None = None
        self.answers = 0  # answers made this session (seeds)
        self.last: Answer | None = None
        self.pending: Comparison | None = None
        self.notes: list[str] = []  # things to tell the user (adapters reloaded, conversation forgotten)
        self._stamp = self._adapter_stamp()

    # ---------------------------------------------------------------- settings
    def set_strength(self, strength: float) -> None:
        check_personalization(self.settings.method, strength)
        self.settings.strength = strength

    def set_method(self, method: str) -> None:
        strength = self.settings.strength
        if method == "weights" and strength > 1.0:
            strength = 1.0  # the weights knob ends at the personal model
        check_personalization(method, strength)
        self.settings.method, self.settings.strength = method, strength

    @property
    def has_personal(self) -> bool:
        """Whether the personal model differs from the global one (trained private tensors)."""
        adapters = self.resident.adapters
        return any(not torch.equal(adapters.params[n], adapters.initial[n]) for n in adapters.names(Role.PRIVATE))

    # ---------------------------------------------------------------- conversations
    def new_conversation(self) -> None:
        """Start afresh: no context; the next message opens a new stored conversation."""
        self.turns, self.chat_id, self.pending, self.last = [], None, None, None

    def resume(self, chat_id: int) -> int:
        """Continue stored conversation ``chat_id`` (its messages become the context); returns their count."""
        messages = self.state.memory.chat_messages(chat_id)
        if messages is None:
            raise UsageError(f"--resume {chat_id}: no conversation #{chat_id} in {self.state.dir}; "
                             "`fedpersona feedback list --chats` lists them")
        self.new_conversation()
        for m in messages:
            if self.turns and self.turns[-1].role == m.role:  # never two turns of one role in a row
                self.turns[-1].content += "\n\n" + m.content
            else:
                self.turns.append(Turn(m.role, m.content, m.id, m.info))
        if self.turns and self.turns[-1].role == "user":  # an unanswered last message: answered next time
            self.turns.pop()
        self.chat_id = chat_id
        return len(messages)

    def _store(self, turn: Turn) -> None:
        if not self.save:
            return
        memory = self.state.memory
        try:
            if self.chat_id is None:
                self.chat_id = memory.start_chat()
            turn.message_id = memory.add_message(self.chat_id, turn.role, turn.content, turn.info)
        except UsageError as err:
            if "no longer exists" not in str(err):
                raise
            self.save = False
            self.notes.append(f"conversation #{self.chat_id} was forgotten (`feedback forget`); "
                              "this chat is no longer saved")

    # ---------------------------------------------------------------- the model
    def _adapter_stamp(self) -> tuple:
        stamp = []
        for path in (self.state.private_path, self.state.shared_path):
            try:
                info = path.stat()
                stamp.append((info.st_mtime_ns, info.st_size, info.st_ino))
            except FileNotFoundError:
                stamp.append(None)
        return tuple(stamp)

    def refresh(self) -> None:
        """Reload the adapters if training replaced them since they were loaded."""
        stamp = self._adapter_stamp()
        if stamp == self._stamp or self.reload is None:
            return
        self._stamp = stamp
        self.resident = self.reload()
        self.model_context = context_length(self.resident)
        self.context = min(self.settings.context or self.model_context, self.model_context)
        rounds = self.state.counters().get("rounds_trained", 0)
        self.notes.append(f"your adapters were updated by training ({rounds} rounds trained); "
                          "answering with them from now on")

    def fit(self, turns: Sequence[Turn]) -> tuple[str, list[int], int, bool]:
        """``(prompt, prompt_ids, dropped_turns, truncated)``: the conversation cut to the context by whole
        exchanges, oldest first; a last message longer than the context keeps its end."""
        budget = self.context - self.settings.max_new_tokens
        form = self.resident.prompt_format
        first = 0
        while True:
            prompt = conversation_prompt(turns[first:])
            ids = form.prompt_ids(prompt)
            if len(ids) <= budget:
                return prompt, ids, first, False
            if first + 2 >= len(turns):
                return prompt, ids[-budget:], first, True
            first += 2  # one user message and its answer (turns alternate, starting with the user)

    def _generate(self, prompt_ids: list[int], *, method: str, strength: float, temperature: float, seed: int,
                  on_piece: Callable[[str], None] | None) -> tuple[str, int, float, bool]:
        """(text, tokens, seconds, stopped) of one answer, streamed piece by piece to ``on_piece``."""
        stream = TextStream(self.resident.tokenizer)
        started = time.perf_counter()
        stopped = False
        with closing(decode(self.resident, prompt_ids, method=method, strength=strength,
                            max_new_tokens=self.settings.max_new_tokens, temperature=temperature,
                            seed=seed)) as tokens:
            try:
                for token in tokens:
                    piece = stream.push(token)
                    if piece and on_piece:
                        on_piece(piece)
            except KeyboardInterrupt:
                stopped = True
        seconds = time.perf_counter() - started
        rest = stream.finish()
        if rest and on_piece:
            on_piece(rest)
        return stream.text, len(stream.ids), seconds, stopped

    def ask(self, text: str, on_piece: Callable[[str], None] | None = None) -> Answer:
        """Answer a user message with the personal model, the conversation as context."""
        if not text.strip():
            raise UsageError("the message is empty")
        self.refresh()
        user = Turn("user", text.strip())
        prompt, ids, dropped, truncated = self.fit([*self.turns, user])
        seed = self.base_seed + self.answers
        self.answers += 1
        settings = self.settings
        reply, tokens, seconds, stopped = self._generate(ids, method=settings.method, strength=settings.strength,
                                                        temperature=settings.temperature, seed=seed,
                                                        on_piece=on_piece)
        cut = not stopped and tokens >= min(settings.max_new_tokens, self.context - len(ids))
        answer = Answer(reply, tokens, seconds, prompt, len(ids), dropped, truncated, settings.method,
                        settings.strength, seed, stopped, cut)
        self.turns.append(user)
        self._store(user)
        assistant = Turn("assistant", reply, info=answer.info())
        self.turns.append(assistant)
        self._store(assistant)
        self.last, self.pending = answer, None
        return answer

    # ---------------------------------------------------------------- compare and pick
    def compare(self) -> Comparison:
        """Two answers to the last message, labelled A and B in random order (see the module's notes)."""
        if not self.turns or self.last is None:
            raise UsageError("/compare: nothing to compare yet; send a message first")
        self.refresh()
        last = self.last
        user_turns = self.turns[:-1]
        prompt, ids, _, _ = self.fit(user_turns)
        settings = self.settings
        two_models = self.has_personal and settings.strength != 0.0
        name = "personal" if two_models else "sample 1"
        personal = (Candidate(last.text, name, last.info()) if not last.stopped and last.text else None)
        if personal is None:
            text, tokens, _, _ = self._generate(ids, method=settings.method, strength=settings.strength,
                                                temperature=settings.temperature, seed=last.seed, on_piece=None)
            personal = Candidate(text, name, {"method": settings.method, "strength": settings.strength,
                                              "seed": last.seed, "tokens": tokens})
        other: Candidate | None = None
        if two_models:
            # the global model, sampled with the same seed (as the simulations' generation check does)
            text, tokens, _, _ = self._generate(ids, method="weights", strength=0.0,
                                                temperature=settings.temperature, seed=last.seed, on_piece=None)
            other = Candidate(text, "global", {"method": "weights", "strength": 0.0, "seed": last.seed,
                                               "tokens": tokens})
        for k in range(COMPARE_TRIES):
            if other is not None and other.text and other.text != personal.text:
                break
            seed = self.base_seed + 7919 * (self.answers + 1) + k
            temperature = max(settings.temperature, COMPARE_TEMPERATURE)
            text, tokens, _, _ = self._generate(ids, method=settings.method, strength=settings.strength,
                                                temperature=temperature, seed=seed, on_piece=None)
            other = Candidate(text, "personal (another sample)" if two_models else "sample 2",
                              {"method": settings.method, "strength": settings.strength, "seed": seed,
                               "temperature": temperature, "tokens": tokens})
        assert other is not None
        if not other.text or not personal.text or other.text == personal.text:
            raise UsageError("/compare: the model gave the same answer every time (or an empty one); "
                             "raise /temperature or ask again")
        pair = [personal, other]
        self.rng.shuffle(pair)
        self.pending = Comparison(prompt, {"A": pair[0], "B": pair[1]})
        return self.pending

    def pick(self, label: str) -> Pick:
        """Store the pending comparison's pick ``A`` or ``B`` as a preference pair (split train)."""
        label = label.strip().upper()
        if self.pending is None:
            raise UsageError("--pick: no comparison to pick from; /compare first")
        if label not in self.pending.candidates:
            raise UsageError(f"--pick {label}: must be A or B")
        chosen = self.pending.candidates[label]
        rejected = self.pending.candidates["B" if label == "A" else "A"]
        memory = self.state.memory
        user_id = memory.user_id() or self.default_user
        pair = validate_row(PreferencePair(user_id, self.pending.prompt, chosen.text, rejected.text,
                                           "train").to_json(), "/compare")
        existing = memory.contains(pair)
        pair_id = memory.add(pair, source=f"{CHAT_SOURCE}:{self.chat_id or 0}") if existing is None else existing
        row = memory.get(pair_id)
        # the conversation goes on with the answer the user preferred
        answer = self.turns[-1]
        answer.content = chosen.text
        answer.info = {**chosen.info, "source": chosen.source, "picked_over": rejected.source, "pair_id": pair_id}
        if self.save and answer.message_id is not None:
            self.state.memory.update_message(answer.message_id, answer.content, answer.info)
        self.pending = None
        return Pick(label, chosen, rejected, pair_id, existing is None, row.split if row else "train")

    # ---------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        memory = self.state.memory
        stats = {**memory.stats(), **memory.chat_stats()}
        counters = self.state.counters()
        last = self.last
        return {
            "pairs": stats["pairs"], "train": stats["train"], "test": stats["test"],
            "chat_pairs": stats["chat_pairs"], "chats": stats["chats"],
            "rounds_trained": counters.get("rounds_trained", 0),
            "personal_model": self.has_personal,
            "method": self.settings.method, "strength": self.settings.strength,
            "temperature": self.settings.temperature, "max_new_tokens": self.settings.max_new_tokens,
            "context_tokens": self.context, "conversation": self.chat_id, "saved": self.save,
            "turns": len(self.turns),
            "last_prompt_tokens": last.prompt_tokens if last else None,
            "last_dropped_turns": last.dropped_turns if last else None,
            "last_tokens_per_s": round(last.tokens_per_s, 1) if last else None,
        }
