"""The model's own speed: vggattn's VGG16WithAttention forward vs the article's code, same weights.

    python bench/model_speed.py [--repeats 7]

Full width, 224 px, fp32, CPU, batch 1 and 16, no capture. vggattn runs channels_last and, in
inference on CPU, attention a block of query rows at a time (never the N x N map); the article's
code runs as written (contiguous, bmm + softmax). Outputs are compared (max abs difference of the
logits). Target: at least 1.3x. bf16 autocast is reported separately with its accuracy cost (max
logit difference, top-1 agreement). A second table times the attention kernels alone on the three
blocks' shapes: the article's bmm + softmax, SDPA's fused kernel with Q and K zero-padded to V's
width (vggattn's training path), and the row blocks (vggattn's CPU inference path); the row
"SDPA fused path" runs the whole model on the former, as inference did before the row blocks. The row
"bound" runs the same network without the three blocks: the speed-up no attention code can pass.
"""

import argparse

import torch
import torch.nn.functional as F

from common import interleaved, median, report
from tests_util import article_twin, full_width_model

from vggattn.models.vgg import VGG16WithAttention, attend_in_row_blocks


def attention_kernels(batches: list[int], repeats: int) -> None:
    rows = []
    for batch in batches:
        for n, c in ((56 * 56, 256), (28 * 28, 512), (14 * 14, 512)):  # the three blocks at 224 px
            torch.manual_seed(0)
            q, k = torch.randn(2, batch, n, c // 8).div(4).unbind(0)
            v = torch.randn(batch, n, c)
            pad = c - c // 8
            variants = {
                "article bmm + softmax": lambda: torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), -1), v),
                "SDPA fused, Q/K padded": lambda: F.scaled_dot_product_attention(F.pad(q, (0, pad)), F.pad(k, (0, pad)),
                                                                                 v, scale=1.0),
                "row blocks": lambda: attend_in_row_blocks(q, k, v),
            }
            with torch.no_grad():
                ref = variants["article bmm + softmax"]()
                diffs = {name: (fn() - ref).abs().max().item() for name, fn in variants.items()}
                t = interleaved(variants, repeats if batch == 1 else max(3, repeats // 2))
            base = median(t["article bmm + softmax"])
            rows += [[batch, f"{n} x {c}", name, round(median(ts) * 1e3, 2), round(base / median(ts), 2),
                      f"{diffs[name]:.1e}"] for name, ts in t.items()]
    report("Attention alone, softmax(Q K^T) V, fp32 (medians of interleaved rounds)",
           ["batch", "N x C", "kernel", "ms", "speed-up vs article", "max |diff|"], rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batches", default="1,16")
    args = p.parse_args()
    attention_kernels([int(b) for b in args.batches.split(",")], args.repeats)
    ours = full_width_model()
    ref = article_twin(ours)
    ours_cl = full_width_model().to(memory_format=torch.channels_last)
    # The same model on GlobalAttention's other path (SDPA's fused kernel, Q/K padded), which it takes
    # with autograd on; no parameter needs a gradient, so no graph is built
    ours_sdpa = full_width_model().to(memory_format=torch.channels_last).requires_grad_(False)
    # The same convs without the three blocks: no attention code, however fast, beats this
    bound = VGG16WithAttention(1000, attention=False).eval().to(memory_format=torch.channels_last)
    bound.load_state_dict({k: v for k, v in ours.state_dict().items() if k in bound.state_dict()}, strict=False)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(1)
        x = torch.randn(batch, 3, 224, 224)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def sdpa_path():
            with torch.enable_grad():
                return ours_sdpa(x_cl)

        with torch.no_grad():
            out_ref = ref(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out_bf16 = ours_cl(x_cl).float()
            diffs = {"article": 0.0, "vggattn": (ours(x) - out_ref).abs().max().item(),
                     "vggattn channels_last": (ours_cl(x_cl) - out_ref).abs().max().item(),
                     "vggattn channels_last, SDPA fused path": (sdpa_path() - out_ref).abs().max().item(),
                     "vggattn channels_last bf16": (out_bf16 - out_ref).abs().max().item()}
        variants = {
            "article": lambda: ref(x),
            "vggattn": lambda: ours(x),
            "vggattn channels_last": lambda: ours_cl(x_cl),
            "vggattn channels_last, SDPA fused path": sdpa_path,
            "bound: no attention blocks, channels_last": lambda: bound(x_cl),
        }

        def bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours_cl(x_cl)
        variants["vggattn channels_last bf16"] = bf16
        with torch.no_grad():
            t = interleaved(variants, args.repeats if batch == 1 else max(3, args.repeats // 2))
        base = median(t["article"])
        agree = (out_bf16.argmax(1) == out_ref.argmax(1)).float().mean().item()
        for name, ts in t.items():
            other = name not in diffs  # the bound is another network: its logits are not comparable
            rows.append([batch, name, round(median(ts) * 1e3, 1), round(base / median(ts), 2),
                         "-" if other else f"{diffs[name]:.2e}",
                         "-" if other else f"{agree:.0%}" if "bf16" in name else "100%"])
    report("Forward, full width, 224 px, fp32 unless named (medians of interleaved rounds)",
           ["batch", "variant", "ms", "speed-up vs article (target >= 1.3)", "max |logit diff| vs article",
            "top-1 agrees"], rows, [f"logits' scale: std {out_ref.std().item():.3g}"])


if __name__ == "__main__":
    main()
