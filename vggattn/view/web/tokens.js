// The tokens page: tokens that are no place on the image (a detector's queries, a prompt's words) as tiles; a tile
// chosen draws its map (or a deformable layer's sampling points) in every layer; the pointer over any picture shows
// that place's weight from each token, per layer, as bars. Everything is drawn here from the payload
// (`vggattn.view.tokens_page`); nothing is fetched. window.vggattnTokens: choose(name), at(fx, fy), times.
(function () {
  const D = JSON.parse(document.getElementById("tokens-data").textContent);
  const pal = D.palette, FULL_AT = D.full_at, OPACITY = D.opacity, TOP = 8;
  const f32 = (b64) => {
    const s = atob(b64), u = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
    return new Float32Array(u.buffer);
  };
  for (const side of D.sides) for (const b of side.blocks) b.data = f32(b.data);
  const [W, H] = D.input_wh, PW = D.width, PH = Math.round(PW * H / W);
  const times = { choose: [], hover: [] };
  const base = new Image();
  let chosen = null, pinned = null;

  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  const el = (tag, attrs, parent) => {
    const e = Object.assign(document.createElement(tag), attrs || {});
    if (parent) parent.appendChild(e);
    return e;
  };
  // tiles: A's tokens, then B's that A lacks
  const tiles = document.getElementById("tokens-tiles");
  const names = [...D.sides[0].tokens.map((t) => t.name)];
  if (D.sides[1]) for (const t of D.sides[1].tokens) if (!names.includes(t.name)) names.push(t.name);
  const info = (side, name) => side.tokens.find((t) => t.name === name);
  for (const name of names) {
    const t = info(D.sides[0], name) || info(D.sides[1], name);
    const b = el("button", { className: "tile" + (t.object === false ? " empty" : ""), textContent: t.label,
                             title: t.label }, tiles);
    b.dataset.name = name;
    b.addEventListener("click", () => choose(name));
  }
  // a row per layer: A's picture (then B's and B minus A)
  const rows = document.getElementById("tokens-layers");
  const pictures = [];
  D.sides[0].blocks.forEach((block, i) => {
    const row = el("div", { className: "layer" }, rows);
    el("div", { className: "layer-name", textContent: block.name }, row);
    const line = el("div", { className: "pictures" }, row);
    for (const [s, what] of D.sides.length > 1 ? [[0, D.sides[0].label], [1, D.sides[1].label], [2, "B minus A"]]
                                                  : [[0, ""]]) {
      const fig = el("figure", {}, line);
      const c = el("canvas", { width: PW, height: PH }, fig);
      const cap = el("figcaption", { textContent: what }, fig);
      c.addEventListener("pointermove", (e) => at(...fraction(c, e)));
      c.addEventListener("click", (e) => { pinned = fraction(c, e); at(...pinned); });
      pictures.push({ canvas: c, ctx: c.getContext("2d"), side: s, block: i, caption: cap, what });
    }
  });
  const fraction = (c, e) => {
    const r = c.getBoundingClientRect();
    return [(e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height];
  };
  const small = el("canvas"), sctx = small.getContext("2d");

  function tokenMap(side, b, name) {  // (gh * gw) the token's weights on a rows block, or null
    const block = side.blocks[b], t = side.tokens.findIndex((x) => x.name === name);
    if (t < 0) return null;
    const m = block.grid[0] * block.grid[1];
    return block.data.subarray(t * m, (t + 1) * m);
  }
  function paint(ctx, grid, rgba) {  // a (gh, gw) RGBA map over the picture, smoothly scaled
    small.width = grid[1]; small.height = grid[0];
    sctx.putImageData(new ImageData(rgba, grid[1], grid[0]), 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(small, 0, 0, PW, PH);
  }
  function heat(ctx, grid, v) {
    let top = 0;
    for (const x of v) top = Math.max(top, x);
    const rgba = new Uint8ClampedArray(v.length * 4);
    for (let j = 0; j < v.length; j++) {
      const lv = top > 0 ? v[j] / top : 0, p = Math.min(255, Math.round(lv * 255)) * 3;
      rgba.set([pal[p], pal[p + 1], pal[p + 2], Math.round(255 * OPACITY * Math.min(1, lv / FULL_AT))], j * 4);
    }
    paint(ctx, grid, rgba);
  }
  function signed(ctx, grid, d) {  // B minus A: orange up, blue down, on a symmetric scale
    let top = 0;
    for (const x of d) top = Math.max(top, Math.abs(x));
    const rgba = new Uint8ClampedArray(d.length * 4);
    for (let j = 0; j < d.length; j++) {
      const lv = top > 0 ? d[j] / top : 0;
      rgba.set(lv >= 0 ? [230, 120, 20] : [30, 110, 230], j * 4);
      rgba[j * 4 + 3] = Math.round(255 * OPACITY * Math.min(1, Math.abs(lv) / FULL_AT));
    }
    paint(ctx, grid, rgba);
  }
  function points(ctx, side, b, name) {  // a deformable layer: the token's points, a disk each (area: weight)
    const block = side.blocks[b], t = side.tokens.findIndex((x) => x.name === name);
    if (t < 0) return;
    const k = block.points, p = block.data.subarray(t * k * 4, (t + 1) * k * 4);
    let top = 0;
    for (let i = 0; i < k; i++) top = Math.max(top, p[i * 4 + 2]);
    const order = [...Array(k).keys()].sort((a, c) => p[a * 4 + 2] - p[c * 4 + 2]), n = block.levels.length;
    for (const i of order) {
      const r = Math.max(PW, PH) / 24 * Math.sqrt(p[i * 4 + 2] / (top || 1));
      if (r < 0.75) continue;
      const c = Math.round(80 + (n > 1 ? p[i * 4 + 3] / (n - 1) : 0.8) * 170) * 3;
      ctx.beginPath();
      ctx.arc(p[i * 4] * PW, p[i * 4 + 1] * PH, r, 0, 2 * Math.PI);
      ctx.fillStyle = `rgb(${pal[c]},${pal[c + 1]},${pal[c + 2]})`;
      ctx.fill();
      ctx.strokeStyle = "#000"; ctx.stroke();
    }
  }
  function box(ctx, t) {
    if (!t || !t.box) return;
    ctx.strokeStyle = t.object === false ? "#aaa" : "#ff0";
    ctx.lineWidth = 2;
    ctx.strokeRect(t.box[0] / W * PW, t.box[1] / H * PH, (t.box[2] - t.box[0]) / W * PW, (t.box[3] - t.box[1]) / H * PH);
    ctx.lineWidth = 1;
  }
  const shares = (v) => { let s = 0; for (const x of v) s += x; return v.map((x) => x / (s || 1)); };

  function choose(name) {
    const t0 = performance.now();
    chosen = name;
    for (const b of tiles.children) b.classList.toggle("chosen", b.dataset.name === name);
    for (const pic of pictures) {
      const { ctx, side: s, block: b } = pic;
      ctx.drawImage(base, 0, 0, PW, PH);
      if (s < 2) {
        const side = D.sides[s], block = side.blocks[b];
        if (!block) continue;
        if (block.kind === "points") points(ctx, side, b, name);
        else {
          const v = tokenMap(side, b, name);
          if (v) heat(ctx, block.grid, v);
        }
        pic.caption.textContent = [pic.what, info(side, name) ? "" : "no such token"].filter(Boolean).join(" · ");
        box(ctx, info(side, name));
      } else {  // B minus A, each as shares of its total, on the finer grid of the two (rows blocks)
        const a = tokenMap(D.sides[0], b, name), bb = D.sides[1].blocks[b] && tokenMap(D.sides[1], b, name);
        const ga = D.sides[0].blocks[b].grid, gb = D.sides[1].blocks[b] && D.sides[1].blocks[b].grid;
        if (!a || !bb || ga[0] !== gb[0] || ga[1] !== gb[1]) {
          pic.caption.textContent = "B minus A: " + (!a || !bb ? "the token is on one side only" : "grids differ");
          continue;
        }
        const sa = shares(a), sb = shares(bb);
        signed(ctx, ga, sb.map((x, j) => x - sa[j]));
        pic.caption.textContent = "B minus A (each map as shares of its total)";
      }
    }
    times.choose.push(performance.now() - t0);
    if (pinned) at(...pinned);
  }

  function weightsAt(side, b, fx, fy) {  // each token's weight on the place (fx, fy) in a layer
    const block = side.blocks[b], n = side.tokens.length, out = new Float64Array(n);
    if (block.kind !== "points") {
      const [gh, gw] = block.grid, cell = Math.min(gh - 1, Math.floor(fy * gh)) * gw + Math.min(gw - 1, Math.floor(fx * gw));
      const m = gh * gw;
      for (let t = 0; t < n; t++) out[t] = block.data[t * m + cell];
      return out;
    }
    // a deformable layer: what the value cells under the place receive from each token's points (bilinear)
    const k = block.points;
    for (let t = 0; t < n; t++) {
      let s = 0;
      for (let i = 0; i < k; i++) {
        const o = (t * k + i) * 4, [h, w] = block.levels[block.data[o + 3]];
        const cx = Math.min(w - 1, Math.floor(fx * w)), cy = Math.min(h - 1, Math.floor(fy * h));
        const px = block.data[o] * w - 0.5, py = block.data[o + 1] * h - 0.5;
        const ax = 1 - Math.abs(px - cx), ay = 1 - Math.abs(py - cy);
        if (ax > 0 && ay > 0) s += block.data[o + 2] * ax * ay;
      }
      out[t] = s;
    }
    return out;
  }

  const bars = document.getElementById("tokens-bars");
  function at(fx, fy) {
    const t0 = performance.now();
    if (fx < 0 || fy < 0 || fx > 1 || fy > 1) return;
    const parts = [];
    D.sides.forEach((side, s) => side.blocks.forEach((block, b) => {
      const w = weightsAt(side, b, fx, fy);
      const order = [...w.keys()].sort((i, j) => w[j] - w[i]).slice(0, TOP), peak = w[order[0]] || 1;
      const lines = order.map((i) => `<tr class="token-bar"><td class="token-name">${esc(side.tokens[i].label)}</td>` +
        `<td><span class="fill" style="width:${Math.round(120 * w[i] / peak)}px"></span></td>` +
        `<td class="token-weight">${w[i].toFixed(4)}</td></tr>`).join("");
      parts.push(`<div class="token-layer"><b>${esc(block.name)}</b>${D.sides.length > 1 ? " · " + esc(side.label) : ""}` +
                 `<table>${lines}</table></div>`);
    }));
    bars.innerHTML = `<p>Each token's weight at (${(fx * W).toFixed(0)}, ${(fy * H).toFixed(0)}) of the model's ` +
                     `input, the largest first:</p>` + parts.join("");
    times.hover.push(performance.now() - t0);
  }

  window.vggattnTokens = { choose, at, times, ready: false };
  base.onload = () => {
    const first = D.first || names[0];
    choose(first);
    window.vggattnTokens.ready = true;
  };
  base.src = D.image;
})();
