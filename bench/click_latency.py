"""Click latency: server-side time from a click to the three rendered overlays.

    python bench/click_latency.py [--clicks 100]

What the server does on a click: the app's `on_click` handler (attention rows from the session's
Q and K, three overlays, readouts, top-5 cells) and Gradio's postprocessing of the three images
(JPEG-encoded into its cache). The model never runs on a click. p50 and p95 over --clicks random
points, for the shipped checkpoint and for the full-width model at 224 px, on a 224 px photo and on
a 1024 x 768 one (overlays are drawn at most 512 px wide). Target: p50 at most 30 ms.
"""

import argparse
import os
import random
import time

from common import ROOT, median, percentile, report

import gradio as gr
from PIL import Image

from vggattn import app
import vggattn
from tests_util import full_width_meta, full_width_model

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--clicks", type=int, default=100)
    args = p.parse_args()
    photo = Image.open(ROOT / "assets" / "church.jpg").convert("RGB")
    images = {"224x224": photo, "1024x768": photo.resize((1024, 768), Image.Resampling.BICUBIC)}
    shipped, meta = vggattn.load_checkpoint(device="cpu")
    ui = app.build_demo(shipped, meta).ui  # the handlers' components (the panels encode JPEG as in the app)
    rows = []
    for name, model, m in (("shipped checkpoint", shipped, meta), ("full width, 224 px", full_width_model(), full_width_meta())):
        for image_name, image in images.items():
            state = vggattn.analyze(model, m, image)
            rng = random.Random(0)
            handler, total = [], []
            for i in range(args.clicks + 3):
                xy = [rng.randrange(image.width), rng.randrange(image.height)]
                evt = gr.SelectData(target=None, data={"index": xy, "value": None})
                t0 = time.perf_counter()
                out = app.on_click(ui, state, 0.5, "jet", "smooth", True, evt)
                t1 = time.perf_counter()
                for component in ui.panels:
                    component.postprocess(out[component]["value"])
                t2 = time.perf_counter()
                if i >= 3:  # warm-up clicks
                    handler.append(t1 - t0)
                    total.append(t2 - t0)
            rows.append([name, image_name, round(median(handler) * 1e3, 1), round(median(total) * 1e3, 1),
                         round(percentile(total, 95) * 1e3, 1)])
    report(f"Click latency over {args.clicks} clicks (server side, no model run)",
           ["model", "photo", "handler p50 ms", "handler + image encoding p50 ms (target <= 30)", "p95 ms"], rows)


if __name__ == "__main__":
    main()
