"""Pure rendering: arrays in, uint8 RGB arrays out (the caller shows or writes them).

    levels = map_levels(row_map)                        # (h, w) in [0, 1]: weight / the map's maximum
    heat = upsample(levels, (W, H), mode="smooth")      # (H, W): bilinear, centre-aligned
    rgb = overlay(image, heat, "inferno", opacity=0.8)  # the tint's opacity grows with the weight
    rgb = mark_cells(rgb, [cell_rect(j, grid, (W, H)) for j in top])   # numbered frames
    rgb = mark_query(rgb, (cx, cy), cell_rect(q, grid, (W, H)))        # the point and its cell
    rgb = attention_picture(image, row_map, q, (cx, cy))                # all of the above, as a panel

Weight is shown as visibility: a cell's tint is transparent at weight 0 and reaches the chosen
opacity at FULL_AT of the colour scale, so the photo stays as it is where a position does not look.
The page's script (vggattn/view/web/hover.js) draws the same pictures with the same rules from the
constants in `page_constants()`: every step is integer or float64 arithmetic in the same order, and
marks are pixel rules (no font or antialiasing), so a map drawn under the pointer and the server's
pinned map are the same pixels (tests/test_browser.py compares them).
"""

from __future__ import annotations

import functools
import math

import matplotlib
import numpy as np

from ..cli import COLORMAPS

UPSAMPLING = ("smooth", "blocky")
SCALES = ("linear", "log")
VIEWS = ("row", "column")  # row: where a position looks; column: who looks at it
TOP_K = 5  # attended cells framed and numbered on a row's map
MARK_SHARE = 0.01  # ... those of them holding at least this share of the row's largest weight (none are numbered on ~0)
LOG_DECADES = 4  # the log scale spans this many powers of ten below a map's maximum
FULL_AT = 0.5  # a cell's tint reaches the chosen opacity at this level of the colour scale, and fades to none at 0
MARK_COLOR = (255, 255, 0)  # frames and numbers of the top cells
QUERY_COLOR = (255, 255, 255)  # the query point and its cell
OUTLINE_COLOR = (0, 0, 0)  # around every mark, so it reads on any photo
# 3x5 pixel digits: both renderers draw the same pixels (a font would not)
DIGITS = ("111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
          "111100111001111", "111100111101111", "111001010010010", "111101111101111", "111101111001111")


def _half_up(v: float) -> int:
    """Round half up (JavaScript's Math.floor(v + 0.5)); Python's round() halves to even."""
    return math.floor(v + 0.5)


def map_levels(grid_map: np.ndarray, scale: str = "linear", floor: float = 0.0) -> np.ndarray:
    """An (h, w) map of non-negative weights -> float64 levels in [0, 1] for the colour scale.

    "linear": weight / max(the map's maximum, floor), so 0 stays 0 (transparent). "log": log10 of the
    weight, LOG_DECADES below that maximum at 0 and the maximum at 1. floor: the column view passes 1/N,
    so a key that no query gives more than uniform attention stays dark."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    m = np.maximum(np.asarray(grid_map, dtype=np.float64), 0.0)
    top = max(float(m.max()) if m.size else 0.0, float(floor))
    if top <= 0:
        return np.zeros_like(m)
    if scale == "linear":
        return np.minimum(m / top, 1.0)
    bottom = math.log10(top) - LOG_DECADES
    return np.minimum((np.log10(np.maximum(m, top / 10 ** LOG_DECADES)) - bottom) / LOG_DECADES, 1.0)


def _sampler(n: int, size: int, smooth: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output pixel: the two source cells and the weight of the second (centre-aligned, edges clamped)."""
    o = np.arange(size, dtype=np.float64)
    scale = n / size
    if not smooth:
        i0 = np.minimum(n - 1, np.floor((o + 0.5) * scale)).astype(np.int64)
        return i0, i0, np.zeros(size)
    s = np.clip((o + 0.5) * scale - 0.5, 0, n - 1)
    i0 = np.floor(s).astype(np.int64)
    return i0, np.minimum(n - 1, i0 + 1), s - i0


