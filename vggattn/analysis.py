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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .capture import AttentionCapture, LayerCapture
from .data import cell_box, preprocess, query_index, to_rgb
from .gradcam import AttentionOff, KeepOutput, grad_cam_from, gradcam_layer
from .model import VGG16WithAttention
from .readouts import query_dependence, row_readouts
from .render import mark_cells, mark_query, overlay, scale_map, upsample_map

SINK_DOMINATED = 0.5  # vggattn.study's rule: one cell takes at least half of all attention in the image
LIST_CLASSES = 20  # the app's header names at most this many of the classes (an ImageNet model has 1000)
DISPLAY_MAX_SIDE = 512  # overlays are drawn on a copy of the image at most this large (click cost ~ its area)


@dataclass
class Panel:
    """One layer's rendered attention for one clicked pixel."""

    layer: str
    grid: tuple[int, int]
    gamma: float
    query_index: int
    image: np.ndarray  # (H, W, 3) uint8 overlay
    attention_row: np.ndarray  # (h, w) float32 weights of the query, sums to 1
    readouts: dict  # entropy, mean distance, top cells of the row (vggattn.readouts.row_readouts)
    sink_note: str = ""  # one line when this layer is sink-dominated on this image (see `sink_note`)

    @property
    def title(self) -> str:
        h, w = self.grid
        # Short: a panel's label is one line under its buttons; the query indexes and the sink note itself
        # go in the line under the panels
        title = f"{self.layer} · {h}×{w} · γ {self.gamma:+.4f}"
        return f"{title} · ⚠ sink" if self.sink_note else title


def sink_note(row: np.ndarray, sink: tuple[int, float], threshold: float = SINK_DOMINATED) -> str:
    """One line saying that a layer is sink-dominated on this image (its most attended cell takes at
    least `threshold` of all attention), so a map is not read as a finding about the clicked pixel.
    row: the clicked query's (h, w) attention; sink: (flat index, share) from `Analysis.sinks`."""
    index, share = sink
    if share < threshold:
        return ""
    w = row.shape[1]
    cell = f"({index // w}, {index % w})"
    on_sink = float(row.reshape(-1)[index])
    if int(row.argmax()) == index:
        return (f"query-independent here: {on_sink:.0%} of this row on cell {cell}, the cell most queries pick "
                f"({share:.0%} of all attention in this image)")
    return f"sink-dominated image: cell {cell} takes {share:.0%} of all attention; this row puts {on_sink:.0%} there"


def unsure_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """The top-1 probability below which predictions are right less than half the time: the largest
    confidence c such that the predictions with confidence <= c have top-1 precision under 50% (0 if
    even the least confident prediction alone is right). Fitted on a val split; stored as
    meta["unsure_below"]."""
    order = np.argsort(confidence, kind="stable")
    conf, hits = np.asarray(confidence, dtype=np.float64)[order], np.asarray(correct, dtype=np.float64)[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)  # of the k least confident predictions
    below = np.nonzero(precision < 0.5)[0]
    return float(conf[below[-1]]) if len(below) else 0.0


def unsure_note(result: "Analysis", meta: dict) -> str:
    """One line when the top-1 probability is below the checkpoint's `unsure_below` threshold."""
    threshold = float(meta.get("unsure_below", 0.0))
    top = float(result.probs.max())
    if top >= threshold:
        return ""
    return (f"⚠ Unsure: the top-1 probability {top:.0%} is below {threshold:.0%}, where this model's val top-1 "
            "precision falls under 50%.")


def model_notes(model: nn.Module, meta: dict) -> list[str]:
    """What a user must know about the model before reading its output: the only classes it can answer,
    and whether attention plays any part in its predictions."""
    from .model import gammas

    names = list(meta["class_names"])
    shown = ", ".join(names[:LIST_CLASSES])
    if len(names) > LIST_CLASSES:
        shown += f", and {len(names) - LIST_CLASSES} more"
    notes = [f"This model knows {len(names)} classes ({shown}); any image you give it gets one of them, "
             "whatever it shows."]
    if all(g == 0.0 for g in gammas(model).values()):
        notes.append("⚠ Every γ is 0: attention does not affect this model's predictions, and the maps come from "
                     "untrained Q and K (a fresh or untrained model).")
    return notes


GAMMA_HINT = ("γ scales what attention adds to each position's features: y = γ · attention(x) + x. "
              "It starts at 0 (attention off) and is learned; its size says how much the layer relies on attention.")


