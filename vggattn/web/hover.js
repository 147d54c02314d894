// vggattn hover view: the three attention panels follow the pointer over the input image.
//
// Runs as the js_on_load of a gr.HTML (vggattn/app.py); Gradio gives it `element`, `props` and `watch`.
// props.value is the payload of vggattn/hover.py (per layer Q, K, log Z), sent once per upload; every
// pointer move is answered here, with no request: row i = softmax(q_i . K), column j = exp(Q k_j - log Z).
// The maps are drawn on canvases laid over the server's panels (#panel-0..2); when the pointer leaves
// the image the canvases hide and the server's panels (the clicked, pinned point) show again, so if
// this script fails to load, clicks still render through the server as before.
// window.vggattnHover exposes the maths and the drawing for tests and bench/hover_speed.py.

const NUM_PANELS = 3;
const TOP_K = 5;
const LOG_DECADES = 4;    // vggattn.render.LOG_DECADES
const api = {};
let payload = null;       // decoded: {size, display, image (HTMLImageElement), layers: [{name, grid, dim, q, k, logz}]}
let controls = {...props.controls};  // opacity, colormap, mode, mark, scale: the app's CONTROLS
let view = "row";         // "row": where the position looks; "column": who looks at it
let pinned = null;        // [x, y] of the last click, in original-image pixels
let current = null;       // [x, y] under the pointer
const latencies = [];     // ms from a pointer event to the three panels drawn (last 1000)
const frames = [];        // ms from a pointer event to the next animation frame after the drawing (last 1000)
const baseCache = new Map();  // "w x h" -> ImageData of the display image at that size

// -- payload -----------------------------------------------------------------------------------
function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * Math.pow(2, e - 15) * (1 + f / 1024);
}

function decodeArray(b64, dtype) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  if (dtype === "float32") return new Float32Array(bytes.buffer);
  const half = new Uint16Array(bytes.buffer), out = new Float32Array(half.length);
  for (let i = 0; i < half.length; i++) out[i] = halfToFloat(half[i]);
  return out;
}

function load(raw) {
  baseCache.clear();
  pinned = current = null;
  hide();
  if (!raw || !raw.layers) { payload = null; setLine(""); return; }
  const image = new Image();
  image.onload = () => {  // until the picture is decoded the panels are drawn on grey: redraw on it
    baseCache.clear();
    if (current) draw(current[0], current[1]);
  };
  image.src = raw.image;
  payload = {
    size: raw.size, display: raw.display_size, image, bytes: JSON.stringify(raw).length,
    layers: raw.layers.map(l => ({
      name: l.name, grid: l.grid, dim: l.dim, n: l.grid[0] * l.grid[1],
      q: decodeArray(l.q, raw.dtype), k: decodeArray(l.k, raw.dtype), logz: decodeArray(l.logz, "float32"),
    })),
  };
  setLine("Move the pointer over the image: the panels follow it. Click to pin a point (readouts below).");
}

// -- maths (float64 accumulation; the reference is LayerCapture.rows in Python) -----------------
function row(li, i) {
  const L = payload.layers[li], c = L.dim, out = new Float64Array(L.n);
  let max = -Infinity;
  for (let j = 0; j < L.n; j++) {
    let s = 0;
    for (let d = 0; d < c; d++) s += L.q[i * c + d] * L.k[j * c + d];
    out[j] = s;
    if (s > max) max = s;
  }
  let sum = 0;
  for (let j = 0; j < L.n; j++) { out[j] = Math.exp(out[j] - max); sum += out[j]; }
  for (let j = 0; j < L.n; j++) out[j] /= sum;
  return out;
}

function column(li, j) {
  const L = payload.layers[li], c = L.dim, out = new Float64Array(L.n);
  for (let i = 0; i < L.n; i++) {
    let s = 0;
    for (let d = 0; d < c; d++) s += L.q[i * c + d] * L.k[j * c + d];
    out[i] = Math.exp(s - L.logz[i]);
  }
  return out;
}

function queryIndex(x, y, grid) {  // vggattn.data.query_index: pixel centres, clamped
  const [w, h] = payload.size, [gh, gw] = grid;
  const col = Math.min(Math.max(Math.floor((x + 0.5) / w * gw), 0), gw - 1);
  const r = Math.min(Math.max(Math.floor((y + 0.5) / h * gh), 0), gh - 1);
  return r * gw + col;
}

