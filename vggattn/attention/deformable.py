"""Deformable attention, read by what the code computes: each query takes a few bilinear samples of the value maps
(`grid_sample` at points it predicts) and sums them with softmax weights. There is no row over the keys to draw;
what it attends to is those points, each with its weight (Deformable DETR, RT-DETR, mmcv's
`multi_scale_deformable_attn_pytorch`: the same computation).

    found = sampling_points(model, x)       # {block: Sampled}, in the order the blocks ran
    s = found["model.decoder.layers.0.encoder_attn"]
    s.points[b, h, q]                         # (S, 2): x, y of its S points as fractions of the input's width, height
    s.weights[b, h, q]                        # (S,): their weights (summing to 1 over a head's points)
    s.cells(b)                                # {level: (Q, h, w)}: the same weights spread on each level's cells
                                              # the way bilinear sampling spreads them (what the value cells get)

An attention is found where a product multiplies something made by `grid_sample` (the samples, possibly stacked or
concatenated over levels) with something made by a softmax (the weights); the points are the grids given to those
`grid_sample` calls, in call order along the samples' last axis. A block is the innermost module that made both.
A "discrete" variant that indexes instead of sampling (RT-DETRv2's option) is not read.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .trace import SOFTMAX, TRANSPARENT, _tensors, _Tracking

GATHER = {"stack", "cat", "concat", "concatenate", "split", "unbind", "chunk"}  # how per-level samples are joined
MULTIPLY = {"mul", "__mul__", "__rmul__"}


@dataclass
class Sampled:
    """One deformable attention's sampling points and their weights, on a batch."""

    block: str
    points: torch.Tensor  # (B, heads, Q, S, 2) x, y as fractions of the input's width and height (0..1 on it)
    weights: torch.Tensor  # (B, heads, Q, S)
    levels: torch.Tensor  # (S,) long: the value map each point samples
    level_grids: list[tuple[int, int]]  # (h, w) of each value map

    @property
    def queries_on_levels(self) -> bool:
        """Its queries are the value maps' own cells (an encoder: the levels' cells, row-major, level by level)."""
        return self.points.shape[2] == sum(h * w for h, w in self.level_grids)

    def cells(self, b: int = 0, head: int | None = None) -> dict[int, torch.Tensor]:
        """{level: (Q, h, w)} every query's weights as the value maps' cells receive them: each point's weight split
        over the four cells around it with its bilinear coefficients (`grid_sample`'s, align_corners=False, zeros
        outside), summed over the heads (or one head's). The block's output for a head is exactly its weights here
        times the value cells."""
        pts = self.points[b] if head is None else self.points[b, head:head + 1]  # (heads, Q, S, 2)
        wts = self.weights[b] if head is None else self.weights[b, head:head + 1]
        q = pts.shape[1]
        out = {}
        for lv, (h, w) in enumerate(self.level_grids):
            at = self.levels == lv
            px = pts[:, :, at, 0].double() * w - 0.5  # (heads, Q, P) in cells, centres at integers
            py = pts[:, :, at, 1].double() * h - 0.5
            x0, y0 = px.floor(), py.floor()
            fx, fy = px - x0, py - y0
            grid = torch.zeros(q, h * w, dtype=torch.float64)
            rows = torch.arange(q)[None, :, None].expand_as(px)
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    xx, yy = (x0 + dx).long(), (y0 + dy).long()
                    ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
                    grid.index_put_((rows[ok], (yy * w + xx)[ok]), (wts[:, :, at].double() * wx * wy)[ok],
                                    accumulate=True)
            out[lv] = grid.reshape(q, h, w)
        return out


