"""The app's Tokens tab, for a model whose attention also runs from tokens that are no place on the image to the
image's places (a detector's object queries over the encoder's grid; a deformable decoder's sampling points:
`vggattn.tokens`).

After each upload the server reads every token's rows once (`token_maps`) and sends the tab the tokens page
(`vggattn.view.tokens_page`, in a frame): the tokens as tiles with their class and score ("no object" greyed), a
tile's map in every layer with its box, and at the pointer each token's weight on that place, as bars. Choosing and
pointing are drawn by the page's own script: no request.
"""

from __future__ import annotations

import html

import gradio as gr
import torch.nn as nn

from ..attention.adapters import CrossAdapter, find_blocks
from ..attention.deformable import sampling_points
from ..data import open_image
from ..tokens import token_maps
from ..view.tokens_page import tokens_html

FRAME_HEIGHT = 900  # px: the frame the page sits in (it scrolls inside when taller)


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


def frame(page: str) -> str:
    """The page in a frame of its own (its script runs there; the app's page is not touched)."""
    return (f'<iframe id="tokens-frame" title="tokens" style="width:100%;height:{FRAME_HEIGHT}px;border:0" '
            f'srcdoc="{html.escape(page, quote=True)}"></iframe>')


def on_upload(model, meta, path, colormap: str = "inferno", opacity: float = 0.8) -> tuple[str, str]:
    """(the tokens page in its frame, the note) for a new image."""
    if not path:
        return "", ""
    try:
        image = open_image(path)
        found = token_maps(model, meta, image)
    except Exception as e:  # noqa: BLE001 (one sentence in the tab; the app keeps serving)
        return "", f"The tokens could not be read: {e}"
    objects = [n for n in found.names if found.predictions.get(n, {}).get("object")]
    note = (f"{len(found.names)} tokens attend to the image in {len(found.blocks)} layers"
            + (f"; {len(objects)} of them predict an object (score >= 0.5)." if found.predictions else "."))
    return frame(tokens_html(found, image, colormap=colormap, opacity=opacity)), note


def tokens_tab(model: nn.Module, meta: dict, image: gr.Image, layers: list[str], opacity, colormap) -> None:
    """The Tokens tab's components and events (inside a `gr.Tabs`), wired to the app's image."""
    with gr.Tab("Tokens"):
        note = gr.Markdown(elem_id="tokens-note")
        page = gr.HTML(elem_id="tokens-page")
    image.change(lambda path, c, o: on_upload(model, meta, path, c, o), [image, colormap, opacity], [page, note],
                 api_name="tokens")


def build_tokens_demo(model: nn.Module, meta: dict) -> gr.Blocks:
    """The page for a model whose only attention runs from tokens to the image (Deformable DETR: no attention over
    positions to draw in panels): an upload, and the tokens page."""
    with gr.Blocks(title="vggattn · tokens") as demo:
        gr.Markdown(f"## vggattn · where each object query looks\n`{meta.get('source', '')}` has no attention over the "
                    "image's positions to show in panels; its queries' attention is below. Upload an image.",
                    elem_id="about")
        with gr.Row():
            image = gr.Image(type="filepath", label="Image", elem_id="input-image", height=320)
            note = gr.Markdown(elem_id="tokens-note")
        page = gr.HTML(elem_id="tokens-page")
        image.change(lambda path: on_upload(model, meta, path), image, [page, note], api_name="tokens")
    return demo
