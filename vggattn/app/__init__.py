"""vggattn web app: upload an image, point at a pixel, see where that position attends in every attention block.

    python app.py                                  # in a checkout: the shipped checkpoint, http://127.0.0.1:7860
    vggattn-app --checkpoint my.safetensors --device cuda --port 8000    # installed: the console script
    vggattn-app --timm botnet26t_256               # any model with attention blocks (random weights where offline)
    vggattn-app --model vggattn.models.zoo:nonlocal_resnet --checkpoint checkpoints/nonlocal-resnet-imagenette-128.safetensors
    vggattn.launch(model, transform=my_transform, class_names=names)    # a model in hand, from Python

One app for every model: the blocks are found by `vggattn.attention.adapters.find_blocks` (the article's GlobalAttention
among them), the model runs once per upload (`vggattn.analysis.analyze`), and the page gets each block's
queries and keys, or its rows where that is smaller (`vggattn.view.hover.page_layer`), and draws the maps under the
pointer itself (vggattn/view/web/hover.js), with no request per move. A click pins a point: the page draws it, and
the server sends its readouts (its pictures, the page's maths in numpy, where no page script draws:
`/pin`, `/attention_at`). The tabs (contribution, query dependence, ablation, Grad-CAM, export, blocks, the
dataset study) read the same analysis; a model with cross-attention (a detector's decoder) also gets a Tokens tab
(`vggattn.app.tokens`). This file wires the UI to the library and holds no model maths.

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    labels, gammas = client.predict(handle_file("photo.jpg"), api_name="/analyze")
    *panels, info = client.predict(handle_file("photo.jpg"), 120, 80, api_name="/attention_at")
"""

from __future__ import annotations

import functools
import html
import logging
import os
import secrets
import shutil
import sys
import threading
from collections import OrderedDict
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..attention.adapters import MODES, NoAttention, TracedAdapter
from ..analysis import (COMPARE_KINDS, Analysis, ablate, analysed_b, analyze, block_gamma, blocks_of, switched_off,
                        with_gradcam)
from ..models.byo import in_hand, load_from_args, model_meta, wants_own_model
from ..models.checkpoint import (BAD_INPUT, DEFAULT_CHECKPOINT, CheckpointError,
                         load_checkpoint)
from ..view.export import map_picture, write_result
from ..view.compare import Side, compare_html
from ..view.live import about_model
from ..view.render import COLORMAPS, SCALES, UPSAMPLING
from ..view import hover as hover_module  # PAYLOAD_BUDGET, read at each upload
from ..view.hover import PageLayer, contributions_binary, layer_binary, page_payload, read_u
from ..cli import app_args
from ..data import query_index
from ..attention.readouts import mean_distance
from ..view.render import TOP_K, top_indices
from ..study import load_study
from ..view.text import contribution_markdown, dependence_markdown, gamma_markdown, model_notes, sink_note, unsure_note
from .ui import (CONTROLS, EXAMPLES, PIN_JS, UPLOAD_JS, STATE_SESSIONS, VIEWS_CSS, UploadedImage, clamped_point, click_problem,
                 hover_view, load_upload, pinned_point, refused_point, release_memory, study_view, unchanged,
                 view_controls)
from .ui import fix_threads, sharing_cores
from .ui import launch as serve
from .ui import HERE, WEB  # noqa: F401  (app.HERE, app.WEB: used by scripts)
from ..view.hover import pages
from .across import across_tab
from .tokens import build_tokens_demo, cross_blocks, tokens_tab

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when a Blocks is made, not at import
log = logging.getLogger("vggattn.app")
APP_CONTROLS = {**CONTROLS, "head": "mean"}
CONTROLS_JS = ("(opacity, colormap, mode, mark, scale, head) => { if (window.vggattnHover) "
               "window.vggattnHover.setControls({opacity, colormap, mode, mark, scale, head}); }")
PER_ROW = 3  # panels a row beside the picture
PANEL_HEIGHT = 340  # px: the image and up to three panels fit above the fold at 1440x900
PANEL_MIN_WIDTH = 240  # px: below this the row wraps (a phone shows them one under another)
STRIP_HEIGHT = 600  # px: more than two rows of panels scroll in a strip of this height (1440x900 screen)
CSS = (f"#panel-strip {{ max-height: {STRIP_HEIGHT}px; overflow-y: auto; flex-wrap: nowrap !important; }}"
       # the readouts table scrolls sideways on a phone instead of squeezing its columns to a letter wide
       "#readouts table { display: block; overflow-x: auto; } #readouts th, #readouts td { white-space: nowrap; }")
INTERVENTIONS = {"off": "off (the block passes its input on)", "mean": "mean row (every query the image's mean row)",
                 "uniform": "uniform rows (average pooling of the values)"}
CONTRIBUTION_HINT = ("How much a block actually changes the features at each position: ‖y − x‖ / ‖x‖ with x its "
                     "input and y its output (‖γ · attention output‖ / ‖x‖ for y = γ · attention(x) + x; 0 = "
                     "untouched). A γ alone says little, because the attention output's size varies.")
EXPORT_DIR = Path(tempfile.gettempdir()) / "vggattn-exports"  # zips older than an hour are removed
TABS = ("contribution", "dependence", "gradcam", "ablation", "export", "blocks", "dataset")


# Layers an upload's payload left out (over its budget: a big transformer's), kept for the page to fetch when it shows
# them: an unguessable key per upload -> (its page layers, their dtype); the newest DEFERRED_KEEP uploads only
DEFERRED: "OrderedDict[str, tuple[list[PageLayer], str]]" = OrderedDict()
DEFERRED_KEEP = 16
_deferred_lock = threading.Lock()
LAYER_ROUTE = "vggattn/layer"  # GET vggattn/layer/<key>/<index> -> that layer's payload (JSON)


def deferred_payload(result: Analysis, pages: list[PageLayer], dtype: str, key: str | None = None) -> dict:
    """The upload's payload within `vggattn.view.hover.PAYLOAD_BUDGET`; the layers left out, and what each layer's
    keys bring, are kept for `layer_answer` and `contributions_answer` under `key` (a new one by default: an
    analysis answered again keeps its own)."""
    key = key or secrets.token_urlsafe(16)
    payload = page_payload(result, pages, dtype, hover_module.PAYLOAD_BUDGET, fetch=f"{LAYER_ROUTE}/{key}/")  # and U
    if "fetch" in payload:
        with _deferred_lock:
            DEFERRED[key] = (pages, dtype)
            while len(DEFERRED) > DEFERRED_KEEP:
                DEFERRED.popitem(last=False)
    return payload


