"""Tasks for the plan comparisons, built reproducibly from real text on this machine, with labels that are facts.

    python benchmarks/tasks.py debian-sections --out benchmarks/_data/debian-sections
    python benchmarks/tasks.py debian-sections-lm --out benchmarks/_data/debian-sections-lm

Source: Debian's package index for the pinned release (``apt-cache dumpavail``: bookworm, amd64, the
list shipped on this machine).  Each package stanza has a one-line ``Description`` written by its
maintainer and a ``Section`` assigned by the archive — the label is the archive's own fact, not a guess.

* ``debian-sections`` (classification, MiniLM): the short description → one of eight sections whose
  packages are end-user software of different kinds (games, science, sound, graphics, net, text, math,
  admin).  Documentation, debug, data-only, transitional and library packages are left out, and the
  package name is not part of the text (names often say the section: ``python3-…``).  Balanced: the same
  number of rows per section, drawn with a fixed seed; duplicate descriptions are dropped.
* ``debian-sections-lm`` (causal LM with a prompt, SmolLM2): the same rows as instruction data —
  prompt ``"Debian package description: <text>\\nSection:"``, completion ``" <section>"``; only the
  completion (and the end-of-sequence token) is scored.

Writes ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (disjoint, seeded) and ``task.json``
(source, counts, sha256 of the index text used).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
from pathlib import Path

SECTIONS = ("games", "science", "sound", "graphics", "net", "text", "math", "admin")
SKIP_NAME = re.compile(r"(-doc|-dbg|-dbgsym|-data|-common|-dev|-examples|-tests?)$|^lib")
SKIP_TEXT = re.compile(r"transitional|dummy package|documentation|debug symbols|data files", re.IGNORECASE)


def debian_index() -> str:
    try:
        return subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"apt-cache dumpavail failed ({exc}); this task needs Debian's package index") from None


def stanzas(index: str):
    for block in index.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields and "Section" in fields and "Description" in fields:
            yield fields


def section_rows(per_section: int, seed: int) -> tuple[list[dict], str]:
    index = debian_index()
    by_section: dict[str, dict[str, str]] = {s: {} for s in SECTIONS}
    seen: set[str] = set()
    for fields in stanzas(index):
        section = fields["Section"].split("/")[-1]  # contrib/games → games
        text = " ".join(fields["Description"].split())
        if section not in by_section or SKIP_NAME.search(fields["Package"]) or SKIP_TEXT.search(text):
            continue
        key = text.lower()
        if len(text.split()) < 3 or key in seen:
            continue
        seen.add(key)
        by_section[section][fields["Package"]] = text
    rng = random.Random(seed)
    rows = []
    for section in SECTIONS:
        packages = sorted(by_section[section])
        if len(packages) < per_section:
            raise SystemExit(f"section {section}: {len(packages)} usable packages, {per_section} wanted")
        for package in rng.sample(packages, per_section):
            rows.append({"package": package, "text": by_section[section][package], "label": section})
    rng.shuffle(rows)
    return rows, hashlib.sha256(index.encode()).hexdigest()


def write_splits(rows: list[dict], out: Path, sizes: dict[str, int], source: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, size in sizes.items():
        part = rows[start:start + size]
        start += size
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (out / "task.json").write_text(json.dumps({**source, "splits": sizes}, indent=1) + "\n")


def build(kind: str, out: Path, per_section: int, seed: int) -> Path:
    rows, digest = section_rows(per_section, seed)
    total = len(rows)
    sizes = {"test": total // 4, "validation": total // 8}
    sizes = {"train": total - sizes["test"] - sizes["validation"], **sizes}
    if kind == "debian-sections-lm":
        rows = [{"prompt": f"Debian package description: {r['text']}\nSection:", "text": f" {r['label']}",
                 "label": r["label"], "package": r["package"]} for r in rows]
    source = {"task": kind, "source": "apt-cache dumpavail (Debian bookworm amd64 index on this machine)",
              "index_sha256": digest, "sections": list(SECTIONS), "per_section": per_section, "seed": seed}
    write_splits(rows, out, sizes, source)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["debian-sections", "debian-sections-lm"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-section", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = build(args.kind, args.out, args.per_section, args.seed)
    print(json.loads((folder / "task.json").read_text()))


if __name__ == "__main__":
    main()
