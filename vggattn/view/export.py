"""What `vggattn.explain` and the app's Export write for one analysed image: figure, maps, numbers.

    write_result(result, [(120, 80)], "out/church", switched_off(model, result))   # figure.png, *.npy, result.json

Per block: `<block>_attention.npy` (points, key rows, key columns: the mean over heads; `_attention_heads.npy`
per head where there are several), `<block>_mean_attention.npy` (the query-averaged map) and, where the block
updates its input in place of it, `<block>_contribution.npy` (||block(x) - x|| / ||x|| per position);
`gradcam.npy` for a classifier with convs; result.json with the predictions (or the model's score), γ where
blocks have one, each block's family, grids and what its numbers are, each point's readouts, and (model
given) the top-5 with each block and with every block switched off.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..analysis import ALL_OFF, Analysis
from ..models.checkpoint import atomic_write
from ..attention.readouts import HIGH_NORM, row_readouts
from .hover import U_BUDGET, contributions_bytes, pages
from .render import attention_picture, map_levels, mark_query, overlay, points_picture, upsample


def ranked_predictions(probs, class_names: list[str], k: int = 5) -> list[dict]:
    """The k most probable classes as JSON records, most probable first (Analysis.top_k is the app's
    {name: probability} form of the same)."""
    p, i = probs.topk(min(k, len(probs)))
    return [{"class": class_names[j], "index": j, "prob": float(v)} for v, j in zip(p.tolist(), i.tolist())]


def point_readouts(result: Analysis, xy: tuple[float, float], k: int = 5) -> dict:
    """{block: readouts} of pixel xy: the query cell, and for rows that are distributions entropy, mean distance
    and top cells (`vggattn.attention.readouts.row_readouts`, mean of heads); the share on padding where there is one;
    a transformer's weights on its prefix tokens (class, registers) by name, and their share of the row."""
    out = {}
    for block in result.blocks:
        q = 0 if block.maps.per_image else block.query_index(xy)
        row = torch.from_numpy(block.row_map(xy).mean(0).reshape(-1))
        entry = {"query_index": q} if block.maps.normalise != "softmax" else row_readouts(
            row, q, block.maps.grid, result.input_size, result.size, k, block.maps.key_grid)
        if block.maps.prefix is not None:  # tokens: the weight on each prefix token by name (mean of heads)
            weights = block.maps.prefix[0, :, q].double().mean(0).tolist()
            entry["prefix_share"] = float(sum(weights))
            entry["prefix"] = dict(zip(block.maps.prefix_names or [f"prefix {i}" for i in range(len(weights))], weights))
        elif block.maps.padding is not None:
            entry["padding_share"] = block.padding_share(xy)
        out[block.name] = entry
    return out


