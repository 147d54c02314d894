"""What a web page needs to compute any attention row or column itself, sent once per image.

    layer = page_layer("stages.3.0", maps)     # any block's vggattn.attention.adapters.BlockMaps, batch of one
    layer.row(i, head=None)                    # float64 (M,): what the page computes (head None: mean of heads)
    payload = page_payload(result, [layer])    # JSON-ready dict: the image, per layer Q, K, log Z (base64)
    q = decode(payload["layers"][0], "q")      # (N, C') float32, as the page decodes it

A row is softmax(q_i . K) and a column is A[:, j] = exp(Q k_j - log Z) with the row normalisers
log Z (N,) computed here once, so the page answers every pointer move with O(N C') arithmetic and
no request. The app's script (vggattn/view/web/hover.js) reads this format and draws with
`vggattn.view.render`'s rules and constants (`page_props`); `PageLayer`'s rows and pictures, the same maths in
numpy, are what the server pins and what the page is tested against.
"""

from __future__ import annotations

import base64
import json

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import query_index
from .render import attention_picture, page_constants
from ..attention.readouts import HIGH_NORM, SINK_DOMINATED, exact_log_z, row_summaries

DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8"}
CELLS = "<i4"  # a windowed layer's key cells (int32; -1: padding)


def _b64(array: np.ndarray, dtype: str) -> np.ndarray:
    """The array as the page gets it (little-endian `dtype`); `_encoded` turns it into base64 text when it is sent."""
    return np.ascontiguousarray(array, dtype=DTYPES.get(dtype, dtype))


def _encoded(layer: dict) -> dict:
    return {k: base64.b64encode(v.tobytes()).decode("ascii") if isinstance(v, np.ndarray) else v
            for k, v in layer.items()}


