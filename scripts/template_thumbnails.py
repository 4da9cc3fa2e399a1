"""Write workflows/<name>.jpg, the picture the Templates browser shows for each shipped workflow:
the workflow's graph as the frontend draws it (Debian's Chromium via Playwright, like the browser
tests). Run after adding or changing a workflow:

    .venv/bin/python scripts/template_thumbnails.py [--url http://127.0.0.1:8188]

Without --url a ComfyUI server with the pack is started in a temporary base directory (with --url,
that server's user keeps the minimap off and full-detail drawing at every zoom).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import browser_ui  # noqa: E402
import harness  # noqa: E402

log = logging.getLogger("template_thumbnails")
SIZE = 512          # square, as the Templates browser crops its cards
CROP = (64, 150, 80)  # app chrome left out of the picture: left sidebar, top bars, bottom controls


def mark_returning_user(url: str) -> None:
    """So that the app opens on the canvas, not on the Templates browser."""
    req = urllib.request.Request(url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).close()


def thumbnail(png: bytes) -> bytes:
    """A screenshot -> the square JPEG of its canvas area."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    left, top, bottom = CROP
    w, h = img.size
    side = min(w - left, h - top - bottom)
    x0 = left + (w - left - side) // 2
    img = img.crop((x0, top, x0 + side, top + side)).resize((SIZE, SIZE), Image.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=80, optimize=True)
    return out.getvalue()


def write_thumbnails(url: str, workflows: list[Path]) -> list[Path]:
    from playwright.sync_api import sync_playwright

    mark_returning_user(url)
    written = []
    with sync_playwright() as p, tempfile.TemporaryDirectory() as shots:
        browser = browser_ui.launch(p)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 1200})
            front = browser_ui.Frontend(context, url, Path(shots)).open()
            front.js("""async () => { const settings = app.extensionManager.setting;
                await settings.set('Comfy.Minimap.Visible', false);
                await settings.set('LiteGraph.Canvas.MinFontSizeForLOD', 0); }""")
            for path in workflows:
                front.load_workflow(json.loads(path.read_text()), path.name)
                target = path.with_suffix(".jpg")
                target.write_bytes(thumbnail(front.page.screenshot()))
                log.info("wrote %s", target.relative_to(REPO))
                written.append(target)
        finally:
            browser.close()
    return written


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running ComfyUI with this pack (default: start one)")
    args = ap.parse_args(argv)
    workflows = sorted((REPO / "workflows").glob("*.json"))
    if args.url:
        write_thumbnails(args.url.rstrip("/"), workflows)
        return 0
    with tempfile.TemporaryDirectory() as base, harness.ComfyServer(base) as server:
        write_thumbnails(server.url, workflows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
