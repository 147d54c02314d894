"""How long `vggattn.study` takes an image, beside the forward-only bound of its 13 intervention passes.

    python bench/study_time.py                        # default checkpoint, 192 evenly spaced val images
    python bench/study_time.py --limit 64             # a quicker look
    python bench/study_time.py --full-width-448 2     # + peak memory of the full-width model at 448 px

Row "forward bound": the baseline forward and the 13 intervention passes (each restarting from the
activation entering its first replaced block, the segments that passes share run once, the baseline's mean
rows kept by its own forward, as the study runs them), on images already in memory: what no implementation of the statistics can go under; beside it the
passes each run alone (before). Those two rows interleaved, twice, the faster of each. Row "statistics, per image (before)": the
per-image `attention_statistics` from the rows and V as the study computed them before
(`batch_statistics` replaced it). Row "statistics, batched": `batch_statistics`. Row "study": the whole
`run_study` (decode, passes, statistics, the sanity check and the faithfulness measures on the same shares
of images as the full split has: 256 and 64 of 3,925), which is the issue's measure (target <= 0.5 s an
image). --study-only: that row alone (it runs against an older checkout too: PYTHONPATH=<its root>). All rows in one process,
one after the other, on the same images. The full-width row runs in a fresh subprocess for its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from common import ROOT, report

import vggattn
from vggattn import study

DATA = ROOT.parent / "shared" / "data" / "imagenette2-224" / "val"
FULL_SPLIT, FULL_SANITY, FULL_FAITHFULNESS = 3925, 256, 64  # the shipped study's shares

CHILD = """
import json, resource, sys, time
import torch, vggattn
from vggattn import study
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
model = vggattn.vgg16_with_attention(10).eval()
for m in model.modules():
    if isinstance(m, vggattn.GlobalAttention):
        m.gamma.data.fill_(0.1)
