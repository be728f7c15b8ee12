"""The entry point: run a command, turn every input error into one line on stderr and exit code 2."""

from __future__ import annotations

import logging
import os
import sys

import click

# Idle OpenMP threads sleep instead of spinning on cores other work needs (set before any command imports
# torch; the user's own setting wins; see layerscope.spectral.threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from layerscope.cli import analysis, experiments, planning, rewrite  # noqa: F401  (registers the commands)
from layerscope.cli.group import cli, one_line
from layerscope.errors import LayerscopeError

# bitsandbytes, imported by transformers' Trainer where it is installed, logs a warning about an optional CPU
# kernel package at import; it concerns no command's input or output, so the CLI keeps it off the terminal.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _gathered_elsewhere(message: str) -> bool:
    """Under torchrun, a failure every rank learned through the collective is printed by rank 0 only."""
    rank = os.environ.get("RANK", "0")
    return rank != "0" and message.startswith("rank ")


def _error(message: str) -> None:
    click.echo(f"error: {one_line(message)}", err=True)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except LayerscopeError as exc:
        if not _gathered_elsewhere(str(exc)):
            _error(str(exc))
        sys.exit(2)
    except OSError as exc:  # unreadable input, unwritable --out: the message names the file
        _error(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `layerscope`: the overview, as --help shows it
        click.echo(exc.ctx.get_help())
        sys.exit(0)
    except click.UsageError as exc:  # one line, like every other input error
        _error(exc.format_message())
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
