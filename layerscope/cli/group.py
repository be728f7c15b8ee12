"""The ``layerscope`` command group and the option helpers every command shares.

Each command imports what it needs (torch, pandas, transformers) when it runs, so that
`layerscope --help` and every `--help` stay fast (tests/test_cli_speed.py).
"""

from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

import click

from layerscope.names import (
    ALL_ESTIMATORS,
)

DEFAULT_DEMO_OUT = Path("layerscope-demo")  # not the committed example under reports/ (regenerated on purpose only)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="layerscope")
def cli() -> None:
    """Spectral diagnostics and LoRA-expert allocation plans for LLM checkpoints."""


def _split_estimators(_ctx, _param, value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in ALL_ESTIMATORS]
    if unknown or not names:
        raise click.BadParameter(f"unknown: {', '.join(unknown)}; choose from {', '.join(ALL_ESTIMATORS)}" if unknown
                                 else f"give one or more of {', '.join(ALL_ESTIMATORS)}")
    return names


def _number_list(value: str | None, cast, example: str) -> tuple | None:
    if value is None:
        return None
    try:
        numbers = tuple(cast(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers like {example}") from None
    if not numbers:
        raise click.BadParameter("empty list")
    return numbers


def _int_list(_ctx, _param, value: str | None) -> tuple[int, ...] | None:
    return _number_list(value, int, "2,4,6,8")


def _float_list(_ctx, _param, value: str | None) -> tuple[float, ...] | None:
    return _number_list(value, float, "3e-4,1e-3,3e-3")


def _command_line(ctx: click.Context) -> str:
    """The command as typed, minus the program path, for the plan's provenance."""
    return " ".join(["layerscope", *sys.argv[1:]]) if ctx.find_root().info_name else "layerscope"


def one_line(text: str) -> str:
    """``text`` with line breaks, control characters and lone surrogates escaped: one terminal line."""
    return "".join(
        char.encode("unicode_escape").decode("ascii") if unicodedata.category(char) in UNPRINTABLE else char
        for char in text)


UNPRINTABLE = frozenset({"Cc", "Cs", "Zl", "Zp"})
