"""The command line, run in this process: what ``python -m layerscope ARGS`` does, without paying the 3–4 s of
imports (torch, pandas, scipy, transformers) that a fresh interpreter pays for every command.

``run_cli`` returns a :class:`subprocess.CompletedProcess` (returncode, stdout, stderr) as ``subprocess.run``
would.  Each call gets its own argv, environment overrides, warning filters and torch thread count, restored
afterwards.  Tests whose point is a fresh process (a killed scan, torchrun, import time, a cache seen by a new
interpreter) keep using subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings

import torch


def run_cli(*args, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    from layerscope.cli.main import main

    argv = ["layerscope", *(str(a) for a in args)]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env, threads, here = sys.argv, dict(os.environ), torch.get_num_threads(), os.getcwd()
    code = 0
    try:
        sys.argv = argv
        if cwd is not None:
            os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(here)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
