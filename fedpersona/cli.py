"""The ``fedpersona`` command: it assembles the command groups of ``fedpersona.commands``; the work lives
in the packages (and every command is a Python call too: ``fedpersona.simulate``, ``fedpersona.benchmark``).

Exit codes: 0 done, 2 bad input or usage (one clear line on stderr), 1 internal error.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import typer

from fedpersona.commands import chat, common, data, deploy, device, research
from fedpersona.errors import RunFailed, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated, privacy-preserving personalized preference alignment of language models.")
for group in (research, data, deploy, device, chat):
    group.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: UsageError -> one line on stderr and exit 2; anything else unexpected -> exit 1."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in common.STOP_CODES} if main_thread else {}
    try:
        _main(argv)
    finally:  # in-process callers (tests) get their own signal handling back
        common._STOP["out"] = None
        if (display := sys.modules.get("fedpersona.display")) is not None:
            display.RunLog.last = None
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


def _main(argv: list[str] | None) -> None:
    try:
        # standalone_mode=False hands typer.Exit(code) back as the return value instead of exiting
        code = app(args=argv, standalone_mode=False)
    except UsageError as err:
        print(f"fedpersona: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as err:
        from fedpersona.display import RunLog

        log = RunLog.last
        print(f"fedpersona: run failed: {err}" + (f" (log: {log.path})" if log is not None and log.committed else ""),
              file=sys.stderr)
        sys.exit(1)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print("fedpersona: aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # click usage errors carry their own exit code (2)
        import click

        if isinstance(err, click.ClickException):
            if "Did you mean" in str(getattr(err, "message", "")) and getattr(err, "possibilities", None):
                err.possibilities = None  # typer's message already suggests; click would append it again
            err.show()
            sys.exit(err.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
