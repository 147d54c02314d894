"""`vggattn-explain` and `vggattn-study --limit N` on timm transformers and hybrids (random weights where the hub is
unreachable), one after the other: did each run, in how many seconds, and what the study says of the prefix tokens.

    python bench/transformers_smoke.py --data ../shared/data/imagenette2-224/val --limit 20 \\
        vit_tiny_patch16_224 deit_tiny_distilled_patch16_224 eva02_tiny_patch14_224 swin_tiny_patch4_window7_224

Writes into --out (default /tmp/vggattn-smoke/<model>/): explain's folder and the study's. Prints one markdown row a
model. A model that fails prints its error's first line and the script goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="timm model names")
    p.add_argument("--data", required=True, help="an ImageFolder split")
    p.add_argument("--limit", type=int, default=20, help="images the study reads")
    p.add_argument("--out", default="/tmp/vggattn-smoke", help="output root")
    p.add_argument("--input-size", type=int, help="the size each model is built for and fed (default: timm's)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vggattn import explain, study

    print("| model | explain (s) | study of N images (s) | blocks | patches' share on the prefix tokens, first and last block |")
    print("|---|---|---|---|---|")
    size = ["--input-size", str(args.input_size)] if args.input_size else []
    for name in args.models:
        out = Path(args.out) / name
        try:
            t0 = time.perf_counter()
            explain.main([str(HERE / "assets" / "church.jpg"), "--timm", name, "--out", str(out / "explain"),
                          "--no-ablation", *size])
            t1 = time.perf_counter()
            study.main(["--timm", name, "--data", args.data, "--limit", str(args.limit), "--out", str(out / "study"),
                        "--sanity-images", "0", "--faithfulness-images", "0", "--bootstrap", "200", "--workers", "0", *size])
            t2 = time.perf_counter()
            s = json.loads((out / "study" / "study.json").read_text())
            layers = list(s["layers"].values())
            shares = [f"{100 * lay['prefix']['total']:.0f}%" if lay.get("prefix") else "-" for lay in (layers[0], layers[-1])]
            print(f"| {name} | {t1 - t0:.1f} | {t2 - t1:.1f} ({s.get('n_images', args.limit)}) | {len(layers)} | "
                  f"{', '.join(shares)} |", flush=True)
        except Exception as e:  # noqa: BLE001 - a smoke run reports and goes on
            print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:160]} | | | |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
