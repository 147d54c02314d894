"""One pinned point of the shipped checkpoint in its three views, stacked: the weights (where it looks), what each key
brings (value-weighted) and the effect of removing each key.

    python scripts/effect_screenshot.py [--out docs/screenshot-effect.png] [--x 150 --y 60]

The app served in this process on the shipped checkpoint, assets/church.jpg uploaded in Chromium at 1440x900, the
point clicked, then the page's "Show" switch set to each view and the panels' row captured.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default=str(ROOT / "assets" / "church.jpg"))
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshot-effect.png"))
    p.add_argument("--x", type=int, default=150)
    p.add_argument("--y", type=int, default=60)
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    import vggattn

    sys.path.insert(0, str(ROOT / "tests"))
    from server import uploaded  # noqa: E402

    model, meta = vggattn.load_checkpoint(device="cpu")
    shots = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        with uploaded(browser, model, meta, args.image) as page:
            page.evaluate("([x, y]) => window.vggattnHover.pin(x, y)", [args.x, args.y])
            page.mouse.move(1430, 890)  # off the picture: the pinned point shows
            for how in ("weights", "value", "effect"):
                page.locator("select.vggattn-measure").select_option(how)
                page.wait_for_timeout(400)
                top = page.locator("#panel-0").bounding_box()
                line = page.locator(".vggattn-hover-line").bounding_box()
                y0 = min(top["y"], line["y"]) - 6
                path = Path(args.out).with_name(f"_{how}.png")
                page.screenshot(path=str(path), clip={"x": 0, "y": y0, "width": 1440,
                                                       "height": top["y"] + top["height"] - y0 + 6})
                shots.append(path)
        browser.close()
    images = [Image.open(s) for s in shots]
    sheet = Image.new("RGB", (1440, sum(i.height for i in images)), "white")
    y = 0
    for im in images:
        sheet.paste(im, (0, y))
        y += im.height
    sheet.save(args.out)
    for s in shots:
        s.unlink()
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