function topCells(values, k) {
  const idx = [];
  for (let j = 0; j < values.length; j++) {
    if (idx.length < k || values[j] > values[idx[idx.length - 1]]) {
      idx.push(j);
      idx.sort((a, b) => values[b] - values[a]);
      if (idx.length > k) idx.pop();
    }
  }
  return idx;
}

// -- drawing --------------------------------------------------------------------------------------
function canvasFor(i) {
  const panel = document.getElementById(`panel-${i}`);
  if (!panel) return null;
  let canvas = panel.querySelector("canvas.vggattn-hover");
  if (!canvas) {
    canvas = document.createElement("canvas");
    canvas.className = "vggattn-hover";
    canvas.dataset.layer = String(i);
    // over the panel's picture, under its label and buttons; never takes the pointer
    Object.assign(canvas.style, {position: "absolute", left: "1px", top: "1px", zIndex: "1", pointerEvents: "none"});
    panel.appendChild(canvas);
  }
  return canvas;
}

function hide() {
  for (let i = 0; i < NUM_PANELS; i++) {
    const c = document.querySelector(`#panel-${i} canvas.vggattn-hover`);
    if (c) c.style.display = "none";
  }
}

function baseImage(w, h) {  // the display image at w x h, its pixels read once per size
  const key = `${w}x${h}`;
  if (!baseCache.has(key)) {
    const c = document.createElement("canvas");
    c.width = w; c.height = h;
    const ctx = c.getContext("2d", {willReadFrequently: true});
    ctx.imageSmoothingQuality = "high";
    if (payload.image.complete && payload.image.naturalWidth) ctx.drawImage(payload.image, 0, 0, w, h);
    else { ctx.fillStyle = "#808080"; ctx.fillRect(0, 0, w, h); return ctx.getImageData(0, 0, w, h); }
    baseCache.set(key, ctx.getImageData(0, 0, w, h));
  }
  return baseCache.get(key);
}

function sampler(n, size, smooth) {  // per output pixel: source index pair and weight (PIL's centre alignment)
  const i0 = new Int32Array(size), i1 = new Int32Array(size), t = new Float32Array(size);
  const scale = n / size;
  for (let o = 0; o < size; o++) {
    if (!smooth) { i0[o] = i1[o] = Math.min(n - 1, Math.floor((o + 0.5) * scale)); continue; }
    const s = Math.min(Math.max((o + 0.5) * scale - 0.5, 0), n - 1);
    i0[o] = Math.floor(s); i1[o] = Math.min(n - 1, i0[o] + 1); t[o] = s - i0[o];
  }
  return {i0, i1, t};
}

// heat (gh*gw values in [0, 1]) over the display image at w x h, blended like PIL's Image.blend
function blend(heat, grid, w, h) {
  const [gh, gw] = grid, smooth = controls.mode === "smooth", a = controls.opacity;
  const pal = props.palettes[controls.colormap] || props.palettes.jet;
  const sx = sampler(gw, w, smooth), sy = sampler(gh, h, smooth);
  const base = baseImage(w, h).data, out = new ImageData(w, h), px = out.data;
  for (let y = 0; y < h; y++) {
    const r0 = sy.i0[y] * gw, r1 = sy.i1[y] * gw, ty = sy.t[y];
    for (let x = 0; x < w; x++) {
      const c0 = sx.i0[x], c1 = sx.i1[x], tx = sx.t[x];
      const top = heat[r0 + c0] + (heat[r0 + c1] - heat[r0 + c0]) * tx;
      const bottom = heat[r1 + c0] + (heat[r1 + c1] - heat[r1 + c0]) * tx;
      const v = top + (bottom - top) * ty;
      const p = 3 * Math.min(255, Math.max(0, Math.floor(v * 255 + 0.5)));
      const o = 4 * (y * w + x);
      px[o] = base[o] + (pal[p] - base[o]) * a;
      px[o + 1] = base[o + 1] + (pal[p + 1] - base[o + 1]) * a;
      px[o + 2] = base[o + 2] + (pal[p + 2] - base[o + 2]) * a;
      px[o + 3] = 255;
    }
  }
  return out;
}

