"""The app's Across layers tab on the shipped ViT: rollout, flow and relevance of the class token, side by side.

    python scripts/across_screenshot.py [--out docs/screenshot-across.png]

The app served in this process on checkpoints/vit-imagenette-96.safetensors, assets/church.jpg uploaded in Chromium at
1440x900, the tab opened (its maps drawn for the top class).
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
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshot-across.png"))
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    from vggattn.models.byo import load_model

    sys.path.insert(0, str(ROOT / "tests"))
    from server import uploaded  # noqa: E402

    model, meta = load_model("vggattn.models.zoo:vit_imagenette", ROOT / "checkpoints" / "vit-imagenette-96.safetensors")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        with uploaded(browser, model, meta, args.image) as page:
            page.get_by_role("tab", name="Across layers").click()
            page.wait_for_function("document.querySelector('#across-note').innerText.includes('sources')",
                                   timeout=60_000)
            page.wait_for_timeout(800)
            top = page.locator("#across-note").bounding_box()
            bottom = page.locator("#across-relevance").bounding_box()
            scroll = page.evaluate("window.scrollY")
            page.screenshot(path=args.out, full_page=True,
                            clip={"x": 0, "y": top["y"] + scroll - 8, "width": 1440,
                                  "height": bottom["y"] + bottom["height"] - top["y"] + 16})
        browser.close()
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
