"""Generate the docs' reference pages from the code at build time (mkdocs-gen-files runs this; see mkdocs.yml).

Why generated: the command line, the settings and the built-in method names change with the code, and a
hand-copied reference drifts the day after it is written. Three pages come from here:

* ``reference/cli.md``: every ``fedpersona`` command and option, from the typer app (``fedpersona.cli.app``);
* ``reference/settings.md``: every ``RunConfig`` field by group, from ``fedpersona.config.describe_settings()``
  and ``GROUPS`` (the fields' metadata, the same text ``fedpersona settings`` prints);
* ``reference/methods.md``: the registered schemes, losses, strategies, data formats and attacks, from their
  registries (the names ``--scheme``, ``--set loss=``, ``--strategy``, ``--format`` and ``--set attack=`` take).

Run by hand to look at the output: ``python scripts/gen_docs_reference.py --print cli``.
"""

from __future__ import annotations

import html
import inspect
import sys
from collections.abc import Iterator

import click


def cell(text: object) -> str:
    """Text for a Markdown table cell: no line breaks, ``|`` escaped, HTML-significant characters escaped."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def para(text: str | None) -> str:
    """A command's help as Markdown paragraphs (HTML-significant characters escaped)."""
    return html.escape(inspect.cleandoc(text or ""), quote=False)


def option_names(param: click.Parameter) -> str:
    names = list(param.opts) + list(getattr(param, "secondary_opts", []))
    return ", ".join(f"`{n}`" for n in names)


def option_default(param: click.Parameter) -> str:
    if param.required:
        return "required"
    default = param.default
    if callable(default) or default is None or default == [] or default == ():
        return ""
    if isinstance(param, click.Option) and param.is_flag and not param.secondary_opts:
        return "off" if not default else "on"
    if isinstance(param, click.Option) and param.is_flag:
        return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
    return f"`{default}`"


def commands(group: click.Group, prefix: str) -> Iterator[tuple[str, click.Command]]:
    """Every command under ``group`` in registration order, sub-groups' commands after their group."""
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        if command.hidden:
            continue
        yield f"{prefix} {name}", command
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix} {name}")


def cli_page() -> str:
    import typer

    from fedpersona.cli import app

    root = typer.main.get_command(app)
    assert isinstance(root, click.Group)
    out = ["# Command line", "",
           "*Generated from the code (`fedpersona.cli`) at every docs build; `fedpersona COMMAND --help` prints "
           "the same.* Exit codes: 0 done, 2 bad input or usage (one line naming what, where and how to fix), "
           "1 internal error (details: [outputs and exit codes](outputs.md)). Any setting of "
           "[the settings reference](settings.md) goes through `--set key=value` where a command takes `--set`.", ""]
    listing = list(commands(root, "fedpersona"))
    out += ["| command | what it does |", "|---|---|"]
    for path, command in listing:
        anchor = path.replace(" ", "-")
        out.append(f"| [`{path}`](#{anchor}) | {cell((command.help or '').split(chr(10) + chr(10))[0])} |")
    out.append("")
    for path, command in listing:
        anchor = path.replace(" ", "-")
        out += [f"## `{path}` {{#{anchor}}}", "", para(command.help), ""]
        if isinstance(command, click.Group):
            out += ["Commands: " + ", ".join(f"[`{path} {n}`](#{anchor}-{n})" for n, c in
                                             command.commands.items() if not c.hidden), ""]  # type: ignore[attr-defined]
            continue
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
        usage = " ".join([path, *(a.human_readable_name for a in arguments), "[OPTIONS]" if options else ""])
        out += ["```text", usage.strip(), "```", ""]
        if arguments:
            out += ["| argument | meaning |", "|---|---|"]
            out += [f"| `{a.human_readable_name}` | {cell(getattr(a, 'help', '') or '')} |" for a in arguments]
            out.append("")
        if options:
            out += ["| option | default | meaning |", "|---|---|---|"]
            out += [f"| {option_names(o)} | {option_default(o)} | {cell(o.help or '')} |" for o in options]
            out.append("")
    return "\n".join(out)


