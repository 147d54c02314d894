"""vggattn web app: upload an image, point at a pixel, see where that position attends in each layer.

    python app.py                                  # in a checkout: shipped checkpoint, http://127.0.0.1:7860
    vggattn-app --checkpoint my.safetensors --device cuda --port 8000    # installed: the console script

The model runs once per image (`analyze`). The page gets each layer's Q, K and row normalisers once
(`vggattn.hover`) and draws the maps under the pointer itself (vggattn/web/hover.js), with no request per
move; a click pins a point and renders it on the server from the per-session `gr.State` (the same Q and K)
with its readouts, so it never runs the model again either. This file wires the UI to the
`vggattn` library and holds no model maths of its own. Scripts use the two stateless endpoints:

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    labels, gammas = client.predict(handle_file("photo.jpg"), api_name="/analyze")
    o14, o22, o30, info = client.predict(handle_file("photo.jpg"), 120, 80, api_name="/attention_at")
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

import vggattn
from .analysis import Analysis, ablate, analyze, render_attention, render_map
from .byo import add_model_arguments, load_from_args, wants_own_model
from .checkpoint import BAD_INPUT, add_checkpoint_argument, resolve_device
from .export import write_result
from .hover import hover_payload
from .text import (contribution_markdown, dependence_markdown, gamma_markdown, model_notes, readouts_markdown, sink_notes_markdown,
                   unsure_note)
from .render import TOP_K
from .study import load_study
from .ui import (CONTROLS, CONTROLS_JS, EXAMPLES, PENDING, PIN_JS, UploadedImage, clamped_point, click_problem,
                 hover_view, launch, load_upload, pinned_point, refused_point, release_memory, study_view, unchanged,
                 view_controls)
from .ui import HERE, STATE_SESSIONS, WEB  # noqa: F401  (app.HERE, app.STATE_SESSIONS, app.WEB: used by scripts)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when a Blocks is made, not at import
log = logging.getLogger("vggattn.app")
NUM_PANELS = 3
PANEL_HEIGHT = 340  # px: the image and the three panels fit above the fold at 1440x900
PANEL_MIN_WIDTH = 240  # px: below this the row wraps (a phone shows them one under another)
CONTRIBUTION_HINT = ("How much attention actually changes the features at each position: ‖γ · attention output‖ / ‖x‖ "
                     "(0 = untouched). The raw γ alone says little, because the attention output's size varies.")
EXPORT_DIR = Path(tempfile.gettempdir()) / "vggattn-exports"  # zips older than an hour are removed
NUM_MAPS = 2 * NUM_PANELS + 1  # the tabs' images: contribution x3, query-averaged x3, Grad-CAM






@dataclass
class UI:
    """The components handlers write to; handlers return {component: value} dicts keyed by these."""

    state: gr.State
    point: gr.State
    open_tab: gr.State  # which of the tabs is open: only its maps are drawn (TABS)
    hover: gr.HTML  # the page's copy of Q, K and log Z (vggattn.hover), for maps under the pointer
    labels: gr.Label
    gammas_md: gr.Markdown
    gammas_plot: gr.BarPlot
    seen: gr.Image
    status: gr.Markdown
    panels: list  # NUM_PANELS gr.Image, one per layer
    readouts: gr.Markdown
    maps: list  # NUM_MAPS gr.Image: contribution x3, query-averaged x3, Grad-CAM
    contribution_md: gr.Markdown
    dependence_md: gr.Markdown
    ablation: gr.Dataframe
    ablation_verdict: gr.Markdown
    export_file: gr.File
    export_png: gr.Image


# Handlers return plain values, never gr.update / gr.skip: Gradio 6 handles any update dict (an empty one too) by
# building the component again and its per-session config twice (its API schema by pydantic), under the GIL,
# which was a quarter of the server's GIL time under load (bench/README.md). So labels are fixed when the app
# is built, and the numbers that labels carried are in the markdown beside them (readouts, tab tables).

def panel_updates(ui: UI, panels=None) -> dict:
    """The three panels' pictures (the panels encode them as JPEG, once); None clears them."""
    if panels is None:
        return {c: None for c in ui.panels}
    return {c: p.image for c, p in zip(ui.panels, panels)}


