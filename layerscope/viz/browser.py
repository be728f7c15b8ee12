"""Render a report in headless Chromium and take a screenshot (proof that it renders)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from layerscope.errors import LayerscopeError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Flags for a closed network: without the background-networking ones Chromium keeps trying to reach Google.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def screenshot(page: str | Path, png: str | Path, width: int = 1280, height: int = 2400, timeout: int = 120) -> Path:
    browser = find_chromium()
    if browser is None:
        raise LayerscopeError("no Chromium found (Debian: apt-get install chromium)")
    page, png = Path(page).resolve(), Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        command = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   f"--screenshot={png}", page.as_uri()]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or not png.is_file():
        raise LayerscopeError(f"chromium could not render {page}: {result.stderr.strip().splitlines()[-1:]}")
    _stamp(png, page)
    return png


PAGE_HASH_KEY = "layerscope-page-sha256"


def page_hash(page: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(page).read_bytes()).hexdigest()


def _stamp(png: Path, page: Path) -> None:
    """Record which page the picture shows (sha256 of the HTML), so a stale screenshot can be told apart."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PAGE_HASH_KEY, page_hash(page))
    with Image.open(png) as image:
        image.load()
        image.save(png, pnginfo=info)


def stamped_hash(png: str | Path) -> str | None:
    from PIL import Image

    with Image.open(png) as image:
        return image.info.get(PAGE_HASH_KEY)
