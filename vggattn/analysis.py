"""One image through any model with attention blocks, kept for cheap per-click answers.

    result = analyze(model, meta, pil_image)        # one forward: every block's maps, its input's change
    result.top_k(5)                                 # {"church": 0.93, ...}, or None (see result.score())
    block = result.blocks[0]                        # BlockResult: name, adapter, maps (vggattn.attention.adapters.BlockMaps)
    block.row_map((120, 80))                        # (heads, kh, kw): where that pixel's position looks
    result.query_dependence()                       # per block: query-averaged map and mean JSD (or None)
    result.contributions()                          # per block: ||block(x) - x|| / ||x|| per position (or None)
    ablate(model, result, {"features.22": "off"})   # probabilities with that block switched off

The blocks are found by `vggattn.attention.adapters.find_blocks` (a family's adapter, or by what their code computes);
one forward keeps each block's input and output (`vggattn.attention.trace.watch`). `Analysis` holds a display-sized copy
of the image, the output and each block's maps, so an app can keep one per session and answer clicks, tabs and
exports without running the model again (Grad-CAM: one forward and backward, when first asked for).
"""

from __future__ import annotations

import functools
import io
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .attention.adapters import (Adapter, BlockMaps, Intervention, TracedAdapter, example_input, find_blocks,
                                 locate_tokens)
from .models.output import image_model
from .data import eval_transform, query_index, to_rgb
from .gradcam import grad_cam
from .attention.readouts import exact_log_z, js_divergence, row_summaries
from .attention.trace import watch

DISPLAY_MAX_SIDE = 512  # overlays are drawn on a copy of the image at most this large (click cost ~ its area)
DISPLAY_JPEG_QUALITY = 90
DEPENDENCE_ELEMENTS = 1 << 22  # query dependence: at most this many row weights at once


def display_copy(image: Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> tuple[np.ndarray, bytes]:
    """The picture maps are drawn on: an RGB image downscaled so its longest side is at most max_side,
    as JPEG bytes (what the page receives) and those bytes decoded, (h, w, 3) uint8, so the server draws
    on the very pixels the page draws on (Chromium's and PIL's libjpeg-turbo decode alike)."""
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=DISPLAY_JPEG_QUALITY)
    return np.asarray(Image.open(jpeg).convert("RGB"), dtype=np.uint8), jpeg.getvalue()


def block_gamma(module: nn.Module) -> float | None:
    """A block's learned residual scale γ where it has one (a one-element `gamma` parameter), else None."""
    gamma = getattr(module, "gamma", None)
    return float(gamma.detach().reshape(())) if isinstance(gamma, torch.Tensor) and gamma.numel() == 1 else None


_BLOCKS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def blocks_of(model: nn.Module, meta: dict, layers: list[str] | None = None) -> list:
    """`find_blocks` on an input of the model's size, once per model and choice of layers (a model's modules are
    not expected to change once it is being analysed)."""
    found = _BLOCKS.setdefault(model, {})
    key = None if layers is None else tuple(layers)
    if key not in found:
        found[key] = find_blocks(model, layers, example=example_input(model, meta.get("input_size")))
    return list(found[key])


