// vggattn hover view: the attention panels follow the pointer over the input image, and a click pins a point.
//
// Runs as the js_on_load of a gr.HTML (vggattn/app/ui.py); Gradio gives it `element`, `props` and `watch`.
// props.value is the payload of vggattn/view/hover.py (per layer Q, K, log Z, sink, or the rows themselves), sent once
// per upload; the other props (vggattn.view.hover.page_props) are the rendering constants, palettes, panel count, sink
// rule and controls. Every pointer move and click is answered here, with no request: row i = softmax(scale q_i . K)
// (or scale q_i . K / M for the dot-product non-local form; a head's own row, or the mean of the heads), column
// j = exp(scale Q k_j - log Z), drawn with the rules of vggattn/view/render.py (attention_picture) at the display copy's
// size, then scaled into the panel: the same pixels as the server's pinned render (tests/test_browser.py). Rows lie
// on the key grid, which can be smaller than the query grid (pooled keys); "map" layers (GCNet) have one map per
// image that no query changes.
// The maps are drawn on canvases laid over the server's panels (#panel-0..); if this script fails to load,
// clicks still render through the server. window.vggattnHover exposes the maths and drawing for tests and bench/.

const K = props;          // constants: top_k, log_decades, full_at, digits, *_color, palettes, num_panels, sink_dominated
const api = {};
let payload = null;       // decoded: {size, display, image, base (ImageData at display size), layers: [...]}
let controls = {head: "mean", ...K.controls};  // opacity, colormap, mode, mark, scale (, head): the app's CONTROLS
let view = "row";         // "row": where the position looks; "column": who looks at it
// The view's switches, each a checkbox input.vggattn-<name> of the template: a transformer's panels show attention
// rollout up to each block (rollout) or the norms of the tokens entering it (norms) instead of a row; heads: each
// panel as a grid of one small map per head (DINO's figures), each on its own scale
const switches = {rollout: false, norms: false, heads: false};
// what a row shows: "weights" (the attention), "value" (sum_h a_j ||u_j||: what each key brings, Kobayashi et al.)
// or "effect" (how far the block's output moves when each key is removed and the rest renormalised)
let measure = "weights";
let pinned = null;        // [x, y] of the last click, in original-image pixels
let pinnedAt = 0;         // when (performance.now()) it was pinned
let token = null;         // the prefix token (class, register) whose own row is pinned, by name (its tile was clicked)
let current = null;       // [x, y] under the pointer
const latencies = [];     // ms from a pointer move to the panels drawn (last 1000)
const works = [];         // ms of the page's own work per pointer move: the drawing's start to its end (last 1000)
const frames = [];        // ms from a pointer move to the next animation frame after the drawing (last 1000)
const pins = [];          // ms from a click (pointerdown) to the pinned panels drawn (last 1000)
const TILES_WIDTH = 78;   // px right of a transformer's picture for its prefix tiles
const LEGEND_STRIP = 22;  // px under the picture for the colour scale, so it never covers the map
let generation = 0;       // bumped by every load: a late image decode of an older upload is ignored

// -- payload -----------------------------------------------------------------------------------
function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * Math.pow(2, e - 15) * (1 + f / 1024);
}

function decodeArray(b64, dtype, buffer) {  // base64 text, or {at, bytes} in a fetched layer's buffer (layerBinary)
  let bytes;
  if (typeof b64 === "string") {
    const bin = atob(b64);
    bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  } else {
    bytes = new Uint8Array(buffer, b64.at, b64.bytes);  // 8-byte aligned by the server: views, no copy
  }
  if (dtype === "float32") return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  if (dtype === "int32") return new Int32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  if (dtype === "float64") return new Float64Array(bytes.buffer, bytes.byteOffset, bytes.length / 8);
  const half = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.length / 2), out = new Float32Array(half.length);
  for (let i = 0; i < half.length; i++) out[i] = halfToFloat(half[i]);
  return out;
}

function layerBinary(buffer) {  // a deferred layer as the server sends it (vggattn/view/hover.py layer_binary)
  const length = new DataView(buffer).getUint32(0, true);
  return JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, length)));
}

// One layer of the payload, decoded; "deferred": its description only, its arrays come later (requestLayer)
function decodeLayer(l, dtype, buffer = null) {  // buffer: a fetched layer's bytes, its arrays' home
  const keyGrid = l.key_grid || l.grid, kind = l.kind || "qk", prefix = l.prefix || [], deferred = !!l.deferred;
  const arr = (name, as = dtype) => (!deferred && l[name] ? decodeArray(l[name], as, buffer) : null);
  return {
    prefix, P: prefix.length,  // prefix tokens: Q's rows after the grid's, K's keys after the grid's
    prefixW: arr("prefix_w"), prefixRows: arr("prefix_rows"),  // "rows": (heads, N, P), (heads, P, M + P)
    name: l.name, grid: l.grid, keyGrid, n: l.grid[0] * l.grid[1], m: keyGrid[0] * keyGrid[1], sink: l.sink,
    heads: l.heads || 1, kind, normalise: l.normalise || "softmax", scale: l.scale === undefined ? 1 : l.scale,
    dim: l.dim, meaning: l.meaning || "", deferred, loading: false,
    q: kind === "qk" ? arr("q") : null, k: kind === "qk" ? arr("k") : null,
    logz: arr("logz", l.logz_dtype || "float32"),
    rows: kind === "rows" || kind === "map" ? arr("rows") : null,
    norms: arr("norms", "float32"), highNorm: l.high_norm, rollout: arr("rollout", "float16"),  // tokens: (N + P,) grid cells, then the prefix
    window: l.window || 0, values: kind === "window" ? arr("values") : null,
    cells: kind === "window" ? arr("cells", "int32") : null,
    u: arr("u"), uc: l.uc || 0, uNote: l.u_note || "",  // (heads, M + P, C): what each key brings through each head
    hasU: !!l.has_u || !!l.u,  // the server holds it: fetched when the view asks (`requestU`)
  };
}

let observer = null;      // watches the panels: a deferred layer is fetched, and a panel drawn, when it is on screen
const offscreen = new Set();  // panels off screen: not drawn per move (a big transformer's 12 would cost 40 ms)
const stale = new Set();      // off-screen panels that missed a drawing: drawn when they come on screen
const fetched = [];       // ms from a deferred layer's request to its panel drawn (last 1000)

function requestLayer(i) {  // a deferred layer's arrays, from the server, once
  const L = payload && payload.layers[i];
  if (!L || !L.deferred || L.loading) return;
  L.loading = true;
  const mine = generation, dtype = payload.dtype, t0 = performance.now();
  fetch(payload.fetch + i).then(r => (r.ok ? r.arrayBuffer() : r.json())).then(got => {
    if (mine !== generation || !payload) return;
    if (!(got instanceof ArrayBuffer)) { L.loading = false; L.failed = got.error; setLine(got.error); return; }
    payload.layers[i] = decodeLayer(layerBinary(got), dtype, got);
    payload.bytes += got.byteLength;
    const at = shown();
    if (at) drawPanel(i, at[0], at[1]);
    else if (payload.layers[i].P) { const parts = partsFor(i); if (parts) drawTiles(parts.tiles, payload.layers[i], null, null); }
    fetched.push(performance.now() - t0);
  }).catch(() => { L.loading = false; });
}

function requestU(i) {  // a layer's keys' contributions, from the server, once (the value-weighted and effect views)
  const L = payload && payload.layers[i];
  if (!L || L.u || !L.hasU || L.uLoading || !payload.fetch) return;
  L.uLoading = true;
  const mine = generation, dtype = payload.dtype;
  fetch(payload.fetch + "u/" + i).then(r => (r.ok ? r.arrayBuffer() : r.json())).then(got => {
    if (mine !== generation || !payload) return;
    if (!(got instanceof ArrayBuffer)) { L.uLoading = false; setLine(got.error); return; }
    const head = layerBinary(got);
    L.u = decodeArray(head.u, dtype, got);
    L.uc = head.uc;
    payload.bytes += got.byteLength;
    const at = shown();
    if (at) drawPanel(i, at[0], at[1]);
  }).catch(() => { L.uLoading = false; });
}

