"""The app's "Across layers" tab: where a transformer's class token gets its output from over all its layers, three
ways side by side (`vggattn.analysis.across_layers`): attention rollout, attention flow (Abnar and Zuidema 2020) and
relevance for a class (Chefer et al. 2021), each over the image with its numbers. A CNN's blocks change grids and
have convolutions between them: the tab says these do not apply.
"""

from __future__ import annotations

import gradio as gr
import torch.nn as nn

from ..analysis import ACROSS_KINDS, across_layers
from ..view.export import map_picture

TITLES = {"rollout": "Attention rollout (the class token's row after the last block)",
          "flow": "Attention flow (max-flow from the class token; Abnar and Zuidema 2020)",
          "relevance": "Relevance for the class (gradient-weighted attention; Chefer et al. 2021)"}


def on_across(model: nn.Module, state, target, opacity: float = 0.8, colormap: str = "inferno") -> list:
    """(the note, a picture per kind) for the session's image."""
    if state is None:
        return ["Upload an image first."] + [gr.update(value=None) for _ in ACROSS_KINDS]
    try:
        got = across_layers(model, state.result, None if target in (None, -1, "-1") else int(target))
    except Exception as e:  # noqa: BLE001 (one sentence in the tab; the app keeps serving)
        return [f"These could not be computed: {e}"] + [gr.update(value=None) for _ in ACROSS_KINDS]
    if "not_offered" in got:
        return [f"Not offered for this model: {got['not_offered']}."] + [gr.update(value=None) for _ in ACROSS_KINDS]
    out = [f"The **{got['token']}** token's sources over all layers; relevance for **{got['class']}**. Each map on its "
           "own scale (brightest: its largest); the prefix tokens' own values under each."]
    for kind in ACROSS_KINDS:
        if kind not in got:  # flow past its token limit
            out.append(gr.update(value=None, label=f"{TITLES[kind]} · {got.get(f'{kind}_not_offered', 'not offered')}"))
            continue
        entry = got[kind]
        prefix = ", ".join(f"{n} {v:.3f}" for n, v in entry["prefix"].items())
        out.append(gr.update(value=map_picture(state.result, entry["map"].clip(min=0), opacity, colormap),
                             label=f"{TITLES[kind]} · max {entry['map'].max():.3g} · {prefix} · "
                                   f"{entry['seconds'] * 1000:.0f} ms"))
    return out


def across_tab(model: nn.Module, meta: dict, state: gr.State, opacity, colormap) -> gr.Tab:
    """The tab's components and events (inside a `gr.Tabs`)."""
    names = meta.get("class_names") or []
    with gr.Tab("Across layers") as tab:
        note = gr.Markdown("Upload an image, then choose a class (or the top one).", elem_id="across-note")
        with gr.Row():
            target = gr.Dropdown([("the top class", -1)] + [(c, i) for i, c in enumerate(names)], value=-1,
                                 label="Relevance for", elem_id="across-class")
            go = gr.Button("Show", elem_id="across-go")
        with gr.Row():
            pictures = [gr.Image(label=TITLES[k], interactive=False, elem_id=f"across-{k}", height=300, min_width=200)
                        for k in ACROSS_KINDS]
    run = lambda s, t, o, c: on_across(model, s, t, o, c)  # noqa: E731
    go.click(run, [state, target, opacity, colormap], [note, *pictures], api_name="across")
    tab.select(run, [state, target, opacity, colormap], [note, *pictures], api_name=False)
    return tab
