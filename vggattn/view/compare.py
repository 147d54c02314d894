"""Two live views under one pointer, and their difference: two models (any two that load, also on different grids),
a model and an intervention, or two images. One self-contained HTML file, as `vggattn.view.live`'s: each side is a
live view in its own frame; the pointer and clicks on either picture reach the other through the image (the same
place as a fraction of its width and height), and under them one panel per pair of layers draws B's row minus A's
on a signed, symmetric colour scale with its numbers (largest change and where, the rows' Jensen-Shannon divergence).

    html = compare_html(Side("A", result_a, layers_a), Side("B", result_b, layers_b), title="church.jpg")

`difference` is the same arithmetic in numpy (the tests hold the page to it; `vggattn-explain --compare` writes it).
"""

from __future__ import annotations

import base64
import html as _html
from dataclasses import dataclass

import numpy as np

from .hover import PageLayer
from .live import PAGE_CSS, script_json, live_html

DIFF_WIDTH = 320  # px: a difference panel's picture


@dataclass
class Side:
    label: str  # what this side is ("attention-VGG16, weights ...", "Q and K re-initialised", "photo.jpg")
    result: object  # `vggattn.analysis.Analysis` of its image
    layers: list[PageLayer]  # its blocks as the page has them
    about: str = ""


def common_grid(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """The grid both rows are compared on: the finer of each side."""
    return max(a[0], b[0]), max(a[1], b[1])


def resample(row: np.ndarray, grid: tuple[int, int], to: tuple[int, int]) -> np.ndarray:
    """A row's weights on `grid` (h * w,) onto `to` (H * W,): each cell of `to` takes the cell of `grid` its centre
    falls in, times the area ratio (a weight per area: the same mass where the grids divide each other)."""
    (h, w), (H, W) = grid, to
    r = (np.arange(H) + 0.5) * h // H
    c = (np.arange(W) + 0.5) * w // W
    src = np.asarray(row, np.float64).reshape(h, w)
    return (src[r.astype(int)][:, c.astype(int)] * (h * w) / (H * W)).reshape(-1)


def jsd_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits of two non-negative vectors, each renormalised (0 to 1)."""
    p = np.clip(np.asarray(p, np.float64), 0, None)
    q = np.clip(np.asarray(q, np.float64), 0, None)
    p, q = p / max(p.sum(), 1e-300), q / max(q.sum(), 1e-300)
    m = (p + q) / 2
    kl = lambda x: float(np.sum(np.where(x > 0, x * np.log2(np.where(x > 0, x, 1) / np.where(m > 0, m, 1)), 0)))  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def difference(row_a: np.ndarray, grid_a: tuple[int, int], row_b: np.ndarray, grid_b: tuple[int, int]) -> dict:
    """B's row minus A's on their common grid: {"grid", "diff" (H * W,), "largest" (signed), "cell" (its index),
    "jsd" (bits, of the rows renormalised over the grid)}."""
    grid = common_grid(grid_a, grid_b)
    a, b = resample(row_a, grid_a, grid), resample(row_b, grid_b, grid)
    d = b - a
    cell = int(np.abs(d).argmax())
    return {"grid": grid, "diff": d, "largest": float(d[cell]), "cell": cell, "jsd": jsd_bits(a, b)}


def point_on(xy: tuple[float, float], size_from: tuple[int, int], size_to: tuple[int, int]) -> tuple[int, int]:
    """A pixel of one image at the same place (as a fraction of width and height) in another."""
    (x, y), (wf, hf), (wt, ht) = xy, size_from, size_to
    return min(wt - 1, int((x + 0.5) * wt / wf)), min(ht - 1, int((y + 0.5) * ht / hf))


def layer_sides(result, pages: list[PageLayer], spec: str) -> tuple[Side, Side]:
    """A/B of two layers of one analysis: spec "layers:NAME,NAME" -> (the first layer's side, the second's)."""
    names = spec[len("layers:"):].split(",")
    by_name = {p.name: p for p in pages}
    if len(names) != 2 or any(n not in by_name for n in names):
        raise ValueError(f"layers:A,B names two of this model's attention layers {list(by_name)}; got {spec!r}")
    return tuple(Side(f"layer {n}", result, [by_name[n]]) for n in names)


def numbers(a: Side, b: Side, point: tuple[float, float]) -> dict:
    """What compare.json holds: per pair of layers at A's point (and B's at the same place), B minus A's largest change,
    where, and the rows' JSD (`difference`)."""
    from ..data import query_index

    xy_b = point_on(point, a.result.size, b.result.size)
    pairs = []
    for la, lb in zip(a.layers, b.layers):
        qa, qb = query_index(point, a.result.size, la.grid), query_index(xy_b, b.result.size, lb.grid)
        d = difference(la.row(qa), la.key_grid, lb.row(qb), lb.key_grid)
        pairs.append({"a": la.name, "b": lb.name, "grid": list(d["grid"]), "largest_change": d["largest"],
                      "at_cell": list(divmod(d["cell"], d["grid"][1])), "jsd_bits": d["jsd"]})
    return {"a": a.label, "b": b.label, "point_a": list(point), "point_b": list(xy_b), "layers": pairs}