function load(raw) {
  generation++;
  if (simd) { simd.top = 0; simd.homes = new WeakMap(); }  // the old image's arrays: their room is reused
  pinned = current = token = null;
  document.querySelectorAll(".vggattn-tiles").forEach(e => e.remove());  // the new image's come with its payload
  for (const key of Object.keys(smallBases)) delete smallBases[key];  // the old image's, at panel sizes
  payload = null;
  hide();
  if (!raw || !raw.layers) { payload = null; setLine(""); return; }
  const mine = generation, image = new Image();
  image.onload = () => {  // the display copy's own pixels (no resampling): the server draws on the same ones
    if (mine !== generation) return;
    const c = document.createElement("canvas");
    c.width = image.naturalWidth; c.height = image.naturalHeight;
    const ctx = c.getContext("2d", {willReadFrequently: true});
    ctx.drawImage(image, 0, 0);
    payload.base = ctx.getImageData(0, 0, c.width, c.height);
    redraw();
  };
  image.src = raw.image;
  payload = {
    dtype: raw.dtype, size: raw.size, display: raw.display_size, image, base: null, bytes: JSON.stringify(raw).length,
    sent: JSON.stringify(raw).length,  // the upload's own payload; bytes adds the layers fetched later
    layers: raw.layers.map(l => decodeLayer(l, raw.dtype)), fetch: raw.fetch || null, example: raw.example || null,
  };
  if (raw.pin) { pinned = raw.pin.slice(); pinnedAt = 0; }  // a link's point (the server pinned it): drawn when ready
  if (raw.column) { view = "column"; const box = element.querySelector("input.vggattn-column"); if (box) box.checked = true; }
  if (observer) observer.disconnect();
  observer = null;
  offscreen.clear(); stale.clear();
  if (typeof IntersectionObserver === "function") {
    observer = new IntersectionObserver(entries => {
      for (const e of entries) {
        const i = Number(e.target.id.slice(6));
        if (!e.isIntersecting) { offscreen.add(i); continue; }
        offscreen.delete(i);
        if (payload && payload.layers[i] && payload.layers[i].deferred) requestLayer(i);
        else if (stale.delete(i) && payload) { const at = shown(); if (at) drawPanel(i, at[0], at[1]); }
      }
    }, {rootMargin: "100px"});
    payload.layers.forEach((L, i) => { const el = document.getElementById(`panel-${i}`); if (el) observer.observe(el); });
  }
  for (let i = 0; i < Math.min(K.num_panels, payload.layers.length); i++) {  // a transformer's prefix tiles, at once
    if (payload.layers[i].P) { const parts = partsFor(i); if (parts) drawTiles(parts.tiles, payload.layers[i], null, null); }
  }
  const label = element.querySelector("label.vggattn-heads-label");
  if (label) label.style.display = payload.layers.some(L => L.heads > 1) ? "" : "none";
  const rolloutLabel = element.querySelector("label.vggattn-rollout-label");
  if (rolloutLabel) rolloutLabel.style.display = raw.layers.some(l => l.has_rollout) ? "" : "none";
  const measureLabel = element.querySelector("label.vggattn-measure-label");
  if (measureLabel) {
    measureLabel.style.display = payload.layers.some(L => L.hasU) ? "" : "none";
    if (measure !== "weights") payload.layers.forEach((L, i) => requestU(i));
    const none = payload.layers.filter(L => !L.hasU && L.uNote).map(L => `${L.name}: ${L.uNote}`);
    measureLabel.title = none.length ? `Not offered for ${none.join("; ")}` : "";
  }
  const normsLabel = element.querySelector("label.vggattn-norms-label");
  if (normsLabel) normsLabel.style.display = payload.layers.some(L => L.norms || (L.deferred && L.P)) ? "" : "none";
  const tiles = payload.layers.some(L => L.P) ? " The tiles are the prefix tokens (class, registers): click one for its own row." : "";
  setLine("Move the pointer over the image: the panels follow it. Click to pin a point" +
          (K.standalone ? "." : " (its numbers appear below).") + tiles);
  syncLink();
}

// The address bar carries the view of an example photo (its name, the pinned point, the column view, the
// controls), so a copied link opens the same view (vggattn.app.on_link); an uploaded photo's view has no link
const LINK = ["example", "x", "y", "column", "opacity", "colormap", "mode", "mark", "scale", "head"];
function syncLink() {
  if (K.standalone || typeof history === "undefined") return;
  try {
    const url = new URL(location.href);
    LINK.forEach(k => url.searchParams.delete(k));
    if (payload && payload.example) {
      url.searchParams.set("example", payload.example);
      if (pinned) { url.searchParams.set("x", String(pinned[0])); url.searchParams.set("y", String(pinned[1])); }
      if (view === "column") url.searchParams.set("column", "1");
      for (const k of ["opacity", "colormap", "mode", "scale", "head"]) url.searchParams.set(k, String(controls[k]));
      url.searchParams.set("mark", controls.mark ? "1" : "0");
    }
    if (url.href !== location.href) history.replaceState(history.state, "", url);
  } catch (e) { /* a page that cannot change its address (a frame of another origin): no link */ }
}

// -- maths (float64 accumulation; the reference is LayerCapture.rows / .column and hover.PageLayer in Python) ----
function heads(L, head = controls.head) {  // the heads shown: the chosen one, or all (their mean)
  if (L.heads === 1) return [0];
  const h = Number(head);
  if (head === "mean" || head === null || head === undefined || !(h >= 0) || h >= L.heads) return [...Array(L.heads).keys()];
  return [h];
}

// hover.PageLayer._mean of part(h, into) over the heads hs: summed in head order (0 + the first is the first), then
// divided; each head's part written into one scratch array (a move makes no array per head)
let partScratch = new Float64Array(0);
function mean(hs, size, part) {
  if (hs.length === 1) return part(hs[0], new Float64Array(size));
  if (partScratch.length < size) partScratch = new Float64Array(size);
  const out = new Float64Array(size), one = partScratch.subarray(0, size);
  for (const h of hs) {
    part(h, one);
    for (let j = 0; j < size; j++) out[j] += one[j];
  }
  for (let j = 0; j < size; j++) out[j] /= hs.length;
  return out;
}

// out[j] = a[at..at+c) . b[bt + j*c..+c) for j < n, summed in float64: in WebAssembly SIMD (web/dots.wat, 5-7x this
// file's loop) where the page can run it and c % 4 == 0, else the loop. b, a layer's Q or K, is copied into the
// module's memory the first time it is used (its "home"); a, the one row, is widened there per call
const simd = (() => {
  try {
    const bytes = Uint8Array.from(atob(K.dots_wasm || ""), ch => ch.charCodeAt(0));
    if (!bytes.length || !WebAssembly.validate(bytes)) return null;
    const memory = new WebAssembly.Memory({initial: 1});
    const {dots} = new WebAssembly.Instance(new WebAssembly.Module(bytes), {env: {memory}}).exports;
    return {memory, dots, top: 0, homes: new WeakMap(), f32: null, f64: null};
  } catch (e) {
    return null;  // no WebAssembly SIMD here: the loop
  }
})();
api.simd = !!simd;

function wasmRoom(bytes) {  // `bytes` more at the top of the module's memory, 16-byte aligned: its byte offset
  const at = (simd.top + 15) & ~15, need = at + bytes, have = simd.memory.buffer.byteLength;
  if (need > have) simd.memory.grow(Math.ceil((need - have) / 65536));
  if (!simd.f64 || simd.f64.buffer !== simd.memory.buffer) {  // grown: the old views are detached
    simd.f32 = new Float32Array(simd.memory.buffer);
    simd.f64 = new Float64Array(simd.memory.buffer);
  }
  return at;
}

function home(b) {  // b's byte offset in the module's memory, copied there once
  let at = simd.homes.get(b);
  if (at === undefined) {
    at = wasmRoom(4 * b.length);
    simd.f32.set(b, at / 4);
    simd.top = at + 4 * b.length;
    simd.homes.set(b, at);
  }
  return at;
}