def tab_maps(ui: UI, tab: str | None) -> list:
    """The images of one tab (None: of every tab)."""
    parts = {"contribution": ui.maps[:NUM_PANELS], "dependence": ui.maps[NUM_PANELS:2 * NUM_PANELS],
             "gradcam": ui.maps[2 * NUM_PANELS:]}
    return ui.maps if tab is None else parts.get(tab, [])


def map_updates(ui: UI, result: Analysis | None, opacity=CONTROLS["opacity"], colormap=CONTROLS["colormap"],
                mode=CONTROLS["mode"], tab: str | None = None) -> dict:
    """The tabs' images and their numbers: effective contribution and query-averaged attention per layer, and
    Grad-CAM; only those of `tab` when given (the query dependence's JSD and the Grad-CAM are computed when asked
    for). The other tabs' are cleared: they are drawn again when opened."""
    out = {c: None for c in ui.maps} | {ui.contribution_md: "", ui.dependence_md: ""}
    if result is None:
        return out
    draw = functools.partial(render_map, result, opacity=opacity, colormap=colormap, mode=mode)
    if tab in (None, "contribution"):
        contributions = result.contributions()
        out |= dict(zip(ui.maps[:NUM_PANELS], [draw(c) for c in contributions]))
        out[ui.contribution_md] = contribution_markdown(result.layers, contributions)
    if tab in (None, "dependence"):
        dependence = result.query_dependence()
        out |= dict(zip(ui.maps[NUM_PANELS:2 * NUM_PANELS], [draw(m) for m, _ in dependence]))
        out[ui.dependence_md] = dependence_markdown(result.layers, dependence)
    if tab in (None, "gradcam"):
        out[ui.maps[-1]] = draw(result.gradcam.numpy()) if result.gradcam is not None else None
    return out


def on_tab(ui: UI, tab: str, state, opacity=CONTROLS["opacity"], colormap=CONTROLS["colormap"],
           mode=CONTROLS["mode"]) -> dict:
    """A tab was opened (or an upload finished with it open): draw its maps for this image (the other tabs'
    are cleared, and drawn when they are opened)."""
    return {ui.open_tab: tab} | map_updates(ui, None if click_problem(state) else state, opacity, colormap, mode, tab)


def tab_outputs(ui: UI) -> list:
    return [ui.open_tab, *ui.maps, ui.contribution_md, ui.dependence_md]


def blank(ui: UI) -> dict:
    """Every component an upload sets, as it is before any image: what an upload first resets, so
    nothing of the previous image (pinned point, readouts, ablation, export) outlives it."""
    return {ui.state: None, ui.point: None, ui.hover: None, ui.labels: None, ui.gammas_md: "", ui.gammas_plot: None,
            ui.seen: None, ui.status: "Upload an image to begin.", **panel_updates(ui), ui.readouts: "",
            **map_updates(ui, None), ui.ablation: None, ui.ablation_verdict: "",
            ui.export_file: None, ui.export_png: None}


def on_image(ui: UI, model, meta, path, hover_dtype: str = "float32") -> dict:
    """New upload (or example): run the model once and show predictions, gammas, model input, and send
    the page what it needs to draw the maps under the pointer. Everything of the previous image is reset."""
    if not path:
        return blank(ui)
    try:
        result = analyze(model, meta, load_upload(path))
        return blank(ui) | upload_outputs(ui, meta, result, hover_dtype)
    finally:
        release_memory()


def upload_outputs(ui: UI, meta, result: Analysis, hover_dtype: str) -> dict:
    w, h = result.size
    status = (f"Analysed a {w}×{h} image. **Move the pointer over it** to see where each position attends in "
              "each layer; **click** to pin a point and read its numbers.")
    note = unsure_note(result, meta)
    return {ui.state: result, ui.hover: hover_payload(result, hover_dtype), ui.labels: result.top_k(5),
            ui.gammas_md: gamma_markdown(result),
            ui.gammas_plot: pd.DataFrame({"layer": [layer.name for layer in result.layers],
                                          "gamma": [layer.gamma for layer in result.layers]}),
            ui.seen: result.model_view, ui.status: f"**{note}** {status}" if note else status}




