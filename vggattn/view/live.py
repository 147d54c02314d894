"""The live view as one self-contained HTML file: the picture, each layer's queries and keys (or rows), and the
page's own script (`web/hover.js`) inline. Opened from disk in a browser, with no server and no network, it follows
the pointer and pins clicks as the app does, with the same pixels.

    html = live_html(result, pages(result), title="church.jpg", pin=(120, 80))
    Path("view.html").write_text(html)

Arrays go as float32 (the app's pixels exactly) while that stays within 8 MB, else as float16, which halves the file;
`row_error` says the largest change float16 makes in any weight of a row.
"""

from __future__ import annotations

import copy
import html as _html
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .hover import CONTROLS, WEB, PageLayer, page_payload, page_props
from .render import page_constants

FIELDS = ("q", "k", "rows_", "values_", "prefix", "prefix_rows")  # a PageLayer's arrays that go at the file's dtype
AUTO_FLOAT32 = 8 << 20  # bytes: a file's arrays go as float32 up to this, else float16
QUERIES = 64  # queries per layer compared by `row_error` (evenly spaced, the prefix tokens' rows too)

PAGE_CSS = """
:root { --text-sm: 13px; --body-text-color-subdued: #555; font: 14px/1.4 system-ui, sans-serif; color: #222; }
body { margin: 16px; }
h1 { font-size: 18px; margin: 0 0 4px; } .about { color: #555; margin: 0 0 10px; }
.controls { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 8px 0; font-size: 13px; }
.controls label { display: inline-flex; gap: 6px; align-items: center; }
.view { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
#input-image { flex: none; max-width: 100%; }
#input-image img { display: block; height: 340px; width: auto; max-width: 100%; object-fit: contain; cursor: crosshair; }
.panel { position: relative; flex: 1 1 300px; max-width: 520px; height: 340px; border: 1px solid #ccc;
         border-radius: 4px; background: #f4f4f4; overflow: hidden; }
.panel .label { position: absolute; left: 6px; top: 4px; z-index: 4; font-size: 12px; background: rgba(255,255,255,.85);
                padding: 1px 6px; border-radius: 3px; }
.predictions { margin: 6px 0 0; padding-left: 20px; font-size: 13px; }
"""


def about_model(meta: dict, checkpoint: str | None = None) -> str:
    """One line on the model for the file's header: what it is, its weights, its accuracy where its meta has it."""
    c, t = meta.get("config"), meta.get("training") or {}
    name = meta.get("source") or (f"attention-VGG16 (width x{c['width']:g})" if c and "width" in c else "a model")
    weights = f", weights {Path(str(checkpoint or meta.get('weights'))).name}" if checkpoint or meta.get("weights") else ""
    acc = f", val top-1 {t['val_top1']:.1%}" if isinstance(t, dict) and "val_top1" in t else ""
    return f"{name}{weights}{acc}"


def script_json(value) -> str:
    """JSON that can sit inside a <script> element (no "</" to end it early)."""
    return json.dumps(value).replace("</", "<\\/")


def _at(layer: PageLayer, dtype: str) -> PageLayer:
    """A copy of the layer with its arrays as the page decodes them from `dtype`."""
    out = copy.copy(layer)
    for name in FIELDS:
        value = getattr(layer, name, None)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            setattr(out, name, value.astype(dtype).astype(value.dtype))
    return out


def row_error(layers: list[PageLayer], dtype: str = "float16", queries: int = QUERIES) -> float:
    """The largest absolute difference, over every layer, head-mean row of up to `queries` evenly spaced queries (the
    prefix tokens' rows too) and weight in it, between the rows the page computes from `dtype` and from float32."""
    worst = 0.0
    for layer in layers:
        if layer.kind == "map":
            picks = [0]
        else:
            picks = sorted(set(np.linspace(0, layer.n - 1, min(queries, layer.n)).round().astype(int).tolist()))
            picks += list(range(layer.n, layer.n + layer.tokens))
        low = _at(layer, dtype)
        for i in picks:
            if layer.tokens:
                a, b = layer.full_row(i), low.full_row(i)
            else:
                a, b = layer.row(None if layer.kind == "map" else i), low.row(None if layer.kind == "map" else i)
            worst = max(worst, float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()))
    return worst


