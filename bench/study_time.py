"""How long `vggattn.study` takes, and whether its memory stays bounded when N is large.

    python bench/study_time.py                        # quarter-width model, full val split (target <= 10 min)
    python bench/study_time.py --limit 400            # a quicker look
    python bench/study_time.py --full-width-448 4     # + the full-width model at 448 px on 4 images

Row 1: a checkpoint (default: the quarter-width 128 px one, as the target is stated for) over the split with every statistic, the 13 intervention passes and the
sanity check (as `python -m vggattn.study` runs it). Row 2 (optional): the article's full-width model
(random weights) at 448 px, where one image's N x N map of features.14 (N = 112 x 112) would be
629 MB in fp32; the study builds it a block of rows at a time, so peak RSS must stay far below
batch x N x N. Peak RSS is measured in a fresh subprocess per row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from pathlib import Path

from common import ROOT, report

from vggattn.checkpoint import SMALL_CHECKPOINT

DATA = ROOT.parent / "shared" / "data" / "imagenette2-224" / "val"

CHILD = """
import json, resource, sys, time
import torch, vggattn
from vggattn import study
cfg = json.loads(sys.argv[1])
if cfg["full_width"]:
    torch.manual_seed(0)
    model = vggattn.vgg16_with_attention(10).eval()
    for m in model.modules():
        if isinstance(m, vggattn.GlobalAttention):
            m.gamma.data.fill_(0.1)
    _, meta = vggattn.load_checkpoint(device="cpu")
    meta = {{**meta, "input_size": 448}}
else:
    model, meta = vggattn.load_checkpoint(cfg["checkpoint"], device="cpu")
size = int(meta["input_size"])
with torch.no_grad():  # a plain forward first: what the model alone takes, for the study's increment
    model(torch.zeros(cfg["batch"], 3, size, size).contiguous(memory_format=torch.channels_last))
    study.fresh_copy(model, 1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
s = study.run_study(model, meta, cfg["data"], limit=cfg["limit"], batch_size=cfg["batch"], progress=False,
                    sanity_images=cfg["sanity"])
print(json.dumps({{"images": s["images"], "wall_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "before_mb": before,
                  "baseline_top1": s["interventions"]["baseline"]["top1"]}}))
"""


def run(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), json.dumps(cfg)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA), help="ImageFolder split")
    p.add_argument("--checkpoint", default=str(SMALL_CHECKPOINT), help="checkpoint of row 1")
    p.add_argument("--limit", type=int, default=0, help="images of row 1 (0 = all; -1 = skip row 1)")
    p.add_argument("--full-width-448", type=int, default=0, metavar="N", help="also run the 448 px full-width row on N images")
    args = p.parse_args(argv)
    rows = []
    if args.limit >= 0:
        r = run({"full_width": False, "checkpoint": args.checkpoint, "data": args.data, "limit": args.limit,
                 "batch": 32, "sanity": 256})
        rows.append([Path(args.checkpoint).name, r["images"], r["wall_s"], r["images"] / r["wall_s"], r["before_mb"],
                     r["peak_rss_mb"], "", f"top-1 {100 * r['baseline_top1']:.2f}%"])
    if args.full_width_448:
        r = run({"full_width": True, "data": args.data, "limit": args.full_width_448, "batch": 1,
                 "sanity": args.full_width_448})
        rows.append(["full width, random weights, 448 px", r["images"], r["wall_s"], r["images"] / r["wall_s"],
                     r["before_mb"], r["peak_rss_mb"], "629 MB (N = 12,544)", ""])
    report("Dataset study: time and peak memory", ["model", "images", "wall s", "images/s",
                                                   "peak RSS MB: models + one forward", "peak RSS MB: study",
                                                   "one N x N map (fp32) would be", "note"], rows,
           [f"run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; target: full val split <= 600 s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