def upsample(levels: np.ndarray, size_wh: tuple[int, int], mode: str = "smooth") -> np.ndarray:
    """(h, w) levels -> (H, W) float64 at `size_wh`: "smooth" bilinear, "blocky" one flat block per cell."""
    if mode not in UPSAMPLING:
        raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {mode!r}")
    m = np.asarray(levels, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"levels must be 2-D (h, w), got shape {m.shape}")
    (w, h), smooth = size_wh, mode == "smooth"
    x0, x1, tx = _sampler(m.shape[1], w, smooth)
    y0, y1, ty = _sampler(m.shape[0], h, smooth)
    a, b = m[y0], m[y1]  # (H, w): the two source rows of every output row
    top = a[:, x0] + (a[:, x1] - a[:, x0]) * tx
    bottom = b[:, x0] + (b[:, x1] - b[:, x0]) * tx
    return top + (bottom - top) * ty[:, None]


@functools.lru_cache(maxsize=None)
def _palette(colormap: str) -> bytes:
    """A matplotlib colormap as a 256-entry RGB palette."""
    return (matplotlib.colormaps[colormap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8).tobytes()


def palette(colormap: str) -> np.ndarray:
    """(256, 3) uint8: the colours of levels 0/255 .. 255/255."""
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap must be one of {COLORMAPS}, got {colormap!r}")
    return np.frombuffer(_palette(colormap), dtype=np.uint8).reshape(256, 3)


def tint_alpha(opacity: float) -> np.ndarray:
    """(256,) float64: the tint's opacity at each level, 0 at level 0 rising to `opacity` at FULL_AT."""
    return opacity * np.minimum(1.0, np.arange(256) / (255 * FULL_AT))


def overlay(image: np.ndarray, heat: np.ndarray, colormap: str = "inferno", opacity: float = 0.8) -> np.ndarray:
    """Tint an RGB uint8 image by a [0, 1] heat map: level = floor(heat * 255 + 0.5), colour from the
    colormap, blended with the level's `tint_alpha`; where heat is 0 the image is unchanged."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heat {heat.shape} and image {image.shape[:2]} differ in size")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    heat = np.asarray(heat, dtype=np.float64)
    if heat.size and (heat.min() < -1e-6 or heat.max() > 1 + 1e-6):
        raise ValueError("heat must lie in [0, 1]")
    level = np.clip(np.floor(heat * 255 + 0.5), 0, 255).astype(np.intp) << 8
    table, out = _blend_table(colormap, float(opacity)), np.empty_like(image)
    for c in range(3):
        out[..., c] = table[c][level + image[..., c]]
    return out


@functools.lru_cache(maxsize=32)
def _blend_table(colormap: str, opacity: float) -> np.ndarray:
    """(3 channels, 256 levels x 256 photo values) uint8: every tinted value `overlay` can make, computed once per
    colormap and opacity as base + (colour - base) * alpha in float64, rounded half to even: what the page's
    Uint8ClampedArray stores."""
    colour, alpha = palette(colormap).astype(np.float64).T, tint_alpha(opacity)  # (3, 256), (256,)
    base = np.arange(256, dtype=np.float64)[None, None, :]
    table = np.rint(base + (colour[:, :, None] - base) * alpha[None, :, None]).astype(np.uint8)  # (3, level, base)
    return table.reshape(3, -1)


def cell_rect(index: int, grid: tuple[int, int], size_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """A grid cell's pixels (x0, y0, x1, y1), x1 and y1 exclusive, in a picture of size (W, H)."""
    (gh, gw), (w, h) = grid, size_wh
    if not 0 <= index < gh * gw:
        raise IndexError(f"cell index {index} out of range for a {gh}x{gw} grid")
    r, c = divmod(int(index), gw)
    x0, y0 = _half_up(c * w / gw), _half_up(r * h / gh)
    return x0, y0, max(x0 + 1, _half_up((c + 1) * w / gw)), max(y0 + 1, _half_up((r + 1) * h / gh))


def _frame(im: np.ndarray, rect: tuple[int, int, int, int], width: int, color) -> None:
    """Paint the pixels of `rect` within `width` of its edge, in place (clipped to the picture)."""
    x0, y0, x1, y1 = rect
    h, w = im.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    ys, xs = np.arange(cy0, cy1)[:, None], np.arange(cx0, cx1)[None, :]
    edge = np.minimum(np.minimum(xs - x0, x1 - 1 - xs), np.minimum(ys - y0, y1 - 1 - ys)) < width
    im[cy0:cy1, cx0:cx1][edge] = color


def _disk(im: np.ndarray, cx: float, cy: float, radius: float, color) -> None:
    """Paint the pixels whose centres lie within `radius` of (cx, cy), in place."""
    h, w = im.shape[:2]
    xa, xb = max(0, math.floor(cx - radius)), min(w, math.ceil(cx + radius) + 1)
    ya, yb = max(0, math.floor(cy - radius)), min(h, math.ceil(cy + radius) + 1)
    if xa >= xb or ya >= yb:
        return
    dx = np.arange(xa, xb, dtype=np.float64)[None, :] + 0.5 - cx
    dy = np.arange(ya, yb, dtype=np.float64)[:, None] + 0.5 - cy
    im[ya:yb, xa:xb][dx * dx + dy * dy <= radius * radius] = color


def _glyph(im: np.ndarray, digit: int, x: int, y: int, size: int, color, outline: bool) -> None:
    """A 3x5 digit with `size`-pixel squares at (x, y); `outline` paints each square grown by one pixel."""
    grow = 1 if outline else 0
    for k, bit in enumerate(DIGITS[digit]):
        if bit == "1":
            gx, gy = x + (k % 3) * size, y + (k // 3) * size
            _frame(im, (gx - grow, gy - grow, gx + size + grow, gy + size + grow), size + 2, color)


def mark_sizes(size_wh: tuple[int, int]) -> dict[str, int]:
    """Line width, digit square and query-dot radius for a picture of size (W, H)."""
    short = min(size_wh)
    return {"line": max(1, _half_up(short / 300)), "digit": max(1, _half_up(short / 128)),
            "dot": max(3, _half_up(short / 80))}


def mark_cells(image: np.ndarray, rects: list[tuple[int, int, int, int]], color=MARK_COLOR) -> np.ndarray:
    """Frame each cell rect (from `cell_rect`) on a copy of `image` and number them 1, 2, ... in order."""
    im = np.array(image, dtype=np.uint8)
    s = mark_sizes((im.shape[1], im.shape[0]))
    line, size = s["line"], s["digit"]
    for rank, (x0, y0, x1, y1) in enumerate(rects, start=1):  # the frame and number sit outside the cell: its tint shows
        _frame(im, (x0 - line - 1, y0 - line - 1, x1 + line + 1, y1 + line + 1), line + 1, OUTLINE_COLOR)
        _frame(im, (x0 - line, y0 - line, x1 + line, y1 + line), line, color)
        gx, gy = x0 - line - 3 - 3 * size, max(1, y0 - line - 1)  # left of the frame, or right of it at the edge
        if gx < 1:
            gx = x1 + line + 3
        for outline in (True, False):
            _glyph(im, rank % 10, gx, gy, size, OUTLINE_COLOR if outline else color, outline)
    return im


def mark_query(image: np.ndarray, xy: tuple[float, float], rect: tuple[int, int, int, int] | None = None,
               color=QUERY_COLOR) -> np.ndarray:
    """Draw the query point (a dot ringed in black) and its cell's frame on a copy of `image`;
    xy in the picture's pixels (a pixel's centre is x + 0.5)."""
    im = np.array(image, dtype=np.uint8)
    s = mark_sizes((im.shape[1], im.shape[0]))
    if rect is not None:
        _frame(im, rect, max(1, s["dot"] // 2), color)
    _disk(im, xy[0], xy[1], s["dot"] + 1, OUTLINE_COLOR)
    _disk(im, xy[0], xy[1], s["dot"], color)
    return im


def top_indices(values: np.ndarray, k: int = TOP_K) -> list[int]:
    """The k largest entries' flat indices, largest first (ties: the lower index first)."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    return [int(i) for i in np.argsort(-flat, kind="stable")[:k]]


def marked_indices(values: np.ndarray, k: int = TOP_K) -> list[int]:
    """The cells a row's picture numbers: of its k largest, those holding weight (at least MARK_SHARE of the
    largest, which must be positive), largest first."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    top = top_indices(flat, k)
    peak = flat[top[0]] if top else 0.0
    return [j for j in top if peak > 0 and flat[j] > 0 and flat[j] >= MARK_SHARE * peak]


def attention_picture(image: np.ndarray, grid_map: np.ndarray, query: int | None, point_xy: tuple[float, float] | None,
                      *, view: str = "row", scale: str = "linear", mode: str = "smooth", colormap: str = "inferno",
                      opacity: float = 0.8, top_k: int = TOP_K, query_grid: tuple[int, int] | None = None,
                      floor: float | None = None) -> np.ndarray:
    """One panel: a row (or column) of attention over the picture, its top_k cells that hold weight numbered
    (rows only; `marked_indices`),
    the query's cell framed and the point marked. grid_map: (h, w) weights on the key grid; query: the flat
    cell index on `query_grid` (default: the key grid; keys pooled to a smaller grid differ); point_xy: the
    point in the picture's pixels. query and point None: a map that belongs to no point (GCNet's context).
    floor: the colour scale's least maximum (default: 1/size for a column, what uniform rows give each key)."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    h, w = image.shape[:2]
    grid = grid_map.shape
    floor = (1.0 / grid_map.size if view == "column" else 0.0) if floor is None else floor
    rgb = overlay(image, upsample(map_levels(grid_map, scale, floor), (w, h), mode), colormap, opacity)
    if top_k and view == "row":
        rgb = mark_cells(rgb, [cell_rect(j, grid, (w, h)) for j in marked_indices(grid_map, top_k)])
    if point_xy is None:
        return rgb
    return mark_query(rgb, point_xy, None if query is None else cell_rect(query, query_grid or grid, (w, h)))


def page_constants() -> dict:
    """What the page's script needs to draw the same pictures (sent as props, never copied in JS)."""
    return {"top_k": TOP_K, "mark_share": MARK_SHARE, "log_decades": LOG_DECADES, "full_at": FULL_AT, "digits": list(DIGITS),
            "mark_color": list(MARK_COLOR), "query_color": list(QUERY_COLOR), "outline_color": list(OUTLINE_COLOR),
            "palettes": {name: list(_palette(name)) for name in COLORMAPS}}


def points_picture(image: np.ndarray, xy: np.ndarray, weights: np.ndarray, levels: np.ndarray,
                   colormap: str = "inferno") -> np.ndarray:
    """Deformable attention's sampling points on the picture (xy in its pixels): a disk per point, its area in
    proportion to its weight (the heaviest's radius a 24th of the picture's side), its colour its level (the finest map darkest on the
    colour map's scale, the coarsest brightest), outlined; the heaviest drawn last, on top. Not a map: the block
    reads these points and nothing else."""
    rgb = np.ascontiguousarray(image.copy())
    h, w = rgb.shape[:2]
    radius = max(3.0, min(h, w) / 24)
    top = float(weights.max()) or 1.0
    n = int(levels.max()) + 1 if len(levels) else 1
    colours = palette(colormap)[np.linspace(80, 250, n).astype(int)] if n > 1 else palette(colormap)[[220]]
    for i in np.argsort(weights):
        r = radius * math.sqrt(float(weights[i]) / top)
        if r < 0.75 or not (0 <= xy[i, 0] < w and 0 <= xy[i, 1] < h):
            continue
        _disk(rgb, float(xy[i, 0]), float(xy[i, 1]), r + 1, OUTLINE_COLOR)
        _disk(rgb, float(xy[i, 0]), float(xy[i, 1]), r, tuple(int(c) for c in colours[int(levels[i])]))
    return rgb