@dataclass
class BlockResult:
    """One block's attention on one image (batch of one)."""

    name: str
    adapter: Adapter
    maps: BlockMaps
    image_size: tuple[int, int]  # (width, height) of the original image
    gamma: float | None = None  # the block's learned γ, where it has one
    contribution: np.ndarray | None = None  # (h, w) ||block(x) - x|| / ||x|| per position; None where y and x differ
    # in shape (the block is no residual update of its input)
    row_sums: tuple | None = None  # (top key, log of its weight, the rows' sum) of each row as the forward computed
    # them (`trace.RowSums`), if it did
    token_norms: np.ndarray | None = None  # a transformer's block: the L2 norm of each token of the residual stream
    # entering it (T,), as Darcet et al. measure them (`residual_stream`)
    page_norms: np.ndarray | None = None  # the same norms in the page's order: the grid's cells, then the prefix tokens
    rollout: np.ndarray | None = None  # (T, T) attention rollout up to this block (`attention_rollout`), page order
    source: tuple | None = None  # (the block, its input, its call) as the forward ran it (`keys_contributions`)
    _contributions: tuple | None = None

    def keys_contributions(self) -> tuple[torch.Tensor | None, str]:
        """((heads, M + P, C) float32 what each key brings through each head, or None; why not, in words):
        `vggattn.attention.effect.contributions`, read once."""
        if self._contributions is None:
            from .attention.effect import NotOffered, contributions

            try:
                if self.source is None:
                    raise NotOffered("the block's input was not kept")
                module, x, call = self.source
                self._contributions = (contributions(self.adapter, module, x, self.maps, call), "")
            except NotOffered as e:
                self._contributions = (None, str(e))
        return self._contributions

    @property
    def family(self) -> str:
        return self.adapter.family

    def query_index(self, xy: tuple[float, float]) -> int:
        return query_index(xy, self.image_size, self.maps.grid)

    def row_map(self, xy: tuple[float, float]) -> np.ndarray:
        """(heads, kh, kw) float64: where the position under pixel xy looks (per-image maps: the map itself)."""
        with torch.no_grad():
            rows = self.maps.rows(None if self.maps.per_image else [self.query_index(xy)], torch.float64)[0, :, 0]
        return rows.cpu().reshape(self.maps.heads, *self.maps.key_grid).numpy()

    def padding_share(self, xy: tuple[float, float]) -> float | None:
        """The share of the row under pixel xy that falls on padding (mean over heads), or None where none can."""
        if self.maps.padding is None:
            return None
        q = 0 if self.maps.per_image else self.query_index(xy)
        return float(self.maps.padding[0, :, q].double().mean())

    @functools.cached_property
    def summaries(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(log Z (heads, N), mean row (heads, M)) as float64 arrays, of softmax rows of queries and keys: as the
        block's forward computed them where it did (`row_sums`), else from one float32 pass over the rows
        (`vggattn.view.hover.row_summaries`); None for other maps. Computed once."""
        m = self.maps
        if m.query is None or m.window is not None or m.weights is not None or m.bias is not None \
                or m.normalise != "softmax":
            return None
        heads, n, k = m.query.shape[1], m.query.shape[2], m.key.shape[2]
        if self.row_sums is not None and heads == 1 and self.row_sums[0].numel() == n \
                and self.row_sums[1].numel() == k:
            top, log_top_weight, total = self.row_sums
            log_z = exact_log_z(m.query[0, 0].float(), m.key[0, 0].float(), m.scale, top.to(m.key.device),
                                log_top_weight.to(m.key.device))
            return log_z.reshape(1, n).cpu().numpy(), (total / n).reshape(1, k).cpu().numpy()
        with torch.no_grad():
            log_z, mean = row_summaries(m.query[0].float(), m.key[0].float(), m.scale)
        return log_z.double().cpu().numpy(), mean.double().cpu().numpy()

    @functools.cached_property
    def mean_row(self) -> np.ndarray:
        """(M,) float64: every query and head's mean weight on each key cell (a distribution for softmax rows);
        computed once."""
        if self.summaries is not None:
            return self.summaries[1].mean(0)
        with torch.no_grad():
            return self.maps.mean_row()[0, :, 0].double().mean(0).cpu().numpy()

    @property
    def sink(self) -> tuple[int, float] | None:
        """The image's sink, for rows that are distributions: (key cell, its share of all attention)."""
        if self.maps.normalise != "softmax":
            return None
        return int(self.mean_row.argmax()), float(self.mean_row.max())

    def query_dependence(self) -> tuple[np.ndarray, float | None]:
        """(query-averaged map (kh, kw), mean JS divergence (nats) of the rows from it); the divergence is None
        where rows are no distributions, 0 for one map per image. Rows are the mean of the heads' rows, read a
        block of queries at a time (never the whole N x M map at once)."""
        mean = self.mean_row
        mean_map = mean.reshape(self.maps.key_grid)
        if self.maps.normalise != "softmax":
            return mean_map, None
        if self.maps.per_image:
            return mean_map, 0.0
        n, m = self.maps.grid[0] * self.maps.grid[1], len(mean)
        step = max(1, DEPENDENCE_ELEMENTS // (m * self.maps.heads))
        target = torch.as_tensor(mean, dtype=torch.float32)
        with torch.no_grad():
            total = sum(float(js_divergence(self.maps.rows(list(range(s, min(n, s + step))))[0].mean(0), target).sum())
                        for s in range(0, n, step))
        return mean_map, total / n


@dataclass
class Analysis:
    size: tuple[int, int]  # (width, height) of the original image (EXIF orientation applied)
    output: torch.Tensor  # the model's raw output for the image (1, ...)
    class_names: list[str] | None
    blocks: list[BlockResult] = field(default_factory=list)
    display: np.ndarray | None = None  # (h, w, 3) uint8 copy to draw on, longest side <= DISPLAY_MAX_SIDE
    display_jpeg: bytes | None = None  # the same picture as the JPEG the page gets
    input: torch.Tensor | None = None  # the model's input (1, 3, S, S), for ablation forwards and Grad-CAM
    input_size: int = 0
    temperature: float = 1.0  # probabilities are softmax(logits / temperature) (the checkpoint's calibration)
    model_view: np.ndarray | None = None  # (S, S, 3) uint8: the input as the model saw it (normalisation undone)
    gradcam: np.ndarray | None = None  # (h, w) Grad-CAM of the top class (`with_gradcam`), when asked for
    shows: str | None = None  # which of a ModelOutput's fields `output` is ("logits", "pooler_output", ...)
    _dependence: list | None = field(default=None, repr=False)

    @property
    def probs(self) -> torch.Tensor | None:
        """(num_classes,) class probabilities when the output is one logit per class, else None."""
        out = self.output.reshape(-1)
        if not self.class_names or out.numel() != len(self.class_names):
            return None
        return torch.softmax(out.float() / self.temperature, dim=0)

    def top_k(self, k: int = 5) -> dict[str, float] | None:
        """{class: probability} when the output is one logit per class, else None (see `score`)."""
        probs = self.probs
        if probs is None:
            return None
        p, i = probs.topk(min(k, probs.numel()))
        return {self.class_names[j]: float(v) for v, j in zip(p.tolist(), i.tolist())}

    def score(self) -> list[float]:
        """The raw output values (a discriminator's real/fake score)."""
        return [float(v) for v in self.output.reshape(-1)[:16]]

    def gammas(self) -> dict[str, float]:
        """{block: γ} of the blocks that have a learned residual scale."""
        return {b.name: b.gamma for b in self.blocks if b.gamma is not None}

    def contributions(self) -> list[np.ndarray | None]:
        return [b.contribution for b in self.blocks]

    def query_dependence(self) -> list[tuple[np.ndarray, float | None]]:
        """Per block `BlockResult.query_dependence`, computed once."""
        if self._dependence is None:
            self._dependence = [b.query_dependence() for b in self.blocks]
        return self._dependence


def contribution_map(x: torch.Tensor, y) -> np.ndarray | None:
    """(h, w) ||y - x|| / ||x|| per position of a (1, C, h, w) block input and its output; None when the output
    is no tensor of the input's shape."""
    if isinstance(y, (tuple, list)):  # SAGAN's blocks return (out, attention)
        y = y[0]
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or x.dim() != 4:
        return None
    delta = (y - x).float()
    return (delta.norm(dim=1) / x.float().norm(dim=1).clamp_min(1e-12))[0].cpu().numpy()


@torch.no_grad()
def analyze(model: nn.Module, meta: dict, image: Image.Image, layers: list[str] | None = None) -> Analysis:
    """Run the model once on the whole image and keep what clicks, tabs and exports need: every block's input
    and output (`vggattn.attention.trace.watch`), then each block's maps."""
    image = to_rgb(image)  # once: open_image's RGB image comes back as it is
    model = image_model(model, example_input(model, meta.get("input_size")))  # a ModelOutput, dict or dataclass
    blocks = blocks_of(model, meta, layers)
    device = next(model.parameters()).device
    x = (meta.get("transform") or eval_transform(meta))(image).unsqueeze(0).to(device)
    traced = {name for name, _, adapter in blocks if isinstance(adapter, TracedAdapter)}
    summarised = {name for name, _, adapter in blocks if adapter.softmax_rows}
    names = [name for name, *_ in blocks]
    tokens = {name for name, _, adapter in blocks if getattr(adapter, "places", None)}  # blocks of tokens
    ancestors = {a for n in tokens for a in _ancestors(n)} - set(names)  # where their residual stream is read
    output, seen = watch(model, x, names + sorted(ancestors), traced, summarised=summarised)
    locate_tokens(model, x, blocks, {name: s.input for name, s in seen.items() if s.input is not None})
    if isinstance(output, (tuple, list)):  # e.g. a discriminator returning (score, features)
        output = output[0]
    result = Analysis(image.size, output.detach().float().cpu(), meta.get("class_names"), [], *display_copy(image),
                      x.cpu(), int(meta["input_size"]), float(meta.get("temperature", 1.0)),
                      model_view(x, meta) if "transform" not in meta else None)
    result.shows = getattr(model, "shows", None)
    for name, module, adapter in blocks:
        if name not in seen:  # a block the forward did not run
            continue
        kept = seen[name]
        maps = adapter.maps(module, kept.input, kept.events, kept.call) if name in traced else \
            adapter.maps(module, kept.input)
        stream = residual_stream(name, seen) if maps.prefix is not None else None
        norms = None if stream is None else stream[0].float().norm(dim=-1).cpu().numpy()
        page_norms = None
        if norms is not None and isinstance(adapter, TracedAdapter):  # each grid cell's token, then the prefix tokens
            lay = adapter.layout(module, kept.input, kept.call)
            if lay.prefix_queries is not None and len(lay.group) == 1 and lay.iq.shape[1] + lay.prefix_queries.shape[1] \
                    == len(norms):
                page_norms = norms[torch.cat([lay.iq[0], lay.prefix_queries[0]]).numpy()]
        result.blocks.append(BlockResult(name, adapter, maps, image.size, block_gamma(module),
                                         contribution_map(kept.input, kept.output), kept.row_sums, norms, page_norms,
                                         source=(module, kept.input, kept.call)))
    for block, rolled in zip(result.blocks, attention_rollout(result.blocks) or []):
        block.rollout = rolled
    return result


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


ROLLOUT_MAX_TOKENS = 300  # attention rollout goes to the page for transformers of at most this many tokens (T x T a layer)


def full_rows(maps: BlockMaps, max_tokens: int | None = None) -> torch.Tensor | None:
    """(T, T) float64, mean of heads: a transformer block's whole attention over its tokens in the page's order (the
    grid's cells, then the prefix tokens), rows and columns; None where the queries and keys are not the same tokens."""
    if maps.prefix is None or maps.prefix_rows is None or maps.grid != maps.key_grid or maps.window is not None:
        return None
    if max_tokens is not None and maps.prefix_rows.shape[-1] > max_tokens:
        return None
    top = torch.cat([maps.rows(dtype=torch.float64)[0], maps.prefix[0].double()], -1)  # (heads, N, M + P)
    return torch.cat([top, maps.prefix_rows[0].double()], 1).mean(0)  # (T, T)


def attention_rollout(blocks: list["BlockResult"], max_tokens: int = ROLLOUT_MAX_TOKENS) -> list[np.ndarray] | None:
    """Attention rollout (Abnar and Zuidema 2020) after each block: R_l = A'_l ... A'_1 with A' = (A + I) / 2 rows
    renormalised and A a block's head-mean attention over all its tokens (`full_rows`); row i of R_l says how much of
    token i at block l comes from each input token, if attention alone mixed them (the MLPs and the residual's
    real weights are left out: a model of the flow, not the flow). None unless every block attends over the same
    tokens, at most max_tokens of them."""
    out, total = [], None
    for block in blocks:
        a = full_rows(block.maps, max_tokens)
        if a is None or a.shape[0] > max_tokens or (total is not None and total.shape != a.shape):
            return None
        a = 0.5 * a + 0.5 * torch.eye(a.shape[0], dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        total = a if total is None else a @ total
        out.append(total.float().numpy())
    return out or None


def residual_stream(name: str, seen: dict):
    """The tokens of the residual stream at a transformer's attention `name`: the input of its nearest enclosing
    module that takes other tokens of the same shape than the attention does (the attention's own input is
    normalised: a block's input is not), else the attention's own input."""
    own = seen[name].input
    for a in _ancestors(name):
        t = seen.get(a)
        if t is not None and isinstance(t.input, torch.Tensor) and t.input.shape == own.shape \
                and t.input.data_ptr() != own.data_ptr():
            return t.input
    return own


def with_gradcam(model: nn.Module, result: Analysis) -> np.ndarray | None:
    """The top class's Grad-CAM at the model's last conv layer (`vggattn.gradcam.grad_cam`), kept in the result;
    None for a model without class logits or convs."""
    if result.gradcam is None and result.probs is not None:
        device = next(model.parameters()).device
        cam = grad_cam(image_model(model, example_input(model, result.input_size or None)), result.input.to(device),
                       int(result.probs.argmax()))
        result.gradcam = None if cam is None else cam[0].cpu().numpy()
    return result.gradcam


@torch.no_grad()
def ablate(model: nn.Module, result: Analysis, modes: dict[str, str]) -> torch.Tensor:
    """The model's output for the analysed input with the named blocks' rows replaced ({block: "off", "mean" or
    "uniform"}, `vggattn.attention.adapters.Intervention`) for one forward: probabilities (softmax with the result's
    temperature) for a classifier, else the raw output, flattened. Other users of the model are unaffected."""
    device = next(model.parameters()).device
    model = image_model(model, example_input(model, result.input_size or None))
    with Intervention(model, modes):
        out = model(result.input.to(device))
    out = (out[0] if isinstance(out, (tuple, list)) else out).detach().float().cpu().reshape(-1)
    return torch.softmax(out / result.temperature, 0) if result.probs is not None else out


ALL_OFF = "*"  # `switched_off`'s key for every block off at once


def switched_off(model: nn.Module, result: Analysis) -> dict[str, torch.Tensor] | None:
    """The ablation that result.json reports, and the Grad-CAM the figure shows (`with_gradcam`, kept in the result):
    {block name: the probabilities with that block's attention off, ALL_OFF: with every block's off}; None for a
    model without class logits (one forward per block, and one more)."""
    with_gradcam(model, result)
    if result.probs is None:
        return None
    off = {b.name: ablate(model, result, {b.name: "off"}) for b in result.blocks}
    return off | {ALL_OFF: ablate(model, result, {b.name: "off" for b in result.blocks})}


def model_view(x: torch.Tensor, meta: dict) -> np.ndarray:
    """Undo normalisation of a (1, 3, S, S) input -> (S, S, 3) uint8: the image as the model sees it."""
    mean = torch.tensor(meta["mean"]).view(3, 1, 1)
    std = torch.tensor(meta["std"]).view(3, 1, 1)
    img = (x[0].cpu().float() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


# B of an A/B on one image: the same model changed (the views compare it with A, `vggattn.view.compare`)
COMPARE_KINDS = {"reinit": "the same model, every block's Q and K re-initialised",
         "off": "the same model, every block's attention off", "mean": "the same model, every block's rows its mean row",
         "uniform": "the same model, every block's rows uniform"}  # what B can be besides another image or model


def twin_with_new_qk(model, meta: dict, layers: list[str] | None = None, seed: int = 1000):
    """A copy of the model with every attention block's Q and K parameters re-initialised (`Adapter.qk_modules`)."""
    import copy

    from .attention.adapters import reset

    twin = copy.deepcopy(model)
    for name, _, adapter in blocks_of(model, meta, layers):
        for i, sub in enumerate(adapter.qk_modules):
            reset(twin.get_submodule(f"{name}.{sub}" if sub else name), seed + i)
    return twin.eval()


def analysed_b(model, meta: dict, image, kind: str, layers: list[str] | None = None):
    """The `Analysis` of B for a kind in COMPARE_KINDS: the image through the model with its Q and K re-initialised, or
    every block's attention intervened on (`Intervention`: a block's own rows are read from its input as always, so
    what changes is every block after one intervened on)."""
    if kind == "reinit":
        return analyze(twin_with_new_qk(model, meta, layers), meta, image, layers)
    if kind not in COMPARE_KINDS:
        raise ValueError(f"B must be one of {list(COMPARE_KINDS)}, another image or another model; got {kind!r}")
    with Intervention(model, {n: kind for n, *_ in blocks_of(model, meta, layers)}):
        return analyze(model, meta, image, layers)


ACROSS_KINDS = ("rollout", "flow", "relevance")
FLOW_MAX_TOKENS = 300  # attention flow: one max-flow per token over (layers + 1) x T nodes (0.6 s at 145 tokens)


def across_layers(model: nn.Module, result: Analysis, target: int | None = None,
                  kinds: tuple[str, ...] = ACROSS_KINDS) -> dict:
    """Where a transformer's class token gets its output from, across all its layers, on the key grid: attention
    rollout (its row of the rollout after the last block), attention flow (Abnar and Zuidema 2020, max-flow from
    it) and relevance for class `target` (default: the top class; Chefer et al. 2021); each as {"map": (gh, gw)
    float64, "prefix": {name: weight}, "seconds"}, with "target", "class" and "token". A model whose blocks do not all
    attend over the same tokens with a class token among them (a CNN: grids change between blocks, convolutions sit
    between them) gets {"not_offered": why}."""
    import time

    from .attention.across import attention_flow, relevance
    from .attention.adapters import is_class_token

    mats = [full_rows(b.maps) for b in result.blocks]
    names = result.blocks[0].maps.prefix_names if result.blocks else None
    if not result.blocks or any(m is None for m in mats) or len({m.shape for m in mats}) != 1 or \
            not any(isinstance(b.adapter, TracedAdapter) for b in result.blocks) or \
            not names or not any(map(is_class_token, names)):
        return {"not_offered": "rollout, flow and relevance need every block to attend over the same tokens, a class "
                               "token among them (a vision transformer); here the grids change between blocks or "
                               "convolutions sit between them"}
    m = result.blocks[0].maps.key_grid
    cls = m[0] * m[1] + next(i for i, n in enumerate(names) if is_class_token(n))
    probs = result.probs
    target = int(probs.argmax()) if target is None and probs is not None else target
    out = {"token": names[cls - m[0] * m[1]], "target": target,
           "class": (result.class_names[target] if result.class_names and target is not None else target)}

    def shaped(row: np.ndarray, t0: float) -> dict:
        n = m[0] * m[1]
        return {"map": row[:n].reshape(m), "prefix": {p: float(row[n + i]) for i, p in enumerate(names)},
                "seconds": time.perf_counter() - t0}
    if "rollout" in kinds:
        t0 = time.perf_counter()
        total = None
        for a in mats:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[0], dtype=a.dtype)
            a = a / a.sum(-1, keepdim=True)
            total = a if total is None else a @ total
        out["rollout"] = shaped(total[cls].numpy(), t0)
    if "flow" in kinds and mats[0].shape[0] > FLOW_MAX_TOKENS:
        out["flow_not_offered"] = (f"attention flow is a max-flow per token over the layer graph: offered up to "
                                   f"{FLOW_MAX_TOKENS} tokens, this model has {mats[0].shape[0]}")
    elif "flow" in kinds:
        t0 = time.perf_counter()
        out["flow"] = shaped(attention_flow(mats, cls), t0)
    if "relevance" in kinds and target is not None:
        t0 = time.perf_counter()
        blocks = [(b.name, b.source[0], b.adapter) for b in result.blocks]
        device = next(model.parameters()).device
        r = relevance(image_model(model, result.input[:1].to(device)), result.input.to(device), blocks, target)
        row = r[cls].numpy().copy()
        row[cls] = 0.0  # its own identity term: R starts as I
        out["relevance"] = shaped(row, t0)
    return out
