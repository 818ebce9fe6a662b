"""Data commands: ``fedpersona data inspect`` (users, sizes, disagreement, encoding), ``data styles`` (the
generated:styles pair file) and ``data synthetic`` (one synthetic user's pair file, data for a device without
writing code).

Commands of this group are added by ``register``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fedpersona.errors import UsageError

Opt = typer.Option
data_app = typer.Typer(no_args_is_help=True, help="Look at preference data files.")


@data_app.command("inspect")
def data_inspect(
    file: Annotated[Path, typer.Argument(help="A pair file or a dataset file in a known format.")],
    format_: Annotated[str, Opt("--format", help="auto, pairs, personalllm, psoups, prism, hh-rlhf.")] = "auto",
    users: Annotated[Optional[int], Opt(help="Users to form (hh-rlhf, personalllm).")] = None,
    model: Annotated[str, Opt(help="The model whose tokenizer checks the pairs (as in simulate --model).")] = "embedded",
    max_length: Annotated[int, Opt("--max-length", help="Tokens kept per pair (as in simulate --set max-length=N).")] = 96,
    check: Annotated[bool, Opt("--check/--no-check", help="Encode a sample of pairs with the model's tokenizer: pairs that carry no signal, text it cannot read.")] = True,
    json_out: Annotated[bool, Opt("--json")] = False,
) -> None:
    """Users, pairs per user (spread), disagreement between users, and how the model encodes the pairs."""
    from fedpersona.data.formats import load_format
    from fedpersona.model.inspect import format_inspection, inspect_pairs

    if max_length < 8:
        raise UsageError(f"--max-length {max_length}: need at least 8 tokens per pair")
    options: dict[str, Any] = {}
    if users is not None:
        options["num_users" if format_ == "personalllm" else "users"] = users
    info = inspect_pairs(load_format(file, format_, **options), model=model if check else None, max_length=max_length)
    print(json.dumps(info, indent=2) if json_out else format_inspection(info))


@data_app.command("styles")
def data_styles(
    out: Annotated[Path, Opt("--out", "-o", help="Pair file to write (JSONL).")],
    model: Annotated[str, Opt(help="The model that writes the answers (as in simulate --model).")] = "smollm2-135m-instruct",
    users: Annotated[int, Opt("--users", "-n", help="Users; user i has persona i mod 8.")] = 8,
    seed: Annotated[int, Opt(help="Sampling seed of the answers.")] = 0,
) -> None:
    """The generated:styles pair file (P-SOUPS-style opposite personas over the model's own answers)."""
    from fedpersona.io import atomic_write_bytes
    from fedpersona.simulations.styles import (answers_path, ensure_style_pairs, format_stats, read_answers,
                                               style_stats)

    pairs = ensure_style_pairs(model, users, seed)  # generates the answers once (minutes), then cached
    answers = answers_path(model, seed)
    print(format_stats(style_stats(read_answers(answers)[1])))
    atomic_write_bytes(out, pairs.read_bytes())
    rows = sum(1 for line in pairs.open(encoding="utf-8") if line.strip())
    print(f"wrote {rows} pairs of {users} users to {out}\nanswers cache: {answers}")


@data_app.command("synthetic")
def data_synthetic(
    out: Annotated[Path, Opt("--out", "-o", help="Pair file to write (JSONL), for `fedpersona feedback import`.")],
    user: Annotated[int, Opt("--user", help="Which user of the population (0-based).")] = 0,
    users: Annotated[int, Opt("--users", "-n", help="Users in the population (as in simulate --users).")] = 32,
    scenario: Annotated[str, Opt(help="conflicting, majority-minority, low-disagreement or mixed.")] = "conflicting",
    seed: Annotated[int, Opt(help="Seed of the population (as in simulate --seed).")] = 0,
    user_id: Annotated[Optional[str], Opt("--user-id", help="user_id written in every row (default: user-NNNNN).")] = None,
) -> None:
    """One synthetic user's pair file (training and held-out test pairs), the same pairs a simulation gives
    that user: data for a device (`fedpersona feedback import FILE --state DIR`)."""
    from fedpersona.data.schema import PreferencePair, write_pairs_jsonl
    from fedpersona.data.synthetic import SCENARIOS, PreferenceSimulator

    if scenario not in SCENARIOS:
        raise UsageError(f"--scenario {scenario}: unknown; use one of {', '.join(SCENARIOS)}")
    if users < 1:
        raise UsageError(f"--users {users}: need at least 1 user")
    if not 0 <= user < users:
        raise UsageError(f"--user {user}: outside the population's users 0..{users - 1}; raise --users or pick "
                         "another --user")
    if user_id is not None and not user_id.strip():
        raise UsageError("--user-id: empty; give a name such as alice, or leave it out")
    data = PreferenceSimulator(scenario, users, seed).user_data(user)
    name = user_id if user_id is not None else data.user_id
    pairs = [PreferencePair(name, p.prompt, p.chosen, p.rejected, p.split) for p in data.train + data.test]
    write_pairs_jsonl(pairs, out)
    print(f"wrote {len(pairs)} pairs of user {user} ({scenario}, seed {seed}) as {name!r} to {out}: "
          f"{len(data.train)} training, {len(data.test)} test")


def register(app: typer.Typer) -> None:
    """Add the ``data`` group to the ``fedpersona`` app."""
    app.add_typer(data_app, name="data")
