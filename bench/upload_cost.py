"""Upload cost: server time of one upload in the app, its parts, and its ratio to the model's forward.

    python bench/upload_cost.py [--runs 15]

For the shipped checkpoint on the church photo, the median over --runs of:
- forward: the model alone on the preprocessed image (the bound an upload is measured against);
- analyze: `analyze` (decode, preprocess, the forward keeping each block's input and output, every block's maps,
  the display copy; Grad-CAM is made when its tab opens);
- page payload: every block's layer for the page (log Z and the mean row: one pass over the rows), base64;
- upload (server): what one upload costs the server: the app's `on_image` handler and the open tab's maps
  (`on_tab` for the first tab, "Effective contribution", which is open when the page loads);
- query dependence tab: what opening the "Query dependence" tab adds (the JSD over every row).
The ratio upload / forward is the issue's measure (target <= 1.5).
"""

import argparse
import statistics
import time

import torch
from common import ROOT, report

from PIL import Image

import vggattn
from vggattn import app
from vggattn.analysis import analyze
from vggattn.data import eval_transform
from vggattn.view.hover import page_layer, page_payload


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=15)
    args = p.parse_args()
    model, meta = vggattn.load_checkpoint(device="cpu")
    ui = app.build_demo(model, meta).ui
    photo = ROOT / "assets" / "church.jpg"
    image = Image.open(photo)
    x = eval_transform(meta)(image.convert("RGB")).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    out = app.on_image(ui, model, meta, str(photo))  # warm-up
    app.on_tab(ui, "contribution", out[ui.state])
    parts = {"forward": [], "analyze": [], "page payload": [], "upload (server)": [], "query dependence tab": []}
    for _ in range(args.runs):
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x)
        t1 = time.perf_counter()
        result = analyze(model, meta, image)
        t2 = time.perf_counter()
        page_payload(result, [page_layer(b.name, b.maps, b.family) for b in result.blocks])
        t3 = time.perf_counter()
        state = app.on_image(ui, model, meta, str(photo))[ui.state]
        app.on_tab(ui, "contribution", state)
        t4 = time.perf_counter()
        app.on_tab(ui, "dependence", state)
        t5 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[name].append(dt)
    med = {name: statistics.median(ts) for name, ts in parts.items()}
    rows = [[name, round(v, 4), round(v / med["forward"], 2)] for name, v in med.items()]
    report(f"Upload cost, shipped checkpoint, church photo, median of {args.runs} (torch threads: "
           f"{torch.get_num_threads()})", ["part", "seconds", "x forward"], rows)


if __name__ == "__main__":
    main()
