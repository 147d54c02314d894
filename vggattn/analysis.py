"""One image through the model, kept for cheap per-click rendering.

    result = analyze(model, meta, pil_image)        # one forward, with AttentionCapture
    result.top_k(5)                                 # {"church": 0.93, ...}
    panels = render_attention(result, (x, y))       # three overlays + readouts, no model run
    result.query_dependence()                       # per layer: query-averaged map and mean JSD
    ablate(model, result, ["features.22"])          # probabilities with that layer's attention off

`Analysis` holds only a display-sized copy of the image, the probabilities and each layer's Q and K
(linear in N), so an app can keep one per session and answer clicks without running the model again.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .capture import AttentionCapture, LayerCapture
from .data import eval_transform, query_index, to_rgb
from .gradcam import AttentionOff, KeepOutput, grad_cam_from, gradcam_layer
from .model import VGG16WithAttention
from .readouts import query_dependence, row_readouts
from .text import sink_note
from .render import TOP_K, attention_picture, map_levels, overlay, upsample

DISPLAY_MAX_SIDE = 512  # overlays are drawn on a copy of the image at most this large (click cost ~ its area)
DISPLAY_JPEG_QUALITY = 90


@dataclass
class Panel:
    """One layer's rendered attention for one clicked pixel."""

    layer: str
    grid: tuple[int, int]
    gamma: float
    query_index: int
    image: np.ndarray | None  # (H, W, 3) uint8 overlay; None where it was not drawn (the page drew it)
    attention_row: np.ndarray  # (h, w) float32 weights of the query, sums to 1
    readouts: dict  # entropy, mean distance, top cells of the row (vggattn.readouts.row_readouts)
    sink_note: str = ""  # one line when this layer is sink-dominated on this image (see `sink_note`)

    @property
    def title(self) -> str:
        """One line: the layer, and what the brightest colour means (the row's largest weight, where)."""
        w = self.grid[1]
        top = int(self.attention_row.argmax())
        peak = float(self.attention_row.max())
        shown = f"{peak:.2f}" if peak >= 0.01 else f"{peak:.1e}"  # as the page's colour scale writes it
        title = f"{self.layer} · max {shown} at cell ({top // w}, {top % w})"
        return f"{title} · ⚠ sink" if self.sink_note else title


def display_copy(image: Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> tuple[np.ndarray, bytes]:
    """The picture maps are drawn on: an RGB image downscaled so its longest side is at most max_side,
    as JPEG bytes (what the page receives) and those bytes decoded, (h, w, 3) uint8, so the server draws
    on the very pixels the page draws on (Chromium's and PIL's libjpeg-turbo decode alike)."""
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=DISPLAY_JPEG_QUALITY)
    return np.asarray(Image.open(jpeg).convert("RGB"), dtype=np.uint8), jpeg.getvalue()


@dataclass
class Analysis:
    size: tuple[int, int]  # (width, height) of the original image (EXIF orientation applied)
    display: np.ndarray  # (h, w, 3) uint8 copy for drawing, longest side <= DISPLAY_MAX_SIDE
    display_jpeg: bytes  # the same picture as the JPEG the page gets (display is these bytes decoded)
    probs: torch.Tensor  # (num_classes,)
    layers: list[LayerCapture]  # batch of one, tensors on the CPU
    class_names: list[str]
    input_size: int
    model_view: np.ndarray  # (S, S, 3) uint8: the input as the model saw it (normalisation undone)
    input: torch.Tensor | None = None  # (1, 3, S, S) the model's input, for ablation forwards
    gradcam: torch.Tensor | None = None  # (h, w) Grad-CAM of the top class at the last conv layer
    temperature: float = 1.0  # probabilities are softmax(logits / temperature) (the checkpoint's calibration)
    _dependence: list | None = field(default=None, repr=False)

    def top_k(self, k: int = 5) -> dict[str, float]:
        p, i = self.probs.topk(min(k, len(self.probs)))
        return {self.class_names[j]: float(v) for v, j in zip(p.tolist(), i.tolist())}

    def gammas(self) -> dict[str, float]:
        return {layer.name: layer.gamma for layer in self.layers}

    def query_indices(self, xy: tuple[float, float]) -> dict[str, int]:
        return {layer.name: query_index(xy, self.size, layer.grid) for layer in self.layers}

    def contributions(self) -> list[np.ndarray]:
        """Per layer, the (h, w) map of ||gamma * attention_out|| / ||x|| at each position."""
        return [layer.contribution[0].numpy() for layer in self.layers]

    def sinks(self) -> list[tuple[int, float]]:
        """Per layer, this image's sink: (flat index of the most attended cell, its share of all
        attention, i.e. max_j of the query-averaged row) (vggattn.study's sink_mass for one image)."""
        return [(int(layer.mean_row[0].argmax()), float(layer.mean_row[0].max())) for layer in self.layers]

    def query_dependence(self) -> list[tuple[np.ndarray, float]]:
        """Per layer: (query-averaged attention map (h, w), mean JS divergence of the rows from it, nats).
        Computed once, on first use (linear memory; O(N^2) time)."""
        if self._dependence is None:
            self._dependence = []
            for layer in self.layers:
                mean_row, jsd = query_dependence(layer)
                self._dependence.append((mean_row[0].reshape(layer.grid).numpy(), float(jsd[0])))
        return self._dependence


