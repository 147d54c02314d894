"""Pack ImageFolder splits into a few .npz files of WebP bytes, small enough to travel to a GPU machine.

    python scripts/pack_gpu_data.py --data ../shared/data/imagenette2-224 --out .gpu --quality 75

Writes OUT/a/val.npz, OUT/a/train-0.npz and OUT/b/train-1.npz (each: `blob` uint8 bytes, `offsets` int64 (n+1), `labels`
int16, `classes` the folder names, `files` the relative paths). The train split is cut in two so
that OUT/a (val + train-0) and OUT/b (train-1) are about the same size: the device tool carries at
most 64 MiB a call, so each folder travels in its own call. WebP re-encoding is lossy: say so
wherever a number comes from these files.
"""

from __future__ import annotations

import argparse
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def encode(args: tuple[str, int]) -> bytes:
    path, quality = args
    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def pack(root: Path, files: list[Path], classes: list[str], quality: int, out: Path) -> int:
    with ProcessPoolExecutor() as pool:
        blobs = list(pool.map(encode, [(str(f), quality) for f in files], chunksize=64))
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    labels = np.array([classes.index(f.parent.name) for f in files], dtype=np.int16)
    np.savez(out, blob=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets, labels=labels,
             classes=np.array(classes), files=np.array([str(f.relative_to(root)) for f in files]))
    return out.stat().st_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quality", type=int, default=75, help="WebP quality")
    args = p.parse_args(argv)
    root, out = Path(args.data), Path(args.out)
    for part in ("a", "b"):
        (out / part).mkdir(parents=True, exist_ok=True)
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    val = sorted((root / "val").glob("*/*.JPEG"))
    train = sorted((root / "train").glob("*/*.JPEG"))
    size_val = pack(root, val, classes, args.quality, out / "a" / "val.npz")
    # train-0 takes an evenly spread share of the images, so that val + train-0 is about train-1
    val_share = size_val / (size_val + sum(f.stat().st_size for f in train) * size_val / sum(f.stat().st_size for f in val))
    frac = max(0.0, (1 - 2 * val_share) / (2 * (1 - val_share)))  # of train, into train-0
    picked = [int((i + 1) * frac) > int(i * frac) for i in range(len(train))]
    first = [f for f, keep in zip(train, picked) if keep]
    rest = [f for f, keep in zip(train, picked) if not keep]
    sizes = [pack(root, first, classes, args.quality, out / "a" / "train-0.npz"),
             pack(root, rest, classes, args.quality, out / "b" / "train-1.npz")]
    print(f"val {len(val)} images {size_val / 2**20:.1f} MiB; train-0 {len(first)} images {sizes[0] / 2**20:.1f} MiB; "
          f"train-1 {len(rest)} images {sizes[1] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
