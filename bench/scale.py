"""Scale with image size: time, peak memory and capture storage of the full-width model at 224,
448 and 640 px, with and without capture.

    python bench/scale.py [--sizes 224,448,640]

Each (size, variant) runs in a fresh process so its peak RSS is its own. "forward": the model alone
on the preprocessed image (channels_last, like analyze); "analyze": vggattn.analyze (the forward keeping
each block's input and output, Q/K kept per block, no Grad-CAM). Capture storage (Q and K) is compared with the
fp32 N x N maps it replaces.
Target: at 448 px, capture storage at most a tenth of the N x N maps.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

from common import ROOT, median, report


def child(size: int, variant: str) -> dict:
    import torch
    from PIL import Image

    import vggattn
    from tests_util import full_width_meta, full_width_model

    model, meta = full_width_model().to(memory_format=torch.channels_last), full_width_meta(size)  # as load_checkpoint
    image = Image.open(ROOT / "assets" / "church.jpg").convert("RGB")
    vggattn.preprocess(image, meta)  # imports and first-call costs of preprocessing, before the baseline RSS
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, result = [], None
    for _ in range(3):
        t0 = time.perf_counter()
        if variant == "forward":
            with torch.no_grad():
                model(vggattn.preprocess(image, meta).contiguous(memory_format=torch.channels_last))  # as analyze
        else:
            result = vggattn.analyze(model, meta, image)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"time_s": median(times[1:]), "first_s": times[0], "peak_rss_mb": peak / 1024, "model_rss_mb": base / 1024}
    if result is not None:
        out["layers"] = [{"name": b.name, "grid": b.maps.grid,
                          "capture_bytes": sum(t.numel() * t.element_size() for t in (b.maps.query, b.maps.key)),
                          "nxn_bytes": (b.maps.grid[0] * b.maps.grid[1]) ** 2 * 4} for b in result.blocks]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="224,448,640")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1])))
        return
    rows, storage = [], []
    for size in (int(s) for s in args.sizes.split(",")):
        results = {}
        for variant in ("forward", "analyze"):
            proc = subprocess.run([sys.executable, __file__, "--child", str(size), variant], capture_output=True,
                                  text=True, check=True)
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        f, a = results["forward"], results["analyze"]
        rows.append([size, round(f["time_s"], 3), round(a["time_s"], 3), round(a["time_s"] / f["time_s"], 3),
                     round(f["peak_rss_mb"]), round(a["peak_rss_mb"]), round(a["peak_rss_mb"] - f["peak_rss_mb"])])
        for layer in a["layers"]:
            storage.append([size, layer["name"], "x".join(map(str, layer["grid"])), f"{layer['capture_bytes'] / 1e6:.2f}",
                            f"{layer['nxn_bytes'] / 1e6:.1f}", f"{layer['capture_bytes'] / layer['nxn_bytes']:.4f}"])
    report("Full width: time and peak RSS (fresh process per cell; time = median of runs 2-3)",
           ["px", "forward s", "analyze s", "ratio", "forward peak RSS MB", "analyze peak RSS MB", "difference MB"], rows)
    report("Capture storage per layer vs the fp32 N x N map (target at 448: <= 0.1)",
           ["px", "layer", "grid", "capture MB", "N x N MB", "ratio"], storage)


if __name__ == "__main__":
    main()