function dots(out, a, at, b, bt, n, c) {
  if (simd && c % 4 === 0 && b instanceof Float32Array) {
    const kb = home(b), s = wasmRoom(8 * (c + n)), f64 = simd.f64, q = s / 8;  // scratch above the homes
    for (let d = 0; d < c; d++) f64[q + d] = a[at + d];
    simd.dots(s, kb + 4 * bt, n, c, s + 8 * c);
    for (let j = 0; j < n; j++) out[j] = f64[q + c + j];
    return out;
  }
  return dotsLoop(out, a, at, b, bt, n, c);
}

function dotsLoop(out, a, at, b, bt, n, c) {
  const qd = new Float64Array(c);
  for (let d = 0; d < c; d++) qd[d] = a[at + d];  // the one row in a local array, b's rows walked in order
  for (let j = 0, o = bt; j < n; j++, o += c) {
    let s = 0;
    for (let d = 0; d < c; d++) s += qd[d] * b[o + d];
    out[j] = s;
  }
  return out;
}

// A transformer's row i over the key grid, then its prefix tokens (M + P), as they are: softmax over all M + P keys.
// i < N: a grid query; N + p: prefix token p's own row (the class token's: DINO's view)
function headFullRow(L, h, i, out = new Float64Array(L.m + L.P)) {  // out: where to write it
  const mk = L.m + L.P;
  if (L.kind !== "qk") {
    if (i >= L.n) { const base = (h * L.P + i - L.n) * mk; for (let j = 0; j < mk; j++) out[j] = L.prefixRows[base + j]; return out; }
    for (let j = 0; j < L.m; j++) out[j] = L.rows[(h * L.n + i) * L.m + j];
    for (let p = 0; p < L.P; p++) out[L.m + p] = L.prefixW[(h * L.n + i) * L.P + p];
    return out;
  }
  const c = L.dim, scale = L.scale;
  dots(out, L.q, (h * (L.n + L.P) + i) * c, L.k, h * mk * c, mk, c);
  let max = -Infinity;
  for (let j = 0; j < mk; j++) { const v = out[j] * scale; out[j] = v; if (v > max) max = v; }
  let sum = 0;
  for (let j = 0; j < mk; j++) { const e = Math.exp(out[j] - max); out[j] = e; sum += e; }
  for (let j = 0; j < mk; j++) out[j] /= sum;
  return out;
}

function headRow(L, h, i, out = new Float64Array(L.m + L.P)) {
  if (L.P) return headFullRow(L, h, i, out).subarray(0, L.m);
  out.fill(0);
  if (L.kind === "window") {  // the row's keys onto the key grid, in key order (hover.PageLayer does the same)
    const base = (h * L.n + i) * L.window;
    for (let t = 0; t < L.window; t++) { const c = L.cells[base + t]; if (c >= 0) out[c] += L.values[base + t]; }
    return out;
  }
  if (L.kind !== "qk") {
    const base = (h * (L.kind === "map" ? 1 : L.n) + (L.kind === "map" ? 0 : i)) * L.m;
    for (let j = 0; j < L.m; j++) out[j] = L.rows[base + j];
    return out;
  }
  const c = L.dim;
  dots(out, L.q, (h * L.n + i) * c, L.k, h * L.m * c, L.m, c);
  let max = -Infinity;
  for (let j = 0; j < L.m; j++) { out[j] *= L.scale; if (out[j] > max) max = out[j]; }
  if (L.normalise === "mean") { for (let j = 0; j < L.m; j++) out[j] /= L.m; return out; }
  let sum = 0;
  for (let j = 0; j < L.m; j++) { out[j] = Math.exp(out[j] - max); sum += out[j]; }
  for (let j = 0; j < L.m; j++) out[j] /= sum;
  return out;
}

function headColumn(L, h, j, out = new Float64Array(L.n)) {
  out.fill(0);
  if (L.kind === "window") {  // every row's weight on key cell j
    for (let i = 0; i < L.n; i++) {
      const base = (h * L.n + i) * L.window;
      for (let t = 0; t < L.window; t++) if (L.cells[base + t] === j) out[i] += L.values[base + t];
    }
    return out;
  }
  if (L.kind === "rows") {
    for (let i = 0; i < L.n; i++) out[i] = L.rows[(h * L.n + i) * L.m + j];
    return out;
  }
  const c = L.dim, nq = L.n + L.P;  // the grid's queries only: the first N of head h's
  dots(out, L.k, (h * (L.m + L.P) + j) * c, L.q, h * nq * c, L.n, c);
  for (let i = 0; i < L.n; i++) {
    out[i] = L.normalise === "mean" ? out[i] * L.scale / L.m : Math.exp(out[i] * L.scale - L.logz[h * nq + i]);
  }
  return out;
}

function row(li, i, head) {  // (M,) over the key grid
  const L = payload.layers[li];
  if (L.P) return fullRow(li, i, head).subarray(0, L.m);
  return mean(heads(L, head), L.m, (h, into) => headRow(L, h, i, into));
}

// vggattn.attention.effect: per key j of query i's rows a^h (over the grid, then the prefix tokens), from u^h_j:
// "value" sum_h |a^h_j| ||u^h_j||; "effect" ||sum_h c^h_j (u^h_j - o^h)||, o^h = sum_k a^h_k u^h_k, c = a / (1 - a)
// ("mean" rows: (M a u_j - o) / (M - 1)). The heads shown: the chosen one, or all of them (summed, not averaged)
function measured(li, i, how = measure, head = controls.head) {
  const L = payload.layers[li], t = L.m + L.P, C = L.uc, out = new Float64Array(t);
  if (!L.u) return null;
  const hs = heads(L, head), rows = hs.map((h) => L.P ? headFullRow(L, h, i) : headRow(L, h, i).slice());
  if (how === "value") {
    hs.forEach((h, r) => {
      for (let j = 0; j < t; j++) {
        let s = 0;
        for (let c = 0, o = (h * t + j) * C; c < C; c++) s += L.u[o + c] * L.u[o + c];
        out[j] += Math.abs(rows[r][j]) * Math.sqrt(s);
      }
    });
    return out;
  }
  const o = hs.map((h, r) => {
    const v = new Float64Array(C);
    for (let j = 0; j < t; j++) { const a = rows[r][j]; if (a) for (let c = 0, b = (h * t + j) * C; c < C; c++) v[c] += a * L.u[b + c]; }
    return v;
  });
  const d = new Float64Array(C), mean = L.normalise === "mean";
  if (hs.length === 1 && !mean) {  // one head: |c_j| sqrt(||u_j||^2 - 2 u_j . o + ||o||^2), one pass over U
    const h = hs[0], a = rows[0], v = o[0];
    if (!L.uNorm2) L.uNorm2 = [];
    if (!L.uNorm2[h]) {
      const n2 = new Float64Array(t);
      for (let j = 0; j < t; j++) { let s = 0; for (let c = 0, b = (h * t + j) * C; c < C; c++) s += L.u[b + c] * L.u[b + c]; n2[j] = s; }
      L.uNorm2[h] = n2;
    }
    let oo = 0;
    for (let c = 0; c < C; c++) oo += v[c] * v[c];
    for (let j = 0; j < t; j++) {
      let uo = 0;
      for (let c = 0, b = (h * t + j) * C; c < C; c++) uo += L.u[b + c] * v[c];
      out[j] = Math.abs(a[j] / (1 - a[j])) * Math.sqrt(Math.max(0, L.uNorm2[h][j] - 2 * uo + oo));
    }
    const top = dominant(a);
    if (top >= 0) { const m = heldMost(L, h, a, top, t, C); let s = 0; for (let c = 0; c < C; c++) s += m[c] * m[c]; out[top] = Math.sqrt(s); }
    return out;
  }
  const tops = rows.map(dominant), most = hs.map((h, r) => tops[r] >= 0 ? heldMost(L, h, rows[r], tops[r], t, C) : null);
  for (let j = 0; j < t; j++) {
    d.fill(0);
    hs.forEach((h, r) => {
      const a = rows[r][j], b = (h * t + j) * C;
      if (mean) { for (let c = 0; c < C; c++) d[c] += (t * a * L.u[b + c] - o[r][c]) / (t - 1); return; }
      if (j === tops[r]) { for (let c = 0; c < C; c++) d[c] += most[r][c]; return; }
      const k = a / (1 - a);
      for (let c = 0; c < C; c++) d[c] += k * (L.u[b + c] - o[r][c]);
    });
    let s = 0;
    for (let c = 0; c < C; c++) s += d[c] * d[c];
    out[j] = Math.sqrt(s);
  }
  return out;
}

