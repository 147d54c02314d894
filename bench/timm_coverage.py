"""Which of timm's models with attention vggattn reads, and how (random weights: nothing is fetched).

    python bench/timm_coverage.py [--all | --families] [--size 0] [--max-params 250e6] [--out rows.md [--resume]] [NAME ...]

For each model (default: every timm CNN whose name says BoTNet, HaloNet, LambdaNet or GCNet; --all: every model
`timm.list_models()` names), `find_blocks` runs it once on an input of its own size (timm's pretrained_cfg; --size
to choose one): the blocks found by an adapter (their class), the blocks found by tracing what they compute, and
the modules named and skipped (attention that is no map over positions), each with its reason. Where a traced block
has `fused_attn` (timm's `Attention` and its kin), its rows are checked against the model's own unfused attention
(the weights entering `attn_drop`; each of our rows, grid then prefix tokens, must be one of its rows to 1e-4).
Models over --max-params parameters (1 GB in float32) are counted "too large" and not built beyond their config;
so are those whose reading needs more than --memory-gb (SAM's ViT at 1,024 px keeps 12 x 4,096^2 weights a block).

Prints a row per model (also appended to --out as it goes, so a long run keeps what it did) and the counts: read,
checked, skipped (no attention over positions: models without attention included), too large, crashed.
"""

import argparse
import copy
import logging
import os
import time
import warnings

import torch

from vggattn.attention.adapters import TracedAdapter, find_blocks, locate_tokens, traced_blocks
from vggattn.attention.trace import watch

PATTERNS = ["*botnet*", "*botnext*", "*halo*", "*lambda*", "gcres*", "gc_*"]


def row_kind(line: str) -> str:
    """Which count a row of this script's table goes to."""
    cells = [c.strip() for c in line.split("|")]
    if cells[2].startswith("CRASHED"):
        return "crashed"
    if "too large" in cells[6]:
        return "too_large"
    return "read" if cells[2] not in ("0", "-") else "skipped"


def own_rows_match(model, x, blocks) -> bool | None:
    """Every traced block with timm's `fused_attn`: each of our rows is one of its own unfused rows (values to 1e-4);
    None where no block can be checked this way (windows stacked on the batch axis, other shapes: not compared)."""
    names = [n for n, m, a in blocks if isinstance(a, TracedAdapter) and hasattr(m, "fused_attn")
             and hasattr(m, "attn_drop")]
    if not names:
        return None
    reference, want = copy.deepcopy(model), {}
    for name, module in reference.named_modules():
        if name in names:
            module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda m, a, n=name: want.setdefault(n, a[0]))
    with torch.no_grad():
        reference(x)
        _, seen = watch(model, x, names, set(names))
    chosen = [b for b in blocks if b[0] in names]
    locate_tokens(model, x, chosen, {n: s.input for n, s in seen.items()})
    compared = 0
    for name, module, adapter in chosen:
        if name not in want or name not in seen:
            return False
        maps = adapter.maps(module, seen[name].input, seen[name].events, seen[name].call)
        if maps.window is not None or want[name].shape[0] != 1 or want[name].dim() != 4:
            continue  # windows stacked on the batch axis: placed and checked in tests/test_vit.py (Swin, MaxViT)
        rows = maps.rows()[0].double()
        if maps.prefix is not None:
            rows = torch.cat([rows, maps.prefix[0].double()], -1)
        a = want[name][0].double()  # (heads, T, S)
        if a.shape[0] != rows.shape[0] or a.shape[-1] != rows.shape[-1]:
            continue  # heads or keys counted otherwise (e.g. heads folded into the batch): not compared
        if not bool((torch.cdist(rows.sort(-1).values, a.sort(-1).values).amin(-1) < 1e-4).all()):
            return False
        compared += 1
    return True if compared else None


def families(timm) -> list[str]:
    """One model name per timm model file (an architecture family): the one with the fewest parameters (counted on
    the meta device, nothing allocated)."""
    from timm.models import get_pretrained_cfg  # noqa: F401 (timm's registry is loaded)
    from timm.models._registry import model_entrypoint

    best: dict[str, tuple[int, str]] = {}
    for name in timm.list_models():
        family = model_entrypoint(name).__module__
        try:
            with torch.device("meta"):
                size = sum(q.numel() for q in timm.create_model(name, pretrained=False).parameters())
        except Exception:  # noqa: BLE001 - counted when it is run
            size = 1 << 62
        if family not in best or size < best[family][0]:
            best[family] = (size, name)
    return sorted(name for _, name in best.values())


