"""The registers A/B across training seeds: each run of each arm evaluated on the whole val split, the spread across
seeds, and a test of whether the arms' difference survives it.

    python scripts/ab_seeds.py ~/runs/ab > checkpoints/vit-registers-seeds.md
    python scripts/ab_seeds.py --shipped        # the two shipped arms on the whole val split, image by image

Reads RUNS/<arch>-s<seed>/best.safetensors (scripts/train_zoo.py's runs: the same recipe as the shipped arms, every
seed of both arms in one precision), evaluates each on all of ../shared's val split in float32 (each image's
correct/incorrect kept), and prints a markdown table: per seed each arm's top-1 and the difference; per arm the mean
and standard deviation across seeds; Welch's t-test of the arms' per-seed accuracies (the named test: does the
difference exceed the seed-to-seed spread?), and, per seed pair, the paired bootstrap CI over images (how sure one
pair's difference is on these images, which says nothing of seeds).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("vit_imagenette", "vit_imagenette_reg4")


@torch.no_grad()
def correct(checkpoint: Path, arch: str, data: Path) -> np.ndarray:
    """(images,) bool: each val image classified right, float32, batches of 128."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from vggattn.data import eval_transform, load_rgb
    from vggattn.models.byo import load_model

    model, meta = load_model(f"vggattn.models.zoo:{arch}", checkpoint)
    model.eval()
    folder = ImageFolder(data, transform=eval_transform(meta), loader=load_rgb)
    hits = []
    for x, y in DataLoader(folder, 128, num_workers=1):
        hits.append(model(x).argmax(1) == y)
    return torch.cat(hits).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="?")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imagenette2-224" / "val")
    p.add_argument("--shipped", action="store_true", help="the shipped arms (checkpoints/vit-*imagenette-96): "
                   "top-1 of each on the whole split, the paired bootstrap CI of the difference and McNemar's exact "
                   "test on the images they disagree on")
    args = p.parse_args(argv)
    from scipy.stats import binomtest, ttest_ind

    if args.shipped:
        a = correct(ROOT / "checkpoints" / "vit-imagenette-96.safetensors", ARMS[0], args.data).astype(float)
        b = correct(ROOT / "checkpoints" / "vit-reg4-imagenette-96.safetensors", ARMS[1], args.data).astype(float)
        d = b - a
        boot = d[np.random.default_rng(0).integers(0, len(d), (2000, len(d)))].mean(1)
        only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        print(f"{len(a)} images: without registers {a.mean():.2%}, with 4 registers {b.mean():.2%}, difference "
              f"{d.mean() * 100:+.2f} pts [{np.percentile(boot, 2.5) * 100:+.2f}, {np.percentile(boot, 97.5) * 100:+.2f}]"
              f" (paired bootstrap over images); right only without registers {only_a}, only with {only_b}: "
              f"McNemar's exact p = {binomtest(only_b, only_a + only_b, 0.5).pvalue:.3f}")
        return 0

    found: dict[str, dict[int, np.ndarray]] = {a: {} for a in ARMS}
    for run in sorted(args.runs.expanduser().glob("*-s*")):
        m = re.fullmatch(r"(.+)-s(\d+)", run.name)
        if m and m.group(1) in ARMS and (run / "done").is_file() and (run / "best.safetensors").is_file():
            found[m.group(1)][int(m.group(2))] = correct(run / "best.safetensors", m.group(1), args.data)
    seeds = sorted(set(found[ARMS[0]]) & set(found[ARMS[1]]))
    if not seeds:
        print("no seed has both arms trained yet")
        return 1
    rng = np.random.default_rng(0)
    print("| seed | without registers | with 4 registers | difference [95% CI over images] |")
    print("|---|---|---|---|")
    for s in seeds:
        a, b = found[ARMS[0]][s].astype(float), found[ARMS[1]][s].astype(float)
        d = b - a
        boot = d[rng.integers(0, len(d), (2000, len(d)))].mean(1)
        print(f"| {s} | {a.mean():.2%} | {b.mean():.2%} | {d.mean() * 100:+.2f} pts "
              f"[{np.percentile(boot, 2.5) * 100:+.2f}, {np.percentile(boot, 97.5) * 100:+.2f}] |")
    acc = {arm: np.array([found[arm][s].mean() for s in seeds]) for arm in ARMS}
    t = ttest_ind(acc[ARMS[1]], acc[ARMS[0]], equal_var=False)
    print()
    print(f"Across {len(seeds)} seeds: without registers {acc[ARMS[0]].mean():.2%} (sd {acc[ARMS[0]].std(ddof=1) * 100:.2f} "
          f"pts), with registers {acc[ARMS[1]].mean():.2%} (sd {acc[ARMS[1]].std(ddof=1) * 100:.2f} pts); "
          f"difference {(acc[ARMS[1]].mean() - acc[ARMS[0]].mean()) * 100:+.2f} pts; Welch's t-test over the seeds' "
          f"accuracies: t = {t.statistic:.2f}, p = {t.pvalue:.3f}" if len(seeds) > 1 else "One seed: no spread.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
