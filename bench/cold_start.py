"""Cold start: a fresh Python process importing vggattn, loading the shipped checkpoint and
analysing one photo; and the app's import + page build on top.

    python bench/cold_start.py [--runs 3]
"""

import argparse
import json
import subprocess
import sys

from common import ROOT, median, report

CHILD = r"""
import json, time, os, sys
t0 = time.perf_counter()
import torch
import vggattn
t1 = time.perf_counter()
model, meta = vggattn.load_checkpoint()
t2 = time.perf_counter()
from PIL import Image
result = vggattn.analyze(model, meta, vggattn.open_image(sys.argv[1]))
t3 = time.perf_counter()
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
from vggattn import app
demo = app.build_demo(model, meta)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first analyze": t3 - t2, "app import + page": t4 - t3}))
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    runs = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "assets" / "church.jpg"), str(ROOT)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    phases = list(runs[0])
    rows = [[ph, round(median([r[ph] for r in runs]), 2)] for ph in phases]
    core = ["import", "load", "first analyze"]
    rows.append(["**import + load + first analyze**", round(median([sum(r[p] for p in core) for r in runs]), 2)])
    rows.append(["**... + app page ready to serve**", round(median([sum(r.values()) for r in runs]), 2)])
    report(f"Cold start, shipped checkpoint (median of {args.runs} fresh processes; interpreter start not included)",
           ["phase", "seconds"], rows)


if __name__ == "__main__":
    main()