def layer_answer(key: str, index: int):
    """One layer of an upload's payload that was sent later (its panel came on screen), as bytes
    (`vggattn.view.hover.layer_binary`), or a JSON 404 that says why."""
    from fastapi.responses import JSONResponse

    with _deferred_lock:
        held = DEFERRED.get(key)
    if held is None or not 0 <= index < len(held[0]):
        return JSONResponse({"error": "this image's layers are no longer kept here: upload it again"}, status_code=404)
    from fastapi.responses import Response

    return Response(layer_binary(held[0][index], held[1]), media_type="application/octet-stream")


def contributions_answer(key: str, index: int):
    """One layer's keys' contributions (the value-weighted and effect views), fetched when the page's view asks
    (`vggattn.view.hover.contributions_binary`), or a JSON 404 that says why."""
    from fastapi.responses import JSONResponse, Response

    with _deferred_lock:
        held = DEFERRED.get(key)
    if held is None or not 0 <= index < len(held[0]):
        return JSONResponse({"error": "this image's layers are no longer kept here: upload it again"}, status_code=404)
    layer = held[0][index]
    if read_u(layer) is None:
        return JSONResponse({"error": f"{layer.name}: what each key brings is not offered ({layer.u_note})"},
                            status_code=404)
    return Response(contributions_binary(layer, held[1]), media_type="application/octet-stream")


@dataclass
class Session:
    """One session's image: the analysis, and each block as the page has it."""

    result: Analysis
    layers: list[PageLayer]
    path: str | None = None  # the file analysed
    stale: bool = False  # a newer upload of this session is being analysed (`on_upload`)
    linked: dict | None = None  # made by a link (`on_link`): its page payload, sent again when the image's change
    # event echoes it (the page drops its maps at every upload's start), which is not an upload
    key: str = field(default_factory=lambda: secrets.token_urlsafe(16))  # its layers' address for the page's fetches

    @property
    def size(self) -> tuple[int, int]:
        return self.result.size


@dataclass
class UI:
    """The components handlers write to; handlers return {component: value} dicts keyed by these."""

    state: gr.State
    point: gr.State
    open_tab: gr.State  # which tab is open: only its maps are drawn
    hover: gr.HTML  # the page's copy of each block's maps (vggattn.view.hover), for maps under the pointer
    labels: gr.Label
    score: gr.Markdown  # a model without class logits: its output
    gammas_md: gr.Markdown
    gammas_plot: gr.BarPlot
    seen: gr.Image
    status: gr.Markdown
    panels: list  # one gr.Image per block
    readouts: gr.Markdown
    contribution: list  # one gr.Image per block
    mean_maps: list  # one gr.Image per block
    gradcam: gr.Image
    contribution_md: gr.Markdown
    dependence_md: gr.Markdown
    ablation: gr.Dataframe
    ablation_verdict: gr.Markdown
    export_file: gr.File
    export_png: gr.Image
    export_html: gr.File
    image: gr.Image  # the input image (a link sets it)
    controls: list  # opacity, colormap, mode, mark, scale, head (a link sets them)

    @property
    def maps(self) -> list:
        """The tabs' images: contribution and query-averaged map per block, and Grad-CAM."""
        return [*self.contribution, *self.mean_maps, self.gradcam]


# Handlers return plain values: Gradio 6 handles an update dict by building the component again and its
# per-session config twice, under the GIL (a quarter of the server's GIL time under load, bench/README.md). So
# labels are fixed when the app is built, and the numbers labels would carry are in the markdown beside them.

def head_choice(head) -> int | None:
    """The head selector's value ("mean" or "0", "1", ...) -> None (mean of heads) or a head index."""
    if head in (None, "", "mean"):
        return None
    try:
        return max(0, int(head))
    except (TypeError, ValueError):
        return None


def panel_updates(ui: UI, pictures=None) -> dict:
    """The panels' pictures (encoded as JPEG, once); None clears them."""
    if pictures is None:
        return {c: None for c in ui.panels}
    return dict(zip(ui.panels, pictures))


def map_updates(ui: UI, state, opacity=CONTROLS["opacity"], colormap=CONTROLS["colormap"], mode=CONTROLS["mode"],
                tab: str | None = None, model: nn.Module | None = None) -> dict:
    """The tabs' images and their numbers, only those of `tab` when given (None: every tab's; the query
    dependence and Grad-CAM are computed when first asked for); the other tabs' are cleared, and drawn when
    they are opened. Grad-CAM needs the model (one forward and backward, once per image)."""
    out = {c: None for c in ui.maps} | {ui.contribution_md: "", ui.dependence_md: ""}
    if state is None or click_problem(state):
        return out
    result = state.result
    draw = functools.partial(map_picture, result, opacity=opacity, colormap=colormap, mode=mode)
    if tab in (None, "contribution"):
        out |= {c: None if m is None else draw(m) for c, m in zip(ui.contribution, result.contributions())}
        out[ui.contribution_md] = contribution_markdown(result)
    if tab in (None, "dependence"):
        out |= {c: draw(m) for c, (m, _) in zip(ui.mean_maps, result.query_dependence())}
        out[ui.dependence_md] = dependence_markdown(result)
    if tab in (None, "gradcam") and model is not None:
        cam = with_gradcam(model, result)
        out[ui.gradcam] = None if cam is None else draw(cam)
    return out


def on_tab(ui: UI, tab: str, state, opacity=CONTROLS["opacity"], colormap=CONTROLS["colormap"],
           mode=CONTROLS["mode"], model: nn.Module | None = None) -> dict:
    """A tab was opened (or an upload finished with it open): draw its maps for this image."""
    return {ui.open_tab: tab} | map_updates(ui, state, opacity, colormap, mode, tab, model)


def tab_outputs(ui: UI) -> list:
    return [ui.open_tab, *ui.maps, ui.contribution_md, ui.dependence_md]


def blank(ui: UI) -> dict:
    """Every component an upload sets, as it is before any image: what an upload first resets, so nothing of
    the previous image (pinned point, readouts, ablation, export) outlives it."""
    return {ui.state: None, ui.point: None, ui.hover: None, ui.labels: None, ui.score: "", ui.gammas_md: "",
            ui.gammas_plot: None, ui.seen: None, ui.status: "Upload an image to begin.", **panel_updates(ui),
            ui.readouts: "", **map_updates(ui, None), ui.ablation: None, ui.ablation_verdict: "",
            ui.export_file: None, ui.export_png: None, ui.export_html: None}