def gamma_markdown(result: "Analysis") -> str:
    """Per layer: grid, γ and the mean effective contribution ‖γ·attn‖/‖x‖, as a markdown table."""
    rows = [f"| `{layer.name}` | {layer.grid[0]}×{layer.grid[1]} | {layer.gamma:+.4f} | {float(layer.contribution.mean()):.3f} |"
            for layer in result.layers]
    return "| layer | grid | γ | mean ‖γ·attn‖/‖x‖ |\n|---|---|---|---|\n" + "\n".join(rows) + f"\n\n{GAMMA_HINT}"


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
        return [(int(m.argmax()), float(m.max())) for m, _ in self.query_dependence()]

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
    image = to_rgb(image)
    device = next(model.parameters()).device
    x = preprocess(image, meta).to(device, memory_format=torch.channels_last)  # (1, 3, S, S)
    index = gradcam_layer(model) if gradcam else None
    with AttentionCapture(model) as cap, contextlib.ExitStack() as stack:
        kept = stack.enter_context(KeepOutput(model.features[index])) if gradcam else None
        logits = model(x)  # (1, num_classes)
    layers = [LayerCapture(layer.name, layer.gamma, layer.grid, layer.query.cpu(), layer.key.cpu(), layer.contribution.cpu()) for layer in cap.layers]
    temperature = float(meta.get("temperature", 1.0))  # fitted on held-out training images (scripts/calibrate.py)
    probs = torch.softmax(logits.float() / temperature, dim=-1)[0].cpu()
    cam = grad_cam_from(model, kept.output, index, int(probs.argmax()))[0].cpu() if gradcam else None
    return Analysis(image.size, display_copy(image), probs, layers, list(meta["class_names"]), int(meta["input_size"]),
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


def render_map(result: Analysis, grid_map: np.ndarray, opacity: float = 0.5, colormap: str = "jet",
               mode: str = "smooth", scale: str = "linear") -> np.ndarray:
    """Any (h, w) map over the image (`scale_map`, then min-max) on the display copy -> (H, W, 3) uint8."""
    disp_h, disp_w = result.display.shape[:2]
    return overlay(result.display, upsample_map(scale_map(grid_map, scale), (disp_w, disp_h), mode=mode), colormap, opacity)


def attention_at(result: Analysis, xy: tuple[float, float], k: int = 5) -> list[tuple[np.ndarray, dict]]:
    """Per layer, the (h, w) attention row of original-image pixel `xy` and its readouts (no drawing)."""
    out = []
    for layer in result.layers:
        q = query_index(xy, result.size, layer.grid)
        flat = layer.row(q)[0]  # (N,)
        out.append((flat.reshape(layer.grid).numpy(), row_readouts(flat, q, layer.grid, result.input_size, result.size, k)))
    return out


def render_attention(result: Analysis, xy: tuple[float, float], opacity: float = 0.5, colormap: str = "jet",
                     mode: str = "smooth", top_k: int = 5, scale: str = "linear") -> list[Panel]:
    """Each layer's attention row for original-image pixel `xy`, overlaid on the display image, with
    the `top_k` most attended cells outlined and numbered (0: none) and the row's readouts; `scale`:
    "linear" or "log" colours (vggattn.render.scale_map)."""
    w, h = result.size
    x, y = xy
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"pixel ({x}, {y}) is outside the {w}x{h} image")
    disp_h, disp_w = result.display.shape[:2]
    sx, sy = disp_w / w, disp_h / h
    panels = []
    for layer, (row, readouts), sink in zip(result.layers, attention_at(result, xy, k=max(top_k, 5)), result.sinks()):
        q = readouts["query_index"]
        rgb = render_map(result, row, opacity, colormap, mode, scale)
        if top_k:
            rgb = mark_cells(rgb, [scale_box(cell_box(c["index"], result.size, layer.grid), sx, sy)
                                   for c in readouts["top_cells"][:top_k]], color=(255, 255, 0))
        rgb = mark_query(rgb, ((x + 0.5) * sx, (y + 0.5) * sy), scale_box(cell_box(q, result.size, layer.grid), sx, sy))
        panels.append(Panel(layer.name, layer.grid, layer.gamma, q, rgb, row, readouts, sink_note(row, sink)))
    return panels


def scale_box(box, sx: float, sy: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy


def model_view(x: torch.Tensor, meta: dict) -> np.ndarray:
    """Undo normalisation of a (1, 3, S, S) input -> (S, S, 3) uint8: the image as the model sees it."""
    mean = torch.tensor(meta["mean"]).view(3, 1, 1)
    std = torch.tensor(meta["std"]).view(3, 1, 1)
    img = (x[0].cpu().float() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
