"""What a web page needs to compute any attention row or column itself, sent once per image.

    payload = hover_payload(result)            # JSON-ready dict: per layer Q, K, log Z (base64)
    row = decode(payload["layers"][0], "q")    # (N, C') float32, as the page decodes it

A row is softmax(q_i . K) and a column is A[:, j] = exp(Q k_j - log Z) with the row normalisers
log Z (N,) computed here once, so the page answers every pointer move with O(N C') arithmetic and
no request. The app's script (vggattn/web/hover.js) reads this format and draws with
`vggattn.render`'s rules and constants (`page_props`); the server's rows and pictures
(`LayerCapture.rows`, `render_attention`) are the reference it is tested against.
"""

from __future__ import annotations

import base64
import json

import numpy as np

from .render import page_constants
from .readouts import SINK_DOMINATED

DTYPES = {"float32": "<f4", "float16": "<f2"}


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=DTYPES[dtype]).tobytes()).decode("ascii")


def hover_payload(result, dtype: str = "float32") -> dict:
    """Per layer: name, grid, γ, Q and K (N, C') and log Z (N,) as base64 little-endian arrays of `dtype`
    (log Z always float32) and the image's sink (flat index, share of all attention); and the image: its
    original size and the display copy as the JPEG data URL the server draws on too.
    result: a `vggattn.analysis.Analysis` (batch of one)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    layers = []
    for layer, sink in zip(result.layers, result.sinks()):
        q, k = layer.query[0].float(), layer.key[0].float()  # (N, C')
        layers.append({"name": layer.name, "grid": list(layer.grid), "dim": int(q.shape[1]), "gamma": layer.gamma,
                       "q": _b64(q.numpy(), dtype), "k": _b64(k.numpy(), dtype),
                       "logz": _b64(layer.log_normalisers[0].numpy(), "float32"), "sink": [sink[0], sink[1]]})
    disp_h, disp_w = result.display.shape[:2]
    return {"version": 2, "dtype": dtype, "size": list(result.size), "display_size": [disp_w, disp_h],
            "image": "data:image/jpeg;base64," + base64.b64encode(result.display_jpeg).decode("ascii"), "layers": layers}


def decode(layer: dict, name: str, dtype: str = "float32") -> np.ndarray:
    """One array of a payload layer back as float32: "q"/"k" -> (N, C'), "logz" -> (N,)."""
    raw = np.frombuffer(base64.b64decode(layer[name]), dtype=DTYPES["float32" if name == "logz" else dtype])
    n = layer["grid"][0] * layer["grid"][1]
    return raw.astype(np.float32).reshape(n, -1) if name != "logz" else raw.astype(np.float32)


def payload_bytes(payload: dict) -> int:
    """Size of the payload as JSON, in bytes (what one upload sends the page)."""
    return len(json.dumps(payload).encode())


def page_props(num_panels: int, controls: dict) -> dict:
    """Everything the page's script is told once, at load: the rendering constants and palettes
    (`vggattn.render.page_constants`), the panel count, the sink rule and the controls' initial values."""
    return {**page_constants(), "num_panels": num_panels, "sink_dominated": SINK_DOMINATED, "controls": dict(controls)}
