"""Upload cost: server time of one upload in the app, and its parts.

    python bench/upload_cost.py [--runs 7]

For the shipped checkpoint on the church photo, the median over --runs of: `analyze` (the one
forward, with capture and Grad-CAM), the query dependence (every row of every layer, twice: mean
row and JSD), the hover payload (log Z of every row, base64), and the app's whole `on_image` handler
(all of these plus the tabs' maps), which is what one upload costs the server before Gradio encodes
the outputs.
"""

import argparse
import statistics
import time

from common import ROOT, report

from PIL import Image

import vggattn
from vggattn import app
from vggattn.analysis import analyze
from vggattn.hover import hover_payload


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    model, meta = vggattn.load_checkpoint(device="cpu")
    ui = app.build_demo(model, meta).ui
    photo = ROOT / "assets" / "church.jpg"
    image = Image.open(photo)
    app.on_image(ui, model, meta, str(photo))  # warm-up
    parts = {"analyze": [], "query dependence": [], "hover payload": [], "on_image (all)": []}
    for _ in range(args.runs):
        t0 = time.perf_counter()
        result = analyze(model, meta, image)
        t1 = time.perf_counter()
        result.query_dependence()
        t2 = time.perf_counter()
        hover_payload(result)
        t3 = time.perf_counter()
        app.on_image(ui, model, meta, str(photo))
        t4 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[name].append(dt)
    report(f"Upload cost, shipped checkpoint, church photo, median of {args.runs}", ["part", "seconds"],
           [[name, round(statistics.median(ts), 3)] for name, ts in parts.items()])


if __name__ == "__main__":
    main()