def mark_pending(ui: UI) -> dict:
    """First step of an upload: drop the old analysis, its pinned point and the page's copy of it, so a
    click, a control or a pointer move meanwhile cannot show (or fail on) the previous image."""
    return {ui.state: PENDING, ui.point: None, ui.hover: None}








def point_outputs(ui: UI) -> list:
    """What a click (or /pin) sets."""
    return [ui.point, ui.status, *ui.panels, ui.readouts]






def on_click(ui: UI, state, opacity, colormap, mode, mark, evt: gr.SelectData, scale=CONTROLS["scale"],
             page_draws: bool = False) -> dict:
    """A click on the image: pin that pixel (see `on_point`). page_draws: the page's script has drawn this
    pin already (PIN_JS sets it), so the server sends the readouts and no pictures."""
    return on_point(ui, state, *evt.index, opacity, colormap, mode, mark, scale, pictures=not page_draws)


def on_point(ui: UI, state, x, y, opacity=CONTROLS["opacity"], colormap=CONTROLS["colormap"], mode=CONTROLS["mode"],
             mark=CONTROLS["mark"], scale=CONTROLS["scale"], pictures: bool = True) -> dict:
    """Pin pixel (x, y) of this session's image: render its attention in every layer, with readouts
    (no model run). Clicks come here; so does the `/pin` endpoint (scripts, bench/load.py). The page's
    script draws the same panels itself (on canvases over these), so a click from it asks for no pictures
    (pictures False: the panels are cleared, the readouts sent); the server's pictures are what `/pin` and a
    page without the script show."""
    refused = refused_point(ui, state, point_outputs(ui))
    if refused:
        return refused
    x, y = clamped_point(state, x, y)
    panels = render_attention(state, (x, y), opacity, colormap, mode, top_k=TOP_K if mark else 0, scale=scale,
                              pictures=pictures)
    idx = ", ".join(f"{p.layer}: {p.query_index}" for p in panels)
    status = f"Pinned: pixel ({x}, {y}) → query index per layer: {idx}.{sink_notes_markdown(panels)}"
    return {ui.point: (x, y), ui.status: status, **panel_updates(ui, panels if pictures else None),
            ui.readouts: readouts_markdown(panels)}


def on_mark(ui: UI, state, point, opacity, colormap, mode, mark, scale=CONTROLS["scale"]) -> dict:
    """The top-5 numbering or the scale changed: re-render the panels of the pinned point (no model run)."""
    point = pinned_point(state, point)
    if point is None:  # nothing pinned on this image: leave the panels as they are
        return unchanged(ui.panels)
    return panel_updates(ui, render_attention(state, point, opacity, colormap, mode, top_k=TOP_K if mark else 0,
                                              scale=scale))


def on_controls(ui: UI, state, point, opacity, colormap, mode, mark, scale=CONTROLS["scale"], tab=None) -> dict:
    """Opacity / colormap / upsampling changed: re-render the panels and the open tab's maps (tab None: every
    tab's; no model run)."""
    if click_problem(state):
        return unchanged([*ui.panels, *ui.maps, ui.contribution_md, ui.dependence_md])
    return {**on_mark(ui, state, point, opacity, colormap, mode, mark, scale),
            **map_updates(ui, state, opacity, colormap, mode, tab)}


