"""The ``spotlane`` command line: a thin Typer shell over the Python API.

Conventions: ``--config PATH`` and ``--debug`` go anywhere on the line (or
``$SPOTLANE_CONFIG`` / ``SPOTLANE_DEBUG=1``); a job is named by its id, a unique
prefix of it, or ``latest``; errors print as one line (``error: ...``) with exit
status 2 for bad input or usage and 1 for everything else, and ``--debug`` shows
the traceback instead. A bare ``spotlane`` prints the help.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

# Importing the command modules registers their commands on the app, in this order in --help.
# isort: off
from pipeline.cli import run, status, control, ops  # noqa: F401

# isort: on
from pipeline.cli.app import _STATE, app, err
from schemas.errors import SpotlaneError

__all__ = ["app", "main"]

#: Options every command takes, wherever they are written on the line.
_GLOBAL = {"--config": True, "-c": True, "--debug": False}


def _hoist(argv: list[str]) -> list[str]:
    """Move ``--config PATH`` / ``--config=PATH`` / ``-c PATH`` and ``--debug`` to the front,
    where Typer reads them, wherever the user wrote them."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            rest.extend(argv[i:])
            break
        name = word.split("=", 1)[0]
        if name in _GLOBAL:
            if _GLOBAL[name] and "=" not in word and i + 1 < len(argv):
                front += [word, argv[i + 1]]
                i += 2
                continue
            front.append(word)
        else:
            rest.append(word)
        i += 1
    return front + rest


def main() -> None:
    """Entry point: run the app, turning ``SpotlaneError`` into one line and an exit code."""
    argv = _hoist(sys.argv[1:])
    _STATE["debug"] = "--debug" in argv or os.environ.get("SPOTLANE_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        # Without standalone mode click returns typer.Exit's code instead of exiting.
        code = app(argv, prog_name="spotlane", standalone_mode=False)
    except SpotlaneError as exc:
        if _STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: a missing argument, a bad option value
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        sys.exit(0 if exc.__class__.__name__ == "NoArgsIsHelpError" else int(getattr(exc, "exit_code", 2)))
    except Exception as exc:  # the unexpected
        if _STATE["debug"]:
            raise
        err.print(
            f"[red]error:[/red] {exc.__class__.__name__}: {escape(str(exc))} (run with --debug for the traceback)"
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
