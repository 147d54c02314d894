"""The app's Tokens tab, for a model whose attention also runs from tokens that are no place on the image to the
image's places (a detector's object queries over the encoder's grid: `vggattn.tokens`).

After each upload: every query's predicted box on the image (numbered; dashed grey: "no object") and a list of the
queries with their class and score. Choosing one shows its map on the image in every cross-attention layer (with
its share inside its own box). Clicking the image shows, for that place, each query's weight on it in every layer,
as bars with names and numbers (drawn by the server at the click: the page's own hover does not draw tokens yet).
"""

from __future__ import annotations

import html

import gradio as gr
import numpy as np
import torch.nn as nn
from PIL import Image, ImageDraw

from ..attention.adapters import CrossAdapter, find_blocks
from ..data import open_image
from ..attention.deformable import sampling_points
from ..tokens import box_shares, point_shares, token_maps
from ..view.render import map_levels, overlay, points_picture, upsample

BOX_COLOUR, EMPTY_COLOUR = (255, 255, 0), (170, 170, 170)


def cross_blocks(model: nn.Module, meta: dict) -> list[str]:
    """The model's blocks between tokens and the image's places (none: no Tokens tab): its deformable attention's
    where queries that are no place sample the image (RT-DETR's decoder), else those found by `find_blocks`."""
    from ..attention.adapters import example_input

    x = example_input(model, meta["input_size"])
    points = [n for n, s in sampling_points(model, x).items() if not s.queries_on_levels]
    if points:
        return points
    try:
        found = find_blocks(model, example=x, cross=True)
    except ValueError:
        return []
    return [n for n, _, a in found if isinstance(a, CrossAdapter)]


def _label(name: str, pred: dict | None) -> str:
    if not pred:
        return name
    return f"{name} · {pred['class']} {pred['score']:.2f}" + ("" if pred["object"] else " · no object")


def boxes_picture(found, base: np.ndarray) -> np.ndarray:
    """The model's input with every query's predicted box, numbered (grey: the queries that predict no object)."""
    im = Image.fromarray(base)
    draw = ImageDraw.Draw(im)
    order = sorted(found.predictions.items(), key=lambda kv: kv[1]["object"])  # objects drawn last, on top
    for name, pred in order:
        colour = BOX_COLOUR if pred["object"] else EMPTY_COLOUR
        draw.rectangle(pred["box"], outline=colour, width=2 if pred["object"] else 1)
        draw.text((pred["box"][0] + 2, pred["box"][1] + 1), name.split()[-1], fill=colour)
    return np.asarray(im)


def on_upload(model, meta, path) -> tuple:
    """(the tokens' state, the boxes picture, the list of tokens, the note) for a new image."""
    if not path:
        return None, None, gr.update(choices=[], value=None), ""
    try:
        image = open_image(path)
        found = token_maps(model, meta, image)
    except Exception as e:  # noqa: BLE001 (one sentence in the tab; the app keeps serving)
        return None, None, gr.update(choices=[], value=None), f"The tokens could not be read: {e}"
    W, H = found.input_wh
    base = np.asarray(image.convert("RGB").resize((W, H)), dtype=np.uint8)
    choices = [(_label(n, found.predictions.get(n)), n) for n in found.names]
    objects = [n for n in found.names if found.predictions.get(n, {}).get("object")]
    note = (f"{len(found.names)} tokens attend to the image in {len(found.blocks)} layers; "
            + (f"{len(objects)} of them predict an object (score >= 0.5). " if found.predictions else "")
            + ("Choose one to see its sampling points in every layer (deformable attention reads those points and "
               "nothing else: no map); click the image to see each token's weight there (what the value cells "
               "there receive from its points)." if found.points else
               "Choose one to see its map in every layer; click the image to see each token's weight there."))
    first = objects[0] if objects else found.names[0]
    return {"found": found, "base": base, "image_wh": image.size}, boxes_picture(found, base) if found.predictions else base, \
        gr.update(choices=choices, value=first), note