def live_html(result, layers: list[PageLayer], *, title: str, about: str = "", dtype: str = "auto",
              controls: dict | None = None, pin: tuple[float, float] | None = None) -> str:
    """The whole file. result: the `vggattn.analysis.Analysis` of one image; layers: its blocks as the page has
    them (`BlockResult.page`); about: one line under the title (the model, where it came from); dtype: of the
    arrays, "auto" float32 (the app's pixels exactly) while that stays within AUTO_FLOAT32 bytes, else float16
    (`row_error`); pin: a point in image pixels drawn when the file opens (None: the image's centre)."""
    payload = page_payload(result, layers, "float32" if dtype == "auto" else dtype, fetch=None)  # all: no server
    if dtype == "auto" and len(json.dumps(payload)) > AUTO_FLOAT32:
        payload = page_payload(result, layers, "float16", fetch=None)
    props = page_props(len(layers), {**CONTROLS, "head": "mean", **(controls or {})}) | {"standalone": True}
    w, h = result.size
    dw, dh = payload["display_size"]
    pin = pin if pin is not None else (w // 2, h // 2)
    heads = max((layer.heads for layer in layers), default=1)
    top = result.top_k(5)
    esc = _html.escape
    options = lambda values, chosen: "".join(  # noqa: E731
        f'<option value="{esc(str(v))}"{" selected" if str(v) == str(chosen) else ""}>{esc(str(label))}</option>'
        for v, label in values)
    c = props["controls"]
    panels = "".join(
        f'<div class="panel" id="panel-{i}"><div class="label">{esc(layer.name)} · {layer.grid[0]}×{layer.grid[1]}'
        f'{" · " + str(layer.heads) + " heads" if layer.heads > 1 else ""}</div></div>' for i, layer in enumerate(layers))
    predictions = "" if not top else '<ol class="predictions">' + "".join(
        f"<li>{esc(name)}: {p:.1%}</li>" for name, p in top.items()) + "</ol>"
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}: vggattn live view</title>
<style>{PAGE_CSS}{(WEB / "hover.css").read_text()}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="about">{esc(about)}{" · " if about else ""}a {w}×{h} image, {len(layers)} attention layers; saved by vggattn
on {made}. Everything is in this file: it needs no server and no network. Move the pointer over the picture; click to
pin a point.</p>
{predictions}
<div class="controls">
<label{"" if heads > 1 else ' style="display: none"'}>head <select id="head">{options([("mean", "mean of heads")] + [(i, f"head {i + 1}") for i in range(heads)], "mean")}</select></label>
<label>colormap <select id="colormap">{options([(n, n) for n in page_constants()["palettes"]], c["colormap"])}</select></label>
<label>scale <select id="scale">{options([("linear", "linear"), ("log", "log")], c["scale"])}</select></label>
<label>opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="{c["opacity"]}"></label>
</div>
<div id="hover">{(WEB / "hover.html").read_text()}</div>
<div class="view">
<div id="input-image"><img alt="the image" width="{dw}" height="{dh}" data-size="{w}x{h}" src="{payload["image"]}"></div>
{panels}
</div>
<script>
(function () {{
const props = {script_json(props | {"value": payload})};
const element = document.getElementById("hover");
{(WEB / "hover.js").read_text()}
const live = window.vggattnHover, first = {script_json(list(pin))};
const wait = setInterval(() => {{ if (live.ready()) {{ clearInterval(wait); live.pin(first[0], first[1]); }} }}, 20);
const set = () => live.setControls({{head: document.getElementById("head").value,
  colormap: document.getElementById("colormap").value, scale: document.getElementById("scale").value,
  opacity: Number(document.getElementById("opacity").value)}});
for (const id of ["head", "colormap", "scale", "opacity"]) document.getElementById(id).addEventListener("input", set);
}})();
</script>
</body></html>
"""
