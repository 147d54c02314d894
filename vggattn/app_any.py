"""The app for any CNN with non-local attention: as many panels as the model has blocks, a head selector.

    vggattn-app --timm botnet26t_256                        # timm's model (random weights where offline)
    vggattn-app --model vggattn.zoo:nonlocal_resnet --checkpoint checkpoints/nonlocal-resnet-imagenette-128.safetensors
    vggattn.launch(model, transform=my_transform, class_names=names)    # from Python

The blocks are found by family (`vggattn.adapters`); the model runs once per upload (`vggattn.byo.analyze_any`),
and the page gets each block's queries and keys, or its rows where that is smaller or the logits have
relative-position terms (`vggattn.hover.page_layer`), and draws the maps under the pointer itself with the
same script as the article's app (vggattn/web/hover.js). A click pins a point; the server's pictures are the
page's maths in numpy (`PageLayer.picture`). A model whose output is not one logit per class (a GAN
discriminator) shows its score instead of a top-5.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .adapters import MODES, Intervention, TracedAdapter, find_blocks
from .ui import (CONTROLS, EXAMPLES, PENDING, PIN_JS, STATE_SESSIONS, UploadedImage, clamped_point, click_problem,
                 hover_view, load_upload, pinned_point, refused_point, release_memory, unchanged, view_controls)
from .byo import AnyAnalysis, analyze_any, blocks_of
from .checkpoint import IMAGENET_MEAN, IMAGENET_STD
from .hover import PageLayer, any_payload, page_layer
from .render import TOP_K, top_indices

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ANY_CONTROLS = {**CONTROLS, "head": "mean"}
CONTROLS_JS = ("(opacity, colormap, mode, mark, scale, head) => { if (window.vggattnHover) "
               "window.vggattnHover.setControls({opacity, colormap, mode, mark, scale, head}); }")
PER_ROW = 3  # panels a row beside the picture
STRIP_HEIGHT = 600  # px: more than two rows of panels scroll in a strip of this height (1440x900 screen)
CSS = f"#panel-strip {{ max-height: {STRIP_HEIGHT}px; overflow-y: auto; flex-wrap: nowrap !important; }}"
INTERVENTIONS = {"off": "off (the block passes its input on)", "mean": "mean row (every query the image's mean row)",
                 "uniform": "uniform rows (average pooling of the values)"}


@dataclass
class AnyState:
    """One session's image: the analysis and each block as the page has it."""

    result: AnyAnalysis
    layers: list[PageLayer]

    @property
    def size(self) -> tuple[int, int]:
        return self.result.size


@dataclass
class AnyUI:
    state: gr.State
    point: gr.State
    hover: gr.HTML
    labels: gr.Label
    score: gr.Markdown
    status: gr.Markdown
    panels: list
    readouts: gr.Markdown
    ablation: gr.Dataframe
    ablation_verdict: gr.Markdown


def panel_height(n: int) -> int:
    """Panels beside the picture: one row of up to three as tall as the picture, else rows of 240 px."""
    return 340 if n <= PER_ROW else 240


def head_choice(head) -> int | None:
    """The head selector's value ("mean" or "0", "1", ...) -> None (mean of heads) or a head index."""
    if head in (None, "", "mean"):
        return None
    try:
        return max(0, int(head))
    except (TypeError, ValueError):
        return None


def blank(ui: AnyUI) -> dict:
    return {ui.state: None, ui.point: None, ui.hover: None, ui.labels: None, ui.score: "",
            ui.status: "Upload an image to begin.", **panel_updates(ui), ui.readouts: "", ui.ablation: None,
            ui.ablation_verdict: ""}


def panel_updates(ui: AnyUI, pictures=None) -> dict:
    """The panels' pictures as plain values (labels are fixed; the numbers are in the readouts); None clears them."""
    if pictures is None:
        return {c: None for c in ui.panels}
    return dict(zip(ui.panels, pictures))


