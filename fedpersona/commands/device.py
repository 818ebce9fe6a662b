"""A user's commands on their device: ``feedback add/import/list/stats/forget``, ``generate``, ``export``.

All of them work on one device state directory (``--state DIR``, or ``$FEDPERSONA_STATE``); see
``fedpersona.device.state``. The ``feedback`` commands touch only the preference memory and
import no torch, so they stay fast; ``feedback import`` alone loads the state's tokenizer (not its
weights) to check how the pairs encode (``--no-check`` skips it). ``generate`` and ``export`` rebuild the model the state belongs to
(``meta.json``: model id and scheme; adapter ranks from meta.json if recorded, else read off the stored
tensors) and load the stored shared and private tensors into it.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from fedpersona.errors import UsageError

if TYPE_CHECKING:
    import torch

    from fedpersona.device.state import DeviceState
    from fedpersona.config import RunConfig
    from fedpersona.model.resident import ResidentModel

Opt = typer.Option
DEFAULT_USER = "me"  # the user id of a device's first pair when no --user is given
STATE_HELP = "The device state folder (your feedback, adapters and ledger)."

feedback_app = typer.Typer(no_args_is_help=True,
                           help="Your preference feedback on this device: add, import, list, stats, forget.")

StateOpt = Annotated[Path, Opt("--state", envvar="FEDPERSONA_STATE", help=STATE_HELP)]
JsonOpt = Annotated[bool, Opt("--json", help="Machine-readable JSON on stdout instead of a table.")]


def register(app: typer.Typer) -> None:
    """Add this group's commands to the ``fedpersona`` app."""
    app.add_typer(feedback_app, name="feedback")
    app.command("generate")(generate)
    app.command("export")(export)


# ---------------------------------------------------------------------------- helpers


def _open(state: Path, *, create: bool) -> DeviceState:
    from fedpersona.device.state import DeviceState

    return DeviceState(state, create=create)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _short(text: str, width: int = 48) -> str:
    """One line of at most ``width`` characters (newlines shown as spaces)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _interactive() -> bool:
    """Whether a person can be asked (stdin and stdout are terminals)."""
    return sys.stdin.isatty() and sys.stdout.isatty()


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No weight-loading progress bars or library deprecation warnings on a user's terminal."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _check_text(flag: str, text: str) -> None:
    """Command-line text that is not valid Unicode (bytes the terminal's encoding could not decode arrive
    as lone surrogates) is refused with one line instead of failing inside SQLite."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UsageError(f"{flag}: not valid text in this terminal's encoding (byte 0x{ord(text[err.start]) & 0xff:02x} "
                         f"at position {err.start + 1}); use a UTF-8 terminal (LANG=C.UTF-8) or `feedback import` "
                         "a UTF-8 file") from None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------------------- feedback


