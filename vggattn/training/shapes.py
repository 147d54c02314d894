"""Coloured shapes with boxes: a detection set written by a seed, so a detector trained here means something without a
hub and without a dataset on disk.

    image, target = sample("train", 17)      # PIL image (SIZE x SIZE), {"labels": [...], "boxes": [[x0, y0, x1, y1]]}
    python -m vggattn.training.shapes --out assets/shapes --split val --count 4   # write a few as JPEG files

Every image is a function of (SEED, split, index): a smooth two-colour background with noise, then 1 to 4 shapes
(circle, square, triangle) of random colour and size, overlapping little (IoU <= 0.2 with each other); a box is its
shape's tight pixel bounds. The splits never share an image: their indices are drawn from different seeds. The
held-out split is "val" (VAL_COUNT images); "train" has as many as a run asks for.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SEED = 20261207
SIZE = 192  # pixels, square
CLASSES = ["circle", "square", "triangle"]
SPLITS = {"train": 0, "val": 1}
VAL_COUNT = 500
MAX_SHAPES = 4


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if index < 0 or (split == "val" and index >= VAL_COUNT):
        raise IndexError(f"{split} has indices 0..{VAL_COUNT - 1 if split == 'val' else 'any'}, got {index}")
    return np.random.default_rng([SEED, SPLITS[split], index])


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _background(rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: a linear blend of two dull colours across a random direction, with pixel noise."""
    a, b = rng.uniform(40, 200, size=3), rng.uniform(40, 200, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0, 1)[..., None]
    img = a * (1 - t) + b * t + rng.normal(0, 12, size=(SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour (one channel high, one low, one anywhere)."""
    c = [int(rng.uniform(200, 255)), int(rng.uniform(0, 60)), int(rng.uniform(0, 255))]
    rng.shuffle(c)
    return tuple(c)


def sample(split: str, index: int) -> tuple[Image.Image, dict]:
    """Image `index` of `split` and its target: {"labels": class indices into CLASSES, "boxes": [[x0, y0, x1, y1]] in
    pixels, ends exclusive}."""
    rng = _rng(split, index)
    img = Image.fromarray(_background(rng))
    draw = ImageDraw.Draw(img)
    count = int(rng.integers(1, MAX_SHAPES + 1))
    labels, boxes = [], []
    for _ in range(50):  # placements tried
        if len(labels) == count:
            break
        size = float(rng.uniform(28, 72))
        x0, y0 = float(rng.uniform(2, SIZE - size - 2)), float(rng.uniform(2, SIZE - size - 2))
        box = [x0, y0, x0 + size, y0 + size]
        if any(_iou(box, b) > 0.2 for b in boxes):
            continue
        kind = int(rng.integers(len(CLASSES)))
        colour = _colour(rng)
        if CLASSES[kind] == "circle":
            draw.ellipse(box, fill=colour)
        elif CLASSES[kind] == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0 + size / 2, y0), (x0 + size, y0 + size), (x0, y0 + size)], fill=colour)
        labels.append(kind)
        boxes.append([round(v, 2) for v in box])
    return img, {"labels": labels, "boxes": boxes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write <split>-<index>.jpg and .json into")
    p.add_argument("--split", default="val", choices=list(SPLITS))
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--start", type=int, default=0)
    args = p.parse_args(argv)
    import json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.start, args.start + args.count):
        img, target = sample(args.split, i)
        img.save(out / f"{args.split}-{i}.jpg", quality=92)
        (out / f"{args.split}-{i}.json").write_text(json.dumps(
            {**target, "classes": [CLASSES[c] for c in target["labels"]]}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
