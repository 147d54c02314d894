"""The app at a phone's width (390x844), every view open: docs/phone/<view>.png.

    python scripts/phone_screenshots.py [--out docs/phone] [--no-vit]

The app served in this process on the shipped checkpoint (its Dataset tab: the shipped study), assets/church.jpg
uploaded in Chromium at 390x844 with touch and its centre tapped (pinned). Then the picture and the panels with their
colour scales (hover.png), and every tab tapped in turn, what it runs run (a block ablated, the export, the A/B
comparison: tests/test_browser.py's `open_view`), the screen shot from the tab buttons down (<view>.png; the A/B view
itself: compare-ab.png). With the shipped ViT (checkpoints/vit-imagenette-96.safetensors) too: its panels (longer
colour scales: the prefix token, the heads) and its Across layers tab (vit-hover.png, vit-across-layers.png); the shipped detector's Tokens tab
(detector-hover.png, detector-tokens.png). Each PNG
in 256 colours (under 150 KB).
"""

import argparse
import io
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 150_000  # bytes a PNG


def small_png(png: bytes, path: Path) -> None:
    """The screenshot in 256 colours (fewer where it is still over LIMIT)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    for colours in (256, 128, 64):
        out = io.BytesIO()
        image.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, "PNG", optimize=True)
        if out.tell() < LIMIT:
            break
    path.write_bytes(out.getvalue())


def shoot(view, path: Path, top) -> None:
    """The screen (390x844) scrolled so that `top` (a locator) is at its top."""
    view.evaluate("(e) => window.scrollTo(0, e.getBoundingClientRect().top + window.scrollY - 8)", top.element_handle())
    view.wait_for_timeout(300)  # the scroll's repaint
    small_png(view.screenshot(), path)
    print(path, path.stat().st_size, "bytes")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def app_views(browser, url: str, out: Path, prefix: str = "", views=None, image=ROOT / "assets" / "church.jpg") -> None:
    """The app at url at 390x844: its panels, then each view (all, or those named in `views`)."""
    from test_browser import open_view, phone_page

    view = phone_page(browser, url, image)
    try:
        shoot(view, out / f"{prefix}hover.png", view.locator("#input-image"))
        names = [n.strip() for n in view.get_by_role("tab").all_inner_texts() if n.strip()]
        for name in names:
            if views is not None and name not in views:
                continue
            open_view(view, name)
            if name == "Across layers":  # its maps are drawn after the tab opened (the event its select runs)
                view.wait_for_function("!document.querySelector('#across-note').innerText.includes('Upload')",
                                       timeout=60_000)
            shoot(view, out / f"{prefix}{slug(name)}.png", view.locator("#views"))
            if name == "Tokens":  # the page in its frame: the tiles drawn
                view.frame_locator("#tokens-frame").locator(".tile").first.wait_for(state="visible", timeout=60_000)
                view.wait_for_timeout(500)
            if name == "Compare":  # the A/B view it made, under its form
                shoot(view, out / f"{prefix}compare-ab.png", view.locator("#compare-view"))
    finally:
        view.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "phone"))
    p.add_argument("--no-vit", action="store_true", help="the shipped VGG's app only")
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT / "tests"))
    import vggattn
    from conftest import CHROMIUM, FLAGS
    from server import running_app, serving
    from vggattn import app
    from vggattn.models.byo import load_hf, load_model

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        with running_app(real=True) as url:
            assert vggattn.DEFAULT_CHECKPOINT.is_file(), "the shipped checkpoint is missing"
            app_views(browser, url, out)
        if not args.no_vit:
            vit = load_model("vggattn.models.zoo:vit_imagenette", ROOT / "checkpoints" / "vit-imagenette-96.safetensors")
            with serving(app.build_demo(*vit)) as url:
                app_views(browser, url, out, "vit-", views={"Across layers"})
            detector = load_hf(str(ROOT / "checkpoints" / "shapes-detector"))  # the shipped detector
            with serving(app.build_demo(*detector)) as url:
                app_views(browser, url, out, "detector-", views={"Tokens"}, image=ROOT / "assets" / "shapes" / "val-3.jpg")
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
