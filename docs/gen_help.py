"""Write every command's ``--help`` into docs/commands/help/ (the command pages include them).

    .venv/bin/python docs/gen_help.py          # rewrite the files
    .venv/bin/python docs/gen_help.py --check  # exit 1 when a file is out of date (tests/test_docs.py runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

import layerscope.cli.main  # noqa: F401  (registers the commands)
from layerscope.cli.group import cli

HELP = Path(__file__).resolve().parent / "commands" / "help"


def help_texts() -> dict[str, str]:
    runner = CliRunner()
    texts = {"layerscope": runner.invoke(cli, ["--help"], terminal_width=100, prog_name="layerscope").output}
    for name in sorted(cli.commands):
        texts[name] = runner.invoke(cli, [name, "--help"], terminal_width=100, prog_name="layerscope").output
    return texts


def main(check: bool) -> int:
    stale = []
    for name, text in help_texts().items():
        path = HELP / f"{name}.txt"
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            HELP.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)} (run python docs/gen_help.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv))
