"""A screenshot of the shapes detector's Tokens tab in the app: the queries' boxes, one query's map in every decoder
layer, and each query's weight at a clicked place.

    python scripts/detector_screenshot.py [--model checkpoints/shapes-detector] [--out docs/screenshot-detector.png]

The app served in this process on the model as `--hf FOLDER` loads it, assets/shapes/val-3.jpg uploaded in Chromium
at 1440x900, the Tokens tab opened, the query that predicts the triangle chosen and the pointer on the triangle.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "shapes-detector"))
    p.add_argument("--image", default=str(ROOT / "assets" / "shapes" / "val-3.jpg"))
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshot-detector.png"))
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    from vggattn import app
    from vggattn.models.byo import load_hf
    from vggattn.data import open_image
    from vggattn.tokens import token_maps

    sys.path.insert(0, str(ROOT / "tests"))
    from server import free_port  # noqa: E402

    model, meta = load_hf(args.model)
    found = token_maps(model, meta, open_image(args.image))
    truth = json.loads(Path(args.image).with_suffix(".json").read_text())
    target = truth["classes"].index("triangle") if "triangle" in truth["classes"] else 0
    tx0, ty0, tx1, ty1 = truth["boxes"][target]
    # the query whose box overlaps that object most
    from vggattn.training.detector import box_iou
    import numpy as np

    boxes = np.array([found.predictions[n]["box"] for n in found.names])
    query = found.names[int(box_iou(np.array([[tx0, ty0, tx1, ty1]]), boxes)[0].argmax())]
    demo = app.build_demo(model, meta)
    port = free_port()
    app.serve(demo, port=port, prevent_thread_lock=True, quiet=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
        page.locator("#input-image input[type=file]").set_input_files(args.image)
        page.wait_for_function("window.vggattnHover && window.vggattnHover.ready()", timeout=120_000)
        img = page.locator("#input-image img").first
        box = img.bounding_box()
        page.get_by_role("tab", name="Tokens").click()
        frame = page.frame_locator("#tokens-frame")
        frame.locator(".tile.chosen").wait_for(timeout=60_000)
        frame.locator(f'.tile[data-name="{query}"]').click()
        w, h = found.input_wh
        canvas = frame.locator("canvas").last
        box = canvas.bounding_box()  # the triangle pointed at in the last layer's picture
        page.mouse.move(box["x"] + (tx0 + tx1) / 2 / w * box["width"], box["y"] + (ty0 + ty1) / 2 / h * box["height"])
        page.wait_for_timeout(500)
        top = page.locator("#tokens-note").bounding_box()
        scroll = page.evaluate("window.scrollY")
        page.screenshot(path=args.out, full_page=True, clip={"x": 0, "y": top["y"] + scroll - 8, "width": 1440,
                                                              "height": 880})
        browser.close()
    print(f"{args.out}: {query} ({found.predictions[query]['class']} {found.predictions[query]['score']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
