"""Tokens that are not the image's places, looked at on the image: a detector's object queries (their maps over the
encoder's grid in every decoder layer, beside the box and class each predicts), or any model's tokens read by
`vggattn.capture` as cross-attention.

    found = token_maps(model, meta, image)     # TokenMaps
    found.names                                 # ["query 0", "query 1", ...]
    found.map("query 3")                        # {block: (key rows, key cols) float32, the mean over heads}
    found.predictions["query 3"]                # {"class", "score", "box": [x0, y0, x1, y1] in input pixels, "object"}
    box_shares(found.map("query 3")[block], box, found.input_wh)   # its attention inside its box and on its border
    python -m vggattn.study --hf DETECTOR --tokens --data photos/ --out q/   # per query over a folder (`query_study`)

The model runs once (`vggattn.capture`); a transformers DETR-family output (logits and pred_boxes) gives each query
its prediction: DETR's softmax with its last class "no object", or Conditional DETR's per-class sigmoid (no
"no object" class: a query whose best score is under SCORE_THRESHOLD is marked as none).
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .attention.deformable import Sampled, sampling_points
from .capture import capture
from .data import preprocess

SCORE_THRESHOLD = 0.5  # a query predicting under this is "no object"
BAND = 1.0  # the border band: cells whose centre lies within this many cells of the box's edge, inside or out


@dataclass
class TokenMaps:
    """The cross-attention of one image: per block, every token's rows on the key grid."""

    names: list[str]  # the tokens, in order ("query 0", ...)
    rows: dict[str, torch.Tensor]  # block -> (heads, T, M) rows of each token over the key grid
    key_grids: dict[str, tuple[int, int]]  # block -> (rows, cols) of its key grid
    input_wh: tuple[int, int]  # the model input's size, in pixels (boxes are in these)
    predictions: dict[str, dict] = field(default_factory=dict)  # token -> what it predicts (detectors)
    shows: str = ""  # what the maps are, in words
    points: dict[str, Sampled] = field(default_factory=dict)  # block -> deformable attention's sampling points

    @property
    def blocks(self) -> list[str]:
        """Every layer: the ones with rows over a key grid, then the ones that sample points (deformable)."""
        return list(self.rows) + list(self.points)

    def index(self, token: str) -> int:
        """The token's position among `names`; a name or a number ("query 3", "3")."""
        if token in self.names:
            return self.names.index(token)
        if re.fullmatch(r"\d+", token.strip()) and int(token) < len(self.names):
            return int(token)
        raise ValueError(f"no token {token!r}: this model's are {self.names[0]} to {self.names[-1]}"
                         if self.names else f"no token {token!r}: this model's attention has no tokens besides places")

    def map(self, token: str, head: int | None = None) -> dict[str, np.ndarray]:
        """{block: (key rows, key cols)} the token's weights on the key grid, the mean over heads (or one head)."""
        i = self.index(token)
        out = {}
        for block, r in self.rows.items():
            row = r[:, i].mean(0) if head is None else r[head, i]
            out[block] = row.reshape(self.key_grids[block]).float().numpy()
        return out

    def samples(self, token: str, head: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """{block: (xy (K, 2) in input pixels, weights (K,), levels (K,))} the token's sampling points in every
        deformable layer: all heads' points (K = heads x points) with each head's weights divided by the number of
        heads (so they sum to 1 like a mean map), or one head's."""
        i = self.index(token)
        W, H = self.input_wh
        out = {}
        for block, s in self.points.items():
            heads = range(s.points.shape[1]) if head is None else [head]
            xy = torch.cat([s.points[0, h, i] for h in heads]) * torch.tensor([W, H], dtype=torch.float32)
            w = torch.cat([s.weights[0, h, i] for h in heads]) / len(heads)
            out[block] = (xy.numpy(), w.numpy(), s.levels.repeat(len(heads)).numpy())
        return out

    def weights_at(self, xy: tuple[float, float]) -> dict[str, np.ndarray]:
        """{block: (T,)} each token's weight on the place (x, y) in input pixels, the mean over heads: on the key
        cell under it, or, for a deformable layer, what the value cells under it receive from its sampling points
        (each point's weight split bilinearly, `Sampled.cells`), summed over the levels."""
        x, y = xy
        W, H = self.input_wh
        out = {}
        for block in self.blocks:
            if block in self.rows:
                gh, gw = self.key_grids[block]
                cell = min(gh - 1, int(y / H * gh)) * gw + min(gw - 1, int(x / W * gw))
                out[block] = self.rows[block][:, :, cell].mean(0).float().numpy()
            else:
                s = self.points[block]
                out[block] = sum(m[:, min(m.shape[1] - 1, int(y / H * m.shape[1])),
                                   min(m.shape[2] - 1, int(x / W * m.shape[2]))]
                                 for m in s.cells(0).values()).numpy() / s.points.shape[1]
        return out


def point_shares(xy: np.ndarray, w: np.ndarray, box, input_wh: tuple[int, int]) -> dict[str, float]:
    """Where sampling points' weight lies against a box (x0, y0, x1, y1 in input pixels): its share on points inside
    the box, beside the box's share of the image."""
    x0, y0, x1, y1 = box
    inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
    W, H = input_wh
    area = max(0.0, min(x1, W) - max(x0, 0)) * max(0.0, min(y1, H) - max(y0, 0)) / (W * H)
    return {"in_box": float(w[inside].sum() / (w.sum() or 1.0)), "box_area": area}


_DEFORMABLE: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()  # model -> samples points


class _Kept:
    """The inner model's own output of this thread's next forward (a ModelOutput: boxes beside the logits)."""

    def __init__(self, module: nn.Module):
        self.module, self.out, self._me = module, None, threading.get_ident()

    def __enter__(self):
        def hook(m, a, out):
            if threading.get_ident() == self._me and self.out is None:
                self.out = out
        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> bool:
        self.handle.remove()
        return False


def predictions(out, names: list[str], class_names: list[str] | None, input_wh: tuple[int, int]) -> dict[str, dict]:
    """Each query's prediction from a DETR-family output (`logits` (1, Q, C or C + 1), `pred_boxes` (1, Q, 4) as
    centre x, centre y, width, height over the input); {} for another output."""
    logits, boxes = getattr(out, "logits", None), getattr(out, "pred_boxes", None)
    if not isinstance(logits, torch.Tensor) or not isinstance(boxes, torch.Tensor) or logits.dim() != 3 \
            or logits.shape[1] != len(names):
        return {}
    n_classes = len(class_names) if class_names else logits.shape[-1]
    if logits.shape[-1] == n_classes + 1:  # DETR: a softmax whose last class is "no object"
        prob = logits[0].float().softmax(-1)
        score, label = prob[:, :-1].max(-1)
        empty = prob[:, -1]
    else:  # per-class sigmoids (Conditional DETR's focal classification)
        score, label = logits[0].float().sigmoid().max(-1)
        empty = None
    W, H = input_wh
    out_ = {}
    for i, name in enumerate(names):
        cx, cy, w, h = (float(v) for v in boxes[0, i])
        c = int(label[i])
        out_[name] = {"class": class_names[c] if class_names and c < len(class_names) else str(c),
                      "score": round(float(score[i]), 4),
                      "box": [round((cx - w / 2) * W, 2), round((cy - h / 2) * H, 2), round((cx + w / 2) * W, 2),
                              round((cy + h / 2) * H, 2)],
                      "object": bool(float(score[i]) >= SCORE_THRESHOLD and (empty is None or float(empty[i]) < 0.5))}
    return out_


@torch.no_grad()
def token_maps(model: nn.Module, meta: dict, image) -> TokenMaps:
    """Every cross-attention block's token rows for one image (PIL), with each query's prediction where the model is
    a DETR-family detector."""
    x = preprocess(image, meta)
    inner = getattr(model, "inner", model)  # a transformers model behind `vggattn.models.output.ImageOutput`
    input_wh = (x.shape[-1], x.shape[-2])
    if _DEFORMABLE.get(model, True):  # deformable attention: its sampling points (checked once per model)
        with _Kept(inner) as kept:
            points = {n: s for n, s in sampling_points(model, x).items() if not s.queries_on_levels}
        _DEFORMABLE[model] = bool(points)
        if points:
            q = next(iter(points.values())).points.shape[2]
            found = TokenMaps([f"query {i}" for i in range(q)], {}, {}, input_wh, points=points,
                              shows="each query's sampling points with their weights (deformable attention samples "
                                    "a few points per query: no map over the image)")
            found.predictions = predictions(kept.out, found.names, _class_names(inner, meta), input_wh)
            return found
    with _Kept(inner) as kept:
        _, maps = capture(model, x)
    cross = {n: m for n, m in maps.items() if m.query_names is not None}
    if not cross:
        raise ValueError("this model has no attention from tokens to the image's places (no cross-attention found: "
                         "object queries or other tokens over the image)")
    names = next(iter(cross.values())).query_names
    rows = {n: m.rows()[0] for n, m in cross.items() if m.query_names == names}
    found = TokenMaps(names, rows, {n: cross[n].key_grid for n in rows}, input_wh,
                      shows=next(iter(cross.values())).meaning)
    found.predictions = predictions(kept.out, names, _class_names(inner, meta), input_wh)
    return found


def _class_names(inner: nn.Module, meta: dict) -> list[str] | None:
    labels = getattr(getattr(inner, "config", None), "id2label", None) or {}  # a detector's classes
    return meta.get("class_names") or ([labels[i] for i in sorted(labels)] if labels else None)


def box_shares(grid_map: np.ndarray, box, input_wh: tuple[int, int], band: float = BAND) -> dict[str, float]:
    """Where a map's weight lies against a box (x0, y0, x1, y1 in input pixels), by each cell's centre: its share
    inside the box; on the band within `band` cells of the box's edge (inside or out), and on the part of that band
    outside the box; in the box's centre (its middle half each way); each beside that region's share of the image's
    cells (what a map spread evenly would give)."""
    gh, gw = grid_map.shape
    W, H = input_wh
    cy, cx = np.meshgrid((np.arange(gh) + 0.5) * H / gh, (np.arange(gw) + 0.5) * W / gw, indexing="ij")
    x0, y0, x1, y1 = box
    inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
    bx, by = band * W / gw, band * H / gh
    outer = (cx >= x0 - bx) & (cx <= x1 + bx) & (cy >= y0 - by) & (cy <= y1 + by)
    inner = (cx >= x0 + bx) & (cx <= x1 - bx) & (cy >= y0 + by) & (cy <= y1 - by)
    border = outer & ~inner
    mx, my, qx, qy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
    centre = (np.abs(cx - mx) <= qx) & (np.abs(cy - my) <= qy)  # the box's middle half each way
    total = float(grid_map.sum()) or 1.0
    share = lambda where: float(grid_map[where].sum()) / total  # noqa: E731
    return {"in_box": share(inside), "box_area": float(inside.mean()),
            "on_border": share(border), "border_area": float(border.mean()),
            "outside_on_border": share(border & ~inside), "outside_border_area": float((border & ~inside).mean()),
            "in_centre": share(centre), "centre_area": float(centre.mean())}


def query_study(model: nn.Module, meta: dict, images, *, seed: int = 0, resamples: int = 2000) -> dict:
    """Per object query of a detector over a set of images (PIL images, or paths): how often it predicts an object
    (score >= SCORE_THRESHOLD), the classes it predicts then, and, over those images, in every cross-attention layer
    the share of its attention inside its own predicted box beside the box's share of the image (`box_shares`);
    means with bootstrap 95% intervals over the images where it predicts an object."""
    from .data import open_image

    per: dict[str, dict] = {}
    layers: list[str] = []
    count = 0
    for item in images:
        image = open_image(item) if not hasattr(item, "size") else item
        found = token_maps(model, meta, image)
        if not found.predictions:
            raise ValueError("the model's output has no boxes (logits and pred_boxes): no per-query study")
        layers = found.blocks
        count += 1
        for name in found.names:
            pred = found.predictions[name]
            entry = per.setdefault(name, {"objects": 0, "classes": {}, "in_box": {b: [] for b in layers},
                                          "box_area": []})
            if not pred["object"]:
                continue
            entry["objects"] += 1
            entry["classes"][pred["class"]] = entry["classes"].get(pred["class"], 0) + 1
            maps, points = found.map(name), found.samples(name)
            for b in layers:
                shares = box_shares(maps[b], pred["box"], found.input_wh) if b in maps else \
                    point_shares(*points[b][:2], pred["box"], found.input_wh)
                entry["in_box"][b].append(shares["in_box"])
            entry["box_area"].append(shares["box_area"])
    rng = np.random.default_rng(seed)

    def mean_ci(values):
        v = np.asarray(values, dtype=np.float64)
        if not len(v):
            return None
        boot = v[rng.integers(0, len(v), (resamples, len(v)))].mean(1)
        return [round(float(v.mean()), 4), round(float(np.percentile(boot, 2.5)), 4),
                round(float(np.percentile(boot, 97.5)), 4)]
    queries = {name: {"object_rate": round(e["objects"] / count, 4), "classes": e["classes"],
                      "in_box": {b: mean_ci(v) for b, v in e["in_box"].items()}, "box_area": mean_ci(e["box_area"])}
               for name, e in per.items()}
    return {"images": count, "layers": layers, "score_threshold": SCORE_THRESHOLD, "queries": queries}