def mark_pending(ui: AnyUI) -> dict:
    return {ui.state: PENDING, ui.point: None, ui.hover: None}


def prediction_outputs(ui: AnyUI, result: AnyAnalysis) -> dict:
    top = result.top_k(5)
    if top is not None:
        return {ui.labels: gr.update(value=top, visible=True), ui.score: gr.update(value="", visible=False)}
    values = result.score()
    shown = ", ".join(f"{v:+.4f}" for v in values[:8]) + (" …" if result.output.numel() > 8 else "")
    what = ("the model's score" if result.output.numel() == 1 else
            f"the model's {result.output.numel()} outputs (no class names for them)")
    return {ui.labels: gr.update(value=None, visible=False),
            ui.score: gr.update(value=f"**Output**: {what}: {shown}", visible=True)}


def on_image(ui: AnyUI, model: nn.Module, meta: dict, layers: list[str] | None, path, hover_dtype="float32") -> dict:
    if not path:
        return blank(ui)
    try:
        result = analyze_any(model, meta, load_upload(path), layers)
        pages = [page_layer(b.name, b.maps, b.family) for b in result.blocks]
        w, h = result.size
        status = (f"Analysed a {w}×{h} image. **Move the pointer over it** to see where each position attends in "
                  f"each of the {len(pages)} attention blocks; **click** to pin a point and read its numbers.")
        return blank(ui) | {ui.state: AnyState(result, pages), ui.hover: any_payload(result, pages, hover_dtype),
                            ui.status: status, **prediction_outputs(ui, result)}
    finally:
        release_memory()


