"""The live view as one HTML file (`vggattn.view.live`): its size, the float16 error where it is float16, and its load
time opened from file:// in Chromium (the network off), for the shipped checkpoint on the church photo and for
DINOv2 with 4 registers at 518 px (timm, random weights: 1,374 tokens, 12 layers of 6 heads).

    python bench/live_html.py [--skip-dinov2] [--out /tmp/vggattn-live]

Load time: from the navigation to the first point pinned and drawn in every panel on screen (median of 3 loads).
Hover: `vggattnHover.latencies` over 20 pointer moves (pointer move to drawn), p50.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))


def measure(browser, path: Path, loads: int = 3) -> tuple[float, float]:
    """(median seconds from navigation to the pinned point drawn, hover p50 ms) of the file in Chromium."""
    times, hover = [], float("nan")
    for k in range(loads):
        context = browser.new_context(viewport={"width": 1440, "height": 900}, offline=True)
        page = context.new_page()
        t0 = time.perf_counter()
        page.goto(path.as_uri())
        page.wait_for_function("window.vggattnHover && window.vggattnHover.ready() && window.vggattnHover.state()"
                               ".pinned && document.querySelectorAll('canvas.vggattn-hover[data-query]').length > 0",
                               timeout=120_000, polling=10)
        times.append(time.perf_counter() - t0)
        if k == loads - 1:
            box = page.locator("#input-image img").bounding_box()
            for i in range(20):
                page.mouse.move(box["x"] + box["width"] * (0.2 + 0.03 * i), box["y"] + box["height"] * 0.5)
                time.sleep(0.1)
            lat = sorted(page.evaluate("window.vggattnHover.latencies"))
            hover = lat[len(lat) // 2]
        context.close()
    return statistics.median(times), hover


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-dinov2", action="store_true", help="the shipped checkpoint only")
    p.add_argument("--out", type=Path, default=Path("/tmp/vggattn-live"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from PIL import Image
    from playwright.sync_api import sync_playwright

    import vggattn
    from vggattn.analysis import analyze
    from vggattn.models.byo import describe
    from vggattn.view import live
    from vggattn.view.hover import pages
    from conftest import CHROMIUM, FLAGS

    args.out.mkdir(parents=True, exist_ok=True)
    church = Image.open(HERE / "assets" / "church.jpg")
    cases = [("shipped checkpoint, church.jpg", *vggattn.load_checkpoint(device="cpu"))]
    if not args.skip_dinov2:
        import timm

        torch.manual_seed(0)
        name = "vit_small_patch14_reg4_dinov2"
        model = timm.create_model(name, pretrained=False, img_size=518, num_classes=5).eval()
        cases.append(("DINOv2 + 4 registers, 518 px, random weights", model, describe(f"timm:{name}", 518, list("abcde"))))
    print("| model | file | dtype | largest row error (float16) | load, file:// to drawn (s) | hover p50 (ms) |")
    print("|---|---|---|---|---|---|")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for i, (what, model, meta) in enumerate(cases):
            result = analyze(model, meta, church)
            layers = pages(result)
            text = live.live_html(result, layers, title=what, about=live.about_model(meta))
            path = args.out / f"view-{i}.html"
            path.write_text(text, encoding="utf-8")
            dtype = "float16" if '"dtype": "float16"' in text else "float32"
            error = live.row_error(layers, "float16")
            load, hover = measure(browser, path)
            print(f"| {what} | {path.stat().st_size / 1e6:.2f} MB | {dtype} | {error:.2e} | {load:.2f} | {hover:.1f} |",
                  flush=True)
        # the A/B file: the shipped checkpoint against the quarter-width one (its load: both frames pinned, B - A drawn)
        from vggattn.view.compare import Side, compare_html

        (m_a, meta_a), (m_b, meta_b) = cases[0][1:], vggattn.load_checkpoint(
            HERE / "checkpoints" / "vgg16att-imagenette-w025-128.safetensors", device="cpu")
        ra, rb = analyze(m_a, meta_a, church), analyze(m_b, meta_b, church)
        path = args.out / "compare.html"
        path.write_text(compare_html(Side("A", ra, pages(ra)),
                                     Side("B", rb, pages(rb)), title="church"), encoding="utf-8")
        times = []
        for _ in range(3):
            context = browser.new_context(viewport={"width": 1440, "height": 900}, offline=True)
            page = context.new_page()
            t0 = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_function("window.vggattnCompare && window.vggattnCompare.ready", timeout=120_000, polling=10)
            times.append(time.perf_counter() - t0)
            context.close()
        print(f"| A/B: shipped against quarter-width, church.jpg | {path.stat().st_size / 1e6:.2f} MB | float32 | - | "
              f"{statistics.median(times):.2f} | - |")
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