def prediction_outputs(ui: UI, result: Analysis) -> dict:
    """The top-5, or (a model whose output is not one logit per class) its output values in words."""
    top = result.top_k(5)
    if top is not None:
        return {ui.labels: top, ui.score: ""}
    values = result.score()
    shown = ", ".join(f"{v:+.4f}" for v in values[:8]) + (" …" if result.output.numel() > 8 else "")
    what = ("the model's score" if result.output.numel() == 1 else
            f"its {result.shows} ({result.output.numel()} values: the image's embedding, no classifier)"
            if result.shows in ("pooler_output", "image_embeds") else
            f"its {result.shows} ({result.output.numel()} values, no class names for them)" if result.shows else
            f"the model's {result.output.numel()} outputs (no class names for them)")
    return {ui.labels: None, ui.score: f"**Output**: {what}: {shown}"}


def on_image(ui: UI, model: nn.Module, meta: dict, path, hover_dtype: str = "float32",
             layers: list[str] | None = None, tab: str = "contribution", opacity=CONTROLS["opacity"],
             colormap=CONTROLS["colormap"], mode=CONTROLS["mode"]) -> dict:
    """New upload (or example): run the model once; show predictions, γ, the model's input and the open tab's
    maps, and send the page what it needs to draw the maps under the pointer, all in one answer (one round
    trip). Everything of the previous image is reset."""
    if not path:
        return blank(ui)
    try:
        with sharing_cores():
            result = analyze(model, meta, load_upload(path), layers)
        session = Session(result, pages(result, lazy=True), path=str(path))
        return session_outputs(ui, model, meta, session, hover_dtype, tab, opacity, colormap, mode)
    finally:
        release_memory()


def session_outputs(ui: UI, model: nn.Module, meta: dict, session: Session, hover_dtype: str = "float32",
                    tab: str = "contribution", opacity=CONTROLS["opacity"], colormap=CONTROLS["colormap"],
                    mode=CONTROLS["mode"]) -> dict:
    """Everything an upload answers for an analysed image (`on_image`), from its session."""
    result, pages = session.result, session.layers
    w, h = result.size
    status = (f"Analysed a {w}×{h} image. **Move the pointer over it** to see where each position attends in "
              f"each of the {len(pages)} attention blocks; **click** to pin a point and read its numbers.")
    note = unsure_note(result, meta)
    gammas = result.gammas()
    return blank(ui) | map_updates(ui, session, opacity, colormap, mode, tab, model) | {
        ui.state: session, ui.hover: deferred_payload(result, pages, hover_dtype, session.key) | link_fields(session.path),
        ui.status: f"**{note}** {status}" if note else status, **prediction_outputs(ui, result),
        ui.gammas_md: gamma_markdown(result),
        ui.gammas_plot: pd.DataFrame({"block": list(gammas), "gamma": list(gammas.values())}) if gammas else None,
        ui.seen: result.model_view}


def on_upload(ui: UI, model: nn.Module, meta: dict, path, state=None, hover_dtype: str = "float32",
              layers: list[str] | None = None, tab: str = "contribution", opacity=CONTROLS["opacity"],
              colormap=CONTROLS["colormap"], mode=CONTROLS["mode"], busy: dict | None = None,
              session_id: str | None = None) -> dict:
    """The upload event, one request: the previous image's analysis is marked stale first (a session's events share
    its state object, so a click, a control or a tab meanwhile is refused, not drawn on the old image; the page's
    script has already dropped its copy), then `on_image`. A file that cannot be read is a warning and an empty
    app (the status says why), never the previous image's analysis under the new picture.

    Gradio's image fires its change event twice for one upload: `busy` ({session id: the file it is analysing})
    makes the second a no-op while the first runs, and a file the session has just analysed is answered from its
    analysis, not run again."""
    if isinstance(state, Session) and state.linked and example_name(path) == Path(state.path).name:  # the link's own
        # image shown (a copy of the example): analysed and pinned already; any other file is an upload
        payload, state.linked = state.linked, None
        return {c: gr.skip() for c in blank(ui)} | {ui.hover: payload | {"again": True}}  # a new value: loaded again
    if path and isinstance(state, Session) and not state.stale and state.path == str(path):
        return session_outputs(ui, model, meta, state, hover_dtype, tab, opacity, colormap, mode)
    if busy is not None and path and busy.get(session_id) == str(path):
        return {c: gr.skip() for c in blank(ui)}
    if isinstance(state, Session):
        state.stale = True
    if busy is not None:
        busy[session_id] = str(path)
    failed = False
    try:
        return on_image(ui, model, meta, path, hover_dtype, layers, tab, opacity, colormap, mode)
    except gr.Error as e:
        failed = True  # the file stays marked: the upload's second change event then adds no second warning
        gr.Warning(e.message)
        return blank(ui) | {ui.status: f"**That file could not be analysed.** {e.message}"}
    finally:
        if busy is not None and busy.get(session_id) == str(path) and not failed:
            del busy[session_id]


