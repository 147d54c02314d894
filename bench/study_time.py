"""How long `vggattn.study` takes an image, beside the forward-only bound: the forwards it must run anyway.

    python bench/study_time.py                                  # default checkpoint, 64 evenly spaced val images
    python bench/study_time.py --model vggattn.models.zoo:nonlocal_resnet \
        --checkpoint checkpoints/nonlocal-resnet-imagenette-128.safetensors
    python bench/study_time.py --study-only                     # the whole study's row alone (any checkout that
                                                                # has run_study(model, meta, data, ...): PYTHONPATH)

Row "forward bound": the forwards the study must run, as plain forwards of the model on images already in memory:
per batch the baseline and one forward per intervention run (each block and all of them, off / mean / uniform),
and a forward of the sanity images (the study runs them through the randomised copy, which costs the same). No
implementation that runs each of those forwards on its own goes under it; the study goes under it where runs share
their forward up to the first block they differ in (`study.branched_forward`). Rows "interventions": the
baseline and every run, one whole forward each under `Intervention` (`trace.watch` + `study.intervention_logits`),
against one branched forward (`study.branched_forward`). Row "statistics, batched": `batch_statistics` of every
block, from maps read off one forward. Row "faithfulness": `faithfulness.record` an image (after one warm image).
Row "study": the whole `run_study` (decode, forwards, statistics, the sanity check and the faithfulness measures on
the same shares of images as the full split has: 256 and 64 of 3,925). All rows in one process, one after the
other, on the same images.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import ROOT, report

from vggattn import study
from vggattn.cli import add_checkpoint_argument, add_model_arguments
from vggattn.models.byo import blocks_of, load_from_args
from vggattn.attention.trace import watch

DATA = ROOT.parent / "shared" / "data" / "imagenette2-224" / "val"
FULL_SPLIT, FULL_SANITY, FULL_FAITHFULNESS = 3925, 256, 64  # the shipped study's shares


@torch.no_grad()
def forward_bound(model, xs, runs, sanity: int) -> float:
    t0 = time.perf_counter()
    for x in xs:
        for _ in range(1 + len(runs)):
            model(x)
    model(xs[0][:sanity])
    return time.perf_counter() - t0


@torch.no_grad()
def one_forward_a_run(model, blocks, xs, runs) -> float:
    t0 = time.perf_counter()
    for x in xs:
        watch(model, x, [name for name, *_ in blocks])
        study.intervention_logits(model, x, runs)
    return time.perf_counter() - t0


@torch.no_grad()
def branched(model, blocks, xs, runs) -> float:
    t0 = time.perf_counter()
    for x in xs:
        study.branched_forward(model, x, blocks, runs)
    return time.perf_counter() - t0


@torch.no_grad()
def statistics(model, meta, blocks, xs) -> float:
    total = 0.0
    for x in xs:
        _, seen = watch(model, x, [name for name, *_ in blocks])
        t0 = time.perf_counter()
        for name, module, adapter in blocks:
            study.batch_statistics(adapter.maps(module, seen[name].input), int(meta["input_size"]))
        total += time.perf_counter() - t0
    return total


def faithfulness_time(model, blocks, x) -> float:
    from vggattn.study import faithfulness
    from vggattn.attention.adapters import reinit_qk

    random_blocks = {name: reinit_qk(module, adapter, 2 + 10 * j) for j, (name, module, adapter) in enumerate(blocks)}
    faithfulness.record(model, blocks, x[:1], random_blocks, [0], 0)  # warm: the first image's one-off costs
    t0 = time.perf_counter()
    faithfulness.record(model, blocks, x[1:], random_blocks, list(range(1, len(x))), 0)
    return (time.perf_counter() - t0) / (len(x) - 1)


def timed_study(model, meta, args):
    """The whole study of --limit images, with the full split's shares of sanity and faithfulness images."""
    n = len(study.load_split(args.data, meta, args.limit)[0])
    sanity = max(1, round(n * FULL_SANITY / FULL_SPLIT))
    faith = max(1, round(n * FULL_FAITHFULNESS / FULL_SPLIT))
    t0 = time.perf_counter()
    s = study.run_study(model, meta, args.data, limit=args.limit, batch_size=args.batch_size, sanity_images=sanity,
                        faithfulness_images=faith, progress=False)
    return n, sanity, faith, time.perf_counter() - t0, s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_argument(p, "checkpoint to time")
    p.add_argument("--data", default=str(DATA), help="ImageFolder split")
    p.add_argument("--limit", type=int, default=64, help="evenly spaced images of the split")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward")
    p.add_argument("--faithfulness-images", type=int, default=2, help="images the faithfulness row times")
    p.add_argument("--study-only", action="store_true", help="only the whole study's row")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_model_arguments(p)
    args = p.parse_args(argv)
    model, meta = load_from_args(args)
    when = f"run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    title = f"Study time ({args.model or args.timm or args.checkpoint or 'default checkpoint'})"
    if args.study_only:
        n, sanity, faith, whole, _ = timed_study(model, meta, args)
        report(f"{title}, {n} val images, batch {args.batch_size}", ["what", "seconds", "s / image"],
               [[f"study (sanity on {sanity}, faithfulness on {faith} images)", round(whole, 1), round(whole / n, 3)]],
               [when])
        return 0
    blocks = blocks_of(model, meta, args.layers)
    runs = study.run_modes([name for name, *_ in blocks])
    ds, _ = study.load_split(args.data, meta, args.limit)
    n = len(ds)
    xs = [torch.stack([ds[i][0] for i in range(s, min(n, s + args.batch_size))]) for s in range(0, n, args.batch_size)]
    sanity = max(1, round(n * FULL_SANITY / FULL_SPLIT))
    forward_bound(model, [xs[0][:2]], runs, 1)  # warm-up
    bound = forward_bound(model, xs, runs, sanity)
    whole = one_forward_a_run(model, blocks, xs, runs)
    shared = branched(model, blocks, xs, runs)
    stats = statistics(model, meta, blocks, xs)
    k = args.faithfulness_images
    faith_s = faithfulness_time(model, blocks, xs[0][:k + 1])
    _, sanity, faith, study_s, s = timed_study(model, meta, args)
    ratio = lambda t: round(t / bound, 2)  # noqa: E731
    rows = [[f"forward bound: (1 + {len(runs)} runs) plain forwards a batch, + {sanity} sanity images", round(bound, 1),
             round(bound / n, 3), 1.0],
            ["interventions, one whole forward a run (watch + Intervention)", round(whole, 1), round(whole / n, 3),
             ratio(whole)],
            ["interventions, branched (one forward, shared prefixes)", round(shared, 1), round(shared / n, 3),
             ratio(shared)],
            ["statistics, batched", round(stats, 1), round(stats / n, 3), ratio(stats)],
            [f"faithfulness, an image (mean of {k}, after a warm one)", round(faith_s, 2), round(faith_s, 3), "-"],
            [f"study (run_study, sanity on {sanity}, faithfulness on {faith} images)", round(study_s, 1),
             round(study_s / n, 3), ratio(study_s)]]
    report(f"{title}, {n} val images, batch {args.batch_size}", ["what", "seconds", "s / image", "x forward bound"],
           rows, [f"{when}; target: study <= 1.3x the forward bound; baseline top-1 on these images "
                  f"{100 * s['interventions']['baseline']['top1']:.2f}%"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