function dominant(a) {  // the key holding over half of the row, or -1
  let top = 0;
  for (let j = 1; j < a.length; j++) if (a[j] > a[top]) top = j;
  return a[top] > 0.5 ? top : -1;
}

// a_j (u_j - the others' weighted mean): key j's move, from the other keys (no 1 - a_j, no u_j - o near a = 1)
function heldMost(L, h, a, j, t, C) {
  const rest = new Float64Array(C);
  let s = 0;
  for (let k = 0; k < t; k++) {
    if (k === j || !a[k]) continue;
    s += a[k];
    for (let c = 0, b = (h * t + k) * C; c < C; c++) rest[c] += a[k] * L.u[b + c];
  }
  if (!s) return rest.fill(0);  // no other key holds any weight: nothing to renormalise (as effect.py gives)
  for (let c = 0, b = (h * t + j) * C; c < C; c++) rest[c] = a[j] * (L.u[b + c] - rest[c] / s);
  return rest;
}

function fullRow(li, i, head) {  // (M + P,): a transformer's row on the grid, then on its prefix tokens
  const L = payload.layers[li];
  return mean(heads(L, head), L.m + L.P, (h, into) => headFullRow(L, h, i, into));
}

function rolloutRow(L, i) {  // (M + P,) row i of the rollout up to this block
  const t = L.m + L.P, out = new Float64Array(t);
  for (let j = 0; j < t; j++) out[j] = L.rollout[i * t + j];
  return out;
}

function tokenIndex(L) {  // the pinned prefix token's own query in layer L (-1: none pinned, or L has no such token)
  if (token === null || current) return -1;
  const p = L.prefix.indexOf(token);
  return p < 0 ? -1 : L.n + p;
}

function column(li, j, head) {  // (N,) over the query grid; a "map" layer: its map
  const L = payload.layers[li];
  if (L.kind === "map") return row(li, 0, head);
  return mean(heads(L, head), L.n, (h, into) => headColumn(L, h, j, into));
}

function queryIndex(x, y, grid) {  // vggattn.data.query_index: pixel centres, clamped
  const [w, h] = payload.size, [gh, gw] = grid;
  const col = Math.min(Math.max(Math.floor((x + 0.5) / w * gw), 0), gw - 1);
  const r = Math.min(Math.max(Math.floor((y + 0.5) / h * gh), 0), gh - 1);
  return r * gw + col;
}

function topIndices(values, k) {  // vggattn.view.render.top_indices: largest first, ties to the lower index
  const idx = [];
  for (let j = 0; j < values.length; j++) {
    let at = idx.length;
    while (at > 0 && values[j] > values[idx[at - 1]]) at--;
    if (at < k) { idx.splice(at, 0, j); if (idx.length > k) idx.pop(); }
  }
  return idx;
}
function markedIndices(values, k) {  // vggattn.view.render.marked_indices: of the k largest, those holding weight
  const idx = topIndices(values, k), peak = idx.length ? values[idx[0]] : 0;
  return idx.filter((j) => peak > 0 && values[j] > 0 && values[j] >= K.mark_share * peak);
}

// vggattn.view.render.map_levels: linear = weight / max(max, floor); log = LOG_DECADES below the maximum at 0
function levels(values, scale, floor) {
  let top = floor;
  for (const v of values) if (v > top) top = v;
  const out = new Float64Array(values.length);
  if (!(top > 0)) return out;
  if (scale === "log") {
    const lo = top / Math.pow(10, K.log_decades), bottom = Math.log10(top) - K.log_decades;
    for (let j = 0; j < values.length; j++) out[j] = Math.min((Math.log10(Math.max(values[j], lo)) - bottom) / K.log_decades, 1);
    return out;
  }
  for (let j = 0; j < values.length; j++) out[j] = Math.min(Math.max(values[j], 0) / top, 1);
  return out;
}

// -- drawing: vggattn.view.render, rule for rule ---------------------------------------------------------
const samplers = new Map();
function sampler(n, size, smooth) {  // per output pixel: source index pair and weight (centre-aligned, clamped)
  const key = `${n}|${size}|${smooth}`;
  if (!samplers.has(key)) samplers.set(key, makeSampler(n, size, smooth));
  return samplers.get(key);
}

function makeSampler(n, size, smooth) {
  const i0 = new Int32Array(size), i1 = new Int32Array(size), t = new Float64Array(size);
  const scale = n / size;
  for (let o = 0; o < size; o++) {
    if (!smooth) { i0[o] = i1[o] = Math.min(n - 1, Math.floor((o + 0.5) * scale)); continue; }
    const s = Math.min(Math.max((o + 0.5) * scale - 0.5, 0), n - 1);
    i0[o] = Math.floor(s); i1[o] = Math.min(n - 1, i0[o] + 1); t[o] = s - i0[o];
  }
  return {i0, i1, t};
}

function tintTable(colormap, opacity) {  // vggattn.view.render.palette and tint_alpha
  const pal = K.palettes[colormap] || K.palettes[K.controls.colormap], alpha = new Float64Array(256);
  for (let i = 0; i < 256; i++) alpha[i] = opacity * Math.min(1, i / (255 * K.full_at));
  return {pal, alpha};
}

let tintCache = {key: null, table: null};
// Every (level, photo value) pair's blended value, base + (colour - base) * alpha, as a Uint8ClampedArray stores
// it (rounding half to even, as the server's np.rint): per pixel, three lookups give the server's bytes exactly.
// One table per channel
function tint(colormap, opacity) {
  const key = `${colormap}|${opacity}`;
  if (tintCache.key !== key) {
    const {pal, alpha} = tintTable(colormap, opacity), one = new Uint8ClampedArray(1);
    const table = [0, 1, 2].map(() => new Uint8Array(256 * 256));
    for (let p = 0; p < 256; p++) {
      for (let b = 0; b < 256; b++) {
        for (let ch = 0; ch < 3; ch++) {
          one[0] = b + (pal[3 * p + ch] - b) * alpha[p];
          table[ch][p * 256 + b] = one[0];
        }
      }
    }
    tintCache = {key, table};
  }
  return tintCache.table;
}

const images = new Map();  // a panel's picture's pixels, kept from move to move (no new ImageData to collect)
function reused(key, w, h) {
  let im = images.get(key);
  if (!im || im.width !== w || im.height !== h) { im = new ImageData(w, h); images.set(key, im); }
  return im;
}

// Each pixel's level, (top + (bottom - top) * t) * 255 rounded half up and clamped (levels lie in [0, 1], so | 0 is
// the floor), then its tint; a pixel at level 0 keeps the photo's. A function of its own, over typed arrays only
// (a third of the time of the same loop inline). RGBA words little-endian: red in the low byte; no photo: grey
function tintPixels(px, base, across, i0, i1, t, w, h, tr, tg, tb) {
  const OPAQUE = -16777216;  // alpha 255 in an int32
  for (let y = 0; y < h; y++) {
    const r0 = i0[y] * w, r1 = i1[y] * w, ty = t[y];
    for (let x = 0, o = y * w; x < w; x++, o++) {
      const top = across[r0 + x], bottom = across[r1 + x];
      let p = ((top + (bottom - top) * ty) * 255 + 0.5) | 0;
      p = p < 0 ? 0 : p > 255 ? 255 : p;
      const rgb = base ? base[o] : 0x808080;
      if (p === 0) { px[o] = rgb | OPAQUE; continue; }
      const row = p << 8;
      px[o] = tr[row + (rgb & 255)] | (tg[row + ((rgb >> 8) & 255)] << 8) | (tb[row + ((rgb >> 16) & 255)] << 16) | OPAQUE;
    }
  }
}

