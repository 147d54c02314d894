"""Transformers at the size people use them: each figure beside a warm forward of the same model in the same process.

    python bench/real_size.py [--runs 3] [--root OTHER_CHECKOUT] [CASE ...]

Cases (timm, random weights, nothing fetched): DINOv2-S/14 with 4 registers at 518 px, ViT-B/16 at 224 px,
DINOv2-L/14 with 4 registers at 518 px. Each case runs in a fresh process (no layout, place or import cached), on the
church photo:
- forward: the model alone on the preprocessed photo, median of --runs after one warm-up, default threads;
- first analysis: `blocks_of` on a model just built (finding the blocks, their layouts, the tokens' places and names);
- upload: the app's server for one upload (`app.on_image`: the model once, every block's maps and the page's
  payload), median of --runs, after the first;
- explain: `vggattn-explain PHOTO --timm NAME --input-size S --no-ablation` called in process, after its imports;
- capture: `vggattn.capture(model, x)` with every block's rows materialised, median of --runs;
- peak RSS of the process (all of the above).
Prints one markdown row a case.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import timed

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "assets" / "church.jpg"
CASES = {"dinov2-s-reg4-518": ("vit_small_patch14_reg4_dinov2", 518),
         "vit-b16-224": ("vit_base_patch16_224", 224),
         "dinov2-l-reg4-518": ("vit_large_patch14_reg4_dinov2", 518)}


def one(case: str, runs: int) -> dict:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import vggattn
    from vggattn import app, explain
    from vggattn.models.byo import blocks_of, load_timm
    from vggattn.data import eval_transform, open_image

    name, size = CASES[case]
    model, meta = load_timm(name, pretrained=False, input_size=size)
    x = eval_transform(meta)(open_image(PHOTO)).unsqueeze(0)

    with torch.no_grad():
        model(x)
        forward = timed(lambda: model(x), runs)
    t = time.perf_counter()
    blocks_of(model, meta)
    first = time.perf_counter() - t
    ui = app.build_demo(model, meta).ui
    app.on_image(ui, model, meta, str(PHOTO))
    upload = timed(lambda: app.on_image(ui, model, meta, str(PHOTO)), runs)

    def rows():
        _, maps = vggattn.capture(model, x)
        for m in maps.values():
            m.rows()
    capture = None
    if hasattr(vggattn, "capture"):  # (a checkout from before it, run with --root)
        rows()
        capture = timed(rows, runs)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        explain.main([str(PHOTO), "--timm", name, "--input-size", str(size), "--out", out, "--no-ablation"])
        explained = time.perf_counter() - t
    return {"case": case, "forward": forward, "first": first, "upload": upload, "capture": capture,
            "explain": explained, "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "blocks": len(blocks_of(model, meta))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="*", default=list(CASES)[:2], help=f"of {list(CASES)}")
    p.add_argument("--runs", type=int, default=3, help="timed runs of the forward, the upload and capture")
    p.add_argument("--root", help="another checkout to measure (its vggattn first on the path), e.g. the base of a change")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one(args.child, args.runs)))
        return 0
    print("| case | forward s | first analysis s (x) | upload s (x) | capture, rows s (x) | explain s (x) | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        env = {**os.environ, "PYTHONPATH": args.root} if args.root else None
        done = subprocess.run([sys.executable, __file__, "--child", case, "--runs", str(args.runs)],
                              capture_output=True, text=True, env=env)
        if done.returncode:
            print(f"| {case} | failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]} |||||| ")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        f = r["forward"]
        cell = lambda k: "-" if r[k] is None else f"{r[k]:.2f} ({r[k] / f:.1f}x)"  # noqa: E731
        print(f"| {case} ({r['blocks']} blocks) | {f:.3f} | {cell('first')} | {cell('upload')} | {cell('capture')} | "
              f"{cell('explain')} | {r['rss_gb']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
