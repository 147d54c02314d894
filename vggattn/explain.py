"""Figures and numbers for images and points, from the command line.

    python -m vggattn.explain photo.jpg more/ --point 120,80 --point 10,200 --out explained/
    python -m vggattn.explain photos/ --relative --point 0.5,0.5 --out explained/ --checkpoint my.safetensors

Writes, per image, into OUT/<image stem>/:
- `figure.png`: the image with each point, the three layers' attention for each point (top-5 cells
  numbered), Grad-CAM of the top class, each layer's effective contribution and query-averaged map;
- `<layer>_attention.npy` (points, h, w), `<layer>_contribution.npy` and `<layer>_mean_attention.npy`
  (h, w), `gradcam.npy` (h, w);
- `result.json`: predictions, gammas, grids, for each point its query index and readouts in every
  layer, per layer the mean contribution and query dependence, and the top-5 with each layer's
  attention switched off (ablation: one extra forward per layer).
A folder is run as a batch with a progress bar; an image that cannot be read is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .analysis import Analysis, ablate, analyze, attention_at, render_attention, render_map
from .checkpoint import DEFAULT_CHECKPOINT, CheckpointError, atomic_write, load_checkpoint
from .data import IMAGE_SUFFIXES, ImageLoadError, open_image

log = logging.getLogger("vggattn.explain")


def top_k(probs, class_names: list[str], k: int = 5) -> list[dict]:
    p, i = probs.topk(min(k, len(probs)))
    return [{"class": class_names[j], "index": j, "prob": float(v)} for v, j in zip(p.tolist(), i.tolist())]


def summarize(result: Analysis, points: list[tuple[float, float]], model=None, per_point: list | None = None) -> dict:
    """Everything result.json holds, as plain numbers (model: for the ablation forwards; None skips them;
    per_point: `attention_at(result, xy)` of each point, when the caller has them already)."""
    per_point = per_point if per_point is not None else [attention_at(result, xy) for xy in points]
    dependence = result.query_dependence()
    layers = []
    for layer, contribution, (_, jsd) in zip(result.layers, result.contributions(), dependence):
        entry = {"name": layer.name, "grid": list(layer.grid), "gamma": layer.gamma,
                 "mean_contribution": float(contribution.mean()), "max_contribution": float(contribution.max()),
                 "query_dependence_jsd_nats": jsd, "query_dependence_jsd_fraction": jsd / math.log(2)}
        if model is not None:
            entry["top5_attention_off"] = top_k(ablate(model, result, [layer.name]), result.class_names)
        layers.append(entry)
    out = {"image_size": list(result.size), "input_size": result.input_size,
           "predictions": top_k(result.probs, result.class_names), "gammas": result.gammas(), "layers": layers,
           "points": [{"xy": list(xy), "layers": {l.name: r for l, (_, r) in zip(result.layers, at)}}
                      for xy, at in zip(points, per_point)]}
    if model is not None:
        out["top5_all_attention_off"] = top_k(ablate(model, result, [l.name for l in result.layers]), result.class_names)
    if result.gradcam is not None:
        out["gradcam_class"] = result.class_names[int(result.probs.argmax())]
    return out


def figure(result: Analysis, points: list[tuple[float, float]], path: Path, opacity: float = 0.5,
           colormap: str = "jet", mode: str = "smooth") -> None:
    """One PNG: a row per point (image + three overlays), then Grad-CAM + contributions, then
    predictions + query-averaged maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .render import mark_query

    n_layers = len(result.layers)
    rows = len(points) + 2
    fig, axes = plt.subplots(rows, n_layers + 1, figsize=(3.2 * (n_layers + 1), 3.2 * rows), squeeze=False)
    h, w = result.display.shape[:2]
    sx, sy = w / result.size[0], h / result.size[1]
    for r, xy in enumerate(points):
        axes[r, 0].imshow(mark_query(result.display, ((xy[0] + 0.5) * sx, (xy[1] + 0.5) * sy)))
        axes[r, 0].set_title(f"point ({xy[0]:g}, {xy[1]:g})", fontsize=9)
        for c, panel in enumerate(render_attention(result, xy, opacity, colormap, mode), start=1):
            ro = panel.readouts
            axes[r, c].imshow(panel.image)
            axes[r, c].set_title(f"{panel.layer} γ={panel.gamma:+.3f} q={panel.query_index}\n"
                                 f"H={ro['entropy_fraction']:.2f}·logN  dist={ro['mean_distance_input_px']:.1f} px",
                                 fontsize=8)
    r = len(points)
    if result.gradcam is not None:
        axes[r, 0].imshow(render_map(result, result.gradcam.numpy(), opacity, colormap, mode))
        axes[r, 0].set_title(f"Grad-CAM: {result.class_names[int(result.probs.argmax())]}", fontsize=9)
    for c, (layer, contribution) in enumerate(zip(result.layers, result.contributions()), start=1):
        axes[r, c].imshow(render_map(result, contribution, opacity, colormap, mode))
        axes[r, c].set_title(f"{layer.name} ‖γ·attn‖/‖x‖, mean {contribution.mean():.3f}", fontsize=8)
    r += 1
    text = "top-5\n" + "\n".join(f"{p['prob']:6.1%}  {p['class']}" for p in top_k(result.probs, result.class_names))
    text += "\n\nγ\n" + "\n".join(f"{k}: {v:+.4f}" for k, v in result.gammas().items())
    axes[r, 0].text(0.02, 0.98, text, va="top", ha="left", family="monospace", fontsize=8)
    for c, (layer, (mean_map, jsd)) in enumerate(zip(result.layers, result.query_dependence()), start=1):
        axes[r, c].imshow(render_map(result, mean_map, opacity, colormap, mode))
        axes[r, c].set_title(f"{layer.name} mean over queries\nJSD from mean {jsd:.3f} nats", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_result(result: Analysis, points: list[tuple[float, float]], out_dir: str | Path, model=None, *,
                 source: str | None = None, opacity: float = 0.5, colormap: str = "jet", mode: str = "smooth") -> dict:
    """Write figure.png, the maps as .npy and result.json into out_dir; return the JSON dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_point = [attention_at(result, xy) for xy in points]  # per point, per layer: (row, readouts)
    summary = {"source": source, **summarize(result, points, model, per_point)}
    files = ["figure.png", "result.json"]
    for i, layer in enumerate(result.layers):
        rows = np.stack([at[i][0] for at in per_point]) if points else np.zeros((0, *layer.grid), np.float32)
        arrays = {"attention": rows, "contribution": result.contributions()[i],
                  "mean_attention": result.query_dependence()[i][0]}
        for what, array in arrays.items():
            name = f"{layer.name}_{what}.npy"
            np.save(out / name, np.asarray(array, dtype=np.float32))
            files.append(name)
    if result.gradcam is not None:
        np.save(out / "gradcam.npy", result.gradcam.numpy().astype(np.float32))
        files.append("gradcam.npy")
    summary["files"] = sorted(files)
    figure(result, points, out / "figure.png", opacity, colormap, mode)
    text = json.dumps(summary, indent=2)
    atomic_write(out / "result.json", lambda tmp: Path(tmp).write_text(text))
    return summary


def parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--point takes X,Y (e.g. 120,80), got {text!r}") from None
    return x, y


def collect_images(inputs: list[str]) -> list[Path]:
    found = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return found


def unique_dirs(images: list[Path], out: Path) -> list[Path]:
    """OUT/<stem>, with -2, -3, ... where two images share a stem."""
    seen: dict[str, int] = {}
    dirs = []
    for image in images:
        seen[image.stem] = seen.get(image.stem, 0) + 1
        dirs.append(out / (image.stem if seen[image.stem] == 1 else f"{image.stem}-{seen[image.stem]}"))
    return dirs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vggattn.explain", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images, or folders of images")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint (default: the shipped one)")
    p.add_argument("--point", type=parse_point, action="append", default=[], metavar="X,Y",
                   help="a pixel of the original image (repeatable; default: the centre)")
    p.add_argument("--relative", action="store_true", help="points are fractions of width and height (0..1)")
    p.add_argument("--out", required=True, help="output folder (one subfolder per image)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-ablation", action="store_true", help="skip the per-layer ablation forwards")
    p.add_argument("--colormap", default="jet", help="colormap of the overlays")
    p.add_argument("--opacity", type=float, default=0.5, help="overlay opacity")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        model, meta = load_checkpoint(args.checkpoint, device=args.device)
        images = collect_images(args.inputs)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not images:
        print("error: no images found", file=sys.stderr)
        return 2
    failed = 0
    out = Path(args.out)
    for image_path, target in tqdm(list(zip(images, unique_dirs(images, out))), desc="explain", unit="image",
                                   disable=len(images) == 1):
        try:
            image = open_image(image_path)
            w, h = image.size
            points = [(min(x * w, w - 1), min(y * h, h - 1)) if args.relative else (x, y)
                      for x, y in args.point] or [(w / 2, h / 2)]
            bad = [xy for xy in points if not (0 <= xy[0] < w and 0 <= xy[1] < h)]
            if bad:
                raise ValueError(f"point(s) {bad} outside the {w}x{h} image")
            result = analyze(model, meta, image)
            write_result(result, points, target, None if args.no_ablation else model, source=str(image_path),
                         opacity=args.opacity, colormap=args.colormap)
        except (ImageLoadError, ValueError) as e:
            failed += 1
            log.error("%s: %s (skipped)", image_path, e)
    log.info("wrote %d of %d images to %s", len(images) - failed, len(images), out)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
