"""Fit a checkpoint's "unsure" threshold on a val split and store it in its meta (weights unchanged).

    python scripts/unsure_threshold.py --checkpoint checkpoints/vgg16att-imagenette-w05-256.safetensors \
        --data ../shared/data/imagenette2-224/val

Rule (vggattn.attention.readouts.unsure_threshold): the largest top-1 probability c (after the checkpoint's
temperature) such that the val predictions with probability <= c are right less than half the
time. The app marks a prediction below it as unsure. Writes meta["unsure_below"] and
meta["training"]["unsure"] (the rule, the number, how many val predictions fall below it).
"""

from __future__ import annotations

import argparse
import json

from vggattn.attention.readouts import unsure_threshold
from vggattn.models.checkpoint import load_checkpoint, save_checkpoint
from vggattn.training.evaluate import predict_logits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint to update in place")
    p.add_argument("--data", required=True, help="the val split (ImageFolder)")
    args = p.parse_args(argv)
    model, meta = load_checkpoint(args.checkpoint, device="cpu")
    targets, logits = predict_logits(model, meta, args.data)
    probs = (logits / float(meta.get("temperature", 1.0))).softmax(1)
    conf, pred = probs.max(1)
    correct = (pred.numpy() == targets)
    threshold = unsure_threshold(conf.numpy(), correct)
    below = conf.numpy() <= threshold
    info = {"rule": "largest top-1 probability c with val top-1 precision < 50% among predictions with probability <= c",
            "unsure_below": threshold, "val_images": int(len(targets)), "val_below": int(below.sum()),
            "val_precision_below": float(correct[below].mean()) if below.any() else None,
            "val_precision_above": float(correct[~below].mean())}
    meta = {**meta, "unsure_below": threshold, "training": {**meta.get("training", {}), "unsure": info}}
    save_checkpoint(model, meta, args.checkpoint)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
