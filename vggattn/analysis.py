"""One image through the model, kept for cheap per-click rendering.

    result = analyze(model, meta, pil_image)        # one forward, with AttentionCapture
    result.top_k(5)                                 # {"church": 0.93, ...}
    panels = render_attention(result, (x, y))       # three overlays, no model run

`Analysis` holds only a display-sized copy of the image, the probabilities and each layer's Q and K
(linear in N), so an app can keep one per session and answer clicks without running the model again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .capture import AttentionCapture, LayerCapture
from .data import cell_box, preprocess, query_index, to_rgb
from .render import mark_query, overlay, upsample_map

DISPLAY_MAX_SIDE = 768  # overlays are drawn on a copy of the image at most this large


@dataclass
class Panel:
    """One layer's rendered attention for one clicked pixel."""

    layer: str
    grid: tuple[int, int]
    gamma: float
    query_index: int
    image: np.ndarray  # (H, W, 3) uint8 overlay
    attention_row: np.ndarray  # (h, w) float32 weights of the query, sums to 1

    @property
    def title(self) -> str:
        h, w = self.grid
        return f"{self.layer} · {h}×{w} grid · γ = {self.gamma:+.4f} · query {self.query_index}"


def display_copy(image: Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """(h, w, 3) uint8 copy of an RGB image, downscaled so its longest side is at most max_side."""
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


@dataclass
class Analysis:
    size: tuple[int, int]  # (width, height) of the original image (EXIF orientation applied)
    display: np.ndarray  # (h, w, 3) uint8 copy for drawing, longest side <= DISPLAY_MAX_SIDE
    probs: torch.Tensor  # (num_classes,)
    layers: list[LayerCapture]  # batch of one, tensors on the CPU
    class_names: list[str]
    input_size: int
    model_view: np.ndarray  # (S, S, 3) uint8: the input as the model saw it (normalisation undone)

    def top_k(self, k: int = 5) -> dict[str, float]:
        p, i = self.probs.topk(min(k, len(self.probs)))
        return {self.class_names[j]: float(v) for v, j in zip(p.tolist(), i.tolist())}

    def gammas(self) -> dict[str, float]:
        return {layer.name: layer.gamma for layer in self.layers}

    def query_indices(self, xy: tuple[float, float]) -> dict[str, int]:
        return {layer.name: query_index(xy, self.size, layer.grid) for layer in self.layers}


@torch.no_grad()
def analyze(model: nn.Module, meta: dict, image: Image.Image) -> Analysis:
    """Run the model once on the whole image and keep what clicks need."""
    image = to_rgb(image)
    device = next(model.parameters()).device
    x = preprocess(image, meta).to(device)  # (1, 3, S, S)
    with AttentionCapture(model) as cap:
        logits = model(x)  # (1, num_classes)
    layers = [LayerCapture(l.name, l.gamma, l.grid, l.query.cpu(), l.key.cpu(), l.contribution.cpu()) for l in cap.layers]
    probs = torch.softmax(logits.float(), dim=-1)[0].cpu()
    return Analysis(image.size, display_copy(image), probs, layers, list(meta["class_names"]), int(meta["input_size"]),
                    model_view(x, meta))


def render_attention(result: Analysis, xy: tuple[float, float], opacity: float = 0.5, colormap: str = "jet",
                     mode: str = "smooth") -> list[Panel]:
    """Each layer's attention row for original-image pixel `xy`, overlaid on the display image."""
    w, h = result.size
    x, y = xy
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"pixel ({x}, {y}) is outside the {w}x{h} image")
    disp_h, disp_w = result.display.shape[:2]
    sx, sy = disp_w / w, disp_h / h
    panels = []
    for layer in result.layers:
        q = query_index(xy, result.size, layer.grid)
        row = layer.row(q)[0].reshape(layer.grid).numpy()  # (gh, gw)
        heat = upsample_map(row, (disp_w, disp_h), mode=mode)
        x0, y0, x1, y1 = cell_box(q, result.size, layer.grid)
        rgb = mark_query(overlay(result.display, heat, colormap, opacity), ((x + 0.5) * sx, (y + 0.5) * sy),
                         (x0 * sx, y0 * sy, x1 * sx, y1 * sy))
        panels.append(Panel(layer.name, layer.grid, layer.gamma, q, rgb, row))
    return panels


def model_view(x: torch.Tensor, meta: dict) -> np.ndarray:
    """Undo normalisation of a (1, 3, S, S) input -> (S, S, 3) uint8: the image as the model sees it."""
    mean = torch.tensor(meta["mean"]).view(3, 1, 1)
    std = torch.tensor(meta["std"]).view(3, 1, 1)
    img = (x[0].cpu().float() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
