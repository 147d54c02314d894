"""Pure rendering: arrays in, uint8 RGB arrays out (the caller shows or writes them).

    heat = upsample_map(row.reshape(grid), (width, height), mode="smooth")   # (H, W) in [0, 1]
    rgb = overlay(image, heat, colormap="jet", opacity=0.5)                  # (H, W, 3) uint8
    rgb = mark_query(rgb, (x, y), cell_box)                                  # point + cell drawn
    rgb = mark_cells(rgb, boxes)                                             # numbered boxes (top-k cells)
"""

from __future__ import annotations

import functools

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

COLORMAPS = ("jet", "viridis", "inferno", "magma", "turbo", "hot")
UPSAMPLING = ("smooth", "blocky")
SCALES = ("linear", "log")
LOG_DECADES = 4  # the log scale spans this many powers of ten below a map's maximum


def scale_map(grid_map: np.ndarray, scale: str = "linear") -> np.ndarray:
    """A map of weights as shown before min-max: "linear" as it is; "log" log10 of it, floored
    LOG_DECADES below its maximum, so a peaked attention row still shows where the rest goes."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    m = np.asarray(grid_map, dtype=np.float64)
    if scale == "linear" or m.size == 0 or m.max() <= 0:
        return m.astype(np.float32)
    return np.log10(np.maximum(m, m.max() * 10.0 ** -LOG_DECADES)).astype(np.float32)


def upsample_map(grid_map: np.ndarray, size_wh: tuple[int, int], mode: str = "smooth",
                 normalize: bool = True) -> np.ndarray:
    """(h, w) map -> (H, W) float32 map at `size_wh`; `normalize` scales it to [0, 1] by min-max.

    "smooth" is bilinear, "blocky" nearest (one flat block per query cell).
    """
    if mode not in UPSAMPLING:
        raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {mode!r}")
    m = np.asarray(grid_map, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"grid_map must be 2-D (h, w), got shape {m.shape}")
    if normalize:
        lo, hi = float(m.min()), float(m.max())
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    resample = Image.Resampling.BILINEAR if mode == "smooth" else Image.Resampling.NEAREST
    out = np.asarray(Image.fromarray(m, mode="F").resize(tuple(size_wh), resample), dtype=np.float32)
    return np.clip(out, 0.0, 1.0) if normalize else out


@functools.lru_cache(maxsize=None)
def _palette(colormap: str) -> bytes:
    """A matplotlib colormap as a 256-entry RGB palette."""
    return (matplotlib.colormaps[colormap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8).tobytes()


def colorize(heat: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 through a matplotlib colormap."""
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap must be one of {COLORMAPS}, got {colormap!r}")
    return np.asarray(_colorize(heat, colormap))


def _colorize(heat: np.ndarray, colormap: str) -> Image.Image:
    heat = np.asarray(heat, dtype=np.float32)
    if heat.size and (heat.min() < -1e-6 or heat.max() > 1 + 1e-6):
        raise ValueError("heat must lie in [0, 1]")
    index = Image.fromarray((np.clip(heat, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L")
    index.putpalette(_palette(colormap))  # L -> P: the palette lookup and RGB conversion run in C
    return index.convert("RGB")


def overlay(image: np.ndarray, heat: np.ndarray, colormap: str = "jet", opacity: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] heat map over an RGB uint8 image: (1 - opacity) * image + opacity * color."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heat {heat.shape} and image {image.shape[:2]} differ in size")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap must be one of {COLORMAPS}, got {colormap!r}")
    return np.asarray(Image.blend(Image.fromarray(image), _colorize(heat, colormap), opacity))


def mark_query(image: np.ndarray, xy: tuple[float, float], box: tuple[float, float, float, float] | None = None,
               color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Draw the clicked point (a ringed dot) and its query cell's rectangle on a copy of `image`."""
    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    draw = ImageDraw.Draw(im)
    r = max(3, round(min(im.size) / 80))
    x, y = xy
    if box is not None:
        x0, y0, x1, y1 = box
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=max(1, r // 2))
    draw.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], fill=(0, 0, 0))
    draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    return np.asarray(im)


def mark_cells(image: np.ndarray, boxes: list[tuple[float, float, float, float]],
               color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Outline each box (x0, y0, x1, y1) on a copy of `image` and number them 1, 2, ... in order."""
    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    draw = ImageDraw.Draw(im)
    line = max(1, round(min(im.size) / 300))
    for rank, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(0, 0, 0), width=line + 2)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=line)
        draw.text((x0 + 2 * line, y0 + line), str(rank), fill=color, stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(im)
