"""What a GGUF file's names cost once: its config and transformers' parameter names and shapes, kept on disk.

Naming a GGUF file's tensors as transformers does means importing transformers and building the model on
the meta device (1.5–3 s of a small file's scan).  The result depends only on the file's table and metadata
and on the installed transformers and gguf, so it is stored under a key of exactly those — the file's
*layout fingerprint* — and a later scan of the same file (or of a copy) reads it back without importing
transformers.

The folder is ``$LAYERSCOPE_CACHE_DIR`` (``off`` disables the cache), else ``$XDG_CACHE_HOME/layerscope``, else
``~/.cache/layerscope``.  An entry that cannot be read, or does not hold what it should, is rebuilt; a folder
that cannot be written only costs the rebuild next time.  Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

FORMAT = 2
SUBFOLDER = "gguf-layouts"


def cache_folder() -> Path | None:
    chosen = os.environ.get("LAYERSCOPE_CACHE_DIR")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "none") else Path(chosen) / SUBFOLDER
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "layerscope" / SUBFOLDER


def layout_key(entries: list, values: dict, array_lengths: dict) -> str:
    """sha256 of the tensor table, the metadata, and the versions of what derives names from them."""
    from layerscope import __version__

    document = {
        "format": FORMAT,
        "layerscope": __version__,
        "transformers": _version("transformers"),
        "gguf": _version("gguf"),
        "tensors": [[e.gguf_name, e.ggml_type, list(e.shape)] for e in entries],
        "values": values,
        "array_lengths": array_lengths,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=repr).encode()).hexdigest()


def load(key: str) -> tuple[dict, dict[str, str], dict[str, list[int]]] | None:
    """(config, names, shapes) stored under ``key``, or None (absent, unreadable, or not what an entry holds)."""
    folder = cache_folder()
    if folder is None:
        return None
    try:
        entry = json.loads((folder / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    config, names, shapes = entry.get("config"), entry.get("names"), entry.get("shapes")
    if not (isinstance(config, dict) and isinstance(names, dict) and isinstance(shapes, dict)):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        return None
    if not all(isinstance(v, list) and all(type(d) is int for d in v) for v in shapes.values()):
        return None
    return config, names, shapes


def store(key: str, config: dict, names: dict[str, str], shapes: dict[str, list[int]]) -> None:
    """Write the entry atomically; a folder that cannot be written is left alone (the cache is optional)."""
    folder = cache_folder()
    if folder is None:
        return
    try:
        text = json.dumps({"key": key, "config": config, "names": names, "shapes": shapes}, sort_keys=True)
    except (TypeError, ValueError):
        return  # a config value JSON cannot hold: not cached, rebuilt each time
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{key}.{os.getpid()}.tmp"
        temporary.write_text(text)
        os.replace(temporary, folder / f"{key}.json")
    except OSError:
        return


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"