def summarize(result: Analysis, points: list[tuple[float, float]], off: dict | None = None) -> dict:
    """Everything result.json holds, as plain numbers (off: the probabilities with each block's attention off and
    with all of them off, `vggattn.analysis.switched_off`; None leaves the ablation out)."""
    probs = result.probs
    blocks = []
    for block, (_, jsd) in zip(result.blocks, result.query_dependence()):
        m = block.maps
        entry = {"name": block.name, "family": block.family, "grid": list(m.grid), "key_grid": list(m.key_grid),
                 "heads": m.heads, "per_image": m.per_image, "what_the_numbers_are": m.meaning, "gamma": block.gamma,
                 "query_dependence_jsd_nats": jsd,
                 "query_dependence_jsd_fraction": None if jsd is None else jsd / math.log(2)}
        if block.contribution is not None:
            entry |= {"mean_contribution": float(block.contribution.mean()),
                      "max_contribution": float(block.contribution.max())}
        if block.token_norms is not None and m.prefix is not None:  # the residual stream entering the block
            norms, prefix = block.token_norms, m.prefix.shape[-1]
            patches = norms[prefix:]
            median = float(np.median(patches))
            high = np.nonzero(patches > HIGH_NORM * median)[0]
            entry["token_norms"] = {
                "prefix": dict(zip(m.prefix_names or [f"prefix {i}" for i in range(prefix)], map(float, norms[:prefix]))),
                "patch_median": median, "patch_max": float(patches.max()),
                "high_norm_patches": [list(divmod(int(i), m.grid[1])) for i in high],
                "high_norm_rule": f"a patch token whose norm is over {HIGH_NORM:g}x the median patch token's"}
        if m.prefix_rows is not None:  # each prefix token's own row (mean of heads): its share on the patches
            kcells = m.key_grid[0] * m.key_grid[1]
            rows = m.prefix_rows[0].double().mean(0)  # (P, M + P)
            names = m.prefix_names or [f"prefix {i}" for i in range(rows.shape[0])]
            entry["prefix_rows"] = {n: {"share_on_patches": float(r[:kcells].sum()),
                                        "top_cell": list(divmod(int(r[:kcells].argmax()), m.key_grid[1])),
                                        "on_prefix": dict(zip(names, map(float, r[kcells:])))}
                                    for n, r in zip(names, rows)}
        if off is not None and probs is not None:
            entry["top5_attention_off"] = ranked_predictions(off[block.name], result.class_names)
        blocks.append(entry)
    out = {"image_size": list(result.size), "input_size": result.input_size,
           "predictions": None if probs is None else ranked_predictions(probs, result.class_names),
           "score": None if probs is not None else result.score(), "gammas": result.gammas(), "layers": blocks,
           "points": [{"xy": list(xy), "layers": point_readouts(result, xy)} for xy in points]}
    if off is not None and probs is not None:
        out["top5_all_attention_off"] = ranked_predictions(off[ALL_OFF], result.class_names)
    if result.gradcam is not None:
        out["gradcam_class"] = result.class_names[int(probs.argmax())]
    return out


def map_picture(result: Analysis, grid_map: np.ndarray, opacity: float = 0.8, colormap: str = "inferno",
                mode: str = "smooth", scale: str = "linear") -> np.ndarray:
    """Any non-negative (h, w) map over the display copy (`vggattn.view.render.map_levels`) -> (H, W, 3) uint8."""
    disp_h, disp_w = result.display.shape[:2]
    return overlay(result.display, upsample(map_levels(grid_map, scale), (disp_w, disp_h), mode), colormap, opacity)


PANEL = 320  # px: each panel of the figure is PANEL x PANEL, its title on top, its picture below
TITLE = 34  # px of a panel's title band (two lines)


def _font(size: int, mono: bool = False):
    """DejaVu Sans (Mono), which matplotlib ships (found without importing matplotlib), else PIL's own font."""
    import importlib.util

    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf" / \
            ("DejaVuSansMono.ttf" if mono else "DejaVuSans.ttf")
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