COMPARE_CSS = """
.sides { display: flex; gap: 12px; align-items: flex-start; }
.side { flex: 1 1 0; min-width: 0; } .side h2 { font-size: 15px; margin: 0 0 4px; }
.side iframe { width: 100%; height: 900px; border: 1px solid #ccc; border-radius: 4px; }
.diffs { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 12px; }
.diff { width: 320px; font-size: 12px; } .diff canvas { width: 320px; display: block; border: 1px solid #ccc; }
.diff .scale { display: flex; align-items: center; gap: 6px; margin: 3px 0; }
@media (max-width: 640px) {  /* a phone: A above B, each the screen's width (both still follow the pointer) */
  .sides { flex-direction: column; } .side { flex: none; width: 100%; } .diff, .diff canvas { width: 100%; }
}
"""

COMPARE_JS = r"""
(function () {
const layers = DATA.pairs;  // [{a: index, b: index, name, gridA, gridB}]
const [fa, fb] = [document.getElementById("side-a"), document.getElementById("side-b")];
let linked = 0;
function api(frame) { return frame.contentWindow && frame.contentWindow.vggattnHover; }
function ready(frame) { const h = api(frame); return !!(h && h.ready()); }
// The other side's pixel at the same place in its image (vggattn.view.compare.point_on)
function onOther(xy, from, to) {
  return [Math.min(to[0] - 1, Math.floor((xy[0] + 0.5) * to[0] / from[0])),
          Math.min(to[1] - 1, Math.floor((xy[1] + 0.5) * to[1] / from[1]))];
}
function commonGrid(a, b) { return [Math.max(a[0], b[0]), Math.max(a[1], b[1])]; }
function resample(row, grid, to) {  // vggattn.view.compare.resample
  const [h, w] = grid, [H, W] = to, out = new Float64Array(H * W), k = (h * w) / (H * W);
  for (let i = 0; i < H; i++) {
    const r = Math.floor((i + 0.5) * h / H);
    for (let j = 0; j < W; j++) out[i * W + j] = row[r * w + Math.floor((j + 0.5) * w / W)] * k;
  }
  return out;
}
function jsdBits(p, q) {  // vggattn.view.compare.jsd_bits
  let sp = 0, sq = 0;
  for (let i = 0; i < p.length; i++) { sp += Math.max(p[i], 0); sq += Math.max(q[i], 0); }
  sp = Math.max(sp, 1e-300); sq = Math.max(sq, 1e-300);
  let kp = 0, kq = 0;
  for (let i = 0; i < p.length; i++) {
    const a = Math.max(p[i], 0) / sp, b = Math.max(q[i], 0) / sq, m = (a + b) / 2;
    if (a > 0) kp += a * Math.log2(a / m);
    if (b > 0) kq += b * Math.log2(b / m);
  }
  return 0.5 * kp + 0.5 * kq;
}
function colour(t) {  // t in [-1, 1]: blue (A looks there more) - white - red (B looks there more)
  const s = Math.abs(t);
  return t < 0 ? [Math.round(255 * (1 - s)), Math.round(255 * (1 - 0.6 * s)), 255] : [255, Math.round(255 * (1 - 0.8 * s)), Math.round(255 * (1 - s))];
}
const results = [];
function drawDiffs(xa, xb) {
  const A = api(fa), B = api(fb), head = "mean";
  results.length = 0;
  layers.forEach((L, i) => {
    const qa = A.queryIndex(xa[0], xa[1], L.gridA), qb = B.queryIndex(xb[0], xb[1], L.gridB);
    const grid = commonGrid(L.keyA, L.keyB);
    const ra = resample(A.row(L.a, qa, head), L.keyA, grid), rb = resample(B.row(L.b, qb, head), L.keyB, grid);
    const d = ra.map((v, k) => rb[k] - v);
    let cell = 0;
    for (let k = 1; k < d.length; k++) if (Math.abs(d[k]) > Math.abs(d[cell])) cell = k;
    const largest = d[cell], top = Math.abs(largest) || 1, jsd = jsdBits(ra, rb);
    results.push({layer: i, grid, largest, cell, jsd, diff: Array.from(d)});
    const canvas = document.getElementById(`diff-${i}`), ctx = canvas.getContext("2d");
    const [H, W] = grid, cw = canvas.width / W, ch = canvas.height / H;
    ctx.drawImage(DATA.photo, 0, 0, canvas.width, canvas.height);
    for (let r = 0; r < H; r++) for (let c = 0; c < W; c++) {
      const t = d[r * W + c] / top, [R, G, Bl] = colour(t);
      ctx.fillStyle = `rgba(${R}, ${G}, ${Bl}, ${(0.85 * Math.abs(t)).toFixed(3)})`;
      ctx.fillRect(Math.floor(c * cw), Math.floor(r * ch), Math.ceil(cw), Math.ceil(ch));
    }
    ctx.strokeStyle = "#000"; ctx.lineWidth = 2;
    ctx.strokeRect(Math.floor((cell % W) * cw), Math.floor(Math.floor(cell / W) * ch), Math.ceil(cw), Math.ceil(ch));
    const fmt = v => (Math.abs(v) >= 0.01 ? v.toFixed(3) : v.toExponential(1));
    document.getElementById(`diff-text-${i}`).textContent =
      `B − A, scale ±${fmt(top)}: largest change ${largest >= 0 ? "+" : ""}${fmt(largest)} at (${Math.floor(cell / W)}, ${cell % W}) ` +
      `of ${H}×${W} · JSD ${jsd.toFixed(3)} bits`;
  });
}
function follow(from, to, sizeFrom, sizeTo, kind) {  // what happened on one side, done on the other at the same place
  const src = api(from), dst = api(to);
  if (!src || !dst || linked) return;
  const s = src.state(), at = kind === "pin" ? s.pinned : s.current;
  linked++;
  try {
    if (!at) { if (kind === "move") dst.leave(); return; }
    const other = onOther(at, sizeFrom, sizeTo);
    if (kind === "pin") dst.pin(other[0], other[1]); else dst.draw(other[0], other[1]);
    const xa = from === fa ? at : other, xb = from === fa ? other : at;
    drawDiffs(xa, xb);
  } finally { linked--; }
}
function hook(frame, other, size, otherSize) {
  const doc = frame.contentDocument;
  doc.addEventListener("pointermove", () => follow(frame, other, size, otherSize, "move"), {passive: true});
  doc.addEventListener("pointerdown", () => follow(frame, other, size, otherSize, "pin"), {passive: true});
}
const start = setInterval(() => {  // each side pins its first point itself (the same place): then the differences
  if (!ready(fa) || !ready(fb) || !DATA.photo.complete || !api(fa).state().pinned || !api(fb).state().pinned) return;
  clearInterval(start);
  for (const f of [fa, fb]) f.style.height = (f.contentDocument.documentElement.scrollHeight + 20) + "px";
  hook(fa, fb, DATA.sizeA, DATA.sizeB);
  hook(fb, fa, DATA.sizeB, DATA.sizeA);
  drawDiffs(api(fa).state().pinned, api(fb).state().pinned);
  try {  // shown in a frame of the app: the frame as tall as the page, so the differences show under the views
    if (window.frameElement) window.frameElement.style.height = (document.documentElement.scrollHeight + 20) + "px";
  } catch (e) { /* a frame of another origin: it keeps its height */ }
  window.vggattnCompare.ready = true;
}, 30);
window.vggattnCompare = {results, ready: false, onOther, drawDiffs};
})();
"""


