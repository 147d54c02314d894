"""Hover speed: time from a pointer move to the three panels drawn, in Chromium, and the payload.

    python bench/hover_speed.py [--moves 200] [--clicks 50] [--images 20]

For the shipped checkpoint and the full-width model at 224 px (random weights: only speed is
measured), the app runs on 127.0.0.1 and Chromium (Playwright, /usr/bin/chromium) uploads the church
photo (and, for the shipped model, a 1024x768 one: the largest panels) at 1440x900, then the pointer moves
to --moves random pixels of it and clicks --clicks of them. The page records, per move,
performance.now() minus the event's timeStamp when the three panels are drawn (the script's own
work: rows, colouring, blending, marks) and at the next animation frame after that. Target: p50
under 16 ms (shipped) and under 33 ms (full width); per click, from pointerdown to the pinned panels drawn
by the page (target p50 50 ms). Also: the bytes one upload sends the page, as
float32 and float16, and how far float16 Q and K move the rows from the float32 ones (every row of
every layer, over --images val photos of ../shared for the shipped model).
"""

import argparse
import os
import random
import socket
import tempfile
from pathlib import Path

from common import ROOT, percentile, report

import numpy as np
from PIL import Image

from vggattn import app
import vggattn
from tests_util import full_width_meta, full_width_model
from vggattn.analysis import analyze
from vggattn.view.hover import decode, page_layer, page_payload, payload_bytes

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
PHOTO = ROOT / "assets" / "church.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moves_in_browser(model, meta, moves: int, browser, photo: Path = None, clicks: int = 50, measure: str = "weights",
                     works: list | None = None):
    """Per pointer move: ms to the panels drawn, and to the next frame; per click: ms from pointerdown to the
    pinned panels drawn by the page (the server's readouts follow; the click needs no answer to show)."""
    photo = photo or PHOTO
    demo = app.build_demo(model, meta)
    port = free_port()
    app.serve(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
        page.locator("#input-image input[type=file]").set_input_files(str(photo))
        page.wait_for_function("window.vggattnHover && window.vggattnHover.ready()", timeout=120_000)
        page.evaluate("(m) => window.vggattnHover.setMeasure(m)", measure)
        img = page.locator("#input-image img").first
        img.wait_for(state="visible")
        img.scroll_into_view_if_needed()
        box = img.bounding_box()  # the photo is letterboxed in this box, never enlarged
        w, h = Image.open(photo).size
        s = min(box["width"] / w, box["height"] / h, 1.0)
        x0, y0 = box["x"] + (box["width"] - w * s) / 2, box["y"] + (box["height"] - h * s) / 2
        rng = random.Random(0)
        points = [(-1, -1)]  # screen pixels of the picture: distinct ones are distinct photo pixels (never enlarged)
        while len(points) <= moves + 5:  # 5 warm-up moves; each to another pixel (the page skips a repeat)
            xy = (rng.randrange(1, int(w * s) - 1), rng.randrange(1, int(h * s) - 1))  # off the edge: whole pixels inside
            if xy != points[-1]:
                points.append(xy)
        for i, (x, y) in enumerate(points[1:]):
            page.mouse.move(x0 + x + 0.5, y0 + y + 0.5)
            try:
                page.wait_for_function("(n) => window.vggattnHover.frames.length > n", arg=i, timeout=10_000)
            except Exception:
                print(photo, i, (x, y), points[i], page.evaluate("[window.vggattnHover.frames.length, "
                      "window.vggattnHover.state()]"), flush=True)
                raise
        for i, (x, y) in enumerate(points[1:clicks + 1]):  # each click waits for the server's answer before the next
            page.mouse.click(x0 + x + 0.5, y0 + y + 0.5)
            page.wait_for_function("(n) => window.vggattnHover.pins.length > n", arg=i, timeout=10_000)
            pinned = page.evaluate("window.vggattnHover.state().pinned")
            try:
                page.wait_for_function("(s) => document.querySelector('#status').innerText.includes(s)",
                                       arg="Pinned: pixel ({}, {})".format(*pinned), timeout=30_000)
            except Exception:
                print("status:", page.locator("#status").inner_text(), "pinned:", pinned, flush=True)
                raise
        drawn, framed, pins, own = page.evaluate("[window.vggattnHover.latencies, window.vggattnHover.frames, "
                                                 "window.vggattnHover.pins, window.vggattnHover.works]")
        if works is not None:
            works.extend(own[5:])
        page.close()
        return drawn[5:], framed[5:], pins
    finally:
        demo.close()


def hover_payload(result, dtype: str) -> dict:
    """The page's payload with every block sent as Q and K (the article's blocks: what its page gets)."""
    return page_payload(result, [page_layer(b.name, b.maps, b.family, "qk") for b in result.blocks], dtype)


def float16_error(model, meta, images: list[Path]) -> tuple[float, float]:
    """Largest and 99th-percentile |row(float16 Q, K) - row(float32 Q, K)| over every row of every layer."""
    worst, p99 = 0.0, []
    for path in images:
        result = analyze(model, meta, Image.open(path))
        full, half = hover_payload(result, "float32"), hover_payload(result, "float16")
        for a, b in zip(full["layers"], half["layers"]):
            rows = []
            for (q, k) in ((decode(a, "q"), decode(a, "k")), (decode(b, "q", "float16"), decode(b, "k", "float16"))):
                logits = q.astype(np.float64) @ k.astype(np.float64).T
                e = np.exp(logits - logits.max(1, keepdims=True))
                rows.append(e / e.sum(1, keepdims=True))
            diff = np.abs(rows[1] - rows[0]).max(1)  # per row
            worst = max(worst, float(diff.max()))
            p99.append(float(np.percentile(diff, 99)))
    return worst, max(p99)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--moves", type=int, default=200)
    p.add_argument("--clicks", type=int, default=50)
    p.add_argument("--images", type=int, default=20, help="val photos for the float16 error (shipped model)")
    p.add_argument("--measures", default="", help="only the shipped model on the church photo, once per view of the "
                   "rows (weights,value,effect): the page's own work per move, p50 and p95")
    args = p.parse_args()
    if args.measures:
        return measures(args)
    from playwright.sync_api import sync_playwright

    shipped, meta = vggattn.load_checkpoint(device="cpu")
    large = Path(tempfile.mkdtemp()) / "large.jpg"  # drawn on a 512 x 384 display copy: the largest panels
    Image.open(PHOTO).convert("RGB").resize((1024, 768)).save(large)
    runs = {"shipped (w0.5, 256 px), 224 px photo": (shipped, meta, PHOTO),
            "shipped, 1024x768 photo": (shipped, meta, large),
            "full width, 224 px, 224 px photo": (full_width_model(), full_width_meta(), PHOTO)}
    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        for name, (model, m, photo) in runs.items():
            drawn, framed, pins = moves_in_browser(model, m, args.moves, browser, photo, args.clicks)
            result = analyze(model, m, Image.open(photo))
            sizes = [payload_bytes(hover_payload(result, d)) for d in ("float32", "float16")]
            grids = " / ".join(f"{b.maps.grid[0]}²×{b.maps.query.shape[-1]}" for b in result.blocks)
            rows.append([name, grids, round(percentile(drawn, 50), 2), round(percentile(drawn, 95), 2),
                         round(percentile(framed, 50), 2), round(percentile(framed, 95), 2),
                         round(percentile(pins, 50), 2), round(percentile(pins, 95), 2),
                         f"{sizes[0] / 1e6:.2f} MB", f"{sizes[1] / 1e6:.2f} MB"])
        browser.close()
    notes = []
    val = ROOT.parent / "shared" / "data" / "imagenette2-224" / "val"
    photos = sorted(val.glob("*/*.JPEG"))[:: max(1, len(list(val.glob("*/*.JPEG"))) // max(1, args.images))][:args.images]
    if photos:
        worst, p99 = float16_error(shipped, meta, photos)
        notes.append(f"float16 Q and K vs float32, shipped model, every row of every layer of {len(photos)} val photos: "
                     f"largest |Δ weight| {worst:.2e}, 99th percentile of the per-row largest {p99:.2e}.")
    report(f"Hover and click: pointer move / click to three panels drawn, in Chromium at 1440x900, {args.moves} "
           f"moves, {args.clicks} clicks",
           ["model, photo", "grids (N = side², C')", "move: drawn p50 ms (target 16 / 33)", "move: drawn p95 ms",
            "move: next frame p50 ms", "move: next frame p95 ms", "click: drawn p50 ms (target 50)",
            "click: drawn p95 ms", "payload float32", "payload float16"], rows, notes)


def measures(args) -> None:
    """--measures: the shipped model, the church photo, each view of the rows in turn (a fresh page each)."""
    from playwright.sync_api import sync_playwright

    shipped, meta = vggattn.load_checkpoint(device="cpu")
    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        for how in args.measures.split(","):
            own: list = []
            drawn, framed, _ = moves_in_browser(shipped, meta, args.moves, browser, PHOTO, 0, how, own)
            rows.append([how, round(percentile(own, 50), 2), round(percentile(own, 95), 2),
                         round(percentile(drawn, 50), 2), round(percentile(framed, 50), 2)])
        browser.close()
    report(f"The shipped checkpoint's hover per view of the rows, Chromium 1440x900, {args.moves} moves",
           ["view", "page's own work p50 ms (target 16)", "p95 ms", "event to drawn p50 ms", "next frame p50 ms"],
           rows, [])


if __name__ == "__main__":
    main()