def render_point(state: Session, xy, opacity, colormap, mode, mark, scale, head, pictures: bool = True
                 ) -> tuple[list, str, str]:
    """Every block's picture for pixel xy (what the page draws for it; pictures False: None each), the readouts
    table, and each sink-dominated block's note (also under the table)."""
    style = dict(scale=scale, mode=mode, colormap=colormap, opacity=opacity, top_k=TOP_K if mark else 0)
    drawn, lines, notes = [], [], []
    h = head_choice(head)
    result = state.result
    for layer in state.layers:
        rgb, cell, values = layer.picture(result.display, state.size, xy, h, draw=pictures, **style)
        drawn.append(rgb)
        kw, gw = layer.key_grid[1], layer.grid[1]
        flat = values.reshape(-1)
        top = top_indices(values, TOP_K)
        if layer.normalise == "softmax":
            p = np.clip(flat, 1e-300, None)
            ent = float(-(flat * np.log(p)).sum())
            spread = f"{ent:.2f} nats ({ent / np.log(layer.m):.0%} of uniform)" if layer.m > 1 else "—"
            far = "—" if layer.kind == "map" else f"{mean_distance(torch.from_numpy(flat), cell, layer.grid, (result.input_size,) * 2, layer.key_grid):.1f}"
        else:
            spread, far = "— (not a distribution: " + ("f/M)" if layer.normalise == "mean" else "see the Blocks tab)"), "—"
        prefix = None if layer.kind == "map" else layer.prefix_weights(cell, h)
        pad = None if layer.kind == "map" else layer.padding_share(cell, h)
        if prefix is not None:  # a transformer's row: the rest of it is on its class token and registers
            spread = (f"{sum(prefix.values()):.0%} of the row on the prefix tokens ("
                      + ", ".join(f"{n.split('.')[-1]} {w:.3f}" for n, w in prefix.items()) + "); the map shows the rest")
        elif pad is not None:
            spread += f"; {pad:.0%} of the row on padding"
        cells = ", ".join(f"({j // kw},{j % kw}) {flat[j]:.3f}" for j in top)
        where = "one map per image" if layer.kind == "map" else f"({cell // gw}, {cell % gw}) of {layer.grid[0]}×{gw}"
        sink = (f"{layer.sink[1]:.0%} at ({layer.sink[0] // kw}, {layer.sink[0] % kw})" + (" ⚠" if layer.sink[1] >= 0.5 else "")
                if layer.sink else "—")
        lines.append(f"| `{layer.name}` | {layer.family} | {where} | {layer.key_grid[0]}×{kw} | "
                     f"{layer.head_label(h) or '1 head'} | {spread} | {far} | {cells} | {sink} |")
        note = sink_note(values, layer.sink) if layer.sink and layer.kind != "map" else ""
        if note:
            notes.append(f"\n\n⚠ `{layer.name}`: {note}.")
    table = ("| block | family | query cell | key grid | heads | entropy | mean distance (input px) | "
             "top cells (row, col) weight | image's sink |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) +
             "\n\nEntropy: 100% = the query looks everywhere equally, 0% = at one cell. Top cells are numbered on "
             "the maps." + "".join(notes))
    return drawn, table, "".join(notes)


def point_outputs(ui: UI) -> list:
    """What a click (or /pin) sets."""
    return [ui.point, ui.status, *ui.panels, ui.readouts]


def on_point(ui: UI, state, x, y, opacity=CONTROLS["opacity"], colormap=CONTROLS["colormap"], mode=CONTROLS["mode"],
             mark=CONTROLS["mark"], scale=CONTROLS["scale"], head="mean", pictures: bool = True) -> dict:
    """Pin pixel (x, y) of this session's image: every block's picture and the readouts (no model run). Clicks
    come here; so does `/pin` (scripts, bench/load.py). pictures False: the page's script has drawn this pin
    itself (PIN_JS says so), so only the readouts travel and the panels are cleared under the page's canvases."""
    refused = refused_point(ui, state, point_outputs(ui))
    if refused:
        return refused
    x, y = clamped_point(state, x, y)
    drawn, table, notes = render_point(state, (x, y), opacity, colormap, mode, mark, scale, head, pictures)
    queries = ", ".join(f"{layer.name}: {query_index((x, y), state.size, layer.grid)}" for layer in state.layers
                        if layer.kind != "map")
    status = f"Pinned: pixel ({x}, {y}) → query index per block: {queries}; its numbers are below.{notes}"
    return {ui.point: (x, y), ui.status: status, **panel_updates(ui, drawn if pictures else None), ui.readouts: table}


def on_click(ui: UI, state, opacity, colormap, mode, mark, evt: gr.SelectData, scale=CONTROLS["scale"],
             page_draws: bool = False, head="mean") -> dict:
    """A click on the image: pin that pixel (`on_point`)."""
    return on_point(ui, state, *evt.index, opacity, colormap, mode, mark, scale, head, pictures=not page_draws)


def on_controls(ui: UI, state, point, opacity, colormap, mode, mark, scale=CONTROLS["scale"], head="mean",
                tab=None) -> dict:
    """A control changed: re-render the pinned point's panels and the open tab's maps (no model run)."""
    if click_problem(state):
        return unchanged([*ui.panels, *ui.maps, ui.contribution_md, ui.dependence_md])
    point = pinned_point(state, point)
    panels = unchanged(ui.panels) if point is None else \
        panel_updates(ui, render_point(state, point, opacity, colormap, mode, mark, scale, head)[0])
    maps = map_updates(ui, state, opacity, colormap, mode, tab) if tab != "gradcam" else {}
    if tab == "gradcam" and state.result.gradcam is not None:
        maps = {ui.gradcam: map_picture(state.result, state.result.gradcam, opacity, colormap, mode)}
    return panels | maps


def on_ablate(ui: UI, model: nn.Module, state, layers, mode="off") -> dict:
    """Replace the chosen blocks' rows ("off", "mean" or "uniform") for one forward and compare the output."""
    problem = click_problem(state) or (None if layers else "Tick at least one block.")
    if problem:
        gr.Warning(problem)
        return {ui.ablation: gr.update(), ui.ablation_verdict: problem}
    mode = mode if mode in MODES else "off"
    result = state.result
    with sharing_cores():
        after = ablate(model, result, {name: mode for name in layers})
    label = f"{', '.join(layers)}: {mode}"
    if result.probs is not None:
        p0, p1 = result.probs, after
        order = p0.topk(min(5, len(p0))).indices.tolist()
        df = pd.DataFrame({"class": [result.class_names[i] for i in order],
                           "as computed": [round(float(p0[i]), 4) for i in order],
                           label: [round(float(p1[i]), 4) for i in order],
                           "change": [round(float(p1[i] - p0[i]), 4) for i in order]})
        a, b = int(p0.argmax()), int(p1.argmax())
        verdict = (f"Top-1 stays **{result.class_names[a]}** ({p0[a]:.1%} → {p1[a]:.1%})." if a == b else
                   f"Top-1 changes: **{result.class_names[a]}** → **{result.class_names[b]}**.")
    else:
        before = result.output.float().reshape(-1)
        n = min(8, len(before))
        df = pd.DataFrame({"output": list(range(n)), "as computed": [round(float(v), 4) for v in before[:n]],
                           label: [round(float(v), 4) for v in after[:n]],
                           "change": [round(float(after[i] - before[i]), 4) for i in range(n)]})
        verdict = f"Score {float(before[0]):+.4f} → {float(after[0]):+.4f}."
    return {ui.ablation: df, ui.ablation_verdict: verdict}


