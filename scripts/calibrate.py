"""Choose a checkpoint's input size and fit its temperature on training images held out of training.

    python scripts/calibrate.py --checkpoint run.safetensors --data ../shared/data/imagenette2-224/train \
        --holdout-every 20 --sizes 224 256 288 --out checkpoints/model.safetensors

The held-out images are every k-th file of the sorted train split (scripts/gpu_train.py keeps them out
of training). The size with the best held-out top-1 is kept (ties: the smaller), then the temperature
T minimising the held-out NLL of softmax(logits / T) is fitted at that size; both go into the
checkpoint's meta (`input_size`, `temperature`, `training.calibration`). Val is never looked at here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from vggattn.models.checkpoint import load_checkpoint, save_checkpoint
from vggattn.data import eval_transform, load_rgb
from vggattn.training.evaluate import fit_temperature


@torch.no_grad()
def held_out_logits(model, meta, root: Path, every: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = ImageFolder(root, transform=eval_transform({**meta, "input_size": size}), loader=load_rgb)
    order = sorted(range(len(ds)), key=lambda i: str(Path(ds.samples[i][0]).relative_to(root)))
    keep = [i for rank, i in enumerate(order) if rank % every == 0]
    logits, labels = [], []
    for x, y in DataLoader(Subset(ds, keep), 32, num_workers=2):
        logits.append(model(x.contiguous(memory_format=torch.channels_last)).float())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint to calibrate")
    p.add_argument("--data", type=Path, required=True, help="the train split it was trained on (ImageFolder)")
    p.add_argument("--holdout-every", type=int, default=20, help="every k-th sorted file was held out of training")
    p.add_argument("--sizes", type=int, nargs="+", default=[224], help="input sizes to compare")
    p.add_argument("--out", required=True, help="where to write the calibrated checkpoint")
    args = p.parse_args(argv)
    model, meta = load_checkpoint(args.checkpoint, device="cpu")
    results = {}
    for size in args.sizes:
        logits, labels = held_out_logits(model, meta, args.data, args.holdout_every, size)
        results[size] = (float((logits.argmax(1) == labels).float().mean()), logits, labels)
        print(f"{size} px: held-out top-1 {results[size][0]:.4f} ({len(labels)} images)")
    best = max(args.sizes, key=lambda s: (results[s][0], -s))
    top1, logits, labels = results[best]
    temperature = fit_temperature(logits, labels)
    nll = (F.cross_entropy(logits, labels).item(), F.cross_entropy(logits / temperature, labels).item())
    calibration = {"input_size_by_heldout_top1": {str(s): r[0] for s, r in results.items()}, "chosen_input_size": best,
                   "temperature": temperature, "heldout_images": len(labels), "heldout_every": args.holdout_every,
                   "heldout_nll_before_after": nll}
    meta = {**meta, "input_size": best, "temperature": temperature,
            "training": {**meta.get("training", {}), "calibration": calibration}}
    save_checkpoint(model, meta, args.out)
    print(json.dumps(calibration, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