let acrossScratch = new Float64Array(0);
// vggattn.view.render.overlay of upsample(levels), at w x h; level 0 (alpha 0) leaves the photo's pixel as it is.
// into: an ImageData of w x h to draw into (every pixel is written), else a new one
function overlay(lv, grid, w, h, baseImage = payload.base, into = null) {
  const [gh, gw] = grid, smooth = controls.mode === "smooth", [tr, tg, tb] = tint(controls.colormap, controls.opacity);
  const sx = sampler(gw, w, smooth), sy = sampler(gh, h, smooth);
  if (acrossScratch.length < gh * w) acrossScratch = new Float64Array(gh * w);
  const across = acrossScratch;  // each source row interpolated across: the same sums as per pixel
  for (let r = 0; r < gh; r++) {
    for (let x = 0; x < w; x++) {
      const a = lv[r * gw + sx.i0[x]], b = lv[r * gw + sx.i1[x]];
      across[r * w + x] = a + (b - a) * sx.t[x];
    }
  }
  const out = into || new ImageData(w, h), px = new Int32Array(out.data.buffer, out.data.byteOffset, w * h);
  const base = baseImage ? new Int32Array(baseImage.data.buffer, baseImage.data.byteOffset, w * h) : null;
  tintPixels(px, base, across, sy.i0, sy.i1, sy.t, w, h, tr, tg, tb);
  return out;
}

const halfUp = v => Math.floor(v + 0.5);

function cellRect(index, grid, w, h) {  // vggattn.view.render.cell_rect: (x0, y0, x1, y1), ends exclusive
  const [gh, gw] = grid, r = Math.floor(index / gw), c = index % gw;
  const x0 = halfUp(c * w / gw), y0 = halfUp(r * h / gh);
  return [x0, y0, Math.max(x0 + 1, halfUp((c + 1) * w / gw)), Math.max(y0 + 1, halfUp((r + 1) * h / gh))];
}

function frame(im, rect, width, color) {  // the pixels of rect within `width` of its edge
  const [x0, y0, x1, y1] = rect, px = im.data, xa = Math.max(x0, 0), xb = Math.min(x1, im.width);
  for (let y = Math.max(y0, 0); y < Math.min(y1, im.height); y++) {
    const edge = y - y0 < width || y1 - 1 - y < width;  // a row of the top or bottom band: all of it; else its ends
    for (let x = xa; x < xb; x++) {
      if (!edge && x - x0 >= width && x1 - 1 - x >= width) { x = Math.max(x, x1 - width) - 1; continue; }
      const o = 4 * (y * im.width + x);
      px[o] = color[0]; px[o + 1] = color[1]; px[o + 2] = color[2];
    }
  }
}

function disk(im, cx, cy, radius, color) {  // the pixels whose centres lie within radius of (cx, cy)
  const px = im.data;
  for (let y = Math.max(0, Math.floor(cy - radius)); y < Math.min(im.height, Math.ceil(cy + radius) + 1); y++) {
    for (let x = Math.max(0, Math.floor(cx - radius)); x < Math.min(im.width, Math.ceil(cx + radius) + 1); x++) {
      const dx = x + 0.5 - cx, dy = y + 0.5 - cy;
      if (dx * dx + dy * dy > radius * radius) continue;
      const o = 4 * (y * im.width + x);
      px[o] = color[0]; px[o + 1] = color[1]; px[o + 2] = color[2];
    }
  }
}

function glyph(im, digit, x, y, size, color, outline) {  // a 3x5 digit of size-pixel squares
  const grow = outline ? 1 : 0, bits = K.digits[digit];
  for (let k = 0; k < 15; k++) {
    if (bits[k] !== "1") continue;
    const gx = x + (k % 3) * size, gy = y + Math.floor(k / 3) * size;
    frame(im, [gx - grow, gy - grow, gx + size + grow, gy + size + grow], size + 2, color);
  }
}

function markSizes(w, h) {  // vggattn.view.render.mark_sizes
  const short = Math.min(w, h);
  return {line: Math.max(1, halfUp(short / 300)), digit: Math.max(1, halfUp(short / 128)), dot: Math.max(3, halfUp(short / 80))};
}

// vggattn.view.render.attention_picture at the display copy's size, for the point (x, y) of the original image
// size: [w, h] smaller than the display copy, for a panel; keep: a name under which its pixels are kept (reused)
function picture(li, x, y, how = view, size = null, keep = null) {
  const L = payload.layers[li], [w, h] = size || payload.display, map = L.kind === "map";
  const base = size ? smallBase(w, h) : payload.base;
  if (map) how = "row";  // one map per image: no query picks a row, and no column either
  // row: values on the key grid, the query's cell on the query grid; column: the other way round
  const own = tokenIndex(L);  // a prefix token's own row: no cell of the image asks
  const rolled = switches.rollout && L.rollout;  // attention rollout's row instead of the block's own
  if (own >= 0 || rolled) how = "row";
  const q = own >= 0 ? own : queryIndex(x, y, how === "row" ? L.grid : L.keyGrid), valueGrid = how === "row" ? L.keyGrid : L.grid;
  const what = how === "row" && !rolled && measure !== "weights" && L.u ? measured(li, q) : null;
  const full = what || (rolled ? rolloutRow(L, q) : L.P && how === "row" ? fullRow(li, q) : null);
  const values = full ? full.subarray(0, L.m) : how === "row" ? row(li, q) : column(li, q);
  const lv = levels(values, controls.scale, how === "column" ? 1 / L.m : 0);
  const im = overlay(lv, valueGrid, w, h, base, keep === null ? null : reused(keep, w, h)), s = markSizes(w, h);
  if (controls.mark && how === "row") {
    const line = s.line, size = s.digit;
    markedIndices(values, K.top_k).forEach((j, rank) => {  // frame and number outside the cell: its tint shows
      const [x0, y0, x1, y1] = cellRect(j, valueGrid, w, h);
      frame(im, [x0 - line - 1, y0 - line - 1, x1 + line + 1, y1 + line + 1], line + 1, K.outline_color);
      frame(im, [x0 - line, y0 - line, x1 + line, y1 + line], line, K.mark_color);
      let gx = x0 - line - 3 - 3 * size;
      const gy = Math.max(1, y0 - line - 1);
      if (gx < 1) gx = x1 + line + 3;
      glyph(im, (rank + 1) % 10, gx, gy, size, K.outline_color, true);
      glyph(im, (rank + 1) % 10, gx, gy, size, K.mark_color, false);
    });
  }
  const prefix = full && L.P ? full.subarray(L.m) : null;
  if (own >= 0) return {im, q, values, how, prefix};
  if (!map) frame(im, cellRect(q, how === "row" ? L.grid : L.keyGrid, w, h), Math.max(1, s.dot >> 1), K.query_color);
  const [iw, ih] = payload.size, cx = (x + 0.5) * w / iw, cy = (y + 0.5) * h / ih;
  disk(im, cx, cy, s.dot + 1, K.outline_color);
  disk(im, cx, cy, s.dot, K.query_color);
  return {im, q, values, how, prefix};
}

// -- panels ------------------------------------------------------------------------------------------
function partsFor(i) {  // the canvas laid over panel i's picture, and its colour scale
  const panel = document.getElementById(`panel-${i}`);
  if (!panel) return null;
  let canvas = panel.querySelector("canvas.vggattn-hover"), legend = panel.querySelector(".vggattn-legend");
  if (!canvas) {
    canvas = document.createElement("canvas");
    canvas.className = "vggattn-hover";
    canvas.dataset.layer = String(i);
    // over the panel's picture, under its label and buttons; never takes the pointer
    Object.assign(canvas.style, {position: "absolute", left: "1px", top: "1px", zIndex: "1", pointerEvents: "none"});
    panel.appendChild(canvas);
  }
  if (!legend) {
    legend = document.createElement("div");
    legend.className = "vggattn-legend";
    legend.innerHTML = '<canvas width="64" height="10"></canvas><span></span>';
    Object.assign(legend.style, {position: "absolute", left: "6px", bottom: "3px", zIndex: "2", display: "none",
      gap: "6px", alignItems: "center", maxWidth: "calc(100% - 12px)", font: "11px/1.3 sans-serif", color: "#fff",
      background: "rgba(0, 0, 0, 0.65)", padding: "2px 6px", borderRadius: "3px", pointerEvents: "none",
      contain: "layout paint", whiteSpace: "normal", overflowWrap: "anywhere"});  // its text changes per move: no page
    // reflow; wider than the panel (a phone's, a transformer's long line) it wraps onto more lines, never cut
    legend.querySelector("canvas").style.flex = "none";
    panel.appendChild(legend);
  }
  let tiles = panel.querySelector(".vggattn-tiles");
  const L = payload && payload.layers[i];
  if (L && L.P && (!tiles || tiles.dataset.names !== L.prefix.join("|"))) {
    if (tiles) tiles.remove();
    tiles = document.createElement("div");
    tiles.className = "vggattn-tiles";
    tiles.dataset.names = L.prefix.join("|");
    Object.assign(tiles.style, {position: "absolute", right: "4px", top: "28px", zIndex: "3", display: "none",
      flexDirection: "column", gap: "3px", font: "11px/1.25 sans-serif", maxHeight: "calc(100% - 60px)", overflow: "auto"});
    L.prefix.forEach((name, p) => {
      const tile = document.createElement("button");
      tile.type = "button";
      tile.className = "vggattn-tile";
      tile.dataset.token = name;
      tile.dataset.index = String(p);
      tile.title = `${name}: its weight in the row shown; click for this token's own row in every layer`;
      Object.assign(tile.style, {border: "1px solid #000", borderRadius: "3px", padding: "1px 5px", cursor: "pointer",
        textAlign: "left", whiteSpace: "nowrap", color: "#fff", background: "rgba(0, 0, 0, 0.7)", pointerEvents: "auto"});
      tile.innerHTML = `<b></b> <span></span>`;
      tile.querySelector("b").textContent = shortName(name);
      tile.onclick = e => { e.stopPropagation(); pinToken(token === name ? null : name); };
      tiles.appendChild(tile);
    });
    panel.appendChild(tiles);
  }
  return {panel, canvas, legend, tiles: L && L.P ? tiles : null};
}

