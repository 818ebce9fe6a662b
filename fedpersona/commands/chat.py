"""``fedpersona chat``: talk to your personal model on this device; compare two answers, teach it your pick.

Two front ends over one ``fedpersona.device.assistant.Assistant``:

* **a terminal** (stdin is one): a prompt ``you>``, the answer streamed token by token, and in-chat
  commands (``/help``): ``/compare``, ``/strength S``, ``/method weights|logits``, ``/temperature T``,
  ``/new``, ``/stats``, ``/quit``. Line editing comes from ``readline`` where Python has it; its history
  stays in memory (never written to a file).
* **scripts and tests** (stdin is not a terminal, or ``--json``/``--compare``/``--pick``): every line of
  stdin is a message (or an in-chat command, ``/pick A|B`` included; ``//text`` sends ``/text``; with
  ``--json-input`` every line is a JSON string, so a message may hold newlines), and
  JSON lines come out: one object per event (``start``, ``answer``, ``compare``, ``pick``, ``settings``,
  ``stats``, ``note``, ``end``; ``piece`` with ``--stream``). ``--compare`` compares the answers to the
  last message after stdin ends, ``--pick A|B`` stores that pick.

Nothing is sent anywhere: the conversation is stored in the state's ``memory.sqlite`` (``--no-save``: not
even that), a pick becomes a preference pair there, and pairs reach the federation only by training
under the device's privacy policy (``fedpersona client``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from fedpersona.commands.device import DEFAULT_USER, StateOpt, _check_text, _open, load_state_resident
from fedpersona.errors import UsageError

if TYPE_CHECKING:
    from fedpersona.device.assistant import Assistant, Comparison, Pick
    from fedpersona.device.state import DeviceState
    from fedpersona.config import RunConfig
    from fedpersona.model.resident import ResidentModel

Opt = typer.Option

HELP = """commands:
  /compare          two answers to your last message (A and B, in random order); pick the better one,
                    it is stored as a preference pair and trained on in the next round
  /strength S       how personal: weights 0 (global) .. 1 (yours); logits 0 .. 4 (above 1 extrapolates)
  /method M         weights (scale your private adapter) or logits (mix the two models' next-token log-probs)
  /temperature T    0 answers greedily; more samples more freely
  /new              start a new conversation (the old one stays stored)
  /stats            your feedback, training and this conversation
  /quit             leave (also Ctrl-D); Ctrl-C stops an answer
  //text            send a message that starts with a slash"""


def register(app: typer.Typer) -> None:
    """Add ``chat`` to the ``fedpersona`` app."""
    app.command("chat")(chat)


def _number(command: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"{command} {value!r}: expected a number") from None


def _pick_label(value: str) -> str:
    label = value.strip().upper()
    if label not in ("A", "B"):
        raise UsageError(f"--pick {value}: must be A or B")
    return label


def _lines(stream, json_strings: bool = False) -> Iterable[str]:
    """stdin's lines without their line ends (``json_strings``: each line a JSON string, decoded); text
    that is not UTF-8, or a line that is not a JSON string, is one UsageError line."""
    number = 0
    while True:
        try:
            raw = stream.readline()
        except UnicodeDecodeError as err:
            raise UsageError(f"stdin line {number + 1}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); "
                             "send UTF-8") from None
        if not raw:
            return
        number += 1
        line = raw.rstrip("\r\n")
        if json_strings and line.strip():
            try:
                line = json.loads(line)
            except ValueError:
                line = None
            if not isinstance(line, str):
                raise UsageError(f"stdin line {number}: with --json-input each line must be a JSON string, "
                                 'e.g. "first line\\nsecond line"')
        _check_text(f"stdin line {number}", line)
        yield line


def chat(
    state: StateOpt,
    method: Annotated[str, Opt("--method", "-m", help="weights: scale your private adapter (--strength 0..1); logits: mix the personal and global models' next-token log-probs (Decoding-time Realignment; --strength 0..4, above 1 extrapolates; two forwards per token).")] = "weights",
    strength: Annotated[float, Opt("--strength", "-s", help="How personal: 0 is the global model, 1 yours.")] = 1.0,
    temperature: Annotated[float, Opt("--temperature", "-t", help="0: greedy; more samples more freely.")] = 0.7,
    max_new_tokens: Annotated[int, Opt("--max-new-tokens", help="Most tokens of one answer.")] = 128,
    context: Annotated[Optional[int], Opt("--context", help="Tokens of conversation + answer the model sees (default: the model's context); older exchanges are left out first.")] = None,
    seed: Annotated[Optional[int], Opt("--seed", help="Sampling seed (answers and A/B order); default: random.")] = None,
    device: Annotated[str, Opt("--accelerator", "--device", help="Where the model computes: auto, cpu, cuda or cuda:N.")] = "auto",
    model: Annotated[Optional[str], Opt("--model", help="Before your first training round (no adapters in the state yet): talk to this base model (smollm2-135m-instruct, an HF id or folder, a .gguf file); picks are stored all the same. Once the state has adapters, its own model is used.")] = None,
    resume: Annotated[Optional[str], Opt("--resume", help="Continue a stored conversation: its id (`feedback list --chats`) or 'last'.")] = None,
    save: Annotated[bool, Opt("--save/--no-save", help="Store the conversation in the state's memory (picks are stored either way).")] = True,
    compare: Annotated[bool, Opt("--compare", help="Without a terminal: after the last message, compare two answers to it.")] = False,
    pick: Annotated[Optional[str], Opt("--pick", help="Without a terminal: store this pick (A or B) of --compare as a preference pair.")] = None,
    stream: Annotated[bool, Opt("--stream", help="JSON lines: also a 'piece' event per streamed text piece.")] = False,
    json_input: Annotated[bool, Opt("--json-input", help="Without a terminal: each stdin line is a JSON string (a message, which may hold newlines, or an in-chat command).")] = False,
    json_out: Annotated[bool, Opt("--json", help="JSON lines on stdout (one event a line), even on a terminal.")] = False,
) -> None:
    """Chat with your personal model (base + shared + your private adapter), on this device only."""
    from fedpersona.device.assistant import Assistant, Settings

    settings = Settings(method, strength, temperature, max_new_tokens, context, seed)
    settings.check()
    if context is not None and context < 32:
        raise UsageError(f"--context {context}: must be at least 32 tokens")
    label = _pick_label(pick) if pick is not None else None
    if label is not None and not compare:
        raise UsageError("--pick: needs --compare (the comparison to pick from)")
    interactive = sys.stdin.isatty() and not (json_out or compare or pick is not None or stream or json_input)

    if model is not None:  # a bad --model is one line before anything is created or loaded
        from fedpersona.model.loading import check_model

        check_model(model)
    st = _open(state, create=model is not None)
    try:
        resident, config, has_private = _state_model(st, device, model)
        assistant = Assistant(st, resident, settings, default_user=DEFAULT_USER, save=save,
                              reload=lambda: _state_model(st, device, model)[0])
        if resume is not None:
            chat_id = st.memory.last_chat() if resume == "last" else _chat_id(resume)
            if chat_id is None:
                raise UsageError(f"--resume last: no stored conversation in {state}")
            assistant.resume(chat_id)
        info = {"state": str(state), "model_id": config.model, "scheme": config.scheme,
                "private_adapter": has_private, "shared_adapter": st.shared_path.exists(),
                "rounds_trained": st.counters().get("rounds_trained", 0),
                "context_tokens": assistant.context}
        if interactive:
            _Terminal(assistant, info).run()
        else:
            _JsonLines(assistant, info, stream).run(_lines(sys.stdin, json_input), compare, label)
    finally:
        st.close()


def _state_model(st: DeviceState, device: str, model: str | None) -> tuple[ResidentModel, RunConfig, bool]:
    """``(resident, config, has_private)``: the state's model with its adapters (``load_state_resident``);
    before the state has any adapters, ``model`` (else the model meta.json names) with its adapters at their
    initial values, which is the base model itself (LoRA's B matrices start at zero). A state without
    meta.json is bound to ``model`` (``DeviceState.bind``; without a private adapter the first training
    round rebinds it to the run's model and scheme)."""
    from fedpersona.config import RunConfig

    meta = st.meta() or {}
    if st.shared_path.exists() or st.private_path.exists():
        if model is not None and meta.get("model_id") and model != meta["model_id"]:
            raise UsageError(f"--model {model}: the adapters in {st.dir} belong to model {meta['model_id']!r}; "
                             "drop --model (the state's own model is used), or use another --state")
        return load_state_resident(st, device)
    name = model or meta.get("model_id")
    if not name:
        raise UsageError(f"--state {st.dir}: no adapters yet: run `fedpersona client` first, or pass --model NAME "
                         "(e.g. smollm2-135m-instruct) to talk to the base model before your first round")
    from fedpersona.round.resident import resident_for
    from fedpersona.commands.device import _quiet_loading
    from fedpersona.model.adapters import Role

    config = RunConfig(model=str(name), scheme=str(meta.get("scheme") or RunConfig().scheme), accelerator=device)
    with _quiet_loading():
        resident = resident_for(config)
    if not meta:  # remembered for the next chat (and `feedback import`'s check); a first round may rebind it
        st.bind(config.model, config.scheme)
    for role in (Role.SHARED, Role.PRIVATE, Role.FROZEN):
        resident.adapters.reset(role)
    return resident, config, False


def _chat_id(value: str) -> int:
    try:
        chat_id = int(value.lstrip("#"))
    except ValueError:
        raise UsageError(f"--resume {value}: expected a conversation id (a number) or 'last'") from None
    if chat_id < 1:
        raise UsageError(f"--resume {value}: conversation ids start at 1")
    return chat_id


def _settings_command(assistant: Assistant, command: str, argument: str) -> dict[str, Any]:
    """/strength, /method, /temperature: change a setting; returns the settings now in force."""
    if not argument:
        raise UsageError(f"{command}: give a value, e.g. {command} "
                         + {"/strength": "0.5", "/method": "logits", "/temperature": "0.7"}[command])
    try:
        if command == "/strength":
            assistant.set_strength(_number(command, argument))
        elif command == "/method":
            assistant.set_method(argument.strip().lower())
    except UsageError as err:  # the same rule as the flag's, named as the in-chat command
        raise UsageError(str(err).replace("--strength", "/strength").replace("--method", "/method")) from None
    if command == "/temperature":
        value = _number(command, argument)
        if value < 0:
            raise UsageError(f"/temperature {argument}: must be 0 (greedy) or more")
        assistant.settings.temperature = value
    s = assistant.settings
    return {"method": s.method, "strength": s.strength, "temperature": s.temperature}


def _split(line: str) -> tuple[str, str]:
    command, _, argument = line.strip().partition(" ")
    return command.lower(), argument.strip()


# ---------------------------------------------------------------------------- scripts: JSON lines


class _JsonLines:
    def __init__(self, assistant: Assistant, info: dict[str, Any], stream: bool) -> None:
        self.assistant = assistant
        self.info = info
        self.stream = stream

    def emit(self, event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, **fields}, ensure_ascii=False), flush=True)

    def notes(self) -> None:
        for note in self.assistant.notes:
            self.emit("note", text=note)
        self.assistant.notes.clear()

    def run(self, lines: Iterable[str], compare: bool, pick: str | None) -> None:
        a = self.assistant
        s = a.settings
        self.emit("start", **self.info, method=s.method, strength=s.strength, temperature=s.temperature,
                  seed=a.base_seed, conversation=a.chat_id, turns=len(a.turns))
        if not self.info["private_adapter"]:
            self.emit("note", text="no private adapter in this state yet; answering with the "
                      + ("global model" if self.info["shared_adapter"] else "base model"))
        for line in lines:
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    break
            else:
                self.answer(line[1:] if line.startswith("//") else line)
        if compare:
            self.compare()
        if pick is not None:
            self.pick(pick)
        self.emit("end", conversation=a.chat_id if a.save else None, turns=len(a.turns), saved=a.save)

    def answer(self, text: str) -> None:
        on_piece: Callable[[str], None] | None = (lambda p: self.emit("piece", text=p)) if self.stream else None
        answer = self.assistant.ask(text, on_piece)
        self.notes()
        self.emit("answer", message=text.strip(), text=answer.text, conversation=self.assistant.chat_id,
                  tokens=answer.tokens, seconds=round(answer.seconds, 3),
                  tokens_per_s=round(answer.tokens_per_s, 1), prompt_tokens=answer.prompt_tokens,
                  dropped_turns=answer.dropped_turns, truncated=answer.truncated, cut=answer.cut,
                  stopped=answer.stopped, method=answer.method, strength=answer.strength, seed=answer.seed)

    def compare(self) -> None:
        comparison = self.assistant.compare()
        self.emit("compare", **comparison.to_json())

    def pick(self, label: str) -> None:
        done = self.assistant.pick(_pick_label(label))
        self.emit("pick", pick=done.label, pair_id=done.pair_id, added=done.added, split=done.split,
                  chosen=done.chosen.text, chosen_source=done.chosen.source, rejected=done.rejected.text,
                  rejected_source=done.rejected.source)

    def command(self, line: str) -> bool:
        """Run an in-chat command; False for /quit (stop reading stdin)."""
        command, argument = _split(line)
        a = self.assistant
        if command in ("/quit", "/exit", "/q"):
            return False
        if command == "/compare":
            self.compare()
        elif command == "/pick":
            self.pick(argument)
        elif command in ("/strength", "/method", "/temperature"):
            self.emit("settings", **_settings_command(a, command, argument))
        elif command == "/new":
            a.new_conversation()
            self.emit("new")
        elif command == "/stats":
            self.emit("stats", **a.stats())
        elif command == "/help":
            self.emit("help", text=HELP)
        else:
            raise UsageError(f"{command}: unknown in-chat command; /help lists them (//text sends /text)")
        return True


