"""Which of timm's CNNs with attention blocks vggattn finds, and how (random weights: nothing is fetched).

    python bench/timm_coverage.py [--size 128] [NAME ...]

For each model (default: every timm CNN whose name says BoTNet, HaloNet, LambdaNet or GCNet), `find_blocks` runs
it once on an input of its own size (timm's pretrained_cfg; --size to choose one): the blocks found by an adapter (their class), the blocks found by tracing what they
compute, and the modules named and skipped (attention that is no map over positions). A table per model.
"""

import argparse
import logging
import time
import warnings

import torch

from vggattn.attention.adapters import TracedAdapter, find_blocks, traced_blocks

PATTERNS = ["*botnet*", "*botnext*", "*halo*", "*lambda*", "gcres*", "gc_*"]


def main(argv=None) -> int:
    import timm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=0, help="input size (0: each model's own, timm's pretrained_cfg)")
    p.add_argument("names", nargs="*", help="timm model names (default: the attention CNNs)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    names = args.names or sorted({n for pat in PATTERNS for n in timm.list_models(pat)})
    print("| model | blocks found | by class | by tracing | skipped (not over positions) | s |")
    print("|---|---|---|---|---|---|")
    found_any = 0
    for name in names:
        t = time.perf_counter()
        model = timm.create_model(name, pretrained=False).eval()
        size = model.pretrained_cfg.get("input_size", (3, args.size, args.size))[1:] if args.size == 0 \
            else (args.size, args.size)
        with torch.no_grad():
            try:
                blocks = find_blocks(model, example=torch.randn(1, 3, *size))
            except ValueError:
                blocks = []
        traced = sum(isinstance(a, TracedAdapter) for *_, a in blocks)
        skipped = traced_blocks(model).skipped
        kinds = sorted({type(m).__name__ for _, m, _ in blocks} | {s.split("(")[1].split(")")[0] for s in skipped})
        found_any += bool(blocks)
        print(f"| {name} | {len(blocks)} | {len(blocks) - traced} | {traced} | {len(skipped)} "
              f"({', '.join(kinds)}) | {time.perf_counter() - t:.1f} |", flush=True)
    print(f"\n{found_any} of {len(names)} models: attention found")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