def on_ablate(ui: UI, model, state, layers) -> dict:
    """Switch the chosen layers' attention off (gamma = 0) for one forward and compare the top-5."""
    problem = click_problem(state) or (None if layers else "Tick at least one layer to switch off.")
    if problem:
        gr.Warning(problem)
        return {ui.ablation: gr.update(), ui.ablation_verdict: problem}
    off = ablate(model, state, layers)
    order = off.topk(min(5, len(off))).indices.tolist()
    df = pd.DataFrame({"class": [state.class_names[i] for i in order],
                       "all layers on": [round(float(state.probs[i]), 4) for i in order],
                       f"{', '.join(layers)} off": [round(float(off[i]), 4) for i in order],
                       "change": [round(float(off[i] - state.probs[i]), 4) for i in order]})
    before, after = int(state.probs.argmax()), int(off.argmax())
    verdict = (f"Top-1 stays **{state.class_names[before]}** ({state.probs[before]:.1%} → {off[before]:.1%})."
               if before == after else
               f"Top-1 changes: **{state.class_names[before]}** → **{state.class_names[after]}**.")
    return {ui.ablation: df, ui.ablation_verdict: verdict}


def on_export(ui: UI, model, state, point, opacity, colormap, mode) -> dict:
    """Write the current view (figure PNG, maps as NPY, numbers as JSON) into a zip to download."""
    problem = click_problem(state)
    if problem:
        gr.Warning(problem)
        return {ui.export_file: None, ui.export_png: None}
    EXPORT_DIR.mkdir(parents=True, exist_ok=True)
    for old in EXPORT_DIR.iterdir():  # keep the folder small: exports are fetched right away
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(dir=EXPORT_DIR))
    point = pinned_point(state, point)
    points = [point] if point is not None else []
    write_result(state, points, work / "vggattn", model, opacity=opacity, colormap=colormap, mode=mode)
    name = "vggattn-export" + (f"-x{point[0]}-y{point[1]}" if point is not None else "")
    archive = shutil.make_archive(str(work / name), "zip", work / "vggattn")
    return {ui.export_file: archive, ui.export_png: str(work / "vggattn" / "figure.png")}


def api_analyze(model, meta, path):
    """Stateless: image -> (top-5 label dict, {layer: gamma})."""
    result = analyze(model, meta, load_upload(path))
    return result.top_k(5), result.gammas()


def api_attention_at(model, meta, path, x, y, opacity=CONTROLS["opacity"], colormap=CONTROLS["colormap"], mode=CONTROLS["mode"]):
    """Stateless: image, pixel (x, y) in original-image pixels -> three overlays + their facts."""
    result = analyze(model, meta, load_upload(path))
    w, h = result.size
    if x is None or y is None or not (0 <= x < w and 0 <= y < h):
        raise gr.Error(f"The point ({x}, {y}) is outside the {w}×{h} image.")
    panels = render_attention(result, (float(x), float(y)), opacity, colormap, mode)
    info = [{"layer": p.layer, "grid": list(p.grid), "gamma": p.gamma, "query_index": p.query_index, "title": p.title}
            for p in panels]
    return (*[p.image for p in panels], info)


# -- UI ---------------------------------------------------------------------------------------------
def describe(model, meta) -> str:
    device = next(model.parameters()).device
    where = f"GPU ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "CPU"
    t = meta.get("training", {})
    acc = f", val top-1 {t['val_top1']:.1%} on {t.get('dataset', '?')}" if "val_top1" in t else ""
    c = meta["config"]
    return (f"# vggattn · where does self-attention look?\n"
            f"Attention-VGG16 (width ×{c['width']:g}, {len(meta['class_names'])} classes, "
            f"{meta['input_size']} px input{acc}) running on **{where}**. "
            "Upload an image, then move the pointer over it: each panel shows where the position under it "
            "attends in one of the three attention layers (computed in your browser); click (or tap) to pin a point.\n\n" + "\n\n".join(model_notes(model, meta)))








