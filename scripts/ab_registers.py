"""A/B of two studies of the same split, image by image: a ViT without registers (A) and with them (B).

    python scripts/ab_registers.py ~/runs/vit-study ~/runs/vit-reg4-study > checkpoints/vit-registers-ab.md

Reads each study's per-image records (OUT/records, `vggattn.study.Records`) and prints a markdown table: val top-1
of each, and per layer the patches' sink mass (the share of all attention on the image's most attended patch) and
their share on the prefix tokens, each with the paired difference B - A and its 95% percentile bootstrap CI over
images. One training run per arm: the CIs say how sure the difference is on these images, not over training seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vggattn.study import Records


def paired(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a and its 95% percentile bootstrap CI over the paired items."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))
    lo, hi = np.percentile(d[picks].mean(1), [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="study folder of model A (no registers)")
    p.add_argument("b", type=Path, help="study folder of model B (registers)")
    args = p.parse_args(argv)
    ra, rb = Records(args.a / "records").load(), Records(args.b / "records").load()
    if not np.array_equal(ra["index"], rb["index"]) or not np.array_equal(ra["target"], rb["target"]):
        raise SystemExit("the two studies cover different images")
    sa, sb = (json.loads((f / "study.json").read_text()) for f in (args.a, args.b))
    n = len(ra["index"])
    print(f"{n} val images; A = {args.a.name}, B = {args.b.name}; paired bootstrap over images (2000 resamples)\n")
    print("| measure | A | B | B - A [95% CI] |\n|---|---|---|---|")
    d = paired(ra["top1:baseline"], rb["top1:baseline"])
    print(f"| val top-1 | {100 * ra['top1:baseline'].mean():.2f}% | {100 * rb['top1:baseline'].mean():.2f}% | "
          f"{100 * d[0]:+.2f} pts [{100 * d[1]:+.2f}, {100 * d[2]:+.2f}] |")
    for name in sa["layers"]:
        ma, mb = ra[f"{name}:sink_mass"], rb[f"{name}:sink_mass"]
        d = paired(ma, mb)
        print(f"| `{name}` sink mass (most attended patch's share) | {ma.mean():.3f} | {mb.mean():.3f} | "
              f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] |")
        pa, pb = ra[f"{name}:prefix"].mean(1).sum(-1), rb[f"{name}:prefix"].mean(1).sum(-1)  # (images,)
        d = paired(pa, pb)
        print(f"| `{name}` patches' share on the prefix tokens | {pa.mean():.3f} | {pb.mean():.3f} | "
              f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] |")
        if f"{name}:high_norm" in ra:
            ha, hb = ra[f"{name}:high_norm"] > 0, rb[f"{name}:high_norm"] > 0
            d = paired(ha, hb)
            print(f"| `{name}` images with a high-norm patch entering it | {ha.mean():.3f} | {hb.mean():.3f} | "
                  f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] |")
    for key in (k for k in sb["interventions"] if k.startswith("all:")):
        r = sb["interventions"][key]
        lo, hi = r["top1_delta_ci95"]
        print(f"| B under `{key}` (top-1 change) | | {100 * r['top1']:.2f}% | {100 * r['top1_delta']:+.2f} pts "
              f"[{100 * lo:+.2f}, {100 * hi:+.2f}] (against B) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
