"""Command line: thin click wrappers over the Python API (``layerscope --help``)."""

from layerscope.cli.group import DEFAULT_DEMO_OUT, cli, one_line
from layerscope.cli.main import main

__all__ = ["DEFAULT_DEMO_OUT", "cli", "main", "one_line"]