def compare_html(a: Side, b: Side, *, title: str, pin: tuple[float, float] | None = None) -> str:
    """The whole file: A and B side by side (each a `live_html` in its own frame, A's point pinned when it opens
    and B's at the same place), then B minus A for each pair of layers (the i-th of each, as many as the fewer)."""
    esc = _html.escape
    pin = pin if pin is not None else (a.result.size[0] // 2, a.result.size[1] // 2)
    pin_b = point_on(pin, a.result.size, b.result.size)
    frames = []
    for key, side, point in (("a", a, pin), ("b", b, pin_b)):
        page = live_html(side.result, side.layers, title=side.label, about=side.about, pin=point)
        frames.append(f'<div class="side"><h2>{key.upper()}: {esc(side.label)}</h2>'
                      f'<iframe id="side-{key}" title="{key.upper()}" srcdoc="{esc(page, quote=True)}"></iframe></div>')
    count = min(len(a.layers), len(b.layers))
    pairs = [{"a": i, "b": i, "name": f"{a.layers[i].name} / {b.layers[i].name}", "gridA": list(a.layers[i].grid),
              "gridB": list(b.layers[i].grid), "keyA": list(a.layers[i].key_grid), "keyB": list(b.layers[i].key_grid)}
             for i in range(count)]
    dw, dh = a.result.display.shape[1], a.result.display.shape[0]
    height = round(DIFF_WIDTH * dh / dw)
    diffs = "".join(
        f'<div class="diff"><b>{esc(p["name"])}</b><canvas id="diff-{i}" width="{DIFF_WIDTH}" height="{height}"></canvas>'
        f'<div class="scale"><span>A more</span><canvas width="120" height="8" style="width: 120px; border: 0; '
        f'background: linear-gradient(to right, #00f, #fff, #f00)"></canvas><span>B more</span></div>'
        f'<span id="diff-text-{i}"></span></div>' for i, p in enumerate(pairs))
    data = {"pairs": pairs, "sizeA": list(a.result.size), "sizeB": list(b.result.size)}
    photo = "data:image/jpeg;base64," + base64.b64encode(a.result.display_jpeg).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}: vggattn A/B</title><style>{PAGE_CSS}{COMPARE_CSS}</style></head>
<body>
<h1>{esc(title)}: A against B</h1>
<p class="about">Two live views under one pointer: move or click on either picture and the other follows at the same
place in its image. Below, for each pair of layers, B's row minus A's (mean of heads) on the finer of their grids, red
where B looks more, blue where A does, on a symmetric scale of the largest change. Saved by vggattn; it needs no
server and no network.</p>
<div class="sides">{"".join(frames)}</div>
<div class="diffs">{diffs}</div>
<script>
const DATA = {script_json(data)};
DATA.photo = new Image(); DATA.photo.src = "{photo}";
{COMPARE_JS}
</script>
</body></html>
"""