# ---------------------------------------------------------------------------- a person at a terminal


class _Terminal:
    def __init__(self, assistant: Assistant, info: dict[str, Any]) -> None:
        self.assistant = assistant
        self.info = info

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def notes(self) -> None:
        for note in self.assistant.notes:
            self.say(f"({note})")
        self.assistant.notes.clear()

    def ask_line(self, prompt: str) -> str | None:
        try:
            return input(prompt)
        except EOFError:
            self.say()
            return None

    def run(self) -> None:
        try:
            import readline  # noqa: F401  (line editing for input(); history kept in memory only)
        except ImportError:
            pass
        a, i = self.assistant, self.info
        s = a.settings
        personal = ("your private adapter" + (f", {i['rounds_trained']} rounds trained" if i["rounds_trained"] else "")
                    if i["private_adapter"] else "no private adapter yet: the global model" if i["shared_adapter"]
                    else "no adapters yet: the base model")
        self.say(f"fedpersona chat: {i['model_id']} ({i['scheme']}), {personal}; method {s.method}, "
                 f"strength {s.strength:g}, context {a.context} tokens")
        where = f"saved in {i['state']}" if a.save else "not saved (--no-save)"
        resumed = f"; continuing conversation #{a.chat_id} ({len(a.turns)} messages)" if a.chat_id else ""
        self.say(f"This chat stays on this device ({where}){resumed}. /help for commands, /quit to leave.")
        try:
            while True:
                self.notes()
                line = self.ask_line("you> ")
                if line is None:
                    break
                if not line.strip():
                    continue
                try:
                    if line.startswith("/") and not line.startswith("//"):
                        if not self.command(line):
                            break
                    else:
                        self.answer(line[1:] if line.startswith("//") else line)
                except UsageError as err:
                    self.say(f"fedpersona: {err}")
        except KeyboardInterrupt:
            self.say()
        if a.chat_id is not None and a.save:
            self.say(f"conversation #{a.chat_id} saved in {i['state']} "
                     f"(`fedpersona feedback list --chat {a.chat_id} --state {i['state']}`; "
                     f"`feedback forget --chat {a.chat_id}` deletes it)")

    def answer(self, text: str) -> None:
        self.notes()
        sys.stdout.write("assistant> ")
        sys.stdout.flush()

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        answer = self.assistant.ask(text, show)
        ending = " [stopped]" if answer.stopped else " [...]" if answer.cut else ""
        cut = ", cut at --max-new-tokens" if answer.cut else ""
        dropped = f", {answer.dropped_turns} older messages left out of the context" if answer.dropped_turns else ""
        self.say(ending)
        self.say(f"  ({answer.tokens} tokens{cut}, {answer.tokens_per_s:.1f} tokens/s{dropped})")

    def command(self, line: str) -> bool:
        """Run an in-chat command; False to leave."""
        command, argument = _split(line)
        a = self.assistant
        if command in ("/quit", "/exit", "/q"):
            return False
        if command == "/compare":
            self.compare()
        elif command in ("/strength", "/method", "/temperature"):
            now = _settings_command(a, command, argument)
            self.say(f"method {now['method']}, strength {now['strength']:g}, temperature {now['temperature']:g}")
        elif command == "/new":
            a.new_conversation()
            self.say("new conversation")
        elif command == "/stats":
            for key, value in a.stats().items():
                self.say(f"  {key.replace('_', ' ')}: {'-' if value is None else value}")
        elif command in ("/help", "/?"):
            self.say(HELP)
        elif command == "/pick":
            self.say("pick in /compare: it asks which answer is better")
        else:
            self.say(f"unknown command {command}; /help lists them (//text sends /text)")
        return True

    def compare(self) -> None:
        self.say("comparing: two answers to your last message...")
        comparison = self.assistant.compare()
        for label, candidate in comparison.candidates.items():
            self.say(f"{label}: {candidate.text}")
        while True:
            reply = self.ask_line("Which is better? [a/b, Enter: neither] ")
            if reply is None or not reply.strip():
                self.assistant.pending = None
                self.say("nothing stored")
                return
            if reply.strip().upper() in ("A", "B"):
                break
            self.say("type a or b (or Enter for neither)")
        self.show_pick(comparison, self.assistant.pick(reply))

    def show_pick(self, comparison: Comparison, done: Pick) -> None:
        other = "B" if done.label == "A" else "A"
        stored = f"saved as pair #{done.pair_id}" if done.added else f"already stored as pair #{done.pair_id}"
        self.say(f"{stored}: you preferred {done.label} ({done.chosen.source}) over {other} "
                 f"({done.rejected.source}). It is trained on in the next round, under your privacy policy; "
                 "nothing was sent.")