// "cls_token" -> "CLS", "reg_token[2]" -> "reg 2", "embeddings.register_tokens[0]" -> "reg 0", "dist_token" -> "dist"
function shortName(name) {
  const last = name.split(".").pop(), index = (last.match(/\[(\d+)\]$/) || [])[1];
  const base = last.replace(/\[\d+\]$/, "").replace(/_?tokens?$/, "");
  const word = base === "cls" ? "CLS" : base === "register" ? "reg" : base || last;
  return index === undefined ? word : `${word} ${index}`;
}

// The prefix tiles beside the picture: each token's weight in the row shown, tinted on the map's scale (its colour
// is the map's for that weight, full beyond the grid's largest); the pinned token's tile is outlined
function drawTiles(tiles, L, prefix, values, ratios = false) {  // ratios: prefix norms / the median patch norm
  if (!tiles) return;
  if (tiles.style.display !== "flex") tiles.style.display = "flex";
  if (!prefix) {  // nothing pointed at: the tiles stay, to be clicked, with no weights
    tiles.querySelectorAll(".vggattn-tile").forEach(tile => {
      tile.querySelector("span").textContent = "";
      tile.dataset.weight = "";
      Object.assign(tile.style, {background: "rgba(0, 0, 0, 0.7)", color: "#fff", outline: "none"});
    });
    if (tiles.items) tiles.items.forEach(item => { item.shown = {}; });
    return;
  }
  let top = 0;
  for (let j = 0; j < values.length; j++) if (values[j] > top) top = values[j];
  const pal = (K.palettes[controls.colormap] || K.palettes[K.controls.colormap]);
  if (!tiles.items) {  // each tile and what it shows, kept: a move writes only what changed
    tiles.items = [...tiles.querySelectorAll(".vggattn-tile")].map(tile => ({tile, span: tile.querySelector("span"), shown: {}}));
  }
  tiles.items.forEach(({tile, span, shown}, p) => {
    const w = prefix[p], level = Math.min(255, Math.round(255 * (top > 0 ? Math.min(1, w / top) : 1)));
    const [r, g, b] = [pal[3 * level], pal[3 * level + 1], pal[3 * level + 2]], light = 0.299 * r + 0.587 * g + 0.114 * b > 140;
    const text = ratios ? `${w.toFixed(1)}x med` : w >= 0.001 ? `${(100 * w).toFixed(1)}%` : w.toExponential(1);
    if (span.textContent !== text) span.textContent = text;
    tile.dataset.weight = String(w);
    const style = {background: `rgb(${r}, ${g}, ${b})`, color: light ? "#000" : "#fff",
                   outline: token === L.prefix[p] ? "3px solid #00b7ff" : "none"};  // the pinned token's
    for (const [name, value] of Object.entries(style)) if (shown[name] !== value) tile.style[name] = shown[name] = value;
  });
}

function hide() {
  document.querySelectorAll("canvas.vggattn-hover, .vggattn-legend").forEach(e => { e.style.display = "none"; });
  document.querySelectorAll(".vggattn-tiles").forEach(e => {  // a transformer's tiles stay, to be clicked
    if (payload) drawTiles(e, null, null, null); else e.style.display = "none";
  });
}

const fmt = v => (v >= 0.01 || v === 0 ? v.toFixed(2) : v.toExponential(1));

