"""What `vggattn.explain` and the app's Export write for one analysed image: figure, maps, numbers.

    write_result(result, [(120, 80)], "out/church", model)   # figure.png, *.npy, result.json
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .analysis import Analysis, ablate, attention_at, render_attention, render_map
from .checkpoint import atomic_write


def ranked_predictions(probs, class_names: list[str], k: int = 5) -> list[dict]:
    """The k most probable classes as JSON records, most probable first (Analysis.top_k is the app's
    {name: probability} form of the same)."""
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
            entry["top5_attention_off"] = ranked_predictions(ablate(model, result, [layer.name]), result.class_names)
        layers.append(entry)
    out = {"image_size": list(result.size), "input_size": result.input_size,
           "predictions": ranked_predictions(result.probs, result.class_names), "gammas": result.gammas(), "layers": layers,
           "points": [{"xy": list(xy), "layers": {layer.name: r for layer, (_, r) in zip(result.layers, at)}}
                      for xy, at in zip(points, per_point)]}
    if model is not None:
        out["top5_all_attention_off"] = ranked_predictions(ablate(model, result, [layer.name for layer in result.layers]), result.class_names)
    if result.gradcam is not None:
        out["gradcam_class"] = result.class_names[int(result.probs.argmax())]
    return out


def figure(result: Analysis, points: list[tuple[float, float]], path: Path, opacity: float = 0.8,
           colormap: str = "inferno", mode: str = "smooth") -> None:
    """One PNG: a row per point (image + three overlays), then Grad-CAM + contributions, then
    predictions + query-averaged maps."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    from .render import mark_query

    n_layers = len(result.layers)
    rows = len(points) + 2
    fig = Figure(figsize=(3.2 * (n_layers + 1), 3.2 * rows))
    axes = fig.subplots(rows, n_layers + 1, squeeze=False)
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
    text = "top-5\n" + "\n".join(f"{p['prob']:6.1%}  {p['class']}" for p in ranked_predictions(result.probs, result.class_names))
    text += "\n\nγ\n" + "\n".join(f"{k}: {v:+.4f}" for k, v in result.gammas().items())
    axes[r, 0].text(0.02, 0.98, text, va="top", ha="left", family="monospace", fontsize=8)
    for c, (layer, (mean_map, jsd)) in enumerate(zip(result.layers, result.query_dependence()), start=1):
        axes[r, c].imshow(render_map(result, mean_map, opacity, colormap, mode))
        axes[r, c].set_title(f"{layer.name} mean over queries\nJSD from mean {jsd:.3f} nats", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def write_result(result: Analysis, points: list[tuple[float, float]], out_dir: str | Path, model=None, *,
                 source: str | None = None, opacity: float = 0.8, colormap: str = "inferno", mode: str = "smooth") -> dict:
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


def write_any_result(result, points: list[tuple[float, float]], out_dir: str | Path, display: np.ndarray, *,
                     source: str | None = None, opacity: float = 0.8, colormap: str = "inferno") -> dict:
    """A brought model's explanation (`vggattn.byo.analyze_any`): per block `<name>_attention.npy` (points x key
    rows x key columns, the mean over heads), `<name>_attention_heads.npy` when it has several heads, figure.png
    and result.json (the predictions, or the score of a model without class logits). display: the image as
    (h, w, 3) uint8, drawn on."""
    from .render import attention_picture

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, blocks = ["figure.png", "result.json"], []
    dh, dw = display.shape[:2]
    sx, sy = dw / result.size[0], dh / result.size[1]
    panels = []  # (row, column, picture, title)
    for c, block in enumerate(result.blocks):
        maps = [block.row_map(xy) for xy in points]
        stacked = np.stack(maps) if maps else np.zeros((0, block.maps.heads, *block.maps.key_grid))
        safe = block.name.replace("/", "_")
        np.save(out / f"{safe}_attention.npy", stacked.mean(axis=1).astype(np.float32))
        files.append(f"{safe}_attention.npy")
        if block.maps.heads > 1:
            np.save(out / f"{safe}_attention_heads.npy", stacked.astype(np.float32))
            files.append(f"{safe}_attention_heads.npy")
        blocks.append({"name": block.name, "family": block.family, "grid": list(block.maps.grid),
                       "key_grid": list(block.maps.key_grid), "heads": block.maps.heads,
                       "per_image": block.maps.per_image, "what_the_numbers_are": block.maps.meaning,
                       "query_index": [block.query_index(xy) for xy in points]})
        if block.maps.padding is not None:  # windows with halos: what each row puts on padding, not on the map
            blocks[-1]["padding_share"] = [block.padding_share(xy) for xy in points]
        for r, (xy, grid_map) in enumerate(zip(points, stacked)):
            if block.maps.per_image and r > 0:
                break  # one map per image: shown once
            point = None if block.maps.per_image else ((xy[0] + 0.5) * sx, (xy[1] + 0.5) * sy)
            query = None if block.maps.per_image else block.query_index(xy)
            picture = attention_picture(display, grid_map.mean(axis=0), query, point, colormap=colormap,
                                        opacity=opacity, query_grid=block.maps.grid)
            title = f"{block.name}\n{'one map per image' if block.maps.per_image else f'point {xy[0]:g}, {xy[1]:g}'}"
            panels.append((r, c, picture, title))
    summary = {"source": source, "image_size": list(result.size), "predictions": result.top_k(5),
               "score": None if result.top_k(5) is not None else result.score(), "blocks": blocks,
               "points": [list(xy) for xy in points], "files": sorted(files)}
    from matplotlib.figure import Figure

    rows, cols = max(1, len(points)), max(1, len(result.blocks))
    fig = Figure(figsize=(3.0 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, c, picture, title in panels:
        axes[r, c].imshow(picture)
        axes[r, c].set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_write(out / "figure.png", lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    text = json.dumps(summary, indent=2)
    atomic_write(out / "result.json", lambda tmp: Path(tmp).write_text(text))
    return summary