class _Tags(TorchFunctionMode):
    """Tags each tensor made in the forward by what it derives from: a softmax's output, `grid_sample`'s samples;
    records each product of the two."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self._tags: dict[int, tuple] = {}
        self.found: list[tuple[str, torch.Tensor, list[dict]]] = []  # (block, weights as multiplied, sample calls)

    def _get(self, t):
        entry = self._tags.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0]() is t else None

    def _set(self, t, tag) -> None:
        self._tags[id(t)] = (weakref.ref(t), tag)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        module = self.stack[-1] if self.stack else ""
        if name == "grid_sample":
            grid = args[1] if len(args) > 1 else kwargs["grid"]
            value = args[0] if args else kwargs["input"]
            align = kwargs.get("align_corners", args[4] if len(args) > 4 else False)
            if isinstance(out, torch.Tensor) and out.dim() == 4 and grid.dim() == 4:
                self._set(out, ("samples", [{"grid": grid.detach(), "hw": tuple(value.shape[-2:]),
                                             "align": bool(align), "module": module}]))
            return out
        if name in SOFTMAX:
            if isinstance(out, torch.Tensor):
                self._set(out, ("weights", module))
            return out
        ins = [t for t in _tensors(args) + _tensors(kwargs)]
        tags = [(t, self._get(t)) for t in ins]
        tags = [(t, g) for t, g in tags if g is not None]
        if name in MULTIPLY and len(tags) == 2 and {g[0] for _, g in tags} == {"samples", "weights"}:
            (w, wt), = [(t, g) for t, g in tags if g[0] == "weights"]
            (_, st), = [(t, g) for t, g in tags if g[0] == "samples"]
            self.found.append((_common(wt[1], module), w.detach(), st[1]))
            return out
        if len(tags) and (name in TRANSPARENT or name in GATHER):
            kinds = {g[0] for _, g in tags}
            if len(kinds) == 1:
                kind = kinds.pop()
                tag = (kind, [c for _, g in tags for c in g[1]]) if kind == "samples" else tags[0][1]
                for t in _tensors(out):
                    self._set(t, tag)
        return out


def _common(a: str, b: str) -> str:
    """The innermost module that holds both (dotted names)."""
    pa, pb = a.split("."), b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) and pa[n] == pb[n]:
        n += 1
    return ".".join(pa[:n])


def _read(block: str, w: torch.Tensor, calls: list[dict], batch: int) -> Sampled | None:
    """The weights and points of one product: the calls' grids (G, Q, P_l, 2) joined along the points, the weights
    (as multiplied: G x Q x S elements) read as (G, Q, S); G = batch x heads."""
    grids = [c["grid"] for c in calls]
    g, q = grids[0].shape[:2]
    if any(gr.shape[:2] != (g, q) for gr in grids) or g % batch:
        return None
    s = sum(gr.shape[2] for gr in grids)
    if w.numel() != g * q * s:
        return None
    points = []
    for c in calls:
        gr = c["grid"].float()
        h, wd = c["hw"]
        if c["align"]:  # -1 and 1 are the centres of the corner cells
            size = torch.tensor([wd, h], dtype=torch.float32)
            gr = ((gr + 1) / 2 * (size - 1) + 0.5) / size
        else:  # -1 and 1 are the map's edges
            gr = (gr + 1) / 2
        points.append(gr)
    heads = g // batch
    levels = torch.cat([torch.full((c["grid"].shape[2],), i, dtype=torch.long) for i, c in enumerate(calls)])
    return Sampled(block, torch.cat(points, 2).reshape(batch, heads, q, s, 2),
                   w.float().reshape(batch, heads, q, s), levels, [c["hw"] for c in calls])


@torch.no_grad()
def sampling_points(model: nn.Module, x, **kwargs) -> dict[str, Sampled]:
    """Every deformable attention's points and weights in one forward of model(x, **kwargs) (x: (B, 3, H, W), or a
    dict of the model's keyword inputs with `pixel_values`)."""
    stack: list[str] = []
    tags = _Tags(stack)
    batch = (x["pixel_values"] if isinstance(x, dict) else x).shape[0]
    with _Tracking(model, stack), tags:
        model(**x, **kwargs) if isinstance(x, dict) else model(x, **kwargs)
    out: dict[str, Sampled] = {}
    for block, w, calls in tags.found:
        read = _read(block, w, calls, batch)
        if read is not None:
            name, n = block, 1
            while name in out:  # a block that runs twice
                n += 1
                name = f"{block} (call {n})"
            read.block = name
            out[name] = read
    return out


def drawn_on(points: torch.Tensor, wh: tuple[int, int]) -> torch.Tensor:
    """(..., 2) fractions of the input as pixels of an image of size wh (width, height)."""
    return points * torch.tensor([wh[0], wh[1]], dtype=points.dtype)