// row: min-max, as the server's overlays. column: weights in [0, 1] divided by the column's maximum, or
// by 1/N (uniform attention) when no query gives it more: a key nobody looks at stays dark, a sink lights all.
// "log" scale: log10 of the weights, floored LOG_DECADES below the maximum (vggattn.render.scale_map)
function scaled(values, how, scale) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  if (how === "column") { lo = 0; hi = Math.max(hi, 1 / values.length); }
  const out = new Float32Array(values.length);
  if (scale === "log" && hi > 0) {
    const floor = hi * Math.pow(10, -LOG_DECADES), top = Math.log10(hi);
    const bottom = how === "column" ? top - LOG_DECADES : Math.log10(Math.max(lo, floor));
    if (top > bottom) for (let j = 0; j < values.length; j++) {
      out[j] = Math.min(1, (Math.log10(Math.max(values[j], floor)) - bottom) / (top - bottom));
    }
    return out;
  }
  if (hi > lo) for (let j = 0; j < values.length; j++) out[j] = Math.min(1, (values[j] - lo) / (hi - lo));
  return out;
}

function drawPanel(i, x, y) {
  const canvas = canvasFor(i);
  if (!canvas) return;
  const L = payload.layers[i], [gh, gw] = L.grid, q = queryIndex(x, y, L.grid);
  const values = view === "row" ? row(i, q) : column(i, q);
  const panel = canvas.parentElement, bw = Math.max(1, panel.clientWidth - 2), bh = Math.max(1, panel.clientHeight - 2);
  const [dw, dh] = payload.display, s = Math.min(bw / dw, bh / dh);
  const w = Math.max(1, Math.round(dw * s)), h = Math.max(1, Math.round(dh * s));
  const ox = Math.floor((bw - w) / 2), oy = Math.floor((bh - h) / 2);
  if (canvas.width !== bw || canvas.height !== bh) { canvas.width = bw; canvas.height = bh; }
  canvas.style.display = "block";
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, bw, bh);
  ctx.putImageData(blend(scaled(values, view, controls.scale), L.grid, w, h), ox, oy);
  const cw = w / gw, ch = h / gh, line = Math.max(1, Math.round(Math.min(w, h) / 300));
  if (controls.mark && view === "row") {  // the top-5 attended cells, numbered (as the server's panels)
    ctx.font = `${Math.max(10, Math.round(Math.min(w, h) / 25))}px sans-serif`;
    ctx.textBaseline = "top";
    topCells(values, TOP_K).forEach((j, rank) => {
      const bx = ox + (j % gw) * cw, by = oy + Math.floor(j / gw) * ch;
      ctx.lineWidth = line + 2; ctx.strokeStyle = "#000"; ctx.strokeRect(bx, by, cw, ch);
      ctx.lineWidth = line; ctx.strokeStyle = "#ff0"; ctx.strokeRect(bx, by, cw, ch);
      ctx.lineWidth = 3; ctx.strokeStyle = "#000"; ctx.strokeText(String(rank + 1), bx + 2 * line, by + line);
      ctx.fillStyle = "#ff0"; ctx.fillText(String(rank + 1), bx + 2 * line, by + line);
    });
  }
  const [iw, ih] = payload.size, px = ox + (x + 0.5) / iw * w, py = oy + (y + 0.5) / ih * h;
  const r = Math.max(3, Math.round(Math.min(w, h) / 80));
  ctx.lineWidth = Math.max(1, r >> 1); ctx.strokeStyle = "#fff";
  ctx.strokeRect(ox + (q % gw) * cw, oy + Math.floor(q / gw) * ch, cw, ch);  // the cell under the pointer
  ctx.beginPath(); ctx.arc(px, py, r + 1, 0, 2 * Math.PI); ctx.fillStyle = "#000"; ctx.fill();
  ctx.beginPath(); ctx.arc(px, py, r, 0, 2 * Math.PI); ctx.fillStyle = "#fff"; ctx.fill();
  canvas.dataset.query = String(q);
  canvas.dataset.view = view;
}