def settings_page() -> str:
    from fedpersona.config import GROUPS, SIMULATION_ONLY, describe_settings

    simulation_only = {n.replace("_", "-") for n in SIMULATION_ONLY}
    out = ["# Settings", "",
           "*Generated from the code (`fedpersona.config.describe_settings()`, the fields' metadata) at every docs "
           "build; `fedpersona settings [WORD]` prints the same.*", "",
           "Every setting is one field of `RunConfig`. Set it the way that fits:", "",
           "| where | how |", "|---|---|",
           "| command line | `fedpersona simulate --set max-steps=8 --set beta=0.1` (`fedpersona server` and "
           "`benchmark` take `--set` too) |",
           "| TOML file | `--config run.toml`, keys at the top or in a `[fedpersona]` table: `max-steps = 8` |",
           "| Python | `fp.simulate(max_steps=8)`, `fp.load_config({\"max-steps\": 8})` |",
           "| `flwr run .` | `--run-config \"max-steps=8\"`, or `[tool.flwr.app.config]` in `pyproject.toml` |", "",
           "Names take dashes or underscores (`max-steps`, `max_steps`). Later sources win: defaults, `--config`, "
           "Flower's run config, `--set`, explicit flags. Settings marked **simulation only** describe the "
           "simulated world (synthetic users, their data, simulated attacks, seeded DP noise): a deployment server "
           "leaves them out of its messages and a device declines a round that carries one.", ""]
    rows = describe_settings()
    for group, title in GROUPS.items():
        members = [r for r in rows if r[3] == group]
        if not members:
            continue
        out += [f"## {title} {{#{group}}}", "", "| setting | default | meaning |", "|---|---|---|"]
        for name, default, meaning, _ in members:
            note = " **Simulation only.**" if name in simulation_only else ""
            out.append(f"| `{name}` | `{cell(default) or chr(32)}` | {cell(meaning)}{note} |")
        out.append("")
    return "\n".join(out)


def first_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def loss_arguments(fn: object) -> str:
    names = [p.name for p in inspect.signature(fn).parameters.values()  # type: ignore[arg-type]
             if p.kind is p.KEYWORD_ONLY and p.name != "beta" and p.default is not p.empty]
    return ", ".join(f"`{n}`" for n in names)


def methods_page() -> str:
    from fedpersona.alignment.losses import LOSSES
    from fedpersona.data.formats import FORMATS
    from fedpersona.strategies.attacks import ATTACKS
    from fedpersona.strategies.registry import STRATEGIES
    from fedpersona.strategies.schemes import SCHEMES

    out = ["# Built-in methods", "",
           "*Generated from the registries at every docs build.* Each kind of method is a registry: a built-in is "
           "registered by the same decorator you use for your own ([the plug-in tutorial](../tutorials/plugins.md)), "
           "and everywhere a method is named (command line, TOML, `fp.simulate`) it is spelled `NAME`, "
           "`package.module:NAME` (a module in the working directory first), either with arguments "
           "`NAME(key=value,...)`. Names are case-insensitive.", ""]
    out += ["## Personalization schemes", "", "`--scheme NAME`, `scheme = \"NAME\"`. What is shared, private or "
            "frozen: [personalization schemes](../explanation/schemes.md).", "",
            "| scheme | what it is | under pair-level DP |", "|---|---|---|"]
    for name in SCHEMES.names():
        scheme = SCHEMES.get(name)[0]
        out.append(f"| `{name}` | {cell(scheme.description)} | {'yes' if scheme.supports_dp else 'refused'} |")
    out += ["", "## Pairwise losses", "", "`--set loss=NAME` or `loss=NAME(key=value)`. A loss takes the summed "
            "response log-probs of policy and reference, chosen and rejected, `[n]` each, and returns one loss per "
            "pair.", "", "| loss | what it is | arguments |", "|---|---|---|"]
    for name in LOSSES.names():
        fn = LOSSES.get(name)[0]
        out.append(f"| `{name}` | {cell(first_line(fn))} | {loss_arguments(fn)} |")
    out += ["", "## Aggregation strategies", "", "`--strategy NAME` or `--strategy 'NAME(key=value,...)'`; "
            "`package.module:Class` for a `flwr.serverapp.strategy.Strategy` of your own.", "",
            "| strategy | Flower class |", "|---|---|"]
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)[0]
        module = "flwr.serverapp.strategy" if cls.__module__.startswith("flwr.serverapp.strategy.") else cls.__module__
        out.append(f"| `{name}` | `{module}.{cls.__qualname__}` |")
    out += ["", "## Data formats", "", "`--data FORMAT:PATH`, `--format FORMAT` ([data formats](../how-to/data-formats.md)).",
            "", "| format | what it reads | options |", "|---|---|---|"]
    for name in FORMATS.names():
        fmt = FORMATS.get(name)[0]
        options = ", ".join(f"`{o}`" for o in fmt.options)
        out.append(f"| `{name}` | {cell(fmt.summary)} | {options} |")
    out += ["", "## Simulated attacks", "", "`--set attack=NAME --set attack-users=K` (simulation only: a device "
            "refuses these settings).", "", "| attack | what the attacker's reply does |", "|---|---|"]
    for name in ATTACKS.names():
        out.append(f"| `{name}` | {cell(first_line(ATTACKS.get(name)[0]))} |")
    out.append("")
    return "\n".join(out)


PAGES = {"cli": ("reference/cli.md", cli_page), "settings": ("reference/settings.md", settings_page),
         "methods": ("reference/methods.md", methods_page)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--print":
        print(PAGES[sys.argv[2]][1]())
        return
    import mkdocs_gen_files

    for path, make in PAGES.values():
        with mkdocs_gen_files.open(path, "w") as page:
            page.write(make())


main()
