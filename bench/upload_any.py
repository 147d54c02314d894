"""Upload cost for every kind of model: the server's time for one upload against the model's forward, side by side.

    python bench/upload_any.py [--runs 15]

The church photo, for: the article's default checkpoint, the shipped non-local ResNet and timm's botnet26t_256 and
halonet26t (random weights; halonet26t's blocks are found by tracing), and the classifier of third-party blocks of
tests/byo_models.py (mmcv, timm, diffusers, all traced). The upload is what the one app's server does for it: `on_image`
(the model once, every block's maps, the page's payload and the open tab's maps: "Effective contribution", open when
the page loads). Per model, interleaved rounds of: the forward alone on the preprocessed
image, and the upload. Target: upload <= 1.5x the forward.
"""

import argparse
import os
import sys

import torch
from common import ROOT, interleaved, median, report

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(ROOT / "tests"))  # byo_models

PHOTO = ROOT / "assets" / "church.jpg"


def article():
    import vggattn

    return any_model(*vggattn.load_checkpoint(device="cpu"))


def any_model(model, meta):
    from vggattn import app

    ui = app.build_demo(model, meta).ui

    def upload():
        app.on_image(ui, model, meta, str(PHOTO), tab="contribution")
    return model, meta, upload


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15, help="interleaved rounds per model")
    p.add_argument("--only", default="", help="run the models whose name contains this (default: all)")
    args = p.parse_args(argv)
    import byo_models
    from PIL import Image

    from vggattn.models.byo import describe, load_model, load_timm
    from vggattn.data import eval_transform, open_image

    cases = {"article's default checkpoint": article,
             "non-local ResNet (shipped)": lambda: any_model(*load_model(
                 "vggattn.models.zoo:nonlocal_resnet", ROOT / "checkpoints" / "nonlocal-resnet-imagenette-128.safetensors")),
             "botnet26t_256 (random)": lambda: any_model(*load_timm("botnet26t_256")),
             "halonet26t (random, traced)": lambda: any_model(*load_timm("halonet26t")),
             "third-party blocks (random, traced)": lambda: any_model(
                 byo_models.third_party(), describe("byo_models:third_party", 64, [f"c{i}" for i in range(10)]))}
    rows = []
    for name, make in cases.items():
        if args.only.lower() not in name.lower():
            continue
        model, meta, upload = make()
        image = open_image(PHOTO) if isinstance(PHOTO, str) else Image.open(PHOTO).convert("RGB")
        x = (meta.get("transform") or eval_transform(meta))(image).unsqueeze(0)

        def forward():
            with torch.no_grad():
                model(x)
        times = interleaved({"forward": forward, "upload": upload}, args.runs, warmup=2)
        f, u = median(times["forward"]), median(times["upload"])
        rows.append([name, f"{meta['input_size']} px", round(f * 1000, 1), round(u * 1000, 1), round(u / f, 2)])
        print(rows[-1], flush=True)
    report(f"Upload cost, every kind of model ({args.runs} interleaved rounds)",
           ["model", "input", "forward ms", "upload (server) ms", "x forward"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
