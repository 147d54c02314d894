"""Tokens that are no place on the image, live in one self-contained HTML file: the tokens as tiles (a detector's
queries with their class and score, "no object" greyed; a prompt's words), a tile chosen drawing its map in every
layer (a deformable layer: its sampling points) with its box, the pointer over any picture giving that place's
weight from each token per layer as bars. The page's script (`web/tokens.js`) draws everything from what it is
sent: per layer each token's row over the key grid (the mean over heads: T x M, never the image's N x M), or a
deformable layer's points. Two sides make an A/B page (two checkpoints, two prompts): per layer A, B, and B minus A.

    html = tokens_html(found, image, title="shapes.jpg")                  # found: vggattn.tokens.TokenMaps
    html = tokens_html(found_a, image, other=(found_b, image_b), labels=("A", "B"))
    Path("tokens.html").write_text(html)
"""

from __future__ import annotations

import base64
import html as _html
import io

import numpy as np

from .hover import WEB
from .live import script_json
from .render import FULL_AT, palette

WIDTH = 256  # px: each picture's width on the page

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; color: #222; margin: 16px; }
h1 { font-size: 18px; margin: 0 0 4px; } .about { color: #555; margin: 0 0 10px; }
#tokens-tiles { display: flex; flex-wrap: wrap; gap: 4px; margin: 8px 0; }
.tile { font: 12px system-ui, sans-serif; padding: 3px 8px; border: 1px solid #bbb; border-radius: 12px;
        background: #fff; cursor: pointer; }
.tile.empty { color: #888; border-style: dashed; } .tile.chosen { background: #f5a623; border-color: #c47d00; color: #000; }
#tokens-layers.one { display: flex; flex-wrap: wrap; gap: 0 12px; } .layer { margin: 6px 0; } .layer-name { font-size: 12px; color: #555; }
.pictures { display: flex; flex-wrap: wrap; gap: 8px; } figure { margin: 0; }
canvas { display: block; max-width: 100%; height: auto; cursor: crosshair; border: 1px solid #ccc; }
figcaption { font-size: 12px; color: #555; max-width: 256px; }
#tokens-bars { font-size: 12px; } .token-layer { display: inline-block; vertical-align: top; margin: 0 18px 8px 0; }
.fill { display: inline-block; height: 10px; background: #f5a623; }
"""


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def _label(name: str, pred: dict | None) -> str:
    if not pred:
        return name
    return f"{name} · {pred['class']} {pred['score']:.2f}" + ("" if pred["object"] else " · no object")


def _side(found, label: str) -> dict:
    """One side of the page: its tokens (name, label, box) and per layer its rows or its points."""
    tokens = [{"name": n, "label": _label(n, found.predictions.get(n)),
               **({"box": found.predictions[n]["box"], "object": found.predictions[n]["object"]}
                  if n in found.predictions else {})} for n in found.names]
    blocks = []
    for name in found.blocks:
        if name in found.rows:
            blocks.append({"name": name, "kind": "rows", "grid": list(found.key_grids[name]),
                           "data": _b64(found.rows[name].float().mean(0).numpy())})  # (T, M)
        else:
            s = found.points[name]
            heads = s.points.shape[1]
            pts = s.points[0].permute(1, 0, 2, 3).reshape(len(found.names), -1, 2)  # (T, heads x S, 2) fractions
            w = s.weights[0].permute(1, 0, 2).reshape(len(found.names), -1) / heads
            lv = s.levels.repeat(heads).float().expand(len(found.names), -1)
            blocks.append({"name": name, "kind": "points", "points": int(w.shape[1]),
                           "levels": [list(g) for g in s.level_grids],
                           "data": _b64(np.concatenate([pts.numpy(), w[..., None].numpy(), lv[..., None].numpy()], -1))})
    return {"label": label, "tokens": tokens, "blocks": blocks}


def _image_uri(image, wh: tuple[int, int]) -> str:
    buf = io.BytesIO()
    image.convert("RGB").resize(wh).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def tokens_payload(found, image, *, other=None, labels: tuple[str, str] = ("A", "B"), colormap: str = "inferno",
                   opacity: float = 0.8, first: str | None = None) -> dict:
    """What the page is sent (JSON-ready). other: (TokenMaps, image) of side B, whose layers pair with A's in order."""
    sides = [_side(found, labels[0])] + ([_side(other[0], labels[1])] if other is not None else [])
    objects = [n for n in found.names if found.predictions.get(n, {}).get("object")]
    return {"sides": sides, "input_wh": list(found.input_wh), "image": _image_uri(image, found.input_wh),
            "width": WIDTH, "palette": palette(colormap).ravel().tolist(), "opacity": opacity, "full_at": FULL_AT,
            "first": first or (objects[0] if objects else found.names[0]), "shows": found.shows}


def tokens_html(found, image, *, title: str = "", about: str = "", other=None, labels: tuple[str, str] = ("A", "B"),
                colormap: str = "inferno", opacity: float = 0.8, first: str | None = None) -> str:
    """The page, self-contained (its script, style and data inline; nothing fetched)."""
    payload = tokens_payload(found, image, other=other, labels=labels, colormap=colormap, opacity=opacity,
                             first=first)
    note = (f"{len(found.names)} tokens; {found.shows.rstrip('.')}. Choose a tile to see its "
            f"{'sampling points' if found.points else 'map'} in every layer; point at a picture (or click it to keep "
            "the place) to see each token's weight there.")
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width, "
            f"initial-scale=1'><title>{_html.escape(title or 'vggattn tokens')}</title><style>{CSS}</style></head>"
            f"<body><h1>{_html.escape(title)}</h1><p class='about'>{_html.escape(about)}</p>"
            f"<p id='tokens-note'>{_html.escape(note)}</p><div id='tokens-tiles'></div>"
            f"<div id='tokens-layers' class='{'ab' if other is not None else 'one'}'></div>"
            f"<div id='tokens-bars'></div><script type='application/json' id='tokens-data'>{script_json(payload)}"
            f"</script><script>{(WEB / 'tokens.js').read_text()}</script></body></html>")