def on_token(state, token, opacity=0.8, colormap="inferno") -> list:
    """The token's map in every cross-attention layer, overlaid on the model's input."""
    if not state or not token:
        return [gr.update(value=None) for _ in range(_n_layers(state))]
    found, base = state["found"], state["base"]
    W, H = found.input_wh
    pred = found.predictions.get(token)
    out = []
    for block, (xy, w, levels) in found.samples(token).items():  # deformable: the points, not a map
        picture = points_picture(base, xy, w, levels, colormap)
        label = f"{block} · its sampling points (area: weight; colour: level)"
        if pred is not None:
            im = Image.fromarray(picture)
            ImageDraw.Draw(im).rectangle(pred["box"], outline=BOX_COLOUR if pred["object"] else EMPTY_COLOUR)
            picture = np.asarray(im)
            label += f" · {point_shares(xy, w, pred['box'], (W, H))['in_box']:.0%} of the weight inside its box"
        out.append(gr.update(value=picture, label=label))
    for block, grid_map in found.map(token).items():
        picture = overlay(base, upsample(map_levels(grid_map), (W, H)), colormap, opacity)
        label = block
        if pred is not None:
            im = Image.fromarray(picture)
            ImageDraw.Draw(im).rectangle(pred["box"], outline=BOX_COLOUR if pred["object"] else EMPTY_COLOUR)
            picture = np.asarray(im)
            label += f" · {box_shares(grid_map, pred['box'], (W, H))['in_box']:.0%} inside its box"
        out.append(gr.update(value=picture, label=label))
    return out


def _n_layers(state) -> int:
    return len(state["found"].blocks) if state else 0


def weights_at(found, xy: tuple[float, float], image_wh: tuple[int, int]) -> dict[str, np.ndarray]:
    """{block: (T,)} each token's weight (the mean over heads) on the point (x, y) of the uploaded image (the
    model's input is that image resized): `TokenMaps.weights_at`."""
    (x, y), (W, H), (iw, ih) = xy, image_wh, found.input_wh
    return found.weights_at((x / W * iw, y / H * ih))


def bars_html(found, weights: dict[str, np.ndarray], top: int = 8) -> str:
    """Per layer, the tokens with the largest weight on the place, as bars with names and numbers (a table a layer:
    the token and what it predicts, its bar scaled to the layer's largest, the weight)."""
    parts = []
    for block, w in weights.items():
        order = np.argsort(-w)[:top]
        peak = float(w[order[0]]) or 1.0
        rows = "".join(
            f'<tr class="token-bar"><td class="token-name">'
            f'{html.escape(_label(found.names[i], found.predictions.get(found.names[i])))}</td>'
            f'<td style="width:160px"><span class="token-fill" style="display:inline-block;'
            f'width:{150 * float(w[i]) / peak:.0f}px;height:10px;background:#f5a623"></span></td>'
            f'<td class="token-weight">{float(w[i]):.4f}</td></tr>' for i in order)
        parts.append(f"<div class='token-layer' style='display:inline-block;vertical-align:top;margin-right:24px'>"
                     f"<b>{html.escape(block)}</b><table>{rows}</table></div>")
    return "".join(parts)


def on_click(state, evt: gr.SelectData) -> str:
    if not state or evt is None or evt.index is None:
        return ""
    found = state["found"]
    x, y = evt.index
    wh = state["image_wh"]  # the uploaded image's size: the click's coordinates are in its pixels
    return (f"<p>Each token's weight on the place ({x}, {y}), the mean of the heads, the largest first:</p>"
            + bars_html(found, weights_at(found, (float(x), float(y)), wh)))


def tokens_tab(model: nn.Module, meta: dict, image: gr.Image, layers: list[str], opacity, colormap) -> None:
    """The Tokens tab's components and events (inside a `gr.Tabs`), wired to the app's image."""
    with gr.Tab("Tokens"):
        state = gr.State(None)
        note = gr.Markdown(elem_id="tokens-note")
        with gr.Row():
            boxes = gr.Image(label="The queries' predicted boxes (grey: no object)", interactive=False,
                             elem_id="tokens-boxes", height=320)
            choice = gr.Radio([], label="Token", elem_id="tokens-choice")
        with gr.Row():
            maps = [gr.Image(label=name, interactive=False, elem_id=f"tokens-map-{i}", height=240, min_width=160)
                    for i, name in enumerate(layers)]
        bars = gr.HTML(elem_id="tokens-bars")

    image.change(lambda path: on_upload(model, meta, path), image, [state, boxes, choice, note], api_name="tokens")
    choice.change(on_token, [state, choice, opacity, colormap], maps, api_name="token")
    image.select(on_click, state, bars, api_name=False)
