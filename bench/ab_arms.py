"""The A/B arms side by side: FLOPs, parameters and CPU throughput of the article's attention, no
attention, and query-averaged ("global") attention, at the A/B scale of the model card.

    python bench/ab_arms.py [--width 0.25 --train-size 96 --input-size 128 --batch 64 --repeats 5]

Training step: what `python -m vggattn.training.train` runs (BatchNorm, channels_last, fp32 on this CPU),
on --train-size crops; inference: the exported (BatchNorm-free) model at --input-size. FLOPs count
each arm's own math (multiply-add = 2), at --input-size.
"""

import argparse

import torch
import torch.nn.functional as F

from common import interleaved, median, report

from vggattn.training.evaluate import count_flops, count_params
from vggattn.models.vgg import VGG16WithAttention

ARMS = {"attention": True, "none": False, "global": "global"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=0.25, help="channel multiplier")
    p.add_argument("--hidden", type=int, default=256, help="hidden classifier size")
    p.add_argument("--train-size", type=int, default=96, help="training crop size")
    p.add_argument("--input-size", type=int, default=128, help="inference input size")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x_train = torch.randn(args.batch, 3, args.train_size, args.train_size).contiguous(memory_format=torch.channels_last)
    x_eval = torch.randn(args.batch, 3, args.input_size, args.input_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    steps, forwards, rows = {}, {}, {}
    for name, attention in ARMS.items():
        train_model = VGG16WithAttention(10, width=args.width, hidden=args.hidden, dropout=0.3, attention=attention,
                                         batch_norm=True).to(memory_format=torch.channels_last).train()
        for m in train_model.modules():
            if hasattr(m, "gamma"):
                torch.nn.init.constant_(m.gamma, 0.1)
        opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)

        def step(model=train_model, opt=opt):
            loss = F.cross_entropy(model(x_train), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        eval_model = VGG16WithAttention(10, width=args.width, hidden=args.hidden, attention=attention).eval()
        eval_model = eval_model.to(memory_format=torch.channels_last)

        def forward(model=eval_model):
            with torch.no_grad():
                model(x_eval)
        steps[name], forwards[name] = step, forward
        rows[name] = [count_flops(eval_model, args.input_size) / 1e9, count_params(eval_model)]
    train_times = interleaved(steps, args.repeats)
    eval_times = interleaved(forwards, args.repeats * 2)
    table = [[name, f"{g:.3f}", f"{n:,}", args.batch / median(train_times[name]), args.batch / median(eval_times[name])]
             for name, (g, n) in rows.items()]
    report(f"A/B arms: width {args.width}, train crops {args.train_size} px, inference {args.input_size} px, batch {args.batch}",
           ["arm", "GFLOPs / image (inference)", "params", "train images/s", "inference images/s"], table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