def on_export(ui: UI, model, state, point, opacity, colormap, mode, meta: dict | None = None) -> dict:
    """Write the current view (figure PNG, maps as NPY, numbers as JSON) into a zip to download, and the live view
    as one HTML file (`vggattn.view.live`: opens offline in any browser, the pinned point drawn)."""
    problem = click_problem(state)
    if problem:
        gr.Warning(problem)
        return {ui.export_file: None, ui.export_png: None, ui.export_html: None}
    EXPORT_DIR.mkdir(parents=True, exist_ok=True)
    for old in EXPORT_DIR.iterdir():  # keep the folder small: exports are fetched right away
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(dir=EXPORT_DIR))
    point = pinned_point(state, point)
    with sharing_cores():
        off = switched_off(model, state.result)
    write_result(state.result, [point] if point is not None else [], work / "vggattn", off,
                 opacity=opacity,
                 colormap=colormap, mode=mode, source=Path(state.path).name if state.path else None, live=True,
                 about=about_model(meta or {}))
    name = "vggattn-export" + (f"-x{point[0]}-y{point[1]}" if point is not None else "")
    archive = shutil.make_archive(str(work / name), "zip", work / "vggattn")
    view = (work / "vggattn" / "view.html").rename(work / f"{name}.html")
    return {ui.export_file: archive, ui.export_png: str(work / "vggattn" / "figure.png"), ui.export_html: str(view)}


def _choice(options):
    def read(v: str) -> str:
        if v not in options:
            raise ValueError(v)
        return v
    return read


def _share(v: str) -> float:
    f = float(v)
    if not 0 <= f <= 1:
        raise ValueError(v)
    return f


LINK_CONTROLS = {"opacity": _share, "colormap": _choice(COLORMAPS), "mode": _choice(UPSAMPLING),
                 "mark": lambda v: v not in ("0", "false", "no"), "scale": _choice(SCALES),
                 "head": lambda v: v if v == "mean" or v.isdigit() else _choice(())(v)}  # a link's controls


def example_name(path: str | None) -> str | None:
    """The name of the example photo this file is a copy of (Gradio copies an example before the upload), else None."""
    if not path:
        return None
    import filecmp

    return next((Path(e).name for e in EXAMPLES if Path(e).name == Path(path).name
                 and filecmp.cmp(e, path, shallow=False)), None)


def link_fields(path: str | None) -> dict:
    """What the page needs to keep a link to its view in the address bar: the example's name, when it is one."""
    name = example_name(path)
    return {"example": name} if name else {}


def on_link(ui: UI, model: nn.Module, meta: dict, params: dict, hover_dtype: str = "float32",
            layers: list[str] | None = None) -> dict:
    """A link's view (the page keeps it in the address bar: ?example=church.jpg&x=60&y=150&column=1&scale=log...): that
    example photo analysed and shown, its point pinned, the controls as the link says; nothing in the link: nothing
    done. A link to an example that is not here, or with values that make no sense, is a warning and the app as it
    is."""
    skip = {c: gr.skip() for c in [*blank(ui), ui.image, *ui.controls]}
    name = params.get("example")
    if not name:
        return skip
    path = next((e for e in EXAMPLES if Path(e).name == name), None)
    if path is None:
        gr.Warning(f"This link names the example photo {name!r}, which this app does not have.")
        return skip
    try:
        controls = {k: conv(params[k]) for k, conv in LINK_CONTROLS.items() if k in params}
        point = (int(float(params["x"])), int(float(params["y"]))) if "x" in params and "y" in params else None
    except ValueError:
        gr.Warning("This link's point or controls could not be read; the example is shown as it is.")
        controls, point = {}, None
    c = {**CONTROLS, "head": "mean", **controls}
    out = on_image(ui, model, meta, path, hover_dtype, layers, "contribution", c["opacity"], c["colormap"], c["mode"])
    session = out[ui.state]
    heads = max(layer.heads for layer in session.layers)
    if c["head"] != "mean" and int(c["head"]) >= heads:
        gr.Warning(f"This link's head {int(c['head']) + 1} is not one of the model's {heads}; the mean is shown.")
        c["head"] = "mean"
    out[ui.hover] = {**out[ui.hover], "pin": list(point) if point else None, "column": params.get("column") == "1"}
    if point is not None:
        out |= on_point(ui, session, *point, c["opacity"], c["colormap"], c["mode"], c["mark"], c["scale"], c["head"])
        out[ui.hover]["pin"] = list(out[ui.point])  # clamped into the image
    session.linked = out[ui.hover]
    return out | {ui.image: path} | dict(zip(ui.controls, (c["opacity"], c["colormap"], c["mode"], c["mark"], c["scale"],
                                                              c["head"])))


def on_compare(model, meta, layers, state, point, kind: str, other_image) -> tuple:
    """The Compare tab: this image and model (A) against B (`vggattn.analysis.COMPARE_KINDS`, or another image), as the
    A/B page in a frame and as one file to download; A's pinned point (else the centre) pinned on both."""
    problem = click_problem(state)
    if problem:
        gr.Warning(problem)
        return "", None
    if kind == "image" and not other_image:
        gr.Warning("Choose B's image first (the box beside the choice), or another kind of B.")
        return "", None
    result = state.result
    a = Side(about_model(meta), result, state.layers)
    if kind == "image":
        with sharing_cores():
            result_b = analyze(model, meta, load_upload(other_image), layers)
        a.label, label = "this image", Path(other_image).name
    else:
        result_b = analysed_b(model, meta, load_upload(state.path), kind, layers)
        label = COMPARE_KINDS[kind]
    b = Side(label, result_b, pages(result_b))
    point = pinned_point(state, point) or (result.size[0] // 2, result.size[1] // 2)
    page = compare_html(a, b, title=Path(state.path).name if state.path else "image", pin=point)
    EXPORT_DIR.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=EXPORT_DIR)) / "compare.html"
    path.write_text(page, encoding="utf-8")
    frame = (f'<iframe title="A/B" srcdoc="{html.escape(page, quote=True)}" style="width: 100%; height: 1500px; '
             'border: 0"></iframe>')
    return frame, str(path)


def api_analyze(model, meta, layers, path):
    """Stateless: image -> (top-5 label dict, or {"output i": value} without class logits; {block: γ})."""
    with sharing_cores():
        result = analyze(model, meta, load_upload(path), layers)
    top = result.top_k(5)
    return (top if top is not None else {f"output {i}": v for i, v in enumerate(result.score())}), result.gammas()


