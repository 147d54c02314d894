"""A screenshot of README.md as rendered: markdown-it-py to HTML with GitHub-like CSS, opened in Debian's Chromium
through playwright (never `playwright install`), a full-page PNG kept small with Pillow.

    .venv/bin/python scripts/readme_screenshot.py                        # docs/screenshot-readme.png
    .venv/bin/python scripts/readme_screenshot.py --doc docs/app.md --out /tmp/app.png
"""

from __future__ import annotations

import argparse
import io
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"

CSS = """
body { margin: 0; background: #fff; color: #1f2328; font: 16px/1.5 -apple-system, "Segoe UI", "Noto Sans",
       Helvetica, Arial, sans-serif; }
main { box-sizing: border-box; max-width: 900px; margin: 0 auto; padding: 32px; }
h1, h2, h3 { font-weight: 600; line-height: 1.25; margin: 24px 0 16px; }
h1 { font-size: 2em; padding-bottom: .3em; border-bottom: 1px solid #d1d9e0; }
h2 { font-size: 1.5em; padding-bottom: .3em; border-bottom: 1px solid #d1d9e0; }
p, ul, ol, table, pre { margin: 0 0 16px; }
a { color: #0969da; text-decoration: none; }
img { max-width: 100%; }
code { font: 85%/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #eff1f3;
       padding: .2em .4em; border-radius: 6px; }
pre { background: #f6f8fa; padding: 16px; border-radius: 6px; overflow: auto; }
pre code { background: none; padding: 0; font-size: 13px; white-space: pre-wrap; }  /* nothing hidden */
table { border-collapse: collapse; display: block; overflow: auto; }
th, td { border: 1px solid #d1d9e0; padding: 6px 13px; vertical-align: top; }
th { font-weight: 600; background: #f6f8fa; }
tr:nth-child(2n) td { background: #f6f8fa; }
"""


def render(doc: Path) -> str:
    """The markdown as a standalone HTML page (YAML front matter left out, as a Space's page does); relative
    links and images resolve against the document's folder."""
    from markdown_it import MarkdownIt

    text = doc.read_text(encoding="utf-8")
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)
    body = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(text)
    base = doc.resolve().parent.as_uri() + "/"
    return (f'<!doctype html><html><head><meta charset="utf-8"><base href="{base}">'
            f"<style>{CSS}</style></head><body><main>{body}</main></body></html>")


def shoot(html: str, width: int) -> bytes:
    """A full-page PNG of the HTML in headless Chromium, `width` CSS pixels wide."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        page_file = Path(tmp) / "page.html"
        page_file.write_text(html, encoding="utf-8")
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 800}, device_scale_factor=1)
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            page.evaluate("Promise.all([...document.images].map(i => i.decode().catch(() => null)))")
            broken = page.evaluate("[...document.images].filter(i => !i.naturalWidth).map(i => i.src)")
            if broken:
                raise SystemExit(f"images that did not load: {broken}")
            return page.screenshot(full_page=True)
        finally:
            browser.close()


def shrink(png: bytes, max_bytes: int) -> bytes:
    """The PNG as it is if small enough, else with a 256-colour palette (then fewer colours) until it fits."""
    from PIL import Image

    if len(png) <= max_bytes:
        return png
    image = Image.open(io.BytesIO(png)).convert("RGB")
    for colours in (256, 128, 64):
        out = io.BytesIO()
        image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            out, format="PNG", optimize=True)
        if out.tell() <= max_bytes:
            break
    return out.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=ROOT / "README.md")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot-readme.png")
    parser.add_argument("--width", type=int, default=1000, help="page width in CSS pixels (default 1000)")
    parser.add_argument("--max-kb", type=int, default=400, help="shrink the PNG's colours until it fits")
    args = parser.parse_args(argv)
    png = shrink(shoot(render(args.doc), args.width), args.max_kb * 1024)
    args.out.write_bytes(png)
    print(f"{args.out}: {len(png) / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
