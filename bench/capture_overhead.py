"""Capture overhead: a forward under `vggattn.attention.trace.watch` with every block's maps read (what `analyze` keeps) vs
the same forward without, batch 1, CPU.

    python bench/capture_overhead.py [--repeats 300]

Two models: the shipped checkpoint at its input size, and the article's full-width model (random
weights: the cost does not depend on them) at 224 px. Target: at most 1.05x.
"""

import argparse

import torch

from common import interleaved, median, report

import vggattn
from tests_util import full_width_model
from vggattn.attention.adapters import find_blocks
from vggattn.attention.trace import watch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=300)
    args = p.parse_args()
    shipped, meta = vggattn.load_checkpoint(device="cpu")
    rows = []
    for name, model, size, repeats in (("shipped checkpoint", shipped, meta["input_size"], args.repeats),
                                       ("article full width", full_width_model(), 224, max(5, args.repeats // 15))):
        x = torch.randn(1, 3, size, size)

        @torch.no_grad()
        def plain():
            model(x)

        blocks = find_blocks(model)

        @torch.no_grad()
        def captured():
            _, seen = watch(model, x, [name for name, *_ in blocks])
            return [adapter.maps(module, seen[name].input) for name, module, adapter in blocks]

        kept = sum(t.numel() * t.element_size() for maps in captured() for t in (maps.query, maps.key))
        t = interleaved({"plain": plain, "capture": captured}, repeats)
        rows.append([name, size, round(median(t["plain"]) * 1e3, 2), round(median(t["capture"]) * 1e3, 2),
                     round(median(t["capture"]) / median(t["plain"]), 3), round(min(t["capture"]) / min(t["plain"]), 3),
                     f"{kept / 1e6:.2f} MB"])
    report(f"Capture overhead, batch 1 (medians of {args.repeats} / {max(5, args.repeats // 15)} interleaved rounds)",
           ["model", "px", "forward ms", "forward + capture ms", "ratio (target <= 1.05)", "ratio of fastest rounds",
            "capture stores"], rows,
           ["Medians are the figures; the ratio of the fastest rounds is less exposed to a noisy machine."])


if __name__ == "__main__":
    main()