@torch.no_grad()
def analyze(model: nn.Module, meta: dict, image: Image.Image, *, gradcam: bool = True) -> Analysis:
    """Run the model once on the whole image and keep what clicks need.

    gradcam: also keep the last conv activation and compute the top class's Grad-CAM from it
    (a backward through the layers after it only, no second forward); VGG16WithAttention only,
    other modules holding GlobalAttention blocks are analysed without it.
    """
    gradcam = gradcam and isinstance(model, VGG16WithAttention)
    image = to_rgb(image)  # once: open_image's RGB image comes back as it is
    device = next(model.parameters()).device
    x = eval_transform(meta)(image).unsqueeze(0).to(device, memory_format=torch.channels_last)  # (1, 3, S, S)
    index = gradcam_layer(model) if gradcam else None
    with AttentionCapture(model) as cap, contextlib.ExitStack() as stack:
        kept = stack.enter_context(KeepOutput(model.features[index])) if gradcam else None
        logits = model(x)  # (1, num_classes)
    layers = [LayerCapture(layer.name, layer.gamma, layer.grid, layer.query.cpu(), layer.key.cpu(), layer.contribution.cpu())
              for layer in cap.layers]
    for captured, layer in zip(cap.layers, layers):  # log Z and the mean row, where the forward made them already
        if captured._log_z is not None:
            layer._log_z, layer._mean_row = captured._log_z.cpu(), captured._mean_row.cpu()
    temperature = float(meta.get("temperature", 1.0))  # fitted on held-out training images (scripts/calibrate.py)
    probs = torch.softmax(logits.float() / temperature, dim=-1)[0].cpu()
    cam = grad_cam_from(model, kept.output, index, int(probs.argmax()))[0].cpu() if gradcam else None
    return Analysis(image.size, *display_copy(image), probs, layers, list(meta["class_names"]), int(meta["input_size"]),
                    model_view(x, meta), x.cpu(), cam, temperature)


@torch.no_grad()
def ablate(model: nn.Module, result: Analysis, layers: list[str]) -> torch.Tensor:
    """Class probabilities (num_classes,) for the analysed input with the named layers' attention
    switched off (gamma = 0 for this forward only). One forward; other users of the model unaffected."""
    if result.input is None:
        raise ValueError("this Analysis keeps no model input (made by an older vggattn?)")
    device = next(model.parameters()).device
    with AttentionOff(model, list(layers)):
        logits = model(result.input.to(device))
    return torch.softmax(logits.float() / result.temperature, dim=-1)[0].cpu()


def render_map(result: Analysis, grid_map: np.ndarray, opacity: float = 0.8, colormap: str = "inferno",
               mode: str = "smooth", scale: str = "linear") -> np.ndarray:
    """Any non-negative (h, w) map over the display copy (`vggattn.render.map_levels`) -> (H, W, 3) uint8."""
    disp_h, disp_w = result.display.shape[:2]
    return overlay(result.display, upsample(map_levels(grid_map, scale), (disp_w, disp_h), mode), colormap, opacity)


def attention_at(result: Analysis, xy: tuple[float, float], k: int = 5) -> list[tuple[np.ndarray, dict]]:
    """Per layer, the (h, w) attention row of original-image pixel `xy` and its readouts (no drawing).
    Rows in float64 from the float32 Q and K, as the page computes them."""
    out = []
    for layer in result.layers:
        q = query_index(xy, result.size, layer.grid)
        flat = layer.rows([q], dtype=torch.float64)[0, 0]  # (N,)
        out.append((flat.reshape(layer.grid).numpy(), row_readouts(flat, q, layer.grid, result.input_size, result.size, k)))
    return out


def render_attention(result: Analysis, xy: tuple[float, float], opacity: float = 0.8, colormap: str = "inferno",
                     mode: str = "smooth", top_k: int = TOP_K, scale: str = "linear", view: str = "row",
                     pictures: bool = True) -> list[Panel]:
    """Each layer's attention for original-image pixel `xy` drawn over the display copy
    (`vggattn.render.attention_picture`: the page's hover view draws the same pixels), with the row's
    readouts. view "row": where the position looks, its `top_k` cells numbered (0: none); "column": how
    much every position looks at it (scaled to its maximum, at least 1/N). scale: "linear" or "log".
    pictures False: the readouts only (Panel.image None), for a page that draws the pictures itself."""
    w, h = result.size
    x, y = xy
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"pixel ({x}, {y}) is outside the {w}x{h} image")
    disp_h, disp_w = result.display.shape[:2]
    point = ((x + 0.5) * disp_w / w, (y + 0.5) * disp_h / h)
    panels = []
    for layer, (row, readouts), sink in zip(result.layers, attention_at(result, xy, k=max(top_k, TOP_K)), result.sinks()):
        q = readouts["query_index"]
        shown = row if view == "row" else layer.column(q)[0].reshape(layer.grid).numpy()
        rgb = attention_picture(result.display, shown, q, point, view=view, scale=scale, mode=mode, colormap=colormap,
                                opacity=opacity, top_k=top_k) if pictures else None
        panels.append(Panel(layer.name, layer.grid, layer.gamma, q, rgb, row, readouts, sink_note(row, sink)))
    return panels


def model_view(x: torch.Tensor, meta: dict) -> np.ndarray:
    """Undo normalisation of a (1, 3, S, S) input -> (S, S, 3) uint8: the image as the model sees it."""
    mean = torch.tensor(meta["mean"]).view(3, 1, 1)
    std = torch.tensor(meta["std"]).view(3, 1, 1)
    img = (x[0].cpu().float() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