def render_point(state: AnyState, xy, opacity, colormap, mode, mark, scale, head, pictures: bool = True
                 ) -> tuple[list, list[str], str]:
    """Every block's picture for pixel xy (what the page draws for it; pictures False: the values only), titles
    and the readouts table."""
    style = dict(scale=scale, mode=mode, colormap=colormap, opacity=opacity, top_k=TOP_K if mark else 0)
    drawn, titles, lines = [], [], []
    h = head_choice(head)
    for layer in state.layers:
        rgb, cell, values = layer.picture(state.result.display, state.size, xy, h, draw=pictures, **style)
        drawn.append(rgb)
        kw = layer.key_grid[1]
        top = top_indices(values, TOP_K)
        peak = float(values.reshape(-1)[top[0]])
        shown = f"{peak:.2f}" if abs(peak) >= 0.01 else f"{peak:.1e}"
        heads = layer.head_label(h)
        titles.append(f"{layer.name} · max {shown} at ({top[0] // kw}, {top[0] % kw})")
        flat = values.reshape(-1)
        if layer.normalise == "softmax":
            p = np.clip(flat, 1e-300, None)
            ent = float(-(flat * np.log(p)).sum())
            spread = f"{ent:.2f} nats ({ent / math.log(layer.m):.0%} of uniform)"
        else:
            spread = "— (not a distribution: " + ("f/M)" if layer.normalise == "mean" else "see the Blocks tab)")
        pad = None if layer.kind == "map" else layer.padding_share(cell, h)
        if pad is not None:
            spread += f"; {pad:.0%} of the row on padding"
        cells = ", ".join(f"({j // kw},{j % kw}) {flat[j]:.3f}" for j in top)
        gw = layer.grid[1]
        where = "one map per image" if layer.kind == "map" else f"({cell // gw}, {cell % gw}) of {layer.grid[0]}×{gw}"
        sink = (f"{layer.sink[1]:.0%} at ({layer.sink[0] // kw}, {layer.sink[0] % kw})" + (" ⚠" if layer.sink[1] >= 0.5 else "")
                if layer.sink else "—")
        lines.append(f"| {layer.name} | {layer.family} | {where} | {layer.key_grid[0]}×{kw} | {heads or '1 head'} | "
                     f"{spread} | {cells} | {sink} |")
    table = ("| block | family | query cell | key grid | heads | entropy | top cells (row, col) weight | "
             "image's sink |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(lines))
    return drawn, titles, table


def point_outputs(ui: AnyUI) -> list:
    return [ui.point, ui.status, *ui.panels, ui.readouts]


def on_point(ui: AnyUI, state, x, y, opacity=CONTROLS["opacity"], colormap=CONTROLS["colormap"], mode=CONTROLS["mode"],
             mark=CONTROLS["mark"], scale=CONTROLS["scale"], head="mean", pictures: bool = True) -> dict:
    """Pin pixel (x, y): every block's picture (the page's maths in numpy) and the readout table (no model run).
    pictures False: the page's script has drawn this pin itself (PIN_JS says so), so only the readouts travel and
    the panels are cleared under the page's canvases."""
    refused = refused_point(ui, state, point_outputs(ui))
    if refused:
        return refused
    x, y = clamped_point(state, x, y)
    drawn, titles, table = render_point(state, (x, y), opacity, colormap, mode, mark, scale, head, pictures)
    status = f"Pinned: pixel ({x}, {y}); its numbers per block are below."
    return {ui.point: (x, y), ui.status: status, **panel_updates(ui, drawn if pictures else None), ui.readouts: table}


def on_controls(ui: AnyUI, state, point, opacity, colormap, mode, mark, scale, head) -> dict:
    point = pinned_point(state, point)
    if point is None:
        return unchanged(ui.panels)
    pictures, _, _ = render_point(state, point, opacity, colormap, mode, mark, scale, head)
    return panel_updates(ui, pictures)


def on_ablate(ui: AnyUI, model: nn.Module, state, layers, mode) -> dict:
    problem = click_problem(state) or (None if layers else "Tick at least one block.")
    if problem:
        gr.Warning(problem)
        return {ui.ablation: gr.update(), ui.ablation_verdict: problem}
    mode = mode if mode in MODES else "off"
    result = state.result
    device = next(model.parameters()).device
    with torch.no_grad(), Intervention(model, {name: mode for name in layers}):
        out = model(result.input.to(device))
    out = (out[0] if isinstance(out, (tuple, list)) else out).detach().float().cpu().reshape(-1)
    before = result.output.float().reshape(-1)
    label = f"{', '.join(layers)}: {mode}"
    if result.top_k(1) is not None:
        p0, p1 = torch.softmax(before, 0), torch.softmax(out, 0)
        order = p0.topk(min(5, len(p0))).indices.tolist()
        df = pd.DataFrame({"class": [result.class_names[i] for i in order],
                           "as computed": [round(float(p0[i]), 4) for i in order],
                           label: [round(float(p1[i]), 4) for i in order],
                           "change": [round(float(p1[i] - p0[i]), 4) for i in order]})
        a, b = int(p0.argmax()), int(p1.argmax())
        verdict = (f"Top-1 stays **{result.class_names[a]}** ({p0[a]:.1%} → {p1[a]:.1%})." if a == b else
                   f"Top-1 changes: **{result.class_names[a]}** → **{result.class_names[b]}**.")
    else:
        n = min(8, len(before))
        df = pd.DataFrame({"output": list(range(n)), "as computed": [round(float(v), 4) for v in before[:n]],
                           label: [round(float(v), 4) for v in out[:n]],
                           "change": [round(float(out[i] - before[i]), 4) for i in range(n)]})
        verdict = f"Score {float(before[0]):+.4f} → {float(out[0]):+.4f}."
    return {ui.ablation: df, ui.ablation_verdict: verdict}


def blocks_markdown(model: nn.Module, layers: list[str] | None) -> str:
    rows = [f"| `{name}` | {adapter.family} | {adapter.residual} | {adapter.off_means} |"
            for name, _, adapter in find_blocks(model, layers)]
    return ("| block | family | how its output enters | \"off\" means |\n|---|---|---|---|\n" + "\n".join(rows))


def short_family(adapter) -> str:
    """A block's family in a few words (a traced block: its class and library; the Blocks tab says more)."""
    return adapter.family.split(", found by")[0]


def traced_note(blocks: list) -> str:
    traced = sum(isinstance(a, TracedAdapter) for *_, a in blocks)
    if not traced:
        return ""
    return f" ({'all' if traced == len(blocks) else traced} found by what {'it computes' if traced == 1 else 'they compute'})"


def describe(model: nn.Module, meta: dict, blocks: list) -> str:
    device = next(model.parameters()).device
    where = f"GPU ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "CPU"
    names = meta.get("class_names")
    classes = f"{len(names)} classes" if names else "no class names (its output is shown as a score)"
    warning = f"\n\n**{meta['warning']}**" if meta.get("warning") else ""
    weights = f"{Path(str(meta['weights'])).name} weights, " if meta.get("weights") else ""
    return (f"# vggattn · where does self-attention look?\n"
            f"`{meta.get('source', type(model).__name__)}` ({weights}{classes}, "
            f"{meta['input_size']} px input) running on **{where}**, with {len(blocks)} attention "
            f"block{'s' if len(blocks) != 1 else ''}: " + ", ".join(f"`{n}` ({short_family(a)})" for n, _, a in blocks) +
            traced_note(blocks) + ". Upload an image, then move the pointer over it: each panel shows where the position under it attends "
            "in one block (computed in your browser); click to pin a point." + warning)


def build_any_demo(model: nn.Module, meta: dict, layers: list[str] | None = None, study: dict | None = None,
                   hover_dtype: str = "float32", session_ttl: int = 3600) -> gr.Blocks:
    """The app for a model of any family (`vggattn.adapters`); meta as `vggattn.byo.describe` makes it."""
    model.eval()
    blocks = blocks_of(model, meta, layers)
    n = len(blocks)
    with torch.no_grad():  # the heads per block, from one forward of a blank image
        from PIL import Image

        probe = analyze_any(model, meta, Image.new("RGB", (meta["input_size"],) * 2, (128, 128, 128)), layers)
    max_heads = max(b.maps.heads for b in probe.blocks)
    bind = functools.partial
    with gr.Blocks(title="vggattn") as demo:
        gr.Markdown(describe(model, meta, blocks), elem_id="about")
        state = gr.State(None, time_to_live=session_ttl)
        point = gr.State(None, time_to_live=session_ttl)
        height = panel_height(n)
        with gr.Row(equal_height=False):
            image = UploadedImage(type="filepath", sources=["upload", "clipboard"], label="Your image: point at or click any pixel",
                                  elem_id="input-image", height=340, scale=1, min_width=240)
            with gr.Column(scale=min(n, PER_ROW), elem_id="panel-strip"):
                panels = []
                for start in range(0, n, PER_ROW):
                    with gr.Row():
                        panels += [gr.Image(label=f"{blocks[i][0]}: where the point attends", interactive=False, format="jpeg", elem_id=f"panel-{i}",
                                            height=height, min_width=200) for i in range(start, min(n, start + PER_ROW))]
                        for _ in range(PER_ROW - (min(n, start + PER_ROW) - start) if n > PER_ROW else 0):
                            gr.HTML("")  # keep the last row's panels as wide as the others
        hover = hover_view(n, ANY_CONTROLS)
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
                labels = gr.Label(num_top_classes=5, label="Top-5 predictions", elem_id="predictions")
                score = gr.Markdown(elem_id="score", visible=False)
        readouts = gr.Markdown(elem_id="readouts")
        with gr.Tabs():
            with gr.Tab("Ablation"):
                gr.Markdown("Replace the chosen blocks' rows for one forward and see how the output changes.")
                with gr.Row():
                    layers_off = gr.CheckboxGroup([name for name, _, _ in blocks], label="Blocks", elem_id="layers-off")
                    how = gr.Radio([(v, k) for k, v in INTERVENTIONS.items()], value="off", label="Replace by",
                                   elem_id="intervention")
                    ablate_button = gr.Button("Run", elem_id="ablate")
                ablation_verdict = gr.Markdown(elem_id="ablation-verdict")
                ablation = gr.Dataframe(interactive=False, elem_id="ablation")
            with gr.Tab("Blocks"):
                gr.Markdown(blocks_markdown(model, layers), elem_id="blocks")
            if study is not None:
                with gr.Tab("Dataset"):
                    from .ui import study_view

                    study_md, study_images = study_view(study, None)
                    gr.Markdown(study_md, elem_id="study")
                    for name, image_array in study_images.items():
                        gr.Image(image_array, label=name[:-4].replace("_", " "), interactive=False,
                                 elem_id=f"study-{name[:-4]}")
        ui = AnyUI(state=state, point=point, hover=hover, labels=labels, score=score, status=status, panels=panels,
                   readouts=readouts, ablation=ablation, ablation_verdict=ablation_verdict)
        demo.ui = ui
        demo.vggattn_css = CSS

        image.change(bind(mark_pending, ui), None, list(mark_pending(ui)), queue=False, api_name="mark_pending").then(
            bind(on_image, ui, model, meta, layers, hover_dtype=hover_dtype), image, list(blank(ui)), api_name="upload")

        page_draws = gr.Checkbox(False, visible=False, elem_id="page-draws")  # set by PIN_JS at each click

        def click(state, opacity, colormap, mode, mark, scale, head, drawn, evt: gr.SelectData):
            return on_point(ui, state, *evt.index, opacity, colormap, mode, mark, scale, head, pictures=not drawn)

        # no loading overlay on the panels: the page has drawn the pin already (show_progress hidden)
        image.select(click, [state, opacity, colormap, mode, mark, scale, head, page_draws], point_outputs(ui),
                     js=PIN_JS, api_name="click", show_progress="hidden")
        controls = [opacity, colormap, mode, mark, scale, head]
        for control in controls:
            control.change(bind(on_controls, ui), [state, point, *controls], panels, show_progress="hidden",
                           api_name=f"rerender_{control.elem_id or 'mark'}")
            control.change(None, controls, None, js=CONTROLS_JS, queue=False, api_name=False)
        ablate_button.click(bind(on_ablate, ui, model), [state, layers_off, how], [ablation, ablation_verdict],
                            api_name="ablate")
        with gr.Row(visible=False):  # the click, for gradio_client: /upload, then /pin in the same session
            pin_x, pin_y = gr.Number(label="x"), gr.Number(label="y")
            pin_button = gr.Button()
        pin_button.click(bind(on_point, ui), [state, pin_x, pin_y, *controls], point_outputs(ui), api_name="pin")
    return demo


def model_meta(model: nn.Module, *, transform=None, class_names=None, input_size: int = 224, mean=IMAGENET_MEAN,
               std=IMAGENET_STD, source: str | None = None) -> dict:
    """The meta `build_any_demo` needs for a model in hand. transform: PIL image -> (3, H, W) tensor (default:
    resize to input_size and normalise with mean and std)."""
    from .byo import describe as describe_meta

    meta = describe_meta(source or type(model).__name__, input_size, class_names, mean, std, weights="your")
    if transform is not None:
        meta["transform"] = transform
    return meta


def launch(model: nn.Module, *, transform=None, class_names=None, input_size: int = 224, layers=None,
           host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kw):
    """Serve the app for a model in hand: `vggattn.launch(model, transform=..., class_names=...)`."""
    from .ui import launch as serve

    demo = build_any_demo(model, model_meta(model, transform=transform, class_names=class_names, input_size=input_size),
                          layers)
    return serve(demo, host, port, share, **kw)


__all__ = ["build_any_demo", "launch", "model_meta", "STATE_SESSIONS"]
