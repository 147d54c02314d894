"""Training throughput: vggattn's training step vs a plain fp32 loop over the article's code.

    python bench/train_throughput.py [--width 0.25 --size 128 --batch 64 --repeats 5]

Same model size (the article's layout at --width), input and batch. "article": the article's
GlobalAttention (bmm + softmax over the N x N map) in an fp32, contiguous-memory loop with AdamW.
"vggattn": what `python -m vggattn.training.train` runs: BatchNorm after each conv, channels_last, the fused
attention path, precision auto (fp32 on CPUs without native bf16). Also reported, to separate the
effects: vggattn's step with SDPA held to its math backend (the N x N map, as before the fused path),
and without BatchNorm (the article's exact network, only our code paths). "bound": the same network
without the three blocks, the speed-up no attention code can pass.
"""

import argparse
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import article_reference, interleaved, median, report

from vggattn.models.vgg import GlobalAttention, VGG16WithAttention
from vggattn.training.train import cpu_has_native_bf16

article = article_reference()


def article_network(width: float) -> nn.Module:
    """The article's network at `width`: our plain layout with the article's attention modules."""
    model = VGG16WithAttention(10, width=width, hidden=256, dropout=0.0)
    for i, m in enumerate(model.features):
        if isinstance(m, GlobalAttention):
            ref = article.GlobalAttention(m.conv_value.in_channels)
            ref.load_state_dict(m.state_dict())
            model.features[i] = ref
    return model


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, channels_last: bool, autocast: bool,
              math_attention: bool = False):
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for m in model.modules():
        if hasattr(m, "gamma"):
            nn.init.constant_(m.gamma, 0.1)  # attention on, as after the first steps of training
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        held = sdpa_kernel([SDPBackend.MATH]) if math_attention else contextlib.nullcontext()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), held:
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    bf16 = cpu_has_native_bf16()
    steps = {
        "article (fp32 loop)": make_step(article_network(args.width), x, y, channels_last=False, autocast=False),
        "vggattn train step": make_step(VGG16WithAttention(10, width=args.width, hidden=256, dropout=0.0, batch_norm=True),
                                        x, y, channels_last=True, autocast=bf16),
        "vggattn, SDPA math backend (N x N)": make_step(
            VGG16WithAttention(10, width=args.width, hidden=256, dropout=0.0, batch_norm=True), x, y,
            channels_last=True, autocast=bf16, math_attention=True),
        "vggattn, no BatchNorm": make_step(VGG16WithAttention(10, width=args.width, hidden=256, dropout=0.0), x, y,
                                           channels_last=True, autocast=bf16),
        "bound: no attention blocks, no BatchNorm": make_step(
            VGG16WithAttention(10, width=args.width, hidden=256, dropout=0.0, attention=False), x, y,
            channels_last=True, autocast=bf16),
    }
    times = interleaved(steps, args.repeats)
    base = median(times["article (fp32 loop)"])
    rows = [[name, round(args.batch / median(t), 1), round(median(t) * 1000), round(base / median(t), 2)]
            for name, t in times.items()]
    report(f"Training step, width {args.width}, {args.size} px, batch {args.batch}, {args.repeats} rounds",
           ["variant", "images/s", "ms/step (median)", "speed-up vs article"], rows,
           [f"precision of the vggattn rows: {'bf16 autocast' if bf16 else 'fp32 (no native bf16 on this CPU)'}"])


if __name__ == "__main__":
    main()
