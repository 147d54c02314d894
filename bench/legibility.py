"""Legibility of the attention maps: does the picture separate where a position looks from where it does not?

    python bench/legibility.py [--images 40] [--points 5] [--seed 0]

On the shipped checkpoint, for val photos (evenly spaced over the split) and --points seeded pixels each,
every layer's row is drawn over the photo as the app's panels draw it (its initial controls; the marks
left out, as they are the same before and after). Per row, two sets of cells:
- faint: cells holding under 1% of the row's largest weight;
- half: the smallest set of cells holding half the row's weight, at most 10 (rows needing more are counted);
and the mean |RGB change| the overlay makes to the photo in each (mean over the cell's pixels and channels,
then over cells, then over rows), in /255. "before" is the previous renderer (min-max, jet, opacity 0.5,
one blend of equal strength everywhere), re-typed here; "after" is vggattn.view.render with app.CONTROLS.
Target (issue 19): faint <= 8, half >= 50.
"""

import argparse

import numpy as np
from common import machine

import vggattn
from vggattn import app
from vggattn.analysis import analyze
from vggattn.view.export import map_picture
from vggattn.data import load_rgb
from vggattn.view.render import cell_rect

DATA = vggattn.models.checkpoint.DEFAULT_CHECKPOINT.parent.parent.parent / "shared" / "data" / "imagenette2-224" / "val"


def before_overlay(display: np.ndarray, grid_map: np.ndarray) -> np.ndarray:
    """The renderer this replaces: min-max to [0, 1], PIL bilinear, jet, Image.blend at opacity 0.5."""
    from PIL import Image

    from vggattn.view.render import _palette

    m = grid_map.astype(np.float32)
    m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)
    h, w = display.shape[:2]
    heat = np.clip(np.asarray(Image.fromarray(m, mode="F").resize((w, h), Image.Resampling.BILINEAR)), 0, 1)
    index = Image.fromarray((heat * 255 + 0.5).astype(np.uint8), mode="L")
    index.putpalette(_palette("jet"))
    return np.asarray(Image.blend(Image.fromarray(display), index.convert("RGB"), 0.5))


def cell_changes(display: np.ndarray, drawn: np.ndarray, grid: tuple[int, int], cells) -> float:
    diff = np.abs(drawn.astype(np.int32) - display.astype(np.int32))
    size = (display.shape[1], display.shape[0])
    means = []
    for j in cells:
        x0, y0, x1, y1 = cell_rect(int(j), grid, size)
        means.append(diff[y0:y1, x0:x1].mean())
    return float(np.mean(means))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=40, help="val photos, evenly spaced over the split")
    p.add_argument("--points", type=int, default=5, help="seeded pixels per photo")
    p.add_argument("--seed", type=int, default=0, help="seed of the pixels")
    args = p.parse_args(argv)
    model, meta = vggattn.load_checkpoint(device="cpu")
    files = sorted(DATA.glob("*/*.JPEG"))
    files = [files[i] for i in np.linspace(0, len(files) - 1, args.images).round().astype(int)]
    rng = np.random.default_rng(args.seed)
    c = app.CONTROLS
    rows = {}  # (renderer, layer) -> [(faint, half)]
    more_than_10 = {}
    for path in files:
        result = analyze(model, meta, load_rgb(path))
        w, h = result.size
        for _ in range(args.points):
            xy = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            for layer in result.blocks:
                row = layer.row_map(xy)[0]
                flat = row.reshape(-1)
                faint = np.nonzero(flat < 0.01 * flat.max())[0]
                order = np.argsort(-flat, kind="stable")
                need = int(np.searchsorted(np.cumsum(flat[order]), 0.5) + 1)
                more_than_10[layer.name] = more_than_10.get(layer.name, 0) + (need > 10)
                half = order[:min(need, 10)]
                drawn = {"before": before_overlay(result.display, row),
                         "after": map_picture(result, row, c["opacity"], c["colormap"], c["mode"], c["scale"])}
                for name, image in drawn.items():
                    rows.setdefault((name, layer.name), []).append(
                        (cell_changes(result.display, image, layer.maps.grid, faint) if len(faint) else np.nan,
                         cell_changes(result.display, image, layer.maps.grid, half)))
    print(f"# legibility: {len(files)} val photos x {args.points} points, shipped checkpoint; {machine()}")
    print(f"after = app.CONTROLS {c}\n")
    print("| renderer | layer | rows | faint cells: mean change /255 | half-mass cells: mean change /255 | rows needing > 10 cells |")
    print("|---|---|---|---|---|---|")
    for renderer in ("before", "after"):
        every = []
        for layer in [layer.name for layer in result.blocks]:
            v = np.array(rows[(renderer, layer)])
            every.append(v)
            print(f"| {renderer} | {layer} | {len(v)} | {np.nanmean(v[:, 0]):.1f} | {np.mean(v[:, 1]):.1f} | "
                  f"{more_than_10[layer]} |")
        v = np.concatenate(every)
        print(f"| {renderer} | all | {len(v)} | **{np.nanmean(v[:, 0]):.1f}** | **{np.mean(v[:, 1]):.1f}** | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