def api_attention_at(model, meta, layers, path, x, y, opacity=CONTROLS["opacity"], colormap=CONTROLS["colormap"],
                     mode=CONTROLS["mode"]):
    """Stateless: image, pixel (x, y) in original-image pixels -> one overlay per block, and their facts."""
    with sharing_cores():
        result = analyze(model, meta, load_upload(path), layers)
    w, h = result.size
    if x is None or y is None or not (0 <= x < w and 0 <= y < h):
        raise gr.Error(f"The point ({x}, {y}) is outside the {w}×{h} image.")
    state = Session(result, pages(result, lazy=True))
    pictures, _, _ = render_point(state, (float(x), float(y)), opacity, colormap, mode, True, CONTROLS["scale"], None)
    info = [{"layer": b.name, "family": b.family, "grid": list(b.maps.grid), "key_grid": list(b.maps.key_grid),
             "gamma": b.gamma, "query_index": b.query_index((float(x), float(y)))} for b in result.blocks]
    return (*pictures, info)


def blocks_markdown(blocks: list) -> str:
    rows = [f"| `{name}` | {adapter.family} | {adapter.residual} | {adapter.off_means} |" for name, _, adapter in blocks]
    return "| block | family | how its output enters | \"off\" means |\n|---|---|---|---|\n" + "\n".join(rows)


def short_family(adapter) -> str:
    """A block's family in a few words (a traced block: its class and library; the Blocks tab says more)."""
    return adapter.family.split(", found by")[0]


def traced_note(blocks: list) -> str:
    traced = sum(isinstance(a, TracedAdapter) for *_, a in blocks)
    if not traced:
        return ""
    return f" ({'all' if traced == len(blocks) else traced} found by what {'it computes' if traced == 1 else 'they compute'})"


def block_list(blocks: list) -> str:
    """The blocks by name, each with its family, or the family once when they share it."""
    families = {short_family(a) for *_, a in blocks}
    if len(families) == 1 and len(blocks) > 1:
        return ", ".join(f"`{n}`" for n, *_ in blocks) + f", all {families.pop()}"
    return ", ".join(f"`{n}` ({short_family(a)})" for n, _, a in blocks)


def model_name(model: nn.Module, meta: dict) -> str:
    c = meta.get("config")
    if meta.get("source"):
        return f"`{meta['source']}`"
    return f"Attention-VGG16 (width ×{c['width']:g})" if c and "width" in c else f"`{type(model).__name__}`"


def describe(model: nn.Module, meta: dict, blocks: list) -> str:
    """The header: the model, where it runs, its blocks, what to do, and the notes a reader needs first."""
    device = next(model.parameters()).device
    where = f"GPU ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "CPU"
    names = meta.get("class_names")
    classes = f"{len(names)} classes" if names else "no class names (its output is shown as a score)"
    t = meta.get("training", {})
    acc = f", val top-1 {t['val_top1']:.1%} on {t.get('dataset', '?')}" if "val_top1" in t else ""
    weights = f"{Path(str(meta['weights'])).name} weights, " if meta.get("weights") else ""
    warning = f"\n\n**{meta['warning']}**" if meta.get("warning") else ""
    notes = model_notes(meta, {n: g for n, m, _ in blocks if (g := block_gamma(m)) is not None})
    return (f"# vggattn · where does self-attention look?\n"
            f"{model_name(model, meta)} ({weights}{classes}, {meta['input_size']} px input{acc}) running on "
            f"**{where}**, with {len(blocks)} attention block{'s' if len(blocks) != 1 else ''}: " +
            block_list(blocks) + traced_note(blocks) +
            ". Upload an image, then move the pointer over it: each panel shows where the position under it attends "
            "in one block (computed in your browser); click (or tap) to pin a point." + warning +
            "".join(f"\n\n{note}" for note in notes))


def panel_height(n: int) -> int:
    """Panels beside the picture: one row of up to three as tall as the picture, else rows of 240 px."""
    return PANEL_HEIGHT if n <= PER_ROW else 240


