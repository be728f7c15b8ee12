"""Resumable scans: each finished tensor's table rows, kept in a SQLite file under ``--cache DIR``.

A tensor's entry is keyed by everything its rows depend on:

* where its bytes are: for each stored part (codes, scales, ...) the file's real path, size and
  modification time, the part's name, dtype, shape and byte range — so a rewritten or replaced
  shard invalidates its own tensors and nothing else;
* what the table says about it (name, kind, layer, role... as the naming scheme classified it) and
  how it was dequantized;
* the settings that change the numbers: estimators, precision policy, working dtype, device type,
  ``--split-fused``, and the layerscope version.

Entries are committed as soon as a tensor's last matrix is analysed, so a killed scan loses at most
the batch in flight; rerunning the same command skips everything already done and returns a table
identical to an uninterrupted run.  Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

from layerscope.errors import LayerscopeError
from layerscope.outputs import kill_point

CACHE_FILE = "layerscope-scan-cache.sqlite"
CACHE_FORMAT = 1


def _plain(value):
    """JSON-storable scalars (numpy ints/floats → Python), NaN kept as NaN."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return value


def _retry_locked(statement, seconds: float = 120.0):
    """Run ``statement``, waiting while another process (another torchrun rank) holds the database: switching to
    WAL takes an exclusive lock that SQLite reports as 'database is locked' at once, without its busy timeout."""
    import time

    deadline = time.monotonic() + seconds
    delay = 0.01
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class ScanCache:
    """Rows of finished tensors, keyed as described in the module docstring."""

    def __init__(self, folder: str | Path, settings: dict):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.folder / CACHE_FILE, isolation_level=None, timeout=120)
            _retry_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
            _retry_locked(lambda: self._db.execute(
                "CREATE TABLE IF NOT EXISTS rows (key TEXT PRIMARY KEY, value TEXT NOT NULL)"))
        except (OSError, sqlite3.Error) as exc:
            raise LayerscopeError(f"--cache {self.folder}: cannot use it as a cache folder ({exc})") from None
        from layerscope import __version__

        self._settings = json.dumps({"format": CACHE_FORMAT, "layerscope": __version__, **settings}, sort_keys=True)
        self._stats: dict[Path, tuple[str, int, int]] = {}
        self.hits = 0
        self.stored = 0

    def key(self, parts: list, identity: dict, quantization: str | None) -> str:
        """``parts``: the TensorInfo of every stored tensor this logical tensor is read from."""
        where = [[*self._file_identity(p.file), p.name, p.dtype, list(p.shape), p.begin, p.end, p.container]
                 for p in parts]
        blob = json.dumps({"settings": self._settings, "parts": where, "identity": identity,
                           "quantization": quantization}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()

    def _file_identity(self, file: Path) -> tuple[str, int, int]:
        if file not in self._stats:
            stat = os.stat(file)
            self._stats[file] = (os.path.realpath(file), stat.st_size, stat.st_mtime_ns)
        return self._stats[file]

    def get(self, key: str) -> list[dict] | None:
        found = self._db.execute("SELECT value FROM rows WHERE key = ?", (key,)).fetchone()
        if found is None:
            return None
        try:
            rows = json.loads(found[0])
        except ValueError:
            return None  # a damaged entry is recomputed
        self.hits += 1
        return rows

    def put(self, key: str, rows: list[dict]) -> None:
        value = json.dumps([{k: _plain(v) for k, v in row.items()} for row in rows], allow_nan=True)
        try:
            self._db.execute("INSERT OR REPLACE INTO rows (key, value) VALUES (?, ?)", (key, value))
        except sqlite3.Error as exc:
            raise LayerscopeError(f"--cache {self.folder}: cannot store a result ({exc})") from None
        self.stored += 1
        kill_point(f"cache-stored:{self.stored}")

    def close(self) -> None:
        self._db.close()