def main(argv=None) -> int:
    import timm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=0, help="input size (0: each model's own, timm's pretrained_cfg)")
    p.add_argument("--all", action="store_true", help="every model timm.list_models() names")
    p.add_argument("--families", action="store_true", help="one model of each of timm's model files (the one with "
                   "the fewest parameters), every architecture once")
    p.add_argument("--max-params", type=float, default=250e6, help="models with more parameters count as too large")
    p.add_argument("--out", help="append each row to this file as it is made")
    p.add_argument("--resume", action="store_true", help="skip the models --out has a row for already (their rows "
                   "count towards the totals): a sweep of hours runs across sessions")
    p.add_argument("names", nargs="*", help="timm model names (default: the attention CNNs)")
    p.add_argument("--memory-gb", type=float, default=12, help="address space of this process: a model that needs "
                   "more at its default size counts as too large, and the sweep goes on")
    args = p.parse_args(argv)
    import resource

    limit = int(args.memory_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    names = args.names or (timm.list_models() if args.all else families(timm) if args.families else
                           sorted({n for pat in PATTERNS for n in timm.list_models(pat)}))
    counts = dict(read=0, checked=0, skipped=0, too_large=0, crashed=0)

    def say(line: str) -> None:
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    done = {}
    if args.resume and args.out and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            done = {line.split("|")[1].strip(): line for line in f if line.startswith("| ") and "---" not in line
                    and not line.startswith("| model |")}
        for line in done.values():
            counts[row_kind(line)] += 1
            counts["checked"] += line.split("|")[5].strip() == "yes"
    else:
        say("| model | blocks found | by class | by tracing | checked | skipped (not over positions) | s |")
        say("|---|---|---|---|---|---|---|")
    for name in names:
        if name in done:
            continue
        t = time.perf_counter()
        try:
            with torch.device("meta"):
                size_of = sum(q.numel() for q in timm.create_model(name, pretrained=False).parameters())
            if size_of > args.max_params:
                counts["too_large"] += 1
                say(f"| {name} | - | - | - | - | too large: {size_of / 1e6:.0f} M parameters | - |")
                continue
            model = timm.create_model(name, pretrained=False).eval()
            size = model.pretrained_cfg.get("input_size", (3, 224, 224))[1:] if args.size == 0 \
                else (args.size, args.size)
            x = torch.randn(1, model.pretrained_cfg.get("input_size", (3,))[0], *size)
            with torch.no_grad():
                try:
                    blocks = find_blocks(model, example=x)
                except ValueError:
                    blocks = []
            traced = sum(isinstance(a, TracedAdapter) for *_, a in blocks)
            skipped = traced_blocks(model).skipped
            checked = own_rows_match(model, x, blocks) if blocks else None
        except (MemoryError, RuntimeError) as e:  # an allocation past --memory-gb: too large here, not a crash
            if not isinstance(e, MemoryError) and "alloc" not in str(e).lower():
                counts["crashed"] += 1
                say(f"| {name} | CRASHED: {type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''} ||||| "
                    f"{time.perf_counter() - t:.1f} |")
                continue
            counts["too_large"] += 1
            say(f"| {name} | - | - | - | - | too large for {args.memory_gb:g} GB at its size: {type(e).__name__} | "
                f"{time.perf_counter() - t:.1f} |")
            continue
        except Exception as e:  # noqa: BLE001 - a sweep reports and goes on
            counts["crashed"] += 1
            say(f"| {name} | CRASHED: {type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''} ||||| "
                f"{time.perf_counter() - t:.1f} |")
            continue
        counts["read" if blocks else "skipped"] += 1
        counts["checked"] += checked is True
        reasons = sorted({s.split(": not an attention block over positions: ")[-1][:90] for s in skipped})
        say(f"| {name} | {len(blocks)} | {len(blocks) - traced} | {traced} | "
            f"{'-' if checked is None else 'yes' if checked else 'NO'} | {len(skipped)}"
            f"{' (' + '; '.join(reasons[:2]) + ')' if reasons else ''} | {time.perf_counter() - t:.1f} |")
        del model
    say("")
    say(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items()) + f" (of {len(names)} models)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