def build_demo(model: nn.Module, meta: dict, study: dict | None = None, checkpoint: str | None = None,
               hover_dtype: str = "float32", session_ttl: int = 3600, layers: list[str] | None = None) -> gr.Blocks:
    """The app for any model with attention blocks. meta: `vggattn.load_checkpoint`'s or `vggattn.models.byo.describe`'s;
    study: the model's `vggattn.study` result (its Dataset tab), if there is one; hover_dtype: how Q and K travel
    to the page ("float16" halves the bytes; bench/README.md has the error); session_ttl: seconds a session's
    analysis is kept after it was made (Gradio's State time_to_live); layers: the blocks to show (default all)."""
    model.eval()
    blocks = blocks_of(model, meta, layers)
    n = len(blocks)
    names = [name for name, *_ in blocks]
    with torch.no_grad():  # the heads per block, from one forward of a blank image
        from PIL import Image

        probe = analyze(model, meta, Image.new("RGB", (meta["input_size"],) * 2, (128, 128, 128)), layers)
    max_heads = max(b.maps.heads for b in probe.blocks)
    cross = cross_blocks(model, meta) if layers is None else []  # a detector's decoder: the Tokens tab
    has_gamma = bool(probe.gammas())
    bind = functools.partial
    with gr.Blocks(title="vggattn") as demo:
        gr.Markdown(describe(model, meta, blocks) + (
            f" Its attention from {len(cross)} layers of tokens that are no place on the image (a detector's object "
            "queries) to the image: the **Tokens** tab." if cross else ""), elem_id="about")
        # This session's analysis (a display-sized image and each block's maps), never shared between users;
        # dropped session_ttl seconds after it was made, and at most STATE_SESSIONS are kept (launch()).
        state = gr.State(None, time_to_live=session_ttl)
        point = gr.State(None, time_to_live=session_ttl)  # last clicked (x, y)
        open_tab = gr.State("contribution")  # the tab shown first
        height = panel_height(n)
        # The image and the panels side by side, equally large, above the fold (they stack on a phone)
        with gr.Row(equal_height=n <= PER_ROW):
            image = UploadedImage(type="filepath", sources=["upload", "clipboard"], label="Your image: point at or click any pixel",
                                  elem_id="input-image", height=PANEL_HEIGHT, scale=1, min_width=PANEL_MIN_WIDTH)
            panel = functools.partial(gr.Image, interactive=False, format="jpeg", height=height)
            if n <= PER_ROW:  # as large as the picture, beside it
                panels = [panel(label=f"{names[i]}: where the point attends", elem_id=f"panel-{i}", scale=1,
                                min_width=PANEL_MIN_WIDTH) for i in range(n)]
            else:  # rows of three in a strip that scrolls
                with gr.Column(scale=PER_ROW, elem_id="panel-strip"):
                    panels = []
                    for start in range(0, n, PER_ROW):
                        with gr.Row():
                            panels += [panel(label=f"{names[i]}: where the point attends", elem_id=f"panel-{i}",
                                             min_width=200) for i in range(start, min(n, start + PER_ROW))]
                            for _ in range(PER_ROW - (min(n, start + PER_ROW) - start)):
                                gr.HTML("")  # keep the last row's panels as wide as the others
        hover = hover_view(n, APP_CONTROLS)
        status = gr.Markdown("Upload an image to begin.", elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                if EXAMPLES:
                    gr.Examples(EXAMPLES, inputs=image, label="Example photos")
                heads = []
                opacity, colormap, mode, scale, mark = view_controls(lambda: heads.append(gr.Radio(
                    [("mean of heads", "mean")] + [(f"head {h + 1}", str(h)) for h in range(max_heads)], value="mean",
                    label="Head (blocks with fewer heads show their mean)", elem_id="head", visible=max_heads > 1)))
                head = heads[0]
            with gr.Column(scale=2):
                labels = gr.Label(num_top_classes=5, label="Top-5 predictions", elem_id="predictions",
                                  visible=bool(meta.get("class_names")))
                score = gr.Markdown(elem_id="score")
                gammas_md = gr.Markdown(elem_id="gammas", visible=has_gamma)
                gammas_plot = gr.BarPlot(x="block", y="gamma", label="Learned γ per block", height=200, visible=has_gamma)
                seen = gr.Image(label=f"What the model sees ({meta['input_size']}×{meta['input_size']})",
                                interactive=False, format="jpeg", height=200, visible="transform" not in meta)
        readouts = gr.Markdown(elem_id="readouts")
        # the views' tab buttons wrap onto more rows where they do not fit (a phone), none hidden in a "..." menu
        with gr.Tabs(overflow_behavior="wrap", elem_id="views"):
            with gr.Tab("Effective contribution") as contribution_tab:
                gr.Markdown(CONTRIBUTION_HINT)
                with gr.Row():
                    contribution = [gr.Image(label=f"{names[i]} · ‖y − x‖/‖x‖", interactive=False, format="jpeg",
                                             elem_id=f"contribution-{i}", min_width=160) for i in range(n)]
                contribution_md = gr.Markdown(elem_id="contribution")
            with gr.Tab("Query dependence") as dependence_tab:
                dependence_md = gr.Markdown(elem_id="dependence")
                with gr.Row():
                    mean_maps = [gr.Image(label=f"{names[i]} · mean over queries", interactive=False, format="jpeg",
                                          elem_id=f"mean-map-{i}", min_width=160) for i in range(n)]
            with gr.Tab("Ablation") as ablation_tab:
                gr.Markdown("Replace the chosen blocks' rows for one forward and see how the output changes.")
                with gr.Row():
                    layers_off = gr.CheckboxGroup(names, label="Blocks", elem_id="layers-off")
                    how = gr.Radio([(v, k) for k, v in INTERVENTIONS.items()], value="off", label="Replace by",
                                   elem_id="intervention")
                    ablate_button = gr.Button("Run", elem_id="ablate")
                ablation_verdict = gr.Markdown(elem_id="ablation-verdict")
                ablation = gr.Dataframe(interactive=False, wrap=True, elem_id="ablation")  # long block names wrap, not cut
            with gr.Tab("Grad-CAM") as gradcam_tab:
                gr.Markdown("Grad-CAM of the top class at the model's last conv layer: where the *class evidence* "
                            "is, beside where positions *look*.")
                cam = gr.Image(label="Grad-CAM of the top class at the last conv layer", interactive=False, format="jpeg",
                               elem_id="gradcam", height=420)
            across_tab(model, meta, state, opacity, colormap)
            with gr.Tab("Export") as export_tab:
                export_button = gr.Button("Export the current view", elem_id="export-button")
                with gr.Row():
                    export_file = gr.File(label="zip: figure.png, maps as .npy, result.json, view.html", elem_id="export")
                    export_html = gr.File(label="the live view in one HTML file: follows the pointer, opens offline "
                                                "in any browser", elem_id="export-html")
                    export_png = gr.Image(label="figure.png", interactive=False, elem_id="export-figure")
            with gr.Tab("Compare"):
                gr.Markdown("**A/B under one pointer.** A is this image through this model; B is what you choose. "
                            "Both views follow the pointer and clicks at the same place in their images, and under "
                            "them each pair of layers shows B's row minus A's with its largest change and JSD. The "
                            "view is one HTML file: download it to keep or share (it opens offline).")
                with gr.Row():
                    compare_kind = gr.Radio([(label, kind) for kind, label in COMPARE_KINDS.items()] +
                                            [("another image (below)", "image")], value="reinit", label="B",
                                            elem_id="compare-kind")
                    compare_image = gr.Image(type="filepath", label="B's image (for \"another image\")",
                                             sources=["upload"], height=160, elem_id="compare-image")
                    compare_button = gr.Button("Compare", elem_id="compare-button")
                compare_view = gr.HTML(elem_id="compare-view")
                compare_file = gr.File(label="compare.html: the A/B view in one file", elem_id="compare-file")
            with gr.Tab("Blocks") as blocks_tab:
                gr.Markdown(blocks_markdown(blocks), elem_id="blocks")
            if cross:
                tokens_tab(model, meta, image, cross, opacity, colormap)
            with gr.Tab("Dataset") as dataset_tab:
                study_md, study_images = study_view(study, checkpoint)
                gr.Markdown(study_md, elem_id="study")
                for name, image_array in study_images.items():
                    gr.Image(image_array, label=name[:-4].replace("_", " "), interactive=False, elem_id=f"study-{name[:-4]}")
        ui = UI(state=state, point=point, open_tab=open_tab, hover=hover, labels=labels, score=score,
                gammas_md=gammas_md, gammas_plot=gammas_plot, seen=seen, status=status, panels=panels,
                readouts=readouts, contribution=contribution, mean_maps=mean_maps, gradcam=cam,
                contribution_md=contribution_md, dependence_md=dependence_md, ablation=ablation,
                ablation_verdict=ablation_verdict, export_file=export_file, export_png=export_png,
                export_html=export_html, image=image,
                controls=[opacity, colormap, mode, mark, scale, head])
        demo.ui = ui  # for tests: handlers are called with it, no server needed
        demo.vggattn_routes = [(f"/{LAYER_ROUTE}/{{key}}/u/{{index}}", contributions_answer),  # added by launch()
                               (f"/{LAYER_ROUTE}/{{key}}/{{index}}", layer_answer)]
        demo.vggattn_css = CSS + VIEWS_CSS

        # Each event's outputs are the keys its handler returns (blank, point_outputs, ...). An upload is one
        # request: the page drops its copy of the old maps at once (UPLOAD_JS), the server marks the old analysis
        # stale, and one answer holds the analysis, the payload and the open tab's maps.
        busy: dict = {}  # session id -> the file its upload event is analysing

        def upload(path, state, tab, opacity, colormap, mode, request: gr.Request):
            return on_upload(ui, model, meta, path, state, hover_dtype, layers, tab, opacity, colormap, mode, busy,
                             getattr(request, "session_hash", None))
        image.change(upload, [image, state, open_tab, opacity, colormap, mode], list(blank(ui)), js=UPLOAD_JS,
                     api_name="upload")
        for tab, name in zip((contribution_tab, dependence_tab, gradcam_tab, ablation_tab, export_tab, blocks_tab,
                              dataset_tab), TABS):
            tab.select(bind(on_tab, ui, name, model=model), [state, opacity, colormap, mode], tab_outputs(ui),
                       api_name=False)
        page_draws = gr.Checkbox(False, visible=False, elem_id="page-draws")  # set by PIN_JS at each click

        def click(state, opacity, colormap, mode, mark, scale, head, drawn, evt: gr.SelectData):  # Gradio finds evt
            return on_click(ui, state, opacity, colormap, mode, mark, evt, scale, bool(drawn), head)  # by annotation

        # no loading overlay on the panels: the page has drawn the pin already (show_progress hidden)
        image.select(click, [state, opacity, colormap, mode, mark, scale, head, page_draws], point_outputs(ui),
                     js=PIN_JS, api_name="click", show_progress="hidden")
        controls = ui.controls
        for control in controls:
            control.change(bind(on_controls, ui), [state, point, *controls, open_tab],
                           [*panels, *ui.maps, contribution_md, dependence_md], show_progress="hidden",
                           api_name=f"rerender_{control.elem_id or 'number'}")
            control.change(None, controls, None, js=CONTROLS_JS, queue=False, api_name=False)  # the page redraws

        def link(request: gr.Request):  # the page's address carries its view: ?example=church.jpg&x=60&y=150&...
            return on_link(ui, model, meta, dict(getattr(request, "query_params", None) or {}), hover_dtype, layers)
        demo.load(link, None, [*blank(ui), ui.image, *ui.controls], api_name=False)
        ablate_button.click(bind(on_ablate, ui, model), [state, layers_off, how], [ablation, ablation_verdict],
                            api_name="ablate")
        compare_button.click(bind(on_compare, model, meta, layers), [state, point, compare_kind, compare_image],
                             [compare_view, compare_file], api_name="compare")
        export_button.click(bind(on_export, ui, model, meta=meta), [state, point, opacity, colormap, mode],
                            [export_file, export_png, export_html], api_name="export")

        with gr.Row(visible=False):  # the click, for gradio_client: /upload, then /pin in the same session
            pin_x, pin_y = gr.Number(label="x"), gr.Number(label="y")
            pin_button = gr.Button()
        pin_button.click(bind(on_point, ui), [state, pin_x, pin_y, *controls], point_outputs(ui), api_name="pin")
        with gr.Row(visible=False):  # stateless endpoints for gradio_client and scripts
            api_image = UploadedImage(type="filepath")
            api_x, api_y = gr.Number(label="x"), gr.Number(label="y")
            api_labels, api_gammas = gr.Label(), gr.JSON()
            api_panels = [gr.Image() for _ in range(n)]
            api_info = gr.JSON()
            analyze_button, attention_button = gr.Button(), gr.Button()
        analyze_button.click(bind(api_analyze, model, meta, layers), api_image, [api_labels, api_gammas],
                             api_name="analyze")
        attention_button.click(bind(api_attention_at, model, meta, layers), [api_image, api_x, api_y],
                               [*api_panels, api_info], api_name="attention_at")
    return demo


def launch(model: nn.Module, *, transform=None, class_names=None, input_size: int | None = None, layers=None,
           host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kw):
    """Serve the app for a model in hand: `vggattn.launch(model, transform=..., class_names=...)` (input size: given,
    else a transformers model's config's, else 224)."""
    model, meta = in_hand(model, transform=transform, class_names=class_names, input_size=input_size)
    return serve(build_demo(model, meta, layers=layers), host, port, share, **kw)


parse_args = app_args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    fix_threads(args.threads)  # else each forward gets the cores divided among the events running (`sharing_cores`)
    if args.diffusers:
        from ..diffusion import load_pipeline
        from .words import build_words_demo

        try:
            pipe = load_pipeline(args.diffusers)
        except (OSError, ValueError, ImportError) as e:
            print(f"error: cannot load the pipeline: {e}", file=sys.stderr)
            return BAD_INPUT
        serve(build_words_demo(pipe, args.diffusers), args.host, args.port, args.share, concurrency=args.concurrency)
        return 0
    try:
        model, meta = load_from_args(args)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return BAD_INPUT
    log.info("loaded %s on %s (%d PyTorch threads a forward)", meta.get("source", args.checkpoint or "the shipped checkpoint"),
             next(model.parameters()).device, torch.get_num_threads())
    weights = str(args.checkpoint) if args.checkpoint else None if wants_own_model(args) else str(DEFAULT_CHECKPOINT)
    try:
        demo = build_demo(model, meta, load_study(weights) if weights else None, weights, hover_dtype=args.hover_dtype,
                          session_ttl=args.session_ttl, layers=args.layers)
    except NoAttention:  # its only attention is deformable (load_from_args let it through for its tokens)
        demo = build_tokens_demo(model, meta)
    serve(demo, args.host, args.port, args.share, concurrency=args.concurrency)
    return 0


def __getattr__(name: str):
    """`from app import demo` builds the demo on the shipped checkpoint (lazily, once)."""
    if name == "demo":
        model, meta = load_checkpoint()
        globals()["demo"] = build_demo(model, meta, load_study(DEFAULT_CHECKPOINT), str(DEFAULT_CHECKPOINT))
        return globals()["demo"]
    raise AttributeError(name)


__all__ = ["build_demo", "launch", "model_meta", "main", "STATE_SESSIONS"]


if __name__ == "__main__":
    raise SystemExit(main())
