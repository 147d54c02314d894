"""Train a model of `vggattn.models.zoo` on an ImageFolder split (Imagenette here), resumably, on the CPU or a GPU.

    python scripts/train_zoo.py --data ../shared/data/imagenette2-224 --out ~/runs/zoo --epochs 22
    python scripts/train_zoo.py --arch vit_imagenette_reg4 --input-size 96 --train-size 96 --cache --precision auto ...
    python scripts/train_zoo.py ... --resume        # continues from OUT/last.pt after a cut

Writes OUT/last.pt every epoch (model, optimizer, epoch), OUT/log.jsonl, and OUT/best.safetensors (weights +
meta: class names, input size, normalisation, val top-1, the recipe), which `vggattn.models.byo.load_weights` reads.
Recipe: AdamW, cosine schedule with one warm-up epoch, label smoothing 0.1, random-resized crops at
--train-size (smaller than --input-size: FixRes-style, faster), evaluation at --input-size. `--cache` decodes
every image once into memory (train at 1.25x the crop size, val as evaluated) and crops from there: the two CPU
cores then train instead of decoding JPEGs. `--precision auto` trains under bf16 autocast where the CPU has native
bf16 (avx512_bf16 / amx_bf16), as vggattn.training.train does.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2 as T

import vggattn
from vggattn.models import zoo
from vggattn.data import eval_transform, load_rgb, train_transform
from vggattn.training.train import cpu_has_native_bf16


class Cached(Dataset):
    """An ImageFolder decoded once into a uint8 tensor (N, 3, S, S); `transform` runs on each uint8 image."""

    def __init__(self, folder: ImageFolder, size: int, transform, cache: Path):
        if cache.is_file():
            self.images, self.labels = torch.load(cache, weights_only=True)
        else:
            resize = T.Compose([T.PILToTensor(), T.Resize((size, size), antialias=True)])
            self.images = torch.stack([resize(load_rgb(path)) for path, _ in folder.samples])
            self.labels = torch.tensor(folder.targets)
            torch.save((self.images, self.labels), cache)
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


def uint8_pipeline(meta: dict, crop: int | None) -> T.Compose:
    steps = [T.RandomResizedCrop(crop, scale=(0.25, 1.0), antialias=True), T.RandomHorizontalFlip()] if crop else []
    return T.Compose(steps + [T.ToDtype(torch.float32, scale=True), T.Normalize(meta["mean"], meta["std"])])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--epochs", type=int, default=22, help="epochs")
    p.add_argument("--batch-size", type=int, default=64, help="batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--train-size", type=int, default=96, help="training crop size")
    p.add_argument("--input-size", type=int, default=128, help="evaluation (and inference) size")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--arch", default="nonlocal_resnet", help="a factory of vggattn.models.zoo (nonlocal_resnet, vit_imagenette, "
                   "vit_imagenette_reg4)")
    p.add_argument("--cache", action="store_true", help="decode the images once into memory (OUT/../cache-*.pt)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32", help="auto: bf16 where native")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _, shipped = vggattn.load_checkpoint(device="cpu")  # the class names and ids of the Imagenette folders
    meta = {"input_size": args.input_size, "mean": list(vggattn.models.checkpoint.IMAGENET_MEAN),
            "std": list(vggattn.models.checkpoint.IMAGENET_STD), "class_names": shipped["class_names"],
            "class_ids": shipped.get("class_ids"), "model": f"vggattn.models.zoo:{args.arch}",
            "recipe": {k: v for k, v in vars(args).items() if k not in ("out", "data")}}  # no paths of this machine
    if args.cache:  # shared by runs of the same sizes
        tag = f"{Path(args.data).name}-{round(args.train_size * 1.25)}-{args.input_size}"
        train = Cached(ImageFolder(Path(args.data) / "train"), round(args.train_size * 1.25),
                       uint8_pipeline(meta, args.train_size), out.parent / f"cache-{tag}-train.pt")
        val = Cached(ImageFolder(Path(args.data) / "val"), args.input_size, uint8_pipeline(meta, None),
                     out.parent / f"cache-{tag}-val.pt")
        train.classes = ImageFolder(Path(args.data) / "train").classes
    else:
        train = ImageFolder(Path(args.data) / "train", transform=train_transform(args.train_size, meta["mean"], meta["std"]),
                            loader=load_rgb)
        val = ImageFolder(Path(args.data) / "val", transform=eval_transform(meta), loader=load_rgb)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_has_native_bf16())
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=bf16)
    train_dl = DataLoader(train, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True,
                          persistent_workers=args.workers > 0)
    val_dl = DataLoader(val, 128, num_workers=args.workers)
    model = getattr(zoo, args.arch)(len(train.classes)).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * len(train_dl)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / len(train_dl)) * 0.5 *
                                              (1 + math.cos(math.pi * min(1.0, s / steps))))
    start, best = 0, 0.0
    if args.resume and (out / "last.pt").is_file():
        state = torch.load(out / "last.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, best = state["epoch"] + 1, state["best"]
    for epoch in range(start, args.epochs):
        t0, seen, loss_sum = time.time(), 0, 0.0
        model.train()
        for x, y in train_dl:
            with autocast:
                loss = F.cross_entropy(model(x.to(memory_format=torch.channels_last)), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += float(loss) * len(y)
        model.eval()
        correct = 0
        with torch.no_grad():  # evaluated in float32, as the app and the study run it
            for x, y in val_dl:
                correct += int((model(x.to(memory_format=torch.channels_last)).argmax(1) == y).sum())
        top1 = correct / len(val)
        record = {"epoch": epoch, "train_loss": loss_sum / seen, "val_top1": top1, "seconds": time.time() - t0,
                  "lr": sched.get_last_lr()[0]}
        if hasattr(model, "nonlocal3"):
            record["gamma_free_W_bn_weight_abs"] = float(model.nonlocal3.W[1].weight.abs().mean())
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        if top1 >= best:
            best = top1
            weights = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(out / "best.safetensors"),
                      metadata={"meta": json.dumps({**meta, "val_top1": top1, "epoch": epoch})})
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch,
                    "best": best}, out / "last.pt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
