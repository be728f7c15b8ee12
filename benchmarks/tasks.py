"""Tasks for the plan comparisons, built reproducibly from real text on this machine, with labels that are facts.

    python benchmarks/tasks.py debian-sections --out benchmarks/_data/debian-sections
    python benchmarks/tasks.py debian-sections-lm --out benchmarks/_data/debian-sections-lm
    python benchmarks/tasks.py stdlib-code-lm --out benchmarks/_data/stdlib-code-lm

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

* ``stdlib-code-lm`` (causal LM with long completions, SmolLM2): a task where capacity can bind harder than on
  one-word sections.  Source: the ``.py`` files of this Python's standard library (3.11; tests, IDLE, tkinter
  and other GUI or demo packages left out).  Per public function or method with at least three statements:
  prompt = ``"# Python standard library: <module>\n"`` + its ``def`` line(s) and docstring as written; completion
  = the body that follows, whole lines up to 240 characters (about 60 tokens), indented as under its ``def``.  Drawn with a fixed
  seed, duplicates dropped; every row is many tokens to predict.

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


CODE_SKIP = re.compile(r"(^|/)(test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip|site-packages|"
                       r"pydoc_data|__pycache__)(/|$)")
CODE_CHARS = 240


def code_rows(count: int, seed: int) -> tuple[list[dict], str]:
    """``count`` function bodies of the standard library (see the module docstring), and a digest of the sources."""
    import ast
    import sysconfig
    import textwrap

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not CODE_SKIP.search(str(p.relative_to(root))))
    digest = hashlib.sha256()
    found: dict[str, dict] = {}
    for path in files:
        source = path.read_text(encoding="utf-8", errors="replace")
        digest.update(source.encode())
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            if len(body) < 3 or node.decorator_list:
                continue
            whole = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno])).splitlines()
            split = body[0].lineno - node.lineno
            head, rest = "\n".join(whole[:split]), "\n".join(whole[split:])
            completion = ""
            for line in rest.splitlines():
                if len(completion) + len(line) + 1 > CODE_CHARS:
                    break
                completion += line + "\n"
            if completion.count("\n") < 2 or completion in found:
                continue
            found[completion] = {"prompt": f"# Python standard library: {module}\n{head}\n",
                                 "text": completion.rstrip("\n"), "function": f"{module}.{node.name}"}
    rows = sorted(found.values(), key=lambda r: (r["function"], r["text"]))
    return random.Random(seed).sample(rows, count), digest.hexdigest()


def build(kind: str, out: Path, per_section: int, seed: int) -> Path:
    if kind == "stdlib-code-lm":
        rows, digest = code_rows(8 * per_section, seed)
        import sys

        source = {"task": kind, "source": f"the standard library of Python {sys.version.split()[0]} (.py files)",
                  "sources_sha256": digest, "rows": len(rows), "seed": seed, "completion_chars": CODE_CHARS}
        sizes = {"train": len(rows) * 5 // 8, "test": len(rows) // 4, "validation": len(rows) // 8}
        write_splits(rows, out, sizes, source)
        return out
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
    parser.add_argument("kind", choices=["debian-sections", "debian-sections-lm", "stdlib-code-lm"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-section", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = build(args.kind, args.out, args.per_section, args.seed)
    print(json.loads((folder / "task.json").read_text()))


if __name__ == "__main__":
    main()
