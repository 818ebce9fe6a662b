"""Data commands: ``fedpersona data inspect`` (users, sizes, disagreement, encoding) and ``data styles`` (the
generated:styles pair file).

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


def register(app: typer.Typer) -> None:
    """Add the ``data`` group to the ``fedpersona`` app."""
    app.add_typer(data_app, name="data")