_, meta = vggattn.load_checkpoint(device="cpu")
meta = {**meta, "input_size": 448}
with torch.no_grad():
    model(torch.zeros(1, 3, 448, 448).contiguous(memory_format=torch.channels_last))
    study.fresh_copy(model, 1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
s = study.run_study(model, meta, cfg["data"], limit=cfg["limit"], batch_size=1, progress=False, sanity_images=cfg["limit"])
print(json.dumps({"images": s["images"], "wall_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "before_mb": before}))
"""


@torch.no_grad()
def forward_bound(model, xs, shared: bool = True) -> float:
    layers = study.attention_indices(model)
    first = min(layers.values())
    runs = study.run_modes(layers)
    t0 = time.perf_counter()
    for x in xs:
        mean_rows = {} if shared else None  # the study's: the baseline's mean rows kept by its own forward
        out, entering = study.entering_blocks(model, model.features[:first](x), first, layers.values(),
                                              mean_rows=mean_rows)
        model.forward_head(out)
        if shared:
            study.run_all(model, entering, runs, mean_rows)
        else:
            for modes in runs.values():
                study.run_from(model, entering[min(modes)], min(modes), modes)
    return time.perf_counter() - t0


@torch.no_grad()
def statistics(model, meta, xs, batched: bool) -> float:
    layers = study.attention_indices(model)
    first = min(layers.values())
    size = int(meta["input_size"])
    total = 0.0
    for x in xs:
        leaving = {}
        _, entering = study.entering_blocks(model, model.features[:first](x), first, layers.values(), leaving)
        t0 = time.perf_counter()
        for name, i in layers.items():
            block, grid = model.features[i], tuple(entering[i].shape[-2:])
            xs_, q, k, v = (t.flatten(2).transpose(1, 2) for t in (entering[i], block.conv_query(entering[i]),
                                                                   block.conv_key(entering[i]), block.conv_value(entering[i])))
            if batched:
                delta = (leaving[i] - entering[i]).flatten(2).transpose(1, 2)
                study.batch_statistics(q, k, grid, size, x=xs_, delta=delta)
            else:
                for j in range(len(x)):
                    study.attention_statistics(study.softmax_rows(q[j], k[j]), grid, size, x=xs_[j], value=v[j],
                                               gamma=float(block.gamma))
        total += time.perf_counter() - t0
    return total


def timed_study(args):
    """The whole study of --limit images, with the full split's shares of sanity and faithfulness images."""
    model, meta = vggattn.load_checkpoint(args.checkpoint, device="cpu")
    n = len(study.load_split(args.data, meta, args.limit)[0])
    sanity = max(1, round(n * FULL_SANITY / FULL_SPLIT))
    faith = max(1, round(n * FULL_FAITHFULNESS / FULL_SPLIT))
    t0 = time.perf_counter()
    s = study.run_study(model, meta, args.data, limit=args.limit, batch_size=args.batch_size, sanity_images=sanity,
                        faithfulness_images=faith, progress=False)
    return n, sanity, faith, time.perf_counter() - t0, s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA), help="ImageFolder split")
    p.add_argument("--checkpoint", default=str(vggattn.DEFAULT_CHECKPOINT))
    p.add_argument("--limit", type=int, default=192, help="evenly spaced images of the split")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--full-width-448", type=int, default=0, metavar="N", help="also the 448 px full-width row on N images")
    p.add_argument("--study-only", action="store_true", help="only the whole study's row")
    args = p.parse_args(argv)
    if args.study_only:
        n, sanity, faith, whole, s = timed_study(args)
        report(f"Study time ({vggattn.__file__}), {n} val images, batch {args.batch_size}", ["what", "seconds", "s / image"],
               [[f"study (run_study, sanity on {sanity}, faithfulness on {faith} images)", round(whole, 1), round(whole / n, 3)]],
               [f"run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"])
        return 0
    model, meta = vggattn.load_checkpoint(args.checkpoint, device="cpu")
    ds, _ = study.load_split(args.data, meta, args.limit)
    n = len(ds)
    xs = [torch.stack([ds[i][0] for i in range(s, min(n, s + args.batch_size))]).contiguous(memory_format=torch.channels_last)
          for s in range(0, n, args.batch_size)]
    forward_bound(model, xs[:1])  # warm-up
    times = {False: [], True: []}
    for shared in (False, True, False, True):  # interleaved, the faster of two each: the machine drifts
        times[shared].append(forward_bound(model, xs, shared=shared))
    unshared, bound = min(times[False]), min(times[True])
    before = statistics(model, meta, xs, batched=False)
    after = statistics(model, meta, xs, batched=True)
    _, sanity, faith, whole, s = timed_study(args)
    rows = [["13 passes, each from its first replaced block (before)", round(unshared, 1), round(unshared / n, 3),
             round(unshared / bound, 2)],
            ["forward bound: baseline + 13 passes, shared segments once", round(bound, 1), round(bound / n, 3), 1.0],
            ["statistics, per image (before)", round(before, 1), round(before / n, 3), round(before / bound, 2)],
            ["statistics, batched (now)", round(after, 1), round(after / n, 3), round(after / bound, 2)],
            [f"study (run_study, sanity on {sanity}, faithfulness on {faith} images)", round(whole, 1), round(whole / n, 3),
             round(whole / bound, 2)]]
    report(f"Study time, {vggattn.DEFAULT_CHECKPOINT.name if args.checkpoint == str(vggattn.DEFAULT_CHECKPOINT) else args.checkpoint}, "
           f"{n} val images, batch {args.batch_size}", ["what", "seconds", "s / image", "x forward bound"], rows,
           [f"run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; target: study <= 0.5 s an image; "
            f"baseline top-1 on these images {100 * s['interventions']['baseline']['top1']:.2f}%"])
    if args.full_width_448:
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"data": args.data, "limit": args.full_width_448})],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        report("Full width, random weights, 448 px (one N x N map of features.14 would be 629 MB)",
               ["images", "wall s", "peak RSS MB: model + one forward", "peak RSS MB: study"],
               [[r["images"], round(r["wall_s"], 1), round(r["before_mb"]), round(r["peak_rss_mb"])]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