function draw(x, y, since) {
  if (!payload) return;
  for (let i = 0; i < Math.min(NUM_PANELS, payload.layers.length); i++) drawPanel(i, x, y);
  const queries = payload.layers.map(L => `${L.name}: ${queryIndex(x, y, L.grid)}`).join(", ");
  const what = view === "row" ? "where it looks" : "who looks at it (column, scaled to its maximum, at least 1/N)";
  setLine(`Under the pointer: pixel (${x}, ${y}) → query index per layer: ${queries} · ${what}`);
  if (since !== undefined) {
    latencies.push(performance.now() - since);
    if (latencies.length > 1000) latencies.shift();
    requestAnimationFrame(() => { frames.push(performance.now() - since); if (frames.length > 1000) frames.shift(); });
  }
}

// -- pointer -----------------------------------------------------------------------------------------
// The original-image pixel under the pointer, or null outside the picture: the same formula as Gradio's
// image .select (its picture is letterboxed, never enlarged; a click's clientX/Y are whole pixels where a
// pointermove's are fractional), so a click pins the pixel the pointer showed.
function pixelAt(e) {
  const img = document.querySelector("#input-image img");
  if (!payload || !img || !img.naturalWidth) return null;
  const r = img.getBoundingClientRect(), nw = img.naturalWidth, nh = img.naturalHeight;
  const s = Math.min(r.width / nw, r.height / nh, 1);
  const x = Math.round((Math.trunc(e.clientX) - r.left - (r.width - nw * s) / 2) / s);
  const y = Math.round((Math.trunc(e.clientY) - r.top - (r.height - nh * s) / 2) / s);
  if (x < 0 || y < 0 || x >= nw || y >= nh) return null;
  return [Math.min(x, payload.size[0] - 1), Math.min(y, payload.size[1] - 1)];
}

function leave() {
  current = null;
  if (pinned && view === "column") draw(pinned[0], pinned[1]);  // the server's panels show rows only
  else hide();
}

const listeners = {
  pointermove: e => {
    const p = pixelAt(e);
    if (!p) { if (current) leave(); return; }
    if (current && p[0] === current[0] && p[1] === current[1]) return;
    current = p;
    draw(p[0], p[1], e.timeStamp);
  },
  pointerdown: e => { const p = pixelAt(e); if (p) pinned = p; },
  pointerout: e => { if (!e.relatedTarget && current) leave(); },  // the pointer left the window
};
if (window.vggattnHover && window.vggattnHover.listeners) {  // mounted again: one set of listeners only
  for (const [type, fn] of Object.entries(window.vggattnHover.listeners)) document.removeEventListener(type, fn);
}
for (const [type, fn] of Object.entries(listeners)) document.addEventListener(type, fn, {passive: true});

// -- the line under the panels, and the row / column switch -----------------------------------------
function setLine(text) {
  const line = element.querySelector(".vggattn-hover-line");
  if (line) line.textContent = text;
}

function bindSwitch() {
  const box = element.querySelector("input.vggattn-column");
  if (!box) return;
  box.checked = view === "column";
  box.onchange = () => setView(box.checked ? "column" : "row");
}

function setView(v) {
  view = v === "column" ? "column" : "row";
  const box = element.querySelector("input.vggattn-column");
  if (box) box.checked = view === "column";
  const at = current || (view === "column" ? pinned : null);
  if (payload && at) draw(at[0], at[1]); else hide();
}

function setControls(c) {
  Object.assign(controls, c);
  baseCache.clear();
  const at = current || (view === "column" ? pinned : null);
  if (payload && at) draw(at[0], at[1]);
}

bindSwitch();
load(props.value);
if (typeof watch === "function") watch("value", () => { bindSwitch(); load(props.value); });

Object.assign(api, {
  load, row: (li, i) => Array.from(row(li, i)), column: (li, j) => Array.from(column(li, j)), queryIndex,
  draw: (x, y) => { const t = performance.now(); current = [x, y]; draw(x, y, t); }, leave, setView, setControls,
  scaled: (values, how, scale) => Array.from(scaled(values, how, scale)), listeners, latencies, frames,
  state: () => ({view, pinned, current, controls: {...controls},
                 bytes: payload ? payload.bytes : 0, layers: payload ? payload.layers.length : 0}),
});
window.vggattnHover = api;
