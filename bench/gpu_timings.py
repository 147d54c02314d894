"""Forward and training-step timings on a CUDA GPU: the shipped model and the full-width article model.

    python bench/gpu_timings.py            # prints a table; JSON with --json PATH

CUDA events around each call, after warm-up; medians of interleaved rounds (bench/common.py).
Forward in fp32 and under bf16 autocast, at the checkpoint's size and at 224 px for full width.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn as nn

from common import machine

import vggattn


def timed(fn, repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time")
        return 0
    torch.backends.cudnn.benchmark = True
    shipped, meta = vggattn.load_checkpoint(device="cuda")
    full = vggattn.vgg16_with_attention(10).cuda().eval().to(memory_format=torch.channels_last)
    rows = []
    for name, model, size in (("shipped (w0.25)", shipped, meta["input_size"]), ("full width", full, 224)):
        for batch in (1, 64):
            x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
            for precision in ("fp32", "bf16"):
                def fwd():
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                        model(x)
                s = timed(fwd)
                rows.append({"model": name, "size": size, "batch": batch, "what": f"forward {precision}",
                             "ms": 1000 * s, "images_per_s": batch / s})
        train_model = vggattn.VGG16WithAttention.from_config(
            vggattn.ModelConfig(**{**model.config.to_dict(), "batch_norm": True})).cuda().to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4, fused=True)
        x = torch.randn(64, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (64,), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(train_model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        s = timed(step, repeats=10)
        rows.append({"model": name, "size": size, "batch": 64, "what": "train step bf16 (BatchNorm)", "ms": 1000 * s,
                     "images_per_s": 64 / s})
    print(machine())
    print(f"{'model':<16} {'px':>4} {'batch':>5}  {'what':<28} {'ms':>9} {'images/s':>10}")
    for r in rows:
        print(f"{r['model']:<16} {r['size']:>4} {r['batch']:>5}  {r['what']:<28} {r['ms']:>9.2f} {r['images_per_s']:>10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
