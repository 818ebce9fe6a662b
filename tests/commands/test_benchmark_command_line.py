"""``benchmark.md``'s "Command:" line is the command as given: every option set on the command line, so pasting
it into a shell runs the same benchmark (parsed by the real ``fedpersona benchmark`` command, not run)."""

from __future__ import annotations

import shlex

import typer

from fedpersona.cli import app
from fedpersona.commands.research import given_command

ARGV = ["--schemes", "split,pal", "--strategies", "FedAvg,FedProx(proximal_mu=0.01)", "-n", "4", "--rounds", "2",
        "--set", "max-steps=2", "--set", "lr=0.01", "--dp", "--target-epsilon", "4", "--out", "runs/my bench",
        "--no-plots", "--new-users", "0"]


def parse(argv: list[str]):
    command = typer.main.get_command(app).commands["benchmark"]  # type: ignore[attr-defined]
    return command.make_context("benchmark", list(argv))


def test_every_given_option_is_recorded_and_replays() -> None:
    line = given_command(parse(ARGV))
    assert line == ("fedpersona benchmark --schemes split,pal --strategies 'FedAvg,FedProx(proximal_mu=0.01)' "
                    "--users 4 --rounds 2 --new-users 0 --dp --target-epsilon 4.0 --set max-steps=2 --set lr=0.01 "
                    "--out 'runs/my bench' --no-plots")
    words = shlex.split(line)
    assert words[:2] == ["fedpersona", "benchmark"]
    assert parse(words[2:]).params == parse(ARGV).params  # the recorded line means the same benchmark


def test_defaults_are_not_invented() -> None:
    assert given_command(parse([])) == "fedpersona benchmark"
    assert given_command(parse(["--quiet"])) == "fedpersona benchmark --quiet"