class _Sheet:
    """A grid of rows x cols panels drawn with PIL (a matplotlib axes a panel cost about 25 ms to make and its
    PNG seconds to write at 39 panels): `show` a picture fitted to its panel, `title` above it, `text` in it."""

    def __init__(self, rows: int, cols: int):
        from PIL import Image, ImageDraw

        self.image = Image.new("RGB", (PANEL * cols, PANEL * rows), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.fonts = {False: _font(11), True: _font(11, mono=True)}

    def show(self, r: int, c: int, picture: np.ndarray) -> None:
        from PIL import Image

        fitted = np.ascontiguousarray(picture)
        h, w = fitted.shape[:2]
        side = min((PANEL - 4) / w, (PANEL - TITLE - 2) / h)
        size = (max(1, round(w * side)), max(1, round(h * side)))
        tile = Image.fromarray(fitted).resize(size, Image.Resampling.BILINEAR) if size != (w, h) else \
            Image.fromarray(fitted)
        self.image.paste(tile, (c * PANEL + (PANEL - size[0]) // 2, r * PANEL + TITLE + (PANEL - TITLE - size[1]) // 2))

    def title(self, r: int, c: int, text: str) -> None:
        self.draw.multiline_text((c * PANEL + PANEL / 2, r * PANEL + 2), text, fill="black", font=self.fonts[False],
                                 anchor="ma", align="center", spacing=2)

    def text(self, r: int, c: int, text: str, mono: bool = False) -> None:
        self.draw.multiline_text((c * PANEL + 6, r * PANEL + 6), text, fill="black", font=self.fonts[mono], spacing=3)


def figure(result: Analysis, points: list[tuple[float, float]], path: Path, opacity: float = 0.8,
           colormap: str = "inferno", mode: str = "smooth") -> None:
    """One PNG: a row per point (image + one overlay per block), then Grad-CAM + each block's contribution, then
    the predictions + each block's query-averaged map (and, for a transformer, its class token's row)."""
    n = len(result.blocks)
    tokens = any(b.maps.prefix_rows is not None for b in result.blocks)  # a transformer: a row for its class token
    middle = result.gradcam is not None or any(b.contribution is not None for b in result.blocks)  # else no row
    sheet = _Sheet(len(points) + middle + 1 + tokens, n + 1)
    h, w = result.display.shape[:2]
    sx, sy = w / result.size[0], h / result.size[1]
    for r, xy in enumerate(points):
        point = ((xy[0] + 0.5) * sx, (xy[1] + 0.5) * sy)
        sheet.show(r, 0, mark_query(result.display, point))
        sheet.title(r, 0, f"point ({xy[0]:g}, {xy[1]:g})")
        readouts = point_readouts(result, xy)
        for c, block in enumerate(result.blocks, start=1):
            m = block.maps
            query = None if m.per_image else block.query_index(xy)
            sheet.show(r, c, attention_picture(result.display, block.row_map(xy).mean(0), query,
                                               None if m.per_image else point, mode=mode, colormap=colormap,
                                               opacity=opacity, query_grid=m.grid))
            ro = readouts[block.name]
            words = (f"H={ro['entropy_fraction']:.2f}·logM  dist={ro['mean_distance_input_px']:.1f} px"
                     if "entropy_fraction" in ro else m.meaning[:40])
            gamma = f" γ={block.gamma:+.3f}" if block.gamma is not None else ""
            sheet.title(r, c, f"{block.name}{gamma} q={ro['query_index']}\n{words}")
    r = len(points)
    probs = result.probs
    if not middle:
        r -= 1  # the row below takes its place
    if result.gradcam is not None:
        sheet.show(r, 0, map_picture(result, result.gradcam, opacity, colormap, mode))
        sheet.title(r, 0, f"Grad-CAM: {result.class_names[int(probs.argmax())]}")
    for c, block in enumerate(result.blocks, start=1):
        if block.contribution is not None:
            sheet.show(r, c, map_picture(result, block.contribution, opacity, colormap, mode))
            sheet.title(r, c, f"{block.name} ‖y−x‖/‖x‖, mean {block.contribution.mean():.3f}")
    r += 1
    text = ("top-5\n" + "\n".join(f"{p['prob']:6.1%}  {p['class']}" for p in ranked_predictions(probs, result.class_names))
            if probs is not None else "score\n" + ", ".join(f"{v:+.4f}" for v in result.score()[:4]))
    if result.gammas():
        text += "\n\nγ\n" + "\n".join(f"{k}: {v:+.4f}" for k, v in result.gammas().items())
    sheet.text(r, 0, text, mono=True)
    for c, (block, (mean_map, jsd)) in enumerate(zip(result.blocks, result.query_dependence()), start=1):
        sheet.show(r, c, map_picture(result, mean_map, opacity, colormap, mode))
        said = f"JSD from mean {jsd:.3f} nats" if jsd is not None else \
            "(the patches' weights as they are)" if block.maps.prefix is not None else "(rows are no distributions)"
        sheet.title(r, c, f"{block.name} mean over queries\n{said}")
    if tokens:  # the first prefix token's own row over the patches (the class token's: DINO's view)
        r += 1
        sheet.text(r, 0, "the first prefix token's row\n(the class token: where it\nlooks among the patches;\n"
                   "mean of heads, on the\npatches only)")
        for c, block in enumerate(result.blocks, start=1):
            m = block.maps
            if m.prefix_rows is None:
                continue
            cells = m.key_grid[0] * m.key_grid[1]
            row = m.prefix_rows[0, :, 0, :cells].double().mean(0).cpu().numpy().reshape(m.key_grid)
            sheet.show(r, c, map_picture(result, row, opacity, colormap, mode))
            name = (m.prefix_names or ["prefix 0"])[0].split(".")[-1]
            sheet.title(r, c, f"{block.name}: {name} → patches\n{row.sum():.0%} of its row on them")
    atomic_write(path, lambda tmp: sheet.image.save(tmp, format="PNG", compress_level=1))


def write_result(result: Analysis, points: list[tuple[float, float]], out_dir: str | Path, off: dict | None = None, *,
                 source: str | None = None, opacity: float = 0.8, colormap: str = "inferno", mode: str = "smooth",
                 live: bool = False, about: str = "") -> dict:
    """Write figure.png, the maps as .npy and result.json into out_dir; return the JSON dict. Per block and point: its
    row (`_attention.npy`), and where the block's keys' contributions can be read, what each key brings and the
    effect of removing it (`_value.npy`, `_effect.npy`: `vggattn.attention.effect`). off: the ablation's
    probabilities (`vggattn.analysis.switched_off`, which also adds the Grad-CAM; None: neither). live: also
    view.html, the live view in one file that opens offline (`vggattn.view.live`, the first point pinned; about:
    its line on the model). Runs no model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"source": source, **summarize(result, points, off)}
    files = ["figure.png", "result.json"]

    def save(name: str, array) -> None:
        np.save(out / name, np.asarray(array, dtype=np.float32))
        files.append(name)
    for block, (mean_map, _) in zip(result.blocks, result.query_dependence()):
        safe = block.name.replace("/", "_")
        maps = [block.row_map(xy) for xy in points]  # (heads, kh, kw) each
        stacked = np.stack(maps) if maps else np.zeros((0, block.maps.heads, *block.maps.key_grid))
        save(f"{safe}_attention.npy", stacked.mean(axis=1))
        if block.maps.heads > 1:
            save(f"{safe}_attention_heads.npy", stacked)
        save(f"{safe}_mean_attention.npy", mean_map)
        if block.contribution is not None:
            save(f"{safe}_contribution.npy", block.contribution)
        size = contributions_bytes(block)
        u, _ = block.keys_contributions() if points and not block.maps.per_image and size is not None \
            and size <= U_BUDGET else (None, "")
        if u is not None:  # what each key brings, and the effect of removing it, at each point (the page's views)
            from ..attention.effect import effect, full_rows, value_weighted

            m = block.maps.key_grid[0] * block.maps.key_grid[1]
            rows = [full_rows(block.maps, block.query_index(xy)) for xy in points]
            save(f"{safe}_value.npy", np.stack([value_weighted(a, u)[:m].numpy().reshape(block.maps.key_grid)
                                                for a in rows]))
            save(f"{safe}_effect.npy", np.stack([effect(a, u, block.maps.normalise)[:m].numpy().reshape(
                block.maps.key_grid) for a in rows]))
        if block.maps.prefix_rows is not None:  # tokens: each prefix token's row on the key grid, mean of heads
            m = block.maps.key_grid[0] * block.maps.key_grid[1]
            rows = block.maps.prefix_rows[0, :, :, :m].double().mean(0).cpu().numpy()
            save(f"{safe}_prefix_rows.npy", rows.reshape(-1, *block.maps.key_grid))
    if result.gradcam is not None:
        save("gradcam.npy", result.gradcam)
    if live:
        from .live import live_html

        page = live_html(result, pages(result), title=Path(source).name if source else "image",
                         about=about, controls={"opacity": opacity, "colormap": colormap, "mode": mode},
                         pin=points[0] if points else None)
        atomic_write(out / "view.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
        files.append("view.html")
    summary["files"] = sorted(files)
    figure(result, points, out / "figure.png", opacity, colormap, mode)
    text = json.dumps(summary, indent=2)
    atomic_write(out / "result.json", lambda tmp: Path(tmp).write_text(text))
    return summary


def write_tokens(found, tokens: list[str], image, out_dir: str | Path, *, opacity: float = 0.8,
                 colormap: str = "inferno", mode: str = "smooth") -> dict:
    """For each named token of a `vggattn.tokens.TokenMaps` (a detector's "query 3"): its map in every
    cross-attention block as `<block>_<token>.npy` (key rows, key columns: the mean over heads) and
    `_heads.npy` (per head), `tokens.png` (a row per token: the image with its predicted box, then its map in each
    block) and `tokens.json` (its prediction, and per block where its weight lies against that box:
    `vggattn.tokens.box_shares`). A deformable layer's token has no map: `<block>_<token>_points.npy` (heads,
    points, 3: x and y in input pixels, the weight, each head's summing to 1), drawn as its points, and its share on
    points inside the box (`vggattn.tokens.point_shares`). Runs no model."""
    from PIL import ImageDraw

    from ..tokens import box_shares, point_shares

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    W, H = found.input_wh
    base = np.asarray(image.convert("RGB").resize((W, H)), dtype=np.uint8)
    blocks = found.blocks
    sheet = _Sheet(len(tokens), 1 + len(blocks))
    summary = {"shows": found.shows, "input_size": [W, H], "tokens": {}, "files": ["tokens.png", "tokens.json"]}
    for r, token in enumerate(tokens):
        i = found.index(token)
        name = found.names[i]
        pred = found.predictions.get(name)
        means, points = found.map(name), found.samples(name)
        entry = {"prediction": pred, "blocks": {}}
        picture = base.copy()
        if pred is not None:
            from PIL import Image

            im = Image.fromarray(picture)
            ImageDraw.Draw(im).rectangle(pred["box"], outline=(255, 255, 0) if pred["object"] else (160, 160, 160),
                                         width=2)
            picture = np.asarray(im)
        sheet.show(r, 0, picture)
        sheet.title(r, 0, f"{name}\n" + (f"{pred['class']} {pred['score']:.2f}" + ("" if pred["object"] else
                                                                                  " (no object)") if pred else ""))
        for c, block in enumerate(blocks, start=1):
            safe = f"{block.replace('/', '_')}_{name.replace(' ', '-')}"
            if block in points:  # deformable attention: its sampling points, not a map
                xy, w, levels = points[block]
                s = found.points[block]
                heads = s.points.shape[1]
                np.save(out / f"{safe}_points.npy", np.concatenate([xy, w[:, None] * heads], 1).reshape(
                    heads, -1, 3).astype(np.float32))  # (heads, points, x y weight): each head's weights sum to 1
                summary["files"].append(f"{safe}_points.npy")
                layer = {"points": int(len(w)), "heads": heads, "levels": [list(g) for g in s.level_grids]}
                if pred is not None:
                    layer.update({k: round(v, 4) for k, v in point_shares(xy, w, pred["box"], (W, H)).items()})
                entry["blocks"][block] = layer
                sheet.show(r, c, points_picture(picture, xy, w, levels, colormap))
                sheet.title(r, c, f"{block}\n{name}: sampling points" + (f", {layer['in_box']:.0%} in its box"
                                                                         if pred else ""))
                continue
            np.save(out / f"{safe}.npy", means[block].astype(np.float32))
            heads = found.rows[block][:, i].reshape(-1, *found.key_grids[block]).float().numpy()
            np.save(out / f"{safe}_heads.npy", heads.astype(np.float32))
            summary["files"] += [f"{safe}.npy", f"{safe}_heads.npy"]
            layer = {"key_grid": list(found.key_grids[block])}
            if pred is not None:
                layer.update({k: round(v, 4) for k, v in box_shares(means[block], pred["box"], (W, H)).items()})
            entry["blocks"][block] = layer
            sheet.show(r, c, overlay(base, upsample(map_levels(means[block]), (W, H), mode), colormap, opacity))
            sheet.title(r, c, f"{block}\n{name}" + (f": {layer['in_box']:.0%} in its box" if pred else ""))
        summary["tokens"][name] = entry
    sheet.image.save(out / "tokens.png")
    summary["files"] = sorted(summary["files"])
    text = json.dumps(summary, indent=2)
    atomic_write(out / "tokens.json", lambda tmp: Path(tmp).write_text(text))
    return summary


def write_words(run, words: list[str], out_dir: str | Path, *, opacity: float = 0.8, colormap: str = "inferno") -> dict:
    """For a `vggattn.diffusion.Generation`: the generated `image.png`, and per word `<word>.npy` (DAAM's map on the
    latent grid: every layer and step summed), `<word>_steps.npy` (steps, h, w), `<word>_<layer>.npy` (the layer's
    grid, all steps), `words.png` (the image, then each word's map over it) and `words.json`. Runs no model."""
    out = Path(out_dir)
    for word in words:  # every word checked before anything is written
        run.token_indices(word)
    out.mkdir(parents=True, exist_ok=True)
    run.image.save(out / "image.png")
    base = np.asarray(run.image.convert("RGB"), dtype=np.uint8)
    H, W = base.shape[:2]
    sheet = _Sheet(1, 1 + len(words))
    sheet.show(0, 0, base)
    sheet.title(0, 0, f"{run.prompt}\n{len(run.steps)} steps")
    summary = {"prompt": run.prompt, "steps": len(run.steps), "tokens": run.tokens, "layers": run.layers,
               "aggregation": "DAAM (Tang et al. 2022): each layer's map of the word's tokens, summed over heads, "
                              "upsampled bilinearly to the latent grid and summed over layers and steps; the "
                              "conditional half of classifier-free guidance", "words": {}}
    for c, word in enumerate(words, start=1):
        idx = run.token_indices(word)
        total = run.word_map(word)
        np.save(out / f"{word}.npy", total.astype(np.float32))
        np.save(out / f"{word}_steps.npy", np.stack([run.word_map(word, step=s) for s in range(len(run.steps))])
                .astype(np.float32))
        for layer in run.layers:
            np.save(out / f"{word}_{layer}.npy", run.layer_map(word, layer).astype(np.float32))
        summary["words"][word] = {"tokens": [run.tokens[i] for i in idx], "positions": idx}
        sheet.show(0, c, overlay(base, upsample(map_levels(total), (W, H)), colormap, opacity))
        sheet.title(0, c, f"{word}: DAAM over {len(run.layers)} layers")
    sheet.image.save(out / "words.png")
    text = json.dumps(summary, indent=2)
    atomic_write(out / "words.json", lambda tmp: Path(tmp).write_text(text))
    return summary


def write_across(got: dict, result: Analysis, out_dir: str | Path, *, opacity: float = 0.8,
                 colormap: str = "inferno") -> dict:
    """`vggattn.analysis.across_layers`'s maps as `across_<kind>.npy` (key grid), `across.png` (the image, then each
    map over it) and `across.json` (the token, the class, each kind's prefix values and time). Runs no model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "not_offered" in got:
        summary = {"not_offered": got["not_offered"]}
    else:
        kinds = [k for k in ("rollout", "flow", "relevance") if k in got]
        sheet = _Sheet(1, 1 + len(kinds))
        sheet.show(0, 0, result.display)
        sheet.title(0, 0, f"{got['token']}'s sources\nrelevance for {got['class']}")
        summary = {"token": got["token"], "target": got["target"], "class": got["class"], "kinds": {},
                   **({"flow_not_offered": got["flow_not_offered"]} if "flow_not_offered" in got else {})}
        for c, kind in enumerate(kinds, start=1):
            np.save(out / f"across_{kind}.npy", got[kind]["map"].astype(np.float32))
            sheet.show(0, c, map_picture(result, got[kind]["map"].clip(min=0), opacity, colormap))
            sheet.title(0, c, f"{kind}\nmax {got[kind]['map'].max():.3g}")
            summary["kinds"][kind] = {"prefix": got[kind]["prefix"], "seconds": round(got[kind]["seconds"], 4)}
        sheet.image.save(out / "across.png")
    text = json.dumps(summary, indent=2)
    atomic_write(out / "across.json", lambda tmp: Path(tmp).write_text(text))
    return summary
