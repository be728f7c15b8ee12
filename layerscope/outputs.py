"""The files one command writes, committed as a set: every one complete, or the previous set untouched.

Each file is first written under a temporary name next to its target (created with mode 0666 minus
the umask, like any file the user creates).  Only when all are complete is a small journal written
(atomically) listing the renames; then the files are renamed onto their targets and the journal is
removed.  A process killed before the journal exists leaves only temporary files, which the next
command writing or reading those outputs deletes; one killed after it leaves a journal, and the next
such command completes the renames first.  So a reader never sees a mix of an old and a new set,
nor a half-written file, and a failed command never leaves outputs behind.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from layerscope.errors import LayerscopeError

PARTIAL = ".partial"
JOURNAL = ".layerscope-commit"


def kill_point(name: str) -> None:
    """Tests kill the process here (SIGKILL, as the OOM killer or a cluster scheduler would)."""
    if os.environ.get("LAYERSCOPE_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def check_writable(targets: Sequence[Path], option: str = "--out") -> None:
    """Fail now, naming the target, if any output could not be written (before hours of work)."""
    for target in targets:
        if target.is_dir():
            raise LayerscopeError(f"{option} {target}: is a folder, not a file")
        ancestor = target.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise LayerscopeError(f"{option} {target}: cannot create it ({ancestor} is not a folder)")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise LayerscopeError(f"{option} {target}: cannot write in {ancestor} (permission denied)")


def _journal_path(targets: Sequence[Path]) -> Path:
    first = targets[0]
    return first.with_name(f".{first.name}{JOURNAL}")


def settle(targets: Sequence[Path]) -> None:
    """Finish an interrupted commit of this set, or clear the temporaries of one that never started."""
    targets = [Path(t) for t in targets]
    journal = _journal_path(targets)
    if journal.is_file():
        try:
            renames = json.loads(journal.read_text(encoding="utf-8"))["renames"]
            for temp, target in renames:
                if os.path.exists(temp):
                    os.replace(temp, target)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LayerscopeError(f"{targets[0]}: an interrupted write could not be completed ({exc}); remove "
                                  f"{journal} and the files it lists, then run the command again") from None
        journal.unlink()
    for target in targets:
        if target.parent.is_dir():
            for stale in target.parent.glob(f".{glob_escape(target.name)}.*{PARTIAL}"):
                stale.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


class OutputSet:
    """Write ``targets`` through temporary files and commit them together (a context manager)."""

    def __init__(self, targets: Sequence[Path], option: str = "--out"):
        self.option = option
        self.targets = [Path(t) for t in targets]
        if len(set(self.targets)) != len(self.targets):
            raise LayerscopeError(f"{option}: the outputs {[str(t) for t in self.targets]} repeat a file")
        check_writable(self.targets, option)
        self._temps: dict[Path, Path] = {}

    def __enter__(self) -> OutputSet:
        settle(self.targets)
        return self

    def __exit__(self, kind, _value, _traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def write(self, target: Path, writer: Callable[[Path], object]) -> None:
        """``writer(path)`` writes the complete file for ``target`` at a temporary path."""
        target = Path(target)
        if target not in self.targets:
            raise ValueError(f"{target} is not one of this set's outputs")
        temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{PARTIAL}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0666 & ~umask
            self._temps[target] = temp
            writer(temp)
        except OSError as exc:
            raise LayerscopeError(f"{self.option} {target}: cannot write it ({exc.strerror or exc})") from None
        kill_point(f"written:{target.name}")

    def commit(self) -> None:
        missing = [str(t) for t in self.targets if t not in self._temps]
        if missing:
            self.discard()
            raise ValueError(f"outputs never written: {missing}")
        journal = _journal_path(self.targets)
        staged = journal.with_name(journal.name + f".{secrets.token_hex(6)}{PARTIAL}")
        staged.write_text(json.dumps({"renames": [[str(self._temps[t]), str(t)] for t in self.targets]}),
                          encoding="utf-8")
        os.replace(staged, journal)  # the commit point
        kill_point("committing")
        for index, target in enumerate(self.targets):
            os.replace(self._temps[target], target)
            if index == 0:
                kill_point("renamed-first")
        journal.unlink()
        self._temps.clear()

    def discard(self) -> None:
        for temp in self._temps.values():
            temp.unlink(missing_ok=True)
        self._temps.clear()


def write_files(writers: dict[Path, Callable[[Path], object]], option: str = "--out") -> list[Path]:
    """Write every file of one command as a set (see the module docstring); return the targets."""
    with OutputSet(list(writers), option) as outputs:
        for target, writer in writers.items():
            outputs.write(target, writer)
    return list(writers)
