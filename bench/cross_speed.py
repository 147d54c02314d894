"""A detector's cross-attention at its size, beside a warm forward in the same process (median of --runs).

    python bench/cross_speed.py [--model checkpoints/shapes-detector] [--runs 5]

Loads the model as `--hf FOLDER` does, on the shapes example (assets/shapes/val-3.jpg), and prints one markdown
table: the forward alone; the first reading of its blocks (finding them, placing the tokens of every cross block:
what the app's start pays once); the Tokens tab's upload (`vggattn.app.tokens.on_upload`: one captured forward,
every query's rows and predictions, the page made); then, in Chromium at 1440x900, the page's own work (its
script's time, `performance.now` around each) for a tile chosen (every layer redrawn) and for a pointer move (the
bars of every layer), p50 and p90 over --moves of each.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from common import timed

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "shapes-detector"))
    p.add_argument("--image", default=str(ROOT / "assets" / "shapes" / "val-3.jpg"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--moves", type=int, default=60)
    args = p.parse_args(argv)
    import torch

    from vggattn.app import tokens as tab
    from vggattn.data import open_image, preprocess
    from vggattn.models.byo import load_hf
    from vggattn.tokens import token_maps

    model, meta = load_hf(args.model)
    image = open_image(args.image)
    x = preprocess(image, meta)
    with torch.no_grad():
        model(x)
        forward = timed(lambda: model(x), args.runs)
    t = time.perf_counter()
    layers = tab.cross_blocks(model, meta)
    first = time.perf_counter() - t
    token_maps(model, meta, image)
    upload = timed(lambda: token_maps(model, meta, image), args.runs)
    framed, _ = tab.on_upload(model, meta, args.image)
    upload = timed(lambda: tab.on_upload(model, meta, args.image), args.runs)
    found = token_maps(model, meta, image)
    choose, hover, framed_ms = page_work(framed, found.names, args.moves)
    print(f"{len(layers)} cross-attention layers, {len(found.names)} queries, input "
          f"{meta['input_size']} px, torch threads {torch.get_num_threads()}")
    print("| step | seconds | x the forward |")
    print("|---|---|---|")
    for name, v in [("forward", forward), ("first reading of the blocks (once a model)", first),
                    ("Tokens tab upload (rows read, page made)", upload)]:
        print(f"| {name} | {v:.4f} | {v / forward:.2f} |")
    print(f"\nupload against its target (1.5 x the forward + 50 ms = {1.5 * forward + 0.05:.4f} s): "
          f"{upload / (1.5 * forward + 0.05):.2f}x")
    print("\n| the page's own work | p50 ms | p90 ms |")
    print("|---|---|---|")
    for name, v in [("a tile chosen (every layer redrawn)", choose), ("a pointer move (every layer's bars)", hover),
                    ("a tile clicked to the second frame after it (painted)", framed_ms)]:
        print(f"| {name} | {np.percentile(v, 50):.2f} | {np.percentile(v, 90):.2f} |")
    return 0


def page_work(framed: str, names: list[str], moves: int) -> tuple[list[float], list[float], list[float]]:
    """(ms per tile chosen, ms per pointer move) of the page's script in Chromium, the page as the tab sends it, and
    ms from a tile's click to the second animation frame after it (the redrawn pictures painted)."""
    import html
    import tempfile

    from playwright.sync_api import sync_playwright

    page_html = html.unescape(framed.split('srcdoc="')[1].rsplit('"></iframe>', 1)[0])
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        path = Path(tmp) / "tokens.html"
        path.write_text(page_html)
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(path.as_uri())
        page.wait_for_function("window.vggattnTokens && window.vggattnTokens.ready")
        page.evaluate("window.vggattnTokens.times.choose.length = 0")
        for i in range(moves):
            page.locator(f'.tile[data-name="{names[i % len(names)]}"]').click()
        box = page.locator("canvas").first.bounding_box()
        rng = np.random.default_rng(0)
        for x, y in rng.uniform(0.02, 0.98, (moves, 2)):
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        times = page.evaluate("window.vggattnTokens.times")
        framed_ms = [page.evaluate("""(name) => new Promise((done) => {
            const t = performance.now();
            document.querySelector(`.tile[data-name="${name}"]`).click();
            requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t)));
        })""", names[i % len(names)]) for i in range(moves)]
        browser.close()
    return times["choose"], times["hover"][-moves:], framed_ms


if __name__ == "__main__":
    raise SystemExit(main())