@feedback_app.command("add")
def feedback_add(
    state: StateOpt,
    prompt: Annotated[str, Opt("--prompt", "-p", help="The prompt.")],
    chosen: Annotated[str, Opt("--chosen", "-c", help="The response you prefer.")],
    rejected: Annotated[str, Opt("--rejected", "-r", help="The response you prefer less.")],
    user: Annotated[Optional[str], Opt("--user", help=f"User id (default: the device's, else '{DEFAULT_USER}').")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Store one preference pair in this device's memory."""
    from fedpersona.data.schema import PreferencePair

    for flag, text in (("--prompt", prompt), ("--chosen", chosen), ("--rejected", rejected), ("--user", user or "")):
        _check_text(flag, text)

    with _open(state, create=True) as st:
        memory = st.memory
        user_id = user if user is not None else (memory.user_id() or DEFAULT_USER)
        pair = PreferencePair(user_id, prompt, chosen, rejected)
        existing = memory.contains(pair)
        pair_id = memory.add(pair, source="add") if existing is None else existing
        row = memory.get(pair_id)
    added = existing is None
    if json_out:
        _print_json({"added": added, **(row.to_json() if row else {"id": pair_id})})
    elif added:
        print(f"added pair #{pair_id} for user {user_id!r} ({row.split if row else '?'} split) to {state}")
    else:
        print(f"already stored as pair #{pair_id}; nothing added")


@feedback_app.command("import")
def feedback_import(
    spec: Annotated[str, typer.Argument(metavar="FILE", help="The file: a JSONL pair file (user_id, prompt, chosen, rejected[, split]), or another dataset format as FORMAT:PATH or with --format.")],
    state: StateOpt,
    as_user: Annotated[Optional[str], Opt("--as-user", help="File every row under this user id.")] = None,
    data_format: Annotated[Optional[str], Opt("--format", help="The file's format when it is not a fedpersona pair file: hh-rlhf, psoups, prism, personalllm, auto (detect from the first row), or package.module:NAME; options as FORMAT(key=value), e.g. 'prism(user=user42)'.")] = None,
    check: Annotated[bool, Opt("--check/--no-check", help="Check how the model encodes the pairs (loads its tokenizer, not its weights): pairs that become identical token ids, text it cannot read.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Import a pair file (or a dataset in another format): validated whole first, then all rows in one
    transaction (or none)."""
    from fedpersona.commands.common import with_format
    from fedpersona.data.sources import parse_data_spec

    data_format, path = parse_data_spec(with_format(spec, data_format) or spec)
    file, pairs = Path(path), None
    if data_format is not None:  # read and checked whole before the device's state is opened
        from fedpersona.data.formats import load_format

        pairs = load_format(file, data_format)
    with _open(state, create=True) as st:
        if pairs is None:
            added, duplicates = st.memory.import_file(file, as_user=as_user)
        else:
            added, duplicates = st.memory.import_pairs(pairs, str(file), as_user=as_user,
                                                       source=f"import:{data_format}:{file.name}")
        total = st.memory.count()
        try:
            model = str((st.meta() or {}).get("model_id") or "embedded")  # the state's model, else the default
        except UsageError:  # a damaged meta.json is `fedpersona client`'s to report, not the import's
            model = "embedded"
    if check and added + duplicates:
        _import_check(file if pairs is None else pairs, model)
    if json_out:
        _print_json({"file": str(file), "format": data_format or "fedpersona", "added": added,
                     "duplicates": duplicates, "pairs": total})
    else:
        dup = f", {duplicates} already stored" if duplicates else ""
        print(f"imported {added} pairs from {file}{dup}; {total} pairs in {state}")


def _import_check(file: Path | list, model: str) -> None:
    """How ``model`` encodes the file's pairs (a sample) at the default max-length: one warning line on
    stderr per problem (no-signal pairs, unreadable text; also with --json, whose object stays as it was).
    The pairs are imported either way; a model that cannot be loaded here is one note line, not a failed
    import."""
    from fedpersona.data.schema import iter_pairs_jsonl
    from fedpersona.model.embedded import EMBEDDED_NAME, embedded_path
    from fedpersona.model.signal import DEFAULT_MAX_LENGTH, check_data

    name, _, seed = model.partition(":")
    if name == EMBEDDED_NAME and (seed or "0").isdigit():
        if not (embedded_path(int(seed or 0)) / "config.json").exists():  # building takes a while: not here
            print(f"fedpersona: note: pairs not checked against model {model} (not built yet on this device; "
                  "`fedpersona client` builds it)", file=sys.stderr)
            return
    try:
        with _quiet_loading():
            report = check_data(iter_pairs_jsonl(file) if isinstance(file, Path) else file, model,
                                DEFAULT_MAX_LENGTH)
    except UsageError as err:
        print(f"fedpersona: note: pairs not checked against model {model} ({err})", file=sys.stderr)
        return
    for line in report.warnings("the server's --set max-length={n}"):
        print(f"fedpersona: warning: {line}", file=sys.stderr)


@feedback_app.command("list")
def feedback_list(
    state: StateOpt,
    limit: Annotated[int, Opt("--limit", "-n", help="Pairs (or conversations) to show (0: all).")] = 20,
    offset: Annotated[int, Opt("--offset", help="Skip this many first.")] = 0,
    chats: Annotated[bool, Opt("--chats", help="List your stored conversations (`fedpersona chat`) instead of pairs.")] = False,
    chat: Annotated[Optional[int], Opt("--chat", help="Show the messages of one stored conversation.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List stored pairs, oldest first, one page at a time (or your conversations: --chats, --chat ID)."""
    if chat is not None:
        return _show_chat(state, chat, json_out)
    if chats:
        return _list_chats(state, limit, offset, json_out)
    with _open(state, create=False) as st:
        rows = st.memory.list(None if limit == 0 else limit, offset)
        total = st.memory.count()
        conversations = st.memory.chat_stats()["chats"]
    if json_out:
        _print_json([r.to_json() for r in rows])
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_lines=False)
    for column, style in (("id", "bold"), ("split", None), ("prompt", None), ("chosen", "green"),
                          ("rejected", "red"), ("added", "dim")):
        table.add_column(column, style=style, overflow="fold")
    for r in rows:  # user text is never rich markup: "[b]" in a prompt stays "[b]"
        table.add_row(str(r.id), r.split, *(escape(_short(t)) for t in (r.prompt, r.chosen, r.rejected)),
                      r.created_at[:16].replace("T", " "))
    console = _console()
    console.print(f"feedback in {state}", markup=False)
    console.print(table)
    end = offset + len(rows)
    more = f"; --offset {end} for more" if end < total else ""
    console.print(f"pairs {offset + 1 if rows else 0}-{end} of {total}{more}", markup=False)
    if conversations:
        console.print(f"{conversations} conversation{'s' if conversations != 1 else ''} stored (`fedpersona chat`); "
                      "--chats lists them", markup=False)


def _list_chats(state: Path, limit: int, offset: int, json_out: bool) -> None:
    with _open(state, create=False) as st:
        rows = st.memory.chats(None if limit == 0 else limit, offset)
        total = st.memory.chat_stats()["chats"]
    if json_out:
        _print_json([r.to_json() for r in rows])
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_lines=False)
    for column, style in (("id", "bold"), ("started", "dim"), ("last", "dim"), ("messages", None),
                          ("pairs", None), ("first message", None)):
        table.add_column(column, style=style, overflow="fold")
    for r in rows:
        table.add_row(str(r.id), r.started_at[:16].replace("T", " "), r.updated_at[:16].replace("T", " "),
                      str(r.messages), str(r.pairs), escape(_short(r.first_message)))
    console = _console()
    console.print(f"conversations in {state} (they never leave this device; `feedback forget --chat ID` "
                  "deletes one)", markup=False)
    console.print(table)
    end = offset + len(rows)
    more = f"; --offset {end} for more" if end < total else ""
    console.print(f"conversations {offset + 1 if rows else 0}-{end} of {total}{more}; --chat ID shows one",
                  markup=False)


def _show_chat(state: Path, chat_id: int, json_out: bool) -> None:
    with _open(state, create=False) as st:
        messages = st.memory.chat_messages(chat_id)
    if messages is None:
        raise UsageError(f"--chat {chat_id}: no conversation #{chat_id} in {state}; --chats lists them")
    if json_out:
        _print_json([m.to_json() for m in messages])
        return
    console = _console()
    console.print(f"conversation #{chat_id} in {state}", markup=False)
    for m in messages:
        how = m.info
        detail = ""
        if m.role == "assistant" and how.get("method"):
            detail = f"  [{how['method']} {how.get('strength', '')}" + (
                f", your pick over the {how['picked_over']} answer (pair #{how.get('pair_id')})" if how.get("picked_over")
                else "") + "]"
        console.print(f"{'you' if m.role == 'user' else 'assistant'}> {m.content}{detail}", markup=False,
                      highlight=False)


@feedback_app.command("stats")
def feedback_stats(state: StateOpt, json_out: JsonOpt = False) -> None:
    """How much feedback this device holds (pairs, and your stored conversations), and what was trained on it."""
    with _open(state, create=False) as st:
        stats = st.memory.stats()
        stats.update(st.memory.chat_stats())  # chats, chat_messages, chat_pairs (pairs picked in `fedpersona chat`)
        counters = st.counters()
        meta = st.meta() or {}
        stats.update(rounds_trained=counters.get("rounds_trained", 0), last_round=counters.get("last_round"),
                     model_id=meta.get("model_id"), scheme=meta.get("scheme"),
                     private_adapter=st.private_path.exists(), shared_adapter=st.shared_path.exists(),
                     **_privacy_stats(st))
    if json_out:
        _print_json(stats)
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    labels = {"pairs": "pairs", "train": "  train", "test": "  test (held out)",
              "chat_pairs": "  picked in your chats (/compare)", "chats": "conversations stored (chat)",
              "chat_messages": "  messages in them", "user_id": "user",
              "first_added": "first added", "last_added": "last added", "rounds_trained": "rounds trained",
              "last_round": "last server round", "model_id": "model", "scheme": "scheme",
              "private_adapter": "private adapter", "shared_adapter": "shared adapter",
              "epsilon_spent": "epsilon spent (pair-level)", "policy": "privacy policy"}
    for key, label in labels.items():
        value = stats.get(key)
        shown = "yes" if value is True else "no" if value is False else "-" if value is None else str(value)
        table.add_row(label, escape(shown))
    console = _console()
    console.print(f"feedback in {state}", markup=False)
    console.print(table)


def _privacy_stats(st: DeviceState) -> dict[str, Any]:
    """The epsilon this device has spent (its ledger, else what forgotten pairs cost) and its policy."""
    from fedpersona.device.policy import DevicePolicy
    from fedpersona.privacy.ledger import PrivacyLedger

    ledger = st.load_ledger()
    policy = DevicePolicy.load(st.dir) or DevicePolicy()
    epsilon = PrivacyLedger.from_json(ledger).spent_epsilon() if ledger else None
    if epsilon is None:  # no ledger yet: what retired ledgers spent on the pairs now stored (privacy record)
        from fedpersona.device.privacy_record import PrivacyRecord
        from fedpersona.privacy.accountant import epsilon_of_history

        pairs = st.memory.list(None, 0) if st.memory_path.exists() else []
        prior, delta = PrivacyRecord(st.dir).spent_on(pairs)
        delta = delta or policy.max_delta
        epsilon = epsilon_of_history(prior, delta, "rdp") if prior else None
    return {"epsilon_spent": epsilon, "policy": policy.describe()}


@feedback_app.command("forget")
def feedback_forget(
    state: StateOpt,
    yes: Annotated[bool, Opt("--yes", "-y", help="Do not ask for confirmation.")] = False,
    chats: Annotated[bool, Opt("--chats", help="Delete only your stored conversations (your pairs and adapters stay).")] = False,
    chat: Annotated[Optional[int], Opt("--chat", help="Delete one stored conversation (pairs you made in it stay).")] = None,
) -> None:
    """Delete all your feedback, conversations, private adapter, privacy ledger and caches from this device."""
    from fedpersona.device.state import USER_FILES

    if chats or chat is not None:
        return _forget_chats(state, chat, yes)
    with _open(state, create=False) as st:
        try:
            pairs: int | None = st.memory.count() if st.memory_path.exists() else 0
            conversations = st.memory.chat_stats()["chats"] if st.memory_path.exists() else 0
        except UsageError:
            pairs, conversations = None, 0  # a damaged database: what forget is for, so it is deleted all the same
        present = [f.name for f in st.files() if any(f.name.startswith(n) for n in USER_FILES)]
        if not present:
            print(f"nothing to forget in {state}")
            return
        parts = [f"{pairs} feedback pairs" if pairs is not None else "the damaged feedback memory"]
        parts += [f"{conversations} conversation{'s' if conversations != 1 else ''}"] if conversations else []
        parts += [label for path, label in ((st.private_path, "your private adapter"),
                                            (st.ledger_path, "the privacy ledger")) if path.exists()]
        what = f"{', '.join(parts)} and caches in {state}"
        if not yes:
            if not _interactive():
                raise UsageError(f"feedback forget: would delete {what}; no terminal to confirm on, "
                                 "pass --yes to delete without asking")
            if not typer.confirm(f"Delete {what}? This cannot be undone.", default=False):
                print("fedpersona: nothing deleted", file=sys.stderr)
                # SystemExit, not typer.Exit: cli.main drops the code of a typer.Exit (standalone_mode=False)
                raise SystemExit(1)
        others = st.open_elsewhere()
        try:
            removed = st.forget()
        except OSError as err:
            from fedpersona.io import storage_error

            raise (storage_error(err, state, "feedback forget") or err) from None
    if others:  # their descriptors now read zeros (DeviceState.forget); say who they were
        print(f"fedpersona: note: process{'es' if len(others) > 1 else ''} {', '.join(map(str, others))} had your "
              "memory open; its files were overwritten before they were deleted, so nothing of them stays "
              "readable there (a `fedpersona client` or `chat` there goes on with an empty memory)", file=sys.stderr)
    chats_gone = f" and {conversations} conversation{'s' if conversations != 1 else ''}" if conversations else ""
    print(f"forgot {'the damaged memory' if pairs is None else f'{pairs} pairs'}{chats_gone}; deleted {', '.join(removed) or 'nothing'} from {state}"
          + ("; what they cost in privacy stays in privacy_record.json (hashes, no text), so importing them again "
             "continues their budget" if "ledger.json" in removed else ""))


def _forget_chats(state: Path, chat_id: int | None, yes: bool) -> None:
    """``feedback forget --chats`` / ``--chat ID``: conversations only; pairs made in them are feedback and stay."""
    with _open(state, create=False) as st:
        if not st.memory_path.exists():
            print(f"nothing to forget in {state}")
            return
        memory = st.memory
        if chat_id is not None:
            if memory.chat_messages(chat_id) is None:
                raise UsageError(f"--chat {chat_id}: no conversation #{chat_id} in {state}; "
                                 "`feedback list --chats` lists them")
            what = f"conversation #{chat_id}"
        else:
            count = memory.chat_stats()["chats"]
            if not count:
                print(f"no conversations to forget in {state}")
                return
            what = f"{count} conversation{'s' if count != 1 else ''}"
        if not yes:
            if not _interactive():
                raise UsageError(f"feedback forget: would delete {what} from {state}; no terminal to confirm on, "
                                 "pass --yes to delete without asking")
            if not typer.confirm(f"Delete {what} from {state}? Pairs you made in them stay. This cannot be undone.",
                                 default=False):
                print("fedpersona: nothing deleted", file=sys.stderr)
                raise SystemExit(1)
        if chat_id is not None:
            memory.remove_chat(chat_id)
        else:
            memory.forget_chats()
    print(f"forgot {what} from {state}; your pairs, adapters and ledger stay")


@feedback_app.command("reset-budget")
def feedback_reset_budget(
    state: StateOpt,
    yes: Annotated[bool, Opt("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Start the privacy budget over after the ledger was lost: deletes the private adapter and counters.

    What it means: the device no longer knows what it spent, so the epsilon it reports from now on covers
    only the rounds after the reset; updates it sent before are outside that guarantee. Your pairs stay."""
    with _open(state, create=False) as st:
        problem = st.ledger_problem()
        if problem is None:
            raise UsageError(f"--state {state}: the privacy ledger is intact (or nothing was spent yet); there is "
                             "no budget to reset")
        what = (f"the budget of {state} starts over: updates sent before are outside the guarantee from now on; "
                "the private adapter and counters are deleted, your pairs stay")
        if not yes:
            if not _interactive():
                raise UsageError(f"feedback reset-budget: {what}; no terminal to confirm on, pass --yes")
            if not typer.confirm(f"{what[0].upper()}{what[1:]}. Continue?", default=False):
                print("fedpersona: nothing changed", file=sys.stderr)
                raise SystemExit(1)
        removed = st.reset_budget()
    print(f"budget reset; deleted {', '.join(removed) or 'nothing'} from {state}")


# ---------------------------------------------------------------------------- adapters of a state

_LORA_NAME = re.compile(r"\.lora_([AB])\.([^.]+)\.weight$")


def adapter_ranks(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Rank of each LoRA adapter in stored tensors: rows of ``lora_A``, columns of ``lora_B``."""
    ranks: dict[str, int] = {}
    for name, tensor in tensors.items():
        match = _LORA_NAME.search(name)
        if match and tensor.dim() == 2:
            ranks[match.group(2)] = int(tensor.shape[0] if match.group(1) == "A" else tensor.shape[1])
    return ranks


def state_config(st: DeviceState, shared: Mapping[str, torch.Tensor] | None,
                 private: Mapping[str, torch.Tensor] | None, device: str = "auto") -> RunConfig:
    """The RunConfig whose resident model fits this state: meta.json's model and scheme; ranks and seed
    from meta.json when recorded, else read off the tensors (adapter 'private' -> private_rank, any
    other adapter -> shared_rank, pal's adapters 'protoK' -> pal_prototypes), else RunConfig's defaults."""
    from fedpersona.config import RunConfig

    meta = st.meta()
    if meta is None or not meta.get("model_id") or not meta.get("scheme"):
        raise UsageError(f"--state {st.dir}: {st.meta_path.name} is missing or names no model/scheme, so the "
                         "adapters cannot be matched to a model; run `fedpersona client` with this --state")
    defaults = RunConfig()
    ranks = {**adapter_ranks(shared or {}), **adapter_ranks(private or {})}
    others = [r for name, r in ranks.items() if name != "private"]

    def setting(key: str, inferred: int | None, default: int, least: int = 1) -> int:
        value = meta.get(key)
        if value is None:
            return inferred if inferred is not None else default
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise UsageError(f"{st.meta_path}: '{key}' must be an integer >= {least}, got {value!r}; "
                             "fix or remove it")
        return value

    prototypes = sum(1 for name in ranks if re.fullmatch(r"proto\d+", name))  # pal: one adapter per prototype
    return RunConfig(model=str(meta["model_id"]), scheme=str(meta["scheme"]), accelerator=device,
                     shared_rank=setting("shared_rank", others[0] if others else None, defaults.shared_rank),
                     private_rank=setting("private_rank", ranks.get("private"), defaults.private_rank),
                     pal_prototypes=setting("pal_prototypes", prototypes or None, defaults.pal_prototypes),
                     seed=setting("seed", None, defaults.seed, least=0))


def load_state_resident(st: DeviceState, device: str = "auto") -> tuple[ResidentModel, RunConfig, bool]:
    """This process's resident model holding the state's shared and private tensors.

    Returns ``(resident, config, has_private)``; a state without private tensors generates with the
    private part at its initial value (the global model).
    """
    from fedpersona.round.resident import resident_for
    from fedpersona.model.adapters import Role
    from fedpersona.strategies.schemes import get_scheme

    shared, private = st.load_shared(), st.load_private()
    if shared is None and private is None:
        raise UsageError(f"--state {st.dir}: no adapters yet: run `fedpersona client` first")
    config = state_config(st, shared, private, device)
    get_scheme(config.scheme)  # an unknown scheme in meta.json: a clear UsageError
    with _quiet_loading():
        resident = resident_for(config)
    fits = (f"model {config.model!r}, scheme {config.scheme!r}, ranks {config.shared_rank}/{config.private_rank}")
    try:
        if resident.adapters.names(Role.SHARED):
            if shared is None:
                raise UsageError(f"--state {st.dir}: no shared adapter yet: run `fedpersona client` first "
                                 "(it keeps the last shared adapter received from the server)")
            resident.adapters.load(shared, Role.SHARED)
        resident.adapters.reset(Role.FROZEN)
        if private is None or not resident.adapters.names(Role.PRIVATE):
            resident.adapters.reset(Role.PRIVATE)
        else:
            resident.adapters.load(private, Role.PRIVATE)
    except (ValueError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"--state {st.dir}: stored adapters do not fit {fits} ({first}); "
                         "check meta.json or run `fedpersona client` again") from None
    return resident, config, private is not None and bool(resident.adapters.names(Role.PRIVATE))


# ---------------------------------------------------------------------------- generate and export


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt to answer.")],
    state: StateOpt,
    strength: Annotated[float, Opt("--strength", "-s", help="How personal: 0 global ... 1 fully personal (--method logits: up to 4, above 1 extrapolates).")] = 1.0,
    max_new_tokens: Annotated[int, Opt("--max-new-tokens", help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, Opt("--temperature", "-t", help="0: greedy (deterministic); > 0 samples.")] = 0.0,
    seed: Annotated[int, Opt("--seed", help="Sampling seed (with --temperature > 0).")] = 0,
    device: Annotated[str, Opt("--accelerator", "--device", help="Where the model computes: auto, cpu, cuda or cuda:N.")] = "auto",
    method: Annotated[str, Opt("--method", "-m", help="weights: scale your private adapter's tensors (one forward per token); logits: mix the personal and global models' next-token log-probs (Decoding-time Realignment, two forwards per token).")] = "weights",
    json_out: JsonOpt = False,
) -> None:
    """Answer a prompt with base + shared + your private adapter."""
    if method not in ("weights", "logits"):
        raise UsageError(f"--method {method}: must be one of weights, logits")
    limit = 4.0 if method == "logits" else 1.0  # fedpersona.alignment.mixing.MAX_MIX_WEIGHT (no torch import here)
    if not 0.0 <= strength <= limit:
        raise UsageError(f"--strength {strength}: must be between 0 (global) and 1 (fully personal)"
                         + (" or up to 4 with --method logits (above 1 extrapolates)" if method == "logits" else ""))
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if temperature < 0:
        raise UsageError(f"--temperature {temperature}: must be 0 (greedy) or more")
    if not prompt.strip():
        raise UsageError("generate: the prompt is empty; pass the prompt text as the argument")
    from fedpersona.alignment.generation import generate as run

    with _open(state, create=False) as st:
        resident, config, has_private = load_state_resident(st, device)
    from fedpersona.strategies.schemes import get_scheme

    if not has_private and strength > 0 and get_scheme(config.scheme).has_private:
        print("fedpersona: note: no private adapter in this state yet; answering with the global model",
              file=sys.stderr)
    text = run(resident, [prompt], strength=strength, max_new_tokens=max_new_tokens, temperature=temperature,
               seed=seed, method=method)[0]
    if json_out:
        _print_json({"prompt": prompt, "text": text, "strength": strength, "method": method,
                     "model_id": config.model, "scheme": config.scheme})
    else:
        print(text)


def export(
    state: StateOpt,
    out: Annotated[Path, Opt("--out", "-o", help="Folder to write: PEFT adapter folders that reproduce your personal model (pal: one merged adapter), README.txt, a manifest.")],
    strength: Annotated[float, Opt("--strength", "-s", help="Private adapter scaled as in `generate`.")] = 1.0,
    force: Annotated[bool, Opt("--force", help="Overwrite an earlier export in --out.")] = False,
) -> None:
    """Write your adapters in PEFT's format, loadable with transformers + peft alone (see OUT/README.txt)."""
    from fedpersona.model.export import export_adapters
    from fedpersona.model.loading import resolve_model_path

    with _open(state, create=False) as st:
        resident, config, _ = load_state_resident(st, "cpu")
        info = {"model_id": config.model, "scheme": config.scheme, "shared_rank": config.shared_rank,
                "private_rank": config.private_rank, "rounds_trained": st.counters().get("rounds_trained", 0)}
    written = export_adapters(resident, out, base_model=resolve_model_path(config.model), strength=strength,
                              force=force, info=info)
    print(f"exported {', '.join(p.name for p in written)} to {out} (PEFT format; see {out}/README.txt)")