def build_demo(model: torch.nn.Module, meta: dict, study: dict | None = None, checkpoint: str | None = None,
               hover_dtype: str = "float32", session_ttl: int = 3600) -> gr.Blocks:
    """The app. study: the checkpoint's `vggattn.study` result (its Dataset tab), if there is one;
    hover_dtype: how Q and K travel to the page ("float16" halves the bytes; bench/README.md has the error);
    session_ttl: seconds a session's analysis is kept after it was made (Gradio's State time_to_live)."""
    bind = functools.partial
    with gr.Blocks(title="vggattn") as demo:
        gr.Markdown(describe(model, meta))
        # This session's Analysis (~2 MB: a display-sized image and each layer's Q and K), never shared
        # between users; dropped session_ttl seconds after it was made, and at most STATE_SESSIONS are kept (launch()).
        state = gr.State(None, time_to_live=session_ttl)
        point = gr.State(None, time_to_live=session_ttl)  # last clicked (x, y)
        open_tab = gr.State("contribution")  # the tab shown first
        # The image and the three panels side by side, equally large, above the fold (they stack on a phone)
        with gr.Row(equal_height=True):
            image = UploadedImage(type="filepath", sources=["upload", "clipboard"], label="Your image: point at or click any pixel",
                                  elem_id="input-image", height=PANEL_HEIGHT, scale=1, min_width=PANEL_MIN_WIDTH)
            names = [*vggattn.attention_layer_names(model), *(f"attention layer {i + 1}" for i in range(NUM_PANELS))]
            panels = [gr.Image(label=f"{names[i]}: where the point attends", interactive=False, format="jpeg",
                               elem_id=f"panel-{i}", height=PANEL_HEIGHT, scale=1, min_width=PANEL_MIN_WIDTH)
                      for i in range(NUM_PANELS)]
        hover = hover_view(NUM_PANELS, CONTROLS)
        status = gr.Markdown("Upload an image to begin.", elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                if EXAMPLES:
                    gr.Examples(EXAMPLES, inputs=image, label="Example photos")
                opacity, colormap, mode, scale, mark = view_controls()
            with gr.Column(scale=2):
                labels = gr.Label(num_top_classes=5, label="Top-5 predictions", elem_id="predictions")
                gammas_md = gr.Markdown(elem_id="gammas")
                gammas_plot = gr.BarPlot(x="layer", y="gamma", label="Learned γ per layer", height=200)
                seen = gr.Image(label=f"What the model sees ({meta['input_size']}×{meta['input_size']})",
                                interactive=False, format="jpeg", height=200)
        readouts = gr.Markdown(elem_id="readouts")
        with gr.Tabs():
            with gr.Tab("Effective contribution") as contribution_tab:
                gr.Markdown(CONTRIBUTION_HINT)
                with gr.Row():
                    contrib = [gr.Image(label=f"{names[i]} · ‖γ·attn‖/‖x‖", interactive=False, format="jpeg",
                                        elem_id=f"contribution-{i}") for i in range(NUM_PANELS)]
                contribution_md = gr.Markdown(elem_id="contribution")
            with gr.Tab("Query dependence") as dependence_tab:
                dependence_md = gr.Markdown(elem_id="dependence")
                with gr.Row():
                    mean_maps = [gr.Image(label=f"{names[i]} · mean over queries", interactive=False, format="jpeg",
                                          elem_id=f"mean-map-{i}") for i in range(NUM_PANELS)]
            with gr.Tab("Ablation") as ablation_tab:
                gr.Markdown("Switch attention layers off (γ = 0 for one forward) and see how the top-5 changes.")
                with gr.Row():
                    layers_off = gr.CheckboxGroup(vggattn.attention_layer_names(model), label="Switch off",
                                                  elem_id="layers-off")
                    ablate_button = gr.Button("Run with these layers off", elem_id="ablate")
                ablation_verdict = gr.Markdown(elem_id="ablation-verdict")
                ablation = gr.Dataframe(interactive=False, elem_id="ablation")
            with gr.Tab("Grad-CAM") as gradcam_tab:
                gr.Markdown("Grad-CAM of the top class at the last conv layer: where the *class evidence* is, "
                            "beside where positions *look*.")
                cam = gr.Image(label="Grad-CAM of the top class at the last conv layer", interactive=False, format="jpeg",
                               elem_id="gradcam", height=420)
            with gr.Tab("Export") as export_tab:
                export_button = gr.Button("Export the current view", elem_id="export-button")
                with gr.Row():
                    export_file = gr.File(label="zip: figure.png, maps as .npy, result.json", elem_id="export")
                    export_png = gr.Image(label="figure.png", interactive=False, elem_id="export-figure")
            with gr.Tab("Dataset") as dataset_tab:
                study_md, study_images = study_view(study, checkpoint)
                gr.Markdown(study_md, elem_id="study")
                for name, label in (("interventions.png", "Top-1 change per intervention, 95% CI"),
                                    ("sink_heatmaps.png", "Where each image's sink is"),
                                    ("cosine_distance.png", "Do positions differ? (GCNet's cosine distance)"),
                                    ("distributions.png", "Per-image distributions"),
                                    ("faithfulness.png", "Faithfulness: deleting a query's top keys, against baselines")):
                    if name in study_images:
                        gr.Image(study_images[name], label=label, interactive=False, elem_id=f"study-{name[:-4]}")
        ui = UI(state=state, point=point, open_tab=open_tab, hover=hover, labels=labels, gammas_md=gammas_md, gammas_plot=gammas_plot,
                seen=seen, status=status, panels=panels, readouts=readouts, maps=[*contrib, *mean_maps, cam],
                contribution_md=contribution_md, dependence_md=dependence_md, ablation=ablation, ablation_verdict=ablation_verdict,
                export_file=export_file, export_png=export_png)
        demo.ui = ui  # for tests: handlers are called with it, no server needed

        # Each event's outputs are the keys its handler returns (blank, mark_pending, point_outputs, ...)
        image.change(bind(mark_pending, ui), None, list(mark_pending(ui)), queue=False, api_name="mark_pending").then(
            bind(on_image, ui, model, meta, hover_dtype=hover_dtype), image, list(blank(ui)), api_name="upload").then(
            lambda state, tab, *controls: on_tab(ui, tab, state, *controls), [state, open_tab, opacity, colormap, mode],
            tab_outputs(ui), api_name="open_tab")  # the open tab's maps, after the page has the image's
        for tab, name in ((contribution_tab, "contribution"), (dependence_tab, "dependence"), (gradcam_tab, "gradcam"),
                          (ablation_tab, "ablation"), (export_tab, "export"), (dataset_tab, "dataset")):
            tab.select(bind(on_tab, ui, name), [state, opacity, colormap, mode], tab_outputs(ui), api_name=False)
        page_draws = gr.Checkbox(False, visible=False, elem_id="page-draws")  # set by PIN_JS at each click

        def click(state, opacity, colormap, mode, mark, scale, drawn, evt: gr.SelectData):  # Gradio finds evt by
            return on_click(ui, state, opacity, colormap, mode, mark, evt, scale, bool(drawn))  # annotation (not in a partial)

        # no loading overlay on the panels: the page has drawn the pin already (show_progress hidden)
        image.select(click, [state, opacity, colormap, mode, mark, scale, page_draws], point_outputs(ui), js=PIN_JS,
                     api_name="click", show_progress="hidden")
        controls = [state, point, opacity, colormap, mode, mark, scale, open_tab]
        for control in (opacity, colormap, mode):
            control.change(bind(on_controls, ui), controls, [*panels, *ui.maps, contribution_md, dependence_md],
                           api_name=f"rerender_{control.elem_id}", show_progress="hidden")
        mark.change(bind(on_mark, ui), controls[:-1], panels, api_name="rerender_number", show_progress="hidden")
        scale.change(bind(on_mark, ui), controls[:-1], panels, api_name="rerender_scale", show_progress="hidden")
        for control in (opacity, colormap, mode, mark, scale):  # the hover view redraws in the page
            control.change(None, [opacity, colormap, mode, mark, scale], None, js=CONTROLS_JS, queue=False,
                           api_name=False)
        ablate_button.click(bind(on_ablate, ui, model), [state, layers_off], [ui.ablation, ui.ablation_verdict],
                            api_name="ablate")
        export_button.click(bind(on_export, ui, model), [state, point, opacity, colormap, mode],
                            [ui.export_file, ui.export_png], api_name="export")

        with gr.Row(visible=False):  # the click, for gradio_client: /upload, then /pin in the same session
            pin_x, pin_y = gr.Number(label="x"), gr.Number(label="y")
            pin_button = gr.Button()
        pin_button.click(bind(on_point, ui), [state, pin_x, pin_y, opacity, colormap, mode, mark, scale],
                         point_outputs(ui), api_name="pin")
        with gr.Row(visible=False):  # stateless endpoints for gradio_client and scripts
            api_image = UploadedImage(type="filepath")
            api_x, api_y = gr.Number(label="x"), gr.Number(label="y")
            api_labels, api_gammas = gr.Label(), gr.JSON()
            api_panels = [gr.Image() for _ in range(NUM_PANELS)]
            api_info = gr.JSON()
            analyze_button, attention_button = gr.Button(), gr.Button()
        analyze_button.click(bind(api_analyze, model, meta), api_image, [api_labels, api_gammas], api_name="analyze")
        attention_button.click(bind(api_attention_at, model, meta), [api_image, api_x, api_y],
                               [*api_panels, api_info], api_name="attention_at")
    return demo




def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="vggattn: click a pixel, see its attention in every layer.")
    add_checkpoint_argument(p, "checkpoint to show (also shipped: checkpoints/vgg16att-imagenette-w025-128"
                               ".safetensors, 85.7%%, 128 px, 1/19 of the FLOPs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present, else CPU")
    # Hosts such as Hugging Face Spaces say where to listen through Gradio's variables (or PORT)
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to bind (default: $GRADIO_SERVER_NAME, else 127.0.0.1 = this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or 7860),
                   help="port to serve on (default: $GRADIO_SERVER_PORT, else $PORT, else 7860)")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    p.add_argument("--session-ttl", type=int, default=3600,
                   help="seconds a session's analysis is kept after it was made (default: an hour)")
    p.add_argument("--hover-dtype", default="float32", choices=["float32", "float16"],
                   help="how Q and K travel to the page for the maps under the pointer (float16: half the bytes, "
                        "rows differ by the error in bench/README.md)")
    p.add_argument("--concurrency", type=int, default=2, help="events of one kind that run at once (default 2)")
    p.add_argument("--threads", type=int, default=0,
                   help="PyTorch threads per forward (default: the cores divided by --concurrency, at least 1, so "
                        "concurrent uploads do not oversubscribe the cores; bench/README.md, load run)")
    add_model_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.threads or max(1, cores // max(1, args.concurrency)))
    own = wants_own_model(args)
    if not own:
        args.checkpoint = args.checkpoint or str(vggattn.DEFAULT_CHECKPOINT)
    try:
        if own:  # any CNN with non-local blocks (vggattn.app_any)
            model, meta = load_from_args(args)
            model.to(resolve_device(args.device))
        else:
            model, meta = vggattn.load_checkpoint(args.checkpoint, device=args.device)
    except (vggattn.CheckpointError, OSError, ValueError) as e:
        print(f"error: cannot load {'the model' if own else 'checkpoint'}: {e}", file=sys.stderr)
        return BAD_INPUT
    log.info("loaded %s on %s (%d PyTorch threads a forward)", meta.get("source", args.checkpoint),
             next(model.parameters()).device, torch.get_num_threads())
    if own:
        from .app_any import build_any_demo

        weights = None if args.timm else args.checkpoint
        demo = build_any_demo(model, meta, args.layers, load_study(weights) if weights else None,
                              hover_dtype=args.hover_dtype, session_ttl=args.session_ttl)
    else:
        demo = build_demo(model, meta, load_study(args.checkpoint), args.checkpoint, hover_dtype=args.hover_dtype,
                          session_ttl=args.session_ttl)
    launch(demo, args.host, args.port, args.share, concurrency=args.concurrency)
    return 0


def __getattr__(name: str):
    """`from app import demo` builds the demo on the shipped checkpoint (lazily, once)."""
    if name == "demo":
        model, meta = vggattn.load_checkpoint()
        checkpoint = str(vggattn.DEFAULT_CHECKPOINT)
        globals()["demo"] = build_demo(model, meta, load_study(checkpoint), checkpoint)
        return globals()["demo"]
    raise AttributeError(name)


if __name__ == "__main__":
    raise SystemExit(main())