// The colour scale under a panel: the tint over mid-grey at every level, and what its ends mean
function drawLegend(legend, L, values, how, prefix) {
  const bar = legend.querySelector("canvas"), key = `${controls.colormap}|${controls.opacity}`;
  if (bar.dataset.key !== key) {  // the bar changes with the controls only
    const ctx = bar.getContext("2d"), {pal, alpha} = tintTable(controls.colormap, controls.opacity);
    const img = ctx.createImageData(bar.width, bar.height);
    for (let x = 0; x < bar.width; x++) {
      const p = Math.min(255, Math.floor(x / (bar.width - 1) * 255 + 0.5));
      for (let y = 0; y < bar.height; y++) {
        const o = 4 * (y * bar.width + x);
        for (let ch = 0; ch < 3; ch++) img.data[o + ch] = 128 + (pal[3 * p + ch] - 128) * alpha[p];
        img.data[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    bar.dataset.key = key;
  }
  let top = 0, at = 0;
  for (let j = 0; j < values.length; j++) if (values[j] > top) { top = values[j]; at = j; }
  const gw = (how === "row" ? L.keyGrid : L.grid)[1], cell = `(${Math.floor(at / gw)}, ${at % gw})`;
  const floor = how === "column" ? 1 / L.m : 0;
  const max = Math.max(top, floor), lo = controls.scale === "log" ? `log ${fmt(max / Math.pow(10, K.log_decades))}` : "0";
  const what = how === "row" ? `max ${fmt(top)} at ${cell}` : `max ${fmt(max)}${top < floor ? " (1/M floor)" : ` from ${cell}`}`;
  const sink = L.sink && L.sink[1] >= K.sink_dominated ? ` · ⚠ sink ${Math.round(100 * L.sink[1])}%` : "";
  const hs = heads(L), who = L.heads > 1 ? (hs.length > 1 ? ` · mean of ${L.heads} heads` : ` · head ${hs[0] + 1}/${L.heads}`) : "";
  const kind = L.kind === "map" ? " · one map per image" : L.normalise === "mean" ? " · f/M, not a softmax" : "";
  const held = controls.mark && how === "row" ? markedIndices(values, K.top_k).length : K.top_k;
  const few = held < K.top_k ? ` · ${held} cell${held === 1 ? "" : "s"} ≥${100 * K.mark_share}% of max` : "";  // numbered
  const shows = how === "row" && L.u && !(switches.rollout && L.rollout) && measure !== "weights";
  let share = 0;
  if (prefix) for (const v of prefix) share += v;
  const pre = prefix && !shows ? ` · ${(100 * share).toFixed(0)}% on the ${L.P} prefix token${L.P === 1 ? "" : "s"}` : "";
  const own = (switches.rollout && L.rollout ? "rollout (Abnar & Zuidema): " : "") +
    (shows ? (measure === "value" ? "value-weighted: " : "effect of removing: ") : "") +
    (tokenIndex(L) >= 0 ? `${shortName(token)}'s own row: ` : "");
  const span = legend.querySelector("span"), text = `${lo} … ${own}${what}${pre}${few}${who}${kind}${sink}`;
  if (span.textContent !== text) span.textContent = text;
  legend.dataset.max = String(top);
  if (legend.style.display !== "flex") legend.style.display = "flex";
}

const smallBases = {};  // the photo at a head grid's cell size, per size
function smallBase(w, h) {
  const key = `${generation}|${w}x${h}`;
  if (!smallBases[key] && payload.image.naturalWidth) {
    const c = document.createElement("canvas");
    c.width = w; c.height = h;
    const ctx = c.getContext("2d", {willReadFrequently: true});
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(payload.image, 0, 0, w, h);
    smallBases[key] = ctx.getImageData(0, 0, w, h);
  }
  return smallBases[key] || null;
}

// One small map per head in a grid over the panel (the same query, or the pinned token's own row), each scaled
// to its own maximum; the row or column view as chosen
function drawHeads(i, x, y, parts) {
  const {panel, canvas, legend, tiles} = parts, L = payload.layers[i];
  const own = tokenIndex(L), how = own >= 0 || L.kind === "map" ? "row" : view;
  const q = own >= 0 ? own : queryIndex(x, y, how === "row" ? L.grid : L.keyGrid), valueGrid = how === "row" ? L.keyGrid : L.grid;
  const bw = Math.max(1, panel.clientWidth - 2), bh = Math.max(1, panel.clientHeight - 2);
  const ph = bh > 4 * LEGEND_STRIP ? bh - LEGEND_STRIP : bh, cols = Math.ceil(Math.sqrt(L.heads)), rows = Math.ceil(L.heads / cols);
  const room = L.P ? TILES_WIDTH : 0, [dw, dh] = payload.display;
  const s = Math.min((bw - room - 2 * cols) / (cols * dw), (ph - 28 - 2 * rows) / (rows * dh));
  const w = Math.max(1, Math.floor(dw * s)), h = Math.max(1, Math.floor(dh * s)), base = smallBase(w, h);
  if (canvas.width !== bw || canvas.height !== bh) { canvas.width = bw; canvas.height = bh; }
  if (canvas.style.display !== "block") canvas.style.display = "block";
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, bw, bh);
  const left = Math.floor((bw - room - cols * (w + 2)) / 2), top = 28 + Math.floor((ph - 28 - rows * (h + 2)) / 2);
  ctx.font = "11px sans-serif";
  for (let hd = 0; hd < L.heads; hd++) {
    const values = how === "row" ? (L.P ? fullRow(i, q, String(hd)).subarray(0, L.m) : row(i, q, String(hd))) : column(i, q, String(hd));
    const im = overlay(levels(values, controls.scale, how === "column" ? 1 / L.m : 0), valueGrid, w, h, base,
                       reused(`${i}.${hd}`, w, h));
    if (own < 0 && L.kind !== "map") frame(im, cellRect(q, how === "row" ? L.grid : L.keyGrid, w, h), 1, K.query_color);
    const ox = left + (hd % cols) * (w + 2), oy = top + Math.floor(hd / cols) * (h + 2);
    ctx.putImageData(im, ox, oy);
    ctx.fillStyle = "rgba(0, 0, 0, 0.65)"; ctx.fillRect(ox, oy, 22, 14);
    ctx.fillStyle = "#fff"; ctx.fillText(`h${hd + 1}`, ox + 3, oy + 11);
  }
  const span = legend.querySelector("span");
  span.textContent = `${L.heads} heads, each scaled to its own maximum${own >= 0 ? ` · ${shortName(token)}'s own row` : ""}`;
  if (legend.style.display !== "flex") legend.style.display = "flex";
  drawTiles(tiles, L, L.P && how === "row" ? fullRow(i, q).subarray(L.m) : null, how === "row" ? (L.P ? fullRow(i, q).subarray(0, L.m) : row(i, q)) : []);
  canvas.dataset.query = String(q);
  canvas.dataset.view = how;
  canvas.dataset.heads = String(L.heads);
}

// The norms of the residual stream's tokens entering block li on its grid (no query), each patch over the high-norm
// rule's multiple of the median framed (Darcet et al. 2023); the prefix tokens' norms / the median go to the tiles
function normsPicture(li, size = null) {
  const L = payload.layers[li], [w, h] = size || payload.display, values = L.norms.subarray(0, L.n);
  const sorted = Float64Array.from(values).sort(), mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  const im = overlay(levels(values, "linear", 0), L.grid, w, h, size ? smallBase(w, h) : payload.base);
  const line = markSizes(w, h).line;
  let high = 0;
  for (let j = 0; j < L.n; j++) {
    if (values[j] <= L.highNorm * median) continue;
    high++;
    const [x0, y0, x1, y1] = cellRect(j, L.grid, w, h);
    frame(im, [x0 - line - 1, y0 - line - 1, x1 + line + 1, y1 + line + 1], line + 1, K.outline_color);
    frame(im, [x0 - line, y0 - line, x1 + line, y1 + line], line, K.mark_color);
  }
  const prefix = Float64Array.from(L.norms.subarray(L.n), v => v / median);
  return {im, q: -1, values: Float64Array.from(values, v => v / median), how: "norms", prefix, median, high};
}

function drawPanel(i, x, y, all = false) {
  if (payload.layers[i].deferred) return;  // drawn when its arrays arrive (its panel came on screen: requestLayer)
  if (!all && offscreen.has(i)) { stale.add(i); return; }  // drawn when it comes on screen
  const parts = partsFor(i);
  if (!parts) return;
  const size = panelSize(i, parts.panel), small = size.w < payload.display[0] ? [size.w, size.h] : null;
  if (switches.norms && payload.layers[i].norms) { drawPicture(i, parts, normsPicture(i, small)); return; }
  if (switches.heads && payload.layers[i].heads > 1 && !(switches.rollout && payload.layers[i].rollout)) { drawHeads(i, x, y, parts); return; }
  delete parts.canvas.dataset.heads;
  drawPicture(i, parts, picture(i, x, y, view, small, i));  // drawn at the panel's size where that is smaller
}

let sizes = null;          // panel i's size, read for every panel before any is drawn (draw): no reflow per panel

function panelSize(i, panel) {  // the panel's canvas, and the picture's size and place in it (letterboxed)
  if (sizes && sizes[i]) return sizes[i];
  const bw = Math.max(1, panel.clientWidth - 2), bh = Math.max(1, panel.clientHeight - 2);
  const ph = bh > 4 * LEGEND_STRIP ? bh - LEGEND_STRIP : bh;  // the picture above the colour scale's strip
  const room = payload.layers[i].P ? TILES_WIDTH : 0;  // the prefix tiles' column, right of the picture
  const [dw, dh] = payload.display, s = Math.min((bw - room) / dw, ph / dh);
  const w = Math.max(1, Math.round(dw * s)), h = Math.max(1, Math.round(dh * s));
  return {bw, bh, w, h, left: Math.floor((bw - room - w) / 2), top: Math.floor((ph - h) / 2)};
}

function drawPicture(i, parts, drawn) {  // a picture into panel i (scaled if it is not at its size), its legend, tiles
  const {panel, canvas, legend, tiles} = parts;
  const {im, q, values, how, prefix} = drawn;
  const {bw, bh, w, h, left, top} = panelSize(i, panel);
  if (canvas.width !== bw || canvas.height !== bh) { canvas.width = bw; canvas.height = bh; }
  if (canvas.style.display !== "block") canvas.style.display = "block";
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, bw, bh);
  if (im.width === w && im.height === h) ctx.putImageData(im, left, top);  // drawn at the panel's size already
  else {  // the display copy's size, scaled into the panel
    if (!api.scratch) api.scratch = document.createElement("canvas");
    const scratch = api.scratch;
    scratch.width = im.width; scratch.height = im.height;
    scratch.getContext("2d").putImageData(im, 0, 0);
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(scratch, left, top, w, h);
  }
  if (how === "norms") {
    const L = payload.layers[i], span = legend.querySelector("span");
    span.textContent = `token norms entering the block: median ${drawn.median.toPrecision(3)}, largest patch ` +
      `${Math.max(...values).toFixed(1)}x · ${drawn.high} high-norm (>${L.highNorm}x median) framed`;
    if (legend.style.display !== "flex") legend.style.display = "flex";
  } else drawLegend(legend, payload.layers[i], values, how, prefix);
  drawTiles(tiles, payload.layers[i], prefix, values, how === "norms");
  canvas.dataset.query = String(q);
  canvas.dataset.view = how;
}

function draw(x, y, since, log = latencies, all = true) {  // all false (a pointer move): the panels on screen only
  if (!payload) return;
  const start = performance.now(), count = Math.min(K.num_panels, payload.layers.length);
  sizes = [];  // every panel's layout read first, then all drawn (reading one after drawing another forces a reflow)
  for (let i = 0; i < count; i++) {
    const parts = (all || !offscreen.has(i)) && partsFor(i);
    sizes[i] = parts ? panelSize(i, parts.panel) : null;
  }
  try { for (let i = 0; i < count; i++) drawPanel(i, x, y, all); } finally { sizes = null; }
  if (token !== null && !current) {
    setLine(`Pinned: the ${token} token's own row in every layer (its weights on the patches as they are; the tiles ` +
            `give its weights on the prefix tokens). Click its tile again, or a pixel, to leave it.`);
  } else {
    const queries = payload.layers.map(L => `${L.name}: ${queryIndex(x, y, L.grid)}`).join(", ");
    const what = view !== "row" ? "who looks at it (column, scaled to its maximum, at least 1/N)" :
      measure === "value" ? "what each key brings (sum over heads of weight x the size of its value through the output projection)" :
      measure === "effect" ? "how far the block's output there moves when each key is removed (the rest renormalised)" :
      "where it looks";
    const who = current && current[0] === x && current[1] === y ? "Under the pointer" : "Pinned";
    setLine(`${who}: pixel (${x}, ${y}) → query index per layer: ${queries} · ${what}`);
  }
  if (since !== undefined) {
    const end = performance.now();
    log.push(end - since);
    if (log.length > 1000) log.shift();
    if (log === latencies) { works.push(end - start); if (works.length > 1000) works.shift(); }
    if (log === latencies) requestAnimationFrame(() => { frames.push(performance.now() - since); if (frames.length > 1000) frames.shift(); });
  }
}

function shown() {  // the point under the pointer, else the pinned one; [0, 0] for a pinned token's row or the norms
  return current || pinned || (token !== null || switches.norms ? [0, 0] : null);
}

function redraw() {  // what `shown` says, else nothing
  const at = shown();
  if (payload && at) draw(at[0], at[1]); else hide();
}

function pinToken(name, since = performance.now()) {  // a prefix token's own row in every layer (null: none)
  token = name;
  if (name !== null) { pinned = null; pinnedAt = performance.now(); }
  current = null;
  if (name === null) { redraw(); return; }
  draw(0, 0, since, pins);
}

// -- pointer -----------------------------------------------------------------------------------------
// The original-image pixel under the pointer, or null outside the picture: the same formula as Gradio's
// image .select (its picture is letterboxed, never enlarged; a click's clientX/Y are whole pixels where a
// pointermove's are fractional), so a click pins the pixel the pointer showed.
function pixelAt(e) {
  const img = document.querySelector("#input-image img");
  if (!payload || !img || !img.naturalWidth) return null;
  // data-size "WxH": the image the picture stands for (a saved view shows the display copy, vggattn/view/live.py)
  const [nw, nh] = img.dataset.size ? img.dataset.size.split("x").map(Number) : [img.naturalWidth, img.naturalHeight];
  const r = img.getBoundingClientRect();
  const s = Math.min(r.width / nw, r.height / nh, img.dataset.size ? Infinity : 1);  // Gradio's: never enlarged
  const x = Math.round((Math.trunc(e.clientX) - r.left - (r.width - nw * s) / 2) / s);
  const y = Math.round((Math.trunc(e.clientY) - r.top - (r.height - nh * s) / 2) / s);
  if (x < 0 || y < 0 || x >= nw || y >= nh) return null;
  return [Math.min(x, payload.size[0] - 1) || 0, Math.min(y, payload.size[1] - 1) || 0];  // || 0: no -0 from a round
}

function leave() {
  current = null;
  redraw();  // the pinned point, if there is one
}

function pin(x, y, since) {
  pinned = [x, y];
  token = null;
  pinnedAt = performance.now();
  current = null;
  draw(x, y, since, pins);
  syncLink();
}

const listeners = {
  pointermove: e => {
    const p = pixelAt(e);
    if (!p) { if (current) leave(); return; }
    if (current && p[0] === current[0] && p[1] === current[1]) return;
    current = p;
    draw(p[0], p[1], e.timeStamp, latencies, false);
  },
  pointerdown: e => { const p = pixelAt(e); if (p) pin(p[0], p[1], e.timeStamp); },
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
  for (const name of Object.keys(switches)) {
    const box = element.querySelector(`input.vggattn-${name}`);
    if (box) { box.checked = switches[name]; box.onchange = () => setSwitch(name, box.checked); }
  }
  const select = element.querySelector("select.vggattn-measure");
  if (select) { select.value = measure; select.onchange = () => setMeasure(select.value); }
  const box = element.querySelector("input.vggattn-column");
  if (!box) return;
  box.checked = view === "column";
  box.onchange = () => setView(box.checked ? "column" : "row");
}

function setView(v) {
  view = v === "column" ? "column" : "row";
  const box = element.querySelector("input.vggattn-column");
  if (box) box.checked = view === "column";
  redraw();
  syncLink();
}

function setMeasure(how) {
  measure = ["value", "effect"].includes(how) ? how : "weights";
  if (measure !== "weights" && payload) payload.layers.forEach((L, i) => requestU(i));
  const select = element.querySelector("select.vggattn-measure");
  if (select) select.value = measure;
  redraw();
}

function setSwitch(name, on) {
  switches[name] = !!on;
  const box = element.querySelector(`input.vggattn-${name}`);
  if (box) box.checked = switches[name];
  redraw();
}

function setControls(c) {
  Object.assign(controls, c);
  redraw();
  syncLink();
}

bindSwitch();
load(props.value);
if (typeof watch === "function") watch("value", () => { bindSwitch(); load(props.value); });

Object.assign(api, {
  load, row: (li, i, head) => Array.from(row(li, i, head)), column: (li, j, head) => Array.from(column(li, j, head)),
  // a . b's n rows of c, in WebAssembly where it runs (how "loop": in JavaScript), as the rows use them
  dots: (a, b, n, c, how) => Array.from((how === "loop" ? dotsLoop : dots)(new Float64Array(n), Float32Array.from(a), 0,
                                                                          Float32Array.from(b), 0, n, c)),
  queryIndex, fullRow: (li, i, head) => Array.from(fullRow(li, i, head)), pinToken,
  levels: (values, scale, floor = 0) => Array.from(levels(values, scale, floor)),
  // the picture the panels show for (x, y), at the display copy's size: [width, height, RGB bytes as base64]
  picture: (li, x, y, how) => {
    const {im} = picture(li, x, y, how), rgb = new Uint8Array(im.width * im.height * 3);
    for (let p = 0, o = 0; p < im.data.length; p += 4) { rgb[o++] = im.data[p]; rgb[o++] = im.data[p + 1]; rgb[o++] = im.data[p + 2]; }
    let bin = "";
    for (let o = 0; o < rgb.length; o += 0x8000) bin += String.fromCharCode.apply(null, rgb.subarray(o, o + 0x8000));
    return [im.width, im.height, btoa(bin)];
  },
  ready: () => !!(payload && payload.base),
  // the click being sent pinned a point drawn here (so the server need not draw it): the pin is this click's
  drawsPins: () => !!(payload && payload.base && pinned && performance.now() - pinnedAt < 5000),
  draw: (x, y) => { const t = performance.now(); current = [x, y]; draw(x, y, t); }, pin: (x, y) => pin(x, y, performance.now()),
  measured: (li, i, how, head) => { const v = measured(li, i, how, head); return v && Array.from(v); },
  leave, setView, setSwitch, setMeasure, setControls, listeners, latencies, works, frames, pins, fetched,
  loaded: () => (payload ? payload.layers.filter(L => !L.deferred).length : 0),
  state: () => ({view, switches: {...switches}, pinned, current, token, controls: {...controls},
                 bytes: payload ? payload.bytes : 0, sent: payload ? payload.sent : 0, layers: payload ? payload.layers.length : 0,
                 waiting: payload ? payload.layers.filter((L, i) => L.deferred && !offscreen.has(i)).length : 0}),  // on screen, not here yet
});
window.vggattnHover = api;