def _json_size(layer: dict) -> int:
    """len(json.dumps(_encoded(layer))), without encoding its arrays."""
    arrays = {k: v for k, v in layer.items() if isinstance(v, np.ndarray)}
    others = {k: v for k, v in layer.items() if k not in arrays}
    commas = 2 * (len(arrays) - (not others)) if arrays else 0  # ", " before each array but a first one
    return len(json.dumps(others)) + commas + sum(len(json.dumps(k)) + 4 + 4 * -(-v.nbytes // 3)
                                                  for k, v in arrays.items())


def decode(layer: dict, name: str, dtype: str = "float32") -> np.ndarray:
    """One array of a payload layer back as float32: "q"/"k" -> (N, C') (heads > 1: (heads, N or M, d); with
    prefix tokens N + P, M + P), "logz" -> (N,) ((heads, N or N + P)), "rows" -> (heads, N or 1, M), "prefix_w" ->
    (heads, N, P), "prefix_rows" -> (heads, P, M + P), "norms" -> (N + P,) (dtype "float32"), "rollout" -> (N + P,
    M + P) (dtype "float16")."""
    logz_dtype = layer.get("logz_dtype", "float32")
    raw = np.frombuffer(base64.b64decode(layer[name]), dtype=DTYPES[logz_dtype if name == "logz" else dtype])
    raw = raw.astype(np.float64 if name == "logz" and logz_dtype == "float64" else np.float32)
    heads = layer.get("heads", 1)
    n = layer["grid"][0] * layer["grid"][1]
    m = layer.get("key_grid", layer["grid"])[0] * layer.get("key_grid", layer["grid"])[1]
    if name == "rows":
        return raw.reshape(heads, -1, m)
    if name == "norms":
        return raw
    if name == "rollout":
        return raw.reshape(n + len(layer["prefix"]), m + len(layer["prefix"]))
    if name in ("prefix_w", "prefix_rows"):
        p = len(layer["prefix"])
        return raw.reshape(heads, n, p) if name == "prefix_w" else raw.reshape(heads, p, m + p)
    if name == "logz":
        return raw if heads == 1 else raw.reshape(heads, -1)
    return raw.reshape(-1, layer["dim"]) if heads == 1 else raw.reshape(heads, -1, layer["dim"])


def layer_binary(layer: "PageLayer", dtype: str = "float32") -> bytes:
    """One layer as the page fetches a deferred one: a uint32 (little-endian) header length, the header (the
    layer's JSON with each array replaced by {"at": byte offset, "bytes": length}, offsets from the buffer's start,
    8-byte aligned), then the arrays' raw little-endian bytes. No base64 and no JSON text of the numbers: a
    transformer's layer at 518 px is 4.2 MB of it instead of 5.7 MB of text to parse and decode."""
    raw = layer._payload(dtype)
    arrays = [(k, v) for k, v in raw.items() if isinstance(v, np.ndarray)]
    header, pad = {k: v for k, v in raw.items() if not isinstance(v, np.ndarray)}, lambda n: -n % 8  # noqa: E731
    at = 0
    for k, v in arrays:  # offsets relative to the first array, shifted by the header's length below
        header[k] = {"at": at, "bytes": v.nbytes}
        at += v.nbytes + pad(v.nbytes)
    text = json.dumps(header).encode()
    start = 4 + len(text) + 16 * len(arrays)  # room for each offset's longer number once shifted by `start`
    start += pad(start)
    for k, _ in arrays:
        header[k]["at"] += start
    text = json.dumps(header).encode()
    text += b" " * (start - 4 - len(text))  # JSON ignores trailing spaces: the arrays start at `start`
    parts = [len(text).to_bytes(4, "little"), text]
    for _, v in arrays:
        parts += [v.tobytes(), b"\0" * pad(v.nbytes)]
    return b"".join(parts)


def contributions_binary(layer: "PageLayer", dtype: str = "float32") -> bytes:
    """A layer's keys' contributions (`PageLayer.u`) as the page fetches them when its view asks (`layer_binary`'s
    format, with "u" and "uc" only)."""
    part = PageLayer(layer.name, layer.family, layer.meaning, layer.grid, layer.key_grid, layer.heads, "u",
                     layer.normalise, layer.scale)
    part.u = read_u(layer)
    return layer_binary(part, dtype)


def payload_bytes(payload: dict) -> int:
    """Size of the payload as JSON, in bytes (what one upload sends the page)."""
    return len(json.dumps(payload).encode())


WEB = Path(__file__).resolve().parent / "web"  # the hover view's script, template and style
CONTROLS = {"opacity": 0.8, "colormap": "inferno", "mode": "smooth", "mark": True, "scale": "linear"}  # initial values


# The page's dot products of a row in WebAssembly SIMD (web/dots.wat, assembled): float64 sums, 5-7x its JavaScript
DOTS_WASM = base64.b64encode((Path(__file__).parent / "web" / "dots.wasm").read_bytes()).decode()


def page_props(num_panels: int, controls: dict) -> dict:
    """Everything the page's script is told once, at load: the rendering constants and palettes
    (`vggattn.view.render.page_constants`), the panel count, the sink rule and the controls' initial values."""
    return {**page_constants(), "num_panels": num_panels, "sink_dominated": SINK_DOMINATED, "controls": dict(controls),
            "dots_wasm": DOTS_WASM}


@dataclass
class PageLayer:
    """One block's maps on one image in the form the page receives them, and the page's maths on them in numpy
    (float64 from the same float32 arrays), so the server's pinned pictures are the page's. kind: "qk" (queries
    and keys: rows are normalise(scale * q . K), columns from the row normalisers log Z), "rows" (the rows
    themselves: relative-position logits, or N x M smaller than Q and K), "window" (each row's K keys of a window
    and the cells they fall on: N x K, not N x M) or "map" (one map per image: GCNet)."""

    name: str
    family: str
    meaning: str  # what a row's numbers are, in words
    grid: tuple[int, int]  # queries
    key_grid: tuple[int, int]
    heads: int
    kind: str
    normalise: str  # "softmax" or "mean" (dot product / M)
    scale: float
    q: np.ndarray | None = None  # (heads, N, d) float32
    k: np.ndarray | None = None  # (heads, M, d)
    logz: np.ndarray | None = None  # (heads, N) float64, softmax rows only (float32 would cost columns
    # |log Z| * 6e-8 of relative error, 5e-4 where random weights give logits in the thousands)
    rows_: np.ndarray | None = None  # (heads, N or 1, M) float32
    sink: tuple[int, float] | None = None  # the image's sink: (key cell, its share of all attention); softmax only
    padding: np.ndarray | None = None  # (heads, N) each row's share on keys that fall on padding (server side only)
    values_: np.ndarray | None = None  # "window": (heads, N, K) float32 weights of each row's keys
    cells_: np.ndarray | None = None  # "window": (heads, N, K) int32 key cell of each (-1: padding)
    prefix: np.ndarray | None = None  # tokens: (heads, N, P) each row's weight on each prefix token
    prefix_names: list[str] | None = None
    prefix_rows: np.ndarray | None = None  # tokens, "rows": (heads, P, M + P) the prefix tokens' own rows
    norms: np.ndarray | None = None  # tokens: (N + P,) the residual stream's norms entering the block (grid, prefix)
    rollout: np.ndarray | None = None  # tokens: (N + P, M + P) attention rollout up to this block (Abnar and Zuidema)
    u: np.ndarray | None = None  # (heads, M + P, C) what each key brings through each head (`vggattn.attention.effect`)
    u_note: str = ""  # why `u` is not sent, in words
    u_read: object = None  # lazy pages (the app): reads `u` when the page first asks (`read_u`); None: not offered
    # tokens, "qk": q holds N + P rows (the grid's, then the prefix tokens') and k M + P keys, in that order

    @property
    def tokens(self) -> int:
        """How many prefix tokens (class, registers) the page can show as tiles and pick as queries (0: none)."""
        return len(self.prefix_names) if self.prefix_names and (self.q is not None or self.prefix_rows is not None) else 0

    def full_row(self, i: int, head: int | None = None) -> np.ndarray:
        """(M + P,) float64: row i's weights on the key grid, then on each prefix token, as they are (a row of a
        softmax over all M + P keys: the grid's part is not renormalised). i < N: a grid query; N + p: prefix token
        p's own row (the class token's: DINO's view)."""
        return self._mean([self._head_full_row(h, i) for h in self._heads(head)])

    def _head_full_row(self, h: int, i: int) -> np.ndarray:
        if self.kind == "qk":
            logits = self.k[h].astype(np.float64) @ self.q[h, i].astype(np.float64)
            e = np.exp(logits - logits.max())
            return e / e.sum()
        if i >= self.n:
            return self.prefix_rows[h, i - self.n].astype(np.float64)
        return np.concatenate([self.rows_[h, i].astype(np.float64), self.prefix[h, i].astype(np.float64)])

    def prefix_weights(self, i: int, head: int | None = None) -> dict[str, float] | None:
        """Query i's weight on each prefix token (class, registers) by name (mean over heads), or None."""
        if self.prefix is None and not self.tokens:
            return None
        w = self.full_row(i, head)[self.m:] if self.tokens else np.mean([self.prefix[h, i] for h in self._heads(head)], axis=0)
        names = self.prefix_names or [f"prefix {j}" for j in range(len(w))]
        return dict(zip(names, map(float, w)))

    def padding_share(self, i: int, head: int | None = None) -> float | None:
        """The share of query i's row that falls on padding (windows with halos), or None where none can."""
        if self.padding is None:
            return None
        return float(np.mean([self.padding[h, i] for h in self._heads(head)]))

    @property
    def n(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def m(self) -> int:
        return self.key_grid[0] * self.key_grid[1]

    def head_label(self, head: int | None) -> str:
        if self.heads == 1:
            return ""
        return f"mean of {self.heads} heads" if head is None or head >= self.heads else f"head {head + 1} of {self.heads}"

    def _heads(self, head: int | None) -> list[int]:
        return [0] if self.heads == 1 else list(range(self.heads)) if head is None or head >= self.heads else [head]

    def _mean(self, parts: list[np.ndarray]) -> np.ndarray:
        if len(parts) == 1:
            return parts[0]
        total = parts[0].copy()
        for p in parts[1:]:  # in head order, as the page sums them
            total += p
        return total / len(parts)

    def row(self, i: int | None, head: int | None = None) -> np.ndarray:
        """(M,) float64: where query position i looks (a "map" layer: the map; i is ignored)."""
        return self._mean([self._head_row(h, i) for h in self._heads(head)])

    def _head_row(self, h: int, i: int | None) -> np.ndarray:
        if self.tokens:
            return self._head_full_row(h, i)[:self.m]
        if self.kind == "window":  # the row's keys scattered onto the key grid, in key order (as the page adds)
            out = np.zeros(self.m)
            for v, c in zip(self.values_[h, i].astype(np.float64), self.cells_[h, i]):
                if c >= 0:
                    out[c] += v
            return out
        if self.kind != "qk":
            return self.rows_[h, 0 if self.kind == "map" else i].astype(np.float64)
        logits = (self.k[h].astype(np.float64) @ self.q[h, i].astype(np.float64)) * self.scale
        if self.normalise == "mean":
            return logits / self.m
        e = np.exp(logits - logits.max())
        return e / e.sum()

    def column(self, j: int, head: int | None = None) -> np.ndarray:
        """(N,) float64: how much every query position gives key position j ("map" layers: the map, (M,))."""
        if self.kind == "map":
            return self.row(None, head)
        return self._mean([self._head_column(h, j) for h in self._heads(head)])

    def _head_column(self, h: int, j: int) -> np.ndarray:
        if self.kind == "window":  # every row's weight on key cell j
            return np.where(self.cells_[h] == j, self.values_[h].astype(np.float64), 0.0).sum(-1)
        if self.kind == "rows":
            return self.rows_[h, :, j].astype(np.float64)
        logits = (self.q[h, :self.n].astype(np.float64) @ self.k[h, j].astype(np.float64)) * self.scale
        if self.normalise == "mean":
            return logits / self.m
        return np.exp(logits - self.logz[h, :self.n].astype(np.float64))

    def picture(self, display: np.ndarray, size: tuple[int, int], xy: tuple[float, float], head: int | None = None,
                view: str = "row", draw: bool = True, **style) -> tuple[np.ndarray | None, int, np.ndarray]:
        """hover.js's picture() for original-image pixel xy on the display copy: (RGB, the cell index under xy
        (on the query grid for a row, the key grid for a column), the values drawn). style: scale, mode,
        colormap, opacity, top_k of `vggattn.view.render.attention_picture`."""
        view = "row" if self.kind == "map" else view
        w, h = size
        disp_h, disp_w = display.shape[:2]
        point = ((xy[0] + 0.5) * disp_w / w, (xy[1] + 0.5) * disp_h / h)
        if view == "row":
            cell = query_index(xy, size, self.grid)
            values, grids = self.row(cell, head).reshape(self.key_grid), (self.key_grid, self.grid)
        else:
            cell = query_index(xy, size, self.key_grid)
            values, grids = self.column(cell, head).reshape(self.grid), (self.grid, self.key_grid)
        if not draw:  # the values only (the page draws the picture itself)
            return None, cell, values
        rgb = attention_picture(display, values, None if self.kind == "map" else cell, point, view=view,
                                query_grid=grids[1], floor=1.0 / self.m if view == "column" else None, **style)
        return rgb, cell, values

    def payload(self, dtype: str = "float32") -> dict:
        """This layer as the page gets it (JSON-ready; arrays as base64 text)."""
        return _encoded(self._payload(dtype))

    def _payload(self, dtype: str) -> dict:
        out = {"name": self.name, "family": self.family, "meaning": self.meaning, "grid": list(self.grid),
               "key_grid": list(self.key_grid), "heads": self.heads, "kind": self.kind, "normalise": self.normalise,
               "scale": self.scale, "sink": list(self.sink) if self.sink else None}
        if self.tokens:  # the tiles: prefix tokens by name; "rows" also sends their weights and own rows
            out["prefix"] = list(self.prefix_names)
            if self.norms is not None:  # the token-norm view: (N + P,) float32, and the high-norm rule
                out.update(norms=_b64(self.norms, "float32"), high_norm=HIGH_NORM)
            if self.rollout is not None:  # float16: 2 bytes a weight, T x T
                out.update(rollout=_b64(self.rollout, "float16"), has_rollout=True)
            if self.kind == "rows":
                out.update(prefix_w=_b64(self.prefix, dtype), prefix_rows=_b64(self.prefix_rows, dtype))
        if self.u is not None:
            out.update(u=_b64(self.u, dtype), uc=int(self.u.shape[-1]))
        elif self.u_note:
            out["u_note"] = self.u_note
        if self.kind == "qk":
            out.update(dim=int(self.q.shape[-1]), q=_b64(self.q, dtype), k=_b64(self.k, dtype))
            if self.logz is not None:
                out.update(logz=_b64(self.logz, "float64"), logz_dtype="float64")
        elif self.kind == "window":
            out.update(window=int(self.values_.shape[-1]), values=_b64(self.values_, dtype),
                       cells=_b64(self.cells_, CELLS))
        elif self.rows_ is not None:
            out["rows"] = _b64(self.rows_, dtype)
        return out


def page_layer(name: str, maps, family: str = "", kind: str | None = None, sink: tuple[int, float] | None = None,
               logz: np.ndarray | None = None) -> PageLayer:
    """A block's `vggattn.attention.adapters.BlockMaps` (batch of one) as the page gets it. kind None: "map" for one
    map per image, "rows" where there are relative-position logits or the N x M rows are smaller than Q and K, else
    "qk". sink, logz: the image's sink and the rows' log Z (heads, N) float64 when the caller has them
    (`BlockResult.page`), else computed here."""
    with torch.no_grad():
        heads, n, m = maps.heads, maps.grid[0] * maps.grid[1], maps.key_grid[0] * maps.key_grid[1]
        tokens = maps.tokens_qk is not None and kind in (None, "qk")
        if tokens:  # a transformer: every row, the prefix tokens' too, from Q and K over the grid and prefix keys
            kind = "qk"
        if kind is None:
            d = 0 if maps.per_image or maps.query is None else maps.query.shape[-1]
            kind = "map" if maps.per_image else "window" if maps.window is not None else "rows" \
                if maps.bias is not None or maps.query is None or n * m <= (n + m) * d else "qk"
        if kind == "qk" and not tokens and (maps.per_image or maps.bias is not None or maps.query is None):
            raise ValueError(f"{name}: its rows cannot be sent as Q and K (one map per image, or extra logits)")
        layer = PageLayer(name, family, maps.meaning, tuple(maps.grid), tuple(maps.key_grid), heads, kind,
                          maps.normalise, float(maps.scale))
        if kind == "window":
            layer.values_ = maps.window[0][0].float().cpu().numpy()  # (heads, N, K)
            layer.cells_ = maps.window[1][0].to(torch.int32).cpu().numpy()
        elif tokens:  # the scale is in Q
            q, k = maps.tokens_qk[0][0].float(), maps.tokens_qk[1][0].float()
            layer.q, layer.k, layer.scale, layer.normalise = q.cpu().numpy(), k.cpu().numpy(), 1.0, "softmax"
            if maps.token_stats is not None:  # read from the fused kernel that computed the rows (`BlockMaps.lean`)
                logz_t, mean = maps.token_stats[0][0], maps.token_sums()[0] / q.shape[-2]
            elif maps.weights is not None and maps.prefix is not None and maps.prefix_rows is not None:
                # the rows the forward computed, in the page's order (grid then prefix, queries and keys alike): log Z
                # from each row's largest weight, the mean row from their sum; no second pass over Q K^T
                grid, prefix, own = maps.weights[0].float(), maps.prefix[0].float(), maps.prefix_rows[0].float()
                top_grid, at_grid = grid.max(-1)  # (heads, N): no N x (M + P) copy is made
                top_prefix, at_prefix = prefix.max(-1)
                on_prefix = top_prefix > top_grid
                top_own, at_own = own.max(-1)  # (heads, P)
                top = torch.cat([torch.where(on_prefix, top_prefix, top_grid), top_own], -1)  # (heads, N + P)
                index = torch.cat([torch.where(on_prefix, at_prefix + grid.shape[-1], at_grid), at_own], -1)
                logz_t = exact_log_z(q, k, 1.0, index, top.double().log())
                mean = (torch.cat([grid.sum(-2), prefix.sum(-2)], -1) + own.sum(-2)) / (grid.shape[-2] + own.shape[-2])
            else:
                logz_t, mean = row_summaries(q, k)
            layer.logz = logz_t.double().cpu().numpy()
            if sink is None:
                grid_mean = mean.mean(0)[:n]
                sink = (int(grid_mean.argmax()), float(grid_mean.max()))
        elif kind == "qk":
            layer.q = maps.query[0].float().cpu().numpy()
            layer.k = maps.key[0].float().cpu().numpy()
            if maps.normalise == "softmax" and logz is None:
                logz_t, mean = row_summaries(maps.query[0].float(), maps.key[0].float(), maps.scale)
                layer.logz = logz_t.double().cpu().numpy()  # (heads, N)
                if sink is None:  # every query and head's share of each key
                    sink = (int(mean.mean(0).argmax()), float(mean.mean(0).max()))
            elif maps.normalise == "softmax":
                layer.logz = logz
        else:
            layer.rows_ = maps.rows(dtype=torch.float64)[0].float().cpu().numpy()  # (heads, N or 1, M)
        if maps.padding is not None:
            layer.padding = maps.padding[0].double().cpu().numpy()
        if maps.prefix is not None:
            layer.prefix, layer.prefix_names = maps.prefix[0].double().cpu().numpy(), maps.prefix_names
            if maps.prefix_rows is not None and kind == "rows":
                layer.prefix_rows = maps.prefix_rows[0].double().cpu().numpy()
        if sink is not None:
            layer.sink = sink
        elif maps.normalise == "softmax":
            mean = maps.mean_row()[0, :, 0].float().mean(0)  # (M,): every query and head's share of each key
            layer.sink = (int(mean.argmax()), float(mean.max()))
    return layer


def block_page(block, kind: str | None = None) -> PageLayer:
    """One block of an analysis (`vggattn.analysis.BlockResult`) as the page gets it (`page_layer`), with its sink,
    log Z, the residual stream's norms and the rollout up to it."""
    layer = page_layer(block.name, block.maps, block.family, kind, block.sink,
                       None if block.summaries is None else block.summaries[0])
    layer.norms, layer.rollout = block.page_norms, block.rollout
    return layer


U_BUDGET = 16 << 20  # bytes: the keys' contributions (value-weighted and effect views) go to the page up to this in all


def contributions_bytes(block) -> int | None:
    """About the bytes of a block's keys' contributions (heads x keys x the block's width, float32), before reading
    them; None where the block's input was not kept."""
    source = getattr(block, "source", None)
    if source is None:
        return None
    x = source[1]  # the block's input: its width is about the output's (what U holds per key and head)
    width = x.shape[-1] if x.dim() == 3 else x.shape[1]
    keys = block.maps.key_grid[0] * block.maps.key_grid[1] + len(block.maps.prefix_names or [])
    return block.maps.heads * keys * width * 4


def read_u(layer: PageLayer) -> np.ndarray | None:
    """A lazy layer's keys' contributions, read once (None, with `u_note` saying why, where not offered)."""
    if layer.u is None and layer.u_read is not None:
        layer.u, layer.u_note = layer.u_read()
        layer.u_read = None
    return layer.u


def pages(result, lazy: bool = False) -> list[PageLayer]:
    """Every block of an analysis (`vggattn.analysis.Analysis`) as the page gets it, with what each key brings
    (`BlockResult.keys_contributions`) while those stay within U_BUDGET bytes in all. lazy (the app, which sends
    them only when the page asks): nothing read here, each layer's `read_u` reads its own on the first request."""
    layers = [block_page(b) for b in result.blocks]
    spent = 0
    for layer, block in zip(layers, result.blocks):
        size = contributions_bytes(block)
        if size is None:
            continue
        if spent + size > U_BUDGET:  # not read at all
            layer.u_note = f"its keys' contributions would pass the page's {U_BUDGET >> 20} MB for them"
            continue
        if lazy:
            def later(block=block):
                u, why = block.keys_contributions()
                return (None if u is None else u.float().cpu().numpy()), why
            layer.u_read = later
            spent += size
            continue
        u, why = block.keys_contributions()
        if u is not None:
            spent += u.numel() * 4
            layer.u = u.float().cpu().numpy()
        layer.u_note = why
    return layers


ARRAYS = ("q", "k", "logz", "rows", "values", "cells", "prefix_w", "prefix_rows", "norms", "rollout", "u")
PAYLOAD_BUDGET = 8 << 20  # bytes of JSON an upload sends at most: layers past it are sent when the page shows them


def page_payload(result, layers: list[PageLayer], dtype: str = "float32", budget: int = PAYLOAD_BUDGET,
                 fetch: str | None = None) -> dict:
    """What the page gets once per image: its size, the display copy as a JPEG data URL (the server draws on the
    same pixels), and the `page_layer`s (result: a `vggattn.analysis.Analysis`). Layers are sent whole in order
    while the JSON stays within `budget` bytes; later ones (a big transformer's: DINOv2 at 518 px has 50 MB of
    float32 queries and keys, 4.2 MB a layer: even its first) go as their description with "deferred": true, and
    the page gets each from `fetch` + its index when its panel is on screen, as bytes (`layer_binary`: no base64 and
    no JSON for Gradio's event to carry). fetch None: every layer whole."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    disp_h, disp_w = result.display.shape[:2]
    out = {"version": 3, "dtype": dtype, "size": list(result.size), "display_size": [disp_w, disp_h],
           "image": "data:image/jpeg;base64," + base64.b64encode(result.display_jpeg).decode("ascii"), "layers": []}
    used = len(out["image"]) + 200
    for i, layer in enumerate(layers):
        whole = layer._payload(dtype)  # its arrays encoded only if they are sent now
        if fetch is not None and ("u" in whole or layer.u_read is not None):  # what each key brings: fetched
            whole = {k: v for k, v in whole.items() if k not in ("u", "uc")} | {"has_u": True}  # when the view asks
        size = _json_size(whole)
        if fetch is not None and used + size > budget:  # past the budget: fetched when its panel shows
            whole = {k: v for k, v in whole.items() if k not in ARRAYS} | {"deferred": True}
            size = len(json.dumps(whole))
        used += size
        out["layers"].append(_encoded(whole))
    if fetch is not None and any(layer.get("deferred") or layer.get("has_u") for layer in out["layers"]):
        out["fetch"] = fetch
    return out
