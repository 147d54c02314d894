"""What each attention layer does over a whole dataset, and whether it matters.

    python -m vggattn.study --checkpoint checkpoints/vgg16att-imagenette-w025-128.safetensors \
        --data ../shared/data/imagenette2-224/val --out study/        # any ImageFolder split
    python -m vggattn.study --data .../val --out study/ --limit 300   # an evenly spaced subset

Writes `study.json` (the contract below), `report.html` (self-contained: figures embedded) and the
figures as PNG. Per layer and image, with A the N x N attention (rows sum to 1):

- sink_mass: max_j (1/N) sum_q A[q, j], the share of all attention the most attended cell gets;
- top1_weight: (1/N) sum_q max_j A[q, j];
- cosine_distance: mean over pairs q != q' of 1 - cos(A[q], A[q']) (GCNet, Cao et al. 2019), and
  the same between the block's input features (`cosine_distance_input`) and attention outputs
  (`cosine_distance_output`) at different positions;
- jsd: mean Jensen-Shannon divergence (nats) of the rows from the image's mean row;
- entropy_frac: (1/N) sum_q H(A[q]) / ln N;
- mean_distance_px: (1/N) sum_q sum_j A[q, j] |c_q - c_j| in model-input pixels;
- contribution: mean over positions of ||gamma * attention output|| / ||x||.

Interventions (top-1/top-5 over the split; paired bootstrap 95% CI of the top-1 change): each layer
and all three `off` (the block returns x), `mean` (every row replaced by the image's mean row:
GCNet's query-independent block, no retraining), `uniform` (every row 1/N: average pooling of V).
Sanity check (Adebayo et al. 2018): the rows' Spearman correlation with the same layer's rows after
re-initialising its conv_query/conv_key, and in a fully re-initialised model.

Memory: one image's attention is built a block of query rows at a time (at most `BLOCK_ELEMENTS`
weights), so a 448 px full-width study runs in bounded memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from .adapters import adapter_for
from .readouts import SINK_DOMINATED, cell_centers
from .study_report import MODES, headline, write_study
from .bootstrap import paired_bootstrap_ci
from .byo import add_model_arguments, load_from_args, wants_own_model
from .checkpoint import (BAD_INPUT, DEFAULT_CHECKPOINT, CheckpointError, add_checkpoint_argument, load_checkpoint,
                         resolve_device)
from .data import eval_transform, load_rgb
from .model import GlobalAttention, VGG16WithAttention

log = logging.getLogger("vggattn.study")

BLOCK_ELEMENTS = 1 << 22  # attention weights alive at once (16 MB in fp32)
STAT_BLOCK_ELEMENTS = 1 << 20  # batch_statistics' blocks: 4 MB of weights, mostly in the CPU's cache
STATS = ("sink_mass", "top1_weight", "cosine_distance", "cosine_distance_input", "cosine_distance_output", "jsd",
         "entropy_frac", "mean_distance_px", "contribution")
SANITY_SPEARMAN_MAX = 0.5  # a layer passes when its rows correlate less than this with randomised ones


class StudyError(ValueError):
    """A study that cannot run (classes that do not match, an empty folder); one sentence."""


# -- statistics of one image's attention ----------------------------------------------------------

RowFn = Callable[[int, int], torch.Tensor]  # (start, stop) -> (stop - start, N) attention rows


def softmax_rows(query: torch.Tensor, key: torch.Tensor) -> RowFn:
    """Rows of softmax(Q K^T) for one image's (N, C') Q and K, built on demand."""
    key_t = key.float().t()  # (C', N)
    return lambda start, stop: torch.softmax(query[start:stop].float() @ key_t, dim=-1)  # (R, N)


def row_blocks(n: int, block_elements: int = BLOCK_ELEMENTS):
    step = max(1, block_elements // max(n, 1))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def mean_cosine_distance(unit_sum: torch.Tensor, n: int) -> float:
    """Mean of 1 - cos over ordered pairs q != q', from s = sum_q u_q of the unit vectors u_q:
    sum over all pairs of cos = |s|^2, of which the diagonal is n."""
    if n < 2:
        return 0.0
    return max(0.0, float(1.0 - (unit_sum.double().square().sum() - n) / (n * (n - 1))))  # >= 0; clamp rounding


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def attention_statistics(rows: RowFn, grid: tuple[int, int], input_size: int, *, x: torch.Tensor | None = None,
                         value: torch.Tensor | None = None, gamma: float = 0.0,
                         block_elements: int = BLOCK_ELEMENTS, key_grid: tuple[int, int] | None = None) -> dict:
    """Every per-image statistic of one layer's attention, from its rows (two passes, row blocks).

    x: (N, C) the block's input features, value: (N, C) its V, both position-major (optional: give
    them for cosine_distance_input / _output and contribution). key_grid: the keys' grid when it is not
    the queries' (pooled keys); rows are then (R, M) and the sink is a key cell.
    """
    n = grid[0] * grid[1]
    key_grid = key_grid or grid
    m = key_grid[0] * key_grid[1]
    step = max(1, block_elements // m)  # rows of M weights: as row_blocks(n) when the grids are one
    blocks = [(s, min(n, s + step)) for s in range(0, n, step)]
    device = rows(0, 1).device  # accumulate where the rows are (CPU or GPU)
    centers = cell_centers(grid, (input_size, input_size)).float().to(device)  # (N, 2)
    key_centers = centers if key_grid == grid else cell_centers(key_grid, (input_size, input_size)).float().to(device)
    col_sum = torch.zeros(m, dtype=torch.float64, device=device)
    unit_sum = torch.zeros(m, dtype=torch.float64, device=device)
    top1 = entropy = distance = 0.0
    out_unit_sum, contribution = None, 0.0
    for start, stop in blocks:
        a = rows(start, stop).float()  # (R, N)
        col_sum += a.sum(0).double()
        unit_sum += unit(a).sum(0).double()
        top1 += float(a.max(1).values.double().sum())
        entropy += float(-(a * torch.log(a.clamp_min(1e-30))).double().sum())
        distance += float((a * torch.cdist(centers[start:stop], key_centers)).double().sum())  # (R, M) distances
        if value is not None:
            out = a @ value.float()  # (R, C): the attention output of these positions
            out_unit_sum = unit(out).sum(0).double() if out_unit_sum is None else out_unit_sum + unit(out).sum(0).double()
            if x is not None:
                contribution += float((abs(gamma) * out.norm(dim=1) / x[start:stop].float().norm(dim=1).clamp_min(1e-12)).double().sum())
    mean_row = col_sum / n  # (N,)
    jsd = 0.0
    for start, stop in blocks:  # second pass: divergence from the mean row
        p = rows(start, stop).double()
        log_m = torch.log((0.5 * (p + mean_row)).clamp_min(1e-300))  # 0 log 0 = 0 below
        kl_p = (p * (torch.log(p.clamp_min(1e-300)) - log_m)).sum(1)
        kl_mean = (mean_row * (torch.log(mean_row.clamp_min(1e-300)) - log_m)).sum(1)
        jsd += float((0.5 * kl_p + 0.5 * kl_mean).sum())
    sink = int(col_sum.argmax())
    col_sum, unit_sum = col_sum.cpu(), unit_sum.cpu()
    stats = {"sink_mass": float(col_sum[sink]) / n, "sink_index": sink, "top1_weight": top1 / n,
             "cosine_distance": mean_cosine_distance(unit_sum, n), "jsd": jsd / n,
             "entropy_frac": entropy / n / math.log(m) if m > 1 else 0.0, "mean_distance_px": distance / n}
    if x is not None:
        stats["cosine_distance_input"] = mean_cosine_distance(unit(x.float()).sum(0).cpu(), n)
    if out_unit_sum is not None:
        stats["cosine_distance_output"] = mean_cosine_distance(out_unit_sum.cpu(), n)
        if x is not None:
            stats["contribution"] = contribution / n
    return stats


@torch.no_grad()
def spearman_rows(rows_a: RowFn, rows_b: RowFn | list[RowFn], n: int,
                  block_elements: int = BLOCK_ELEMENTS) -> float | list[float]:
    """Mean over query rows of the Spearman rank correlation between two maps' rows; rows_b a list: one mean
    for each of its maps (a's ranks made once for all)."""
    def ranks(a: torch.Tensor) -> torch.Tensor:  # (R, N) -> centred, unit-norm ranks per row (one sort)
        order = a.argsort(1)
        r = torch.empty_like(order).scatter_(1, order, torch.arange(a.shape[1], device=a.device).expand_as(order)).double()
        r = r - r.mean(1, keepdim=True)
        return r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)

    others = list(rows_b) if isinstance(rows_b, (list, tuple)) else [rows_b]
    totals = [0.0] * len(others)
    for start, stop in row_blocks(n, block_elements):
        own = ranks(rows_a(start, stop))
        for t, other in enumerate(others):
            totals[t] += float((own * ranks(other(start, stop))).sum())
    means = [t / n for t in totals]
    return means if isinstance(rows_b, (list, tuple)) else means[0]


_DISTANCES: dict[tuple, torch.Tensor] = {}


def cell_distances(grid: tuple[int, int], key_grid: tuple[int, int], input_size: int, device) -> torch.Tensor:
    """(N, M) float32 distances in model-input pixels between query and key cell centres, made once per grids."""
    key = (tuple(grid), tuple(key_grid), int(input_size), str(device))
    if key not in _DISTANCES:
        if len(_DISTANCES) > 16:
            _DISTANCES.clear()
        size = (input_size, input_size)
        _DISTANCES[key] = torch.cdist(cell_centers(grid, size), cell_centers(key_grid, size)).float().to(device)
    return _DISTANCES[key]


@torch.no_grad()
def batch_statistics(query: torch.Tensor, key: torch.Tensor, grid: tuple[int, int], input_size: int, *,
                     x: torch.Tensor | None = None, delta: torch.Tensor | None = None,
                     block_elements: int = STAT_BLOCK_ELEMENTS, keep_elements: int = 1 << 25) -> dict[str, np.ndarray]:
    """`attention_statistics` of every image of a batch at once, from the layer's Q and K (B, N, C') and the
    block's input x and its change delta = output - x (B, N, C) -> {statistic: (B,) float64, "sink_index": (B,)}.

    One pass builds each block of rows once (several images at a time when N is small) and takes every
    statistic from it, in blocks small enough to stay in the CPU's cache (`STAT_BLOCK_ELEMENTS`, 4 MB), with
    as few passes over the weights as the sums allow: the column sums and the unit rows' sum in one product
    (rows [1 / |a_q|, 1] times A), sum_j a_j l_j = q . (A K) (a product at Q's width, no (R, M) product), the
    distance-weighted sum as each row's dot product with the distance matrix (made once per grid), the attention
    output's statistics from delta (= gamma * attention output; no A V product), and the JSD from entropies:
    JSD = H(s / 2) - (H(p) + H(m)) / 2 with s = p + m, and sum s/2 log s/2 = (sum s log s) / 2 - log 2 per row,
    so one more log per weight. The rows of an image are kept for the JSD pass when they fit `keep_elements`,
    else rebuilt. Terms in float32, sums of blocks in float64."""
    B, n, _ = query.shape
    m = key.shape[1]
    device = query.device
    dist = cell_distances(grid, grid, input_size, device)
    keyt = key.float().transpose(1, 2)  # (B, C', M)
    keyf = key.float()
    per = max(1, block_elements // m)  # rows a block
    out = {k: np.zeros(B) for k in ("sink_mass", "top1_weight", "cosine_distance", "jsd", "entropy_frac",
                                    "mean_distance_px")}
    out["sink_index"] = np.zeros(B, dtype=np.int64)
    images = max(1, per // n)  # whole images a block, when one image's rows are fewer than a block
    for b0 in range(0, B, images):
        b1 = min(B, b0 + images)
        g = b1 - b0
        col_sum = torch.zeros(g, m, dtype=torch.float64, device=device)
        unit_sum = torch.zeros(g, m, dtype=torch.float64, device=device)
        top1 = torch.zeros(g, dtype=torch.float64, device=device)
        plogp = torch.zeros(g, dtype=torch.float64, device=device)
        distance = torch.zeros(g, dtype=torch.float64, device=device)
        kept = [] if g * n * m <= keep_elements else None
        steps = [(s, min(n, s + per)) for s in range(0, n, per)] if g == 1 else [(0, n)]
        for s0, s1 in steps:
            q = query[b0:b1, s0:s1].float()
            logits = torch.bmm(q, keyt[b0:b1])  # (g, R, M)
            a = torch.softmax(logits, dim=-1)
            top = a.amax(2)  # (g, R)
            # log Z = max_j l_j - log max_j a_j (no more exponentials), and
            # sum_j a_j log a_j = sum_j a_j l_j - log Z = q . (A K) - log Z
            log_z = logits.amax(2).double() - torch.log(top.double())
            del logits
            if kept is not None:
                kept.append(a)
            inv = 1.0 / torch.linalg.vector_norm(a, dim=2).clamp_min(1e-12)  # (g, R)
            sums = torch.bmm(torch.stack([inv, torch.ones_like(inv)], 1), a).double()  # (g, 2, M)
            unit_sum += sums[:, 0]
            col_sum += sums[:, 1]
            top1 += top.sum(1, dtype=torch.float64)
            plogp += ((q * torch.bmm(a, keyf[b0:b1])).sum(2).double() - log_z).sum(1)
            distance += torch.linalg.vecdot(a, dist[s0:s1]).double().sum(1)  # rows in float32, their sum in float64
        mean_row = (col_sum / n).float()  # (g, M)
        mlogm = torch.xlogy(mean_row, mean_row).sum(1, dtype=torch.float64)  # (g,)
        slogs = torch.zeros(g, dtype=torch.float64, device=device)
        for i, (s0, s1) in enumerate(steps):
            a = kept[i] if kept is not None else torch.softmax(torch.bmm(query[b0:b1, s0:s1].float(), keyt[b0:b1]), -1)
            s = a.add_(mean_row[:, None, :]).clamp_min_(1e-30)  # in place: the rows are not needed after this
            slogs += torch.linalg.vecdot(s, torch.log(s)).double().sum(1)  # sum s log s, rows in float32
        alog = 0.5 * slogs - n * math.log(2.0)  # sum over queries and keys of a log a, a = (p + m) / 2
        # JSD_q = H(a) - (H(p_q) + H(m)) / 2 = (sum_j p log p + m log m) / 2 - sum_j a log a, summed over queries
        jsd = (0.5 * (plogp + n * mlogm) - alog) / n
        sink = col_sum.argmax(1)
        out["sink_index"][b0:b1] = sink.cpu().numpy()
        out["sink_mass"][b0:b1] = (col_sum.max(1).values / n).cpu().numpy()
        out["top1_weight"][b0:b1] = (top1 / n).cpu().numpy()
        out["jsd"][b0:b1] = jsd.clamp_min(0).cpu().numpy()
        out["entropy_frac"][b0:b1] = ((-plogp / n) / math.log(m) if m > 1 else 0 * plogp).cpu().numpy()
        out["mean_distance_px"][b0:b1] = (distance / n).cpu().numpy()
        out["cosine_distance"][b0:b1] = [mean_cosine_distance(u, n) for u in unit_sum.cpu()]
    if x is not None:
        out["cosine_distance_input"] = np.array([mean_cosine_distance(unit(xi.float()).sum(0).cpu(), n) for xi in x])
    if delta is not None:
        out["cosine_distance_output"] = np.array([mean_cosine_distance(unit(d.float()).sum(0).cpu(), n) for d in delta])
        if x is not None:
            ratio = delta.float().norm(dim=2) / x.float().norm(dim=2).clamp_min(1e-12)  # (B, N)
            out["contribution"] = ratio.double().mean(1).cpu().numpy()
    return out


# -- the model run a block at a time, with interventions -------------------------------------------

@torch.no_grad()
def qkv(block: GlobalAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's Q, K (B, N, C') and V (B, N, C) for input x (B, C, H, W)."""
    return tuple(conv(x).flatten(2).transpose(1, 2) for conv in (block.conv_query, block.conv_key, block.conv_value))


@torch.no_grad()
def intervene(block: torch.nn.Module, x: torch.Tensor, mode: str, mean_row: torch.Tensor | None = None) -> torch.Tensor:
    """The block's output for x (B, C, H, W) with its attention rows replaced as `mode` says (through its
    family's adapter, `vggattn.adapters`): "off" -> x (gamma = 0); "mean" -> every row the image's mean row
    (what `attention="global"` trains with); "uniform" -> every row 1/N.
    mean_row: (B, N) the mean rows of x, where they are known already (from the block's own forward)."""
    adapter = adapter_for(block)
    if adapter is None:
        raise ValueError(f"{type(block).__name__} is not the article's attention block (the article's study path "
                         "reads GlobalAttention; any other model goes through run_study_any)")
    if mode not in MODES:
        raise ValueError(f"unknown intervention {mode!r}; use one of {MODES}")
    if mode == "mean" and mean_row is not None:
        return adapter.forward(block, x, rows=mean_row.to(x.dtype)[:, None, None, :])
    return adapter.forward(block, x, mode)


@torch.no_grad()
def features_from(model: VGG16WithAttention, h: torch.Tensor, start: int, modes: dict[int, str]) -> torch.Tensor:
    """model.features from activation h entering features[start] on, with the blocks at the indices in
    `modes` replaced by `intervene`."""
    for i in range(start, len(model.features)):
        m = model.features[i]
        h = intervene(m, h, modes[i]) if i in modes else m(h)
    return h


def run_from(model: VGG16WithAttention, h: torch.Tensor, start: int, modes: dict[int, str]) -> torch.Tensor:
    """Logits of `features_from`."""
    return model.forward_head(features_from(model, h, start, modes))


@torch.no_grad()
def run_all(model: VGG16WithAttention, entering: dict[int, torch.Tensor], runs: dict[str, dict[int, str]],
            mean_rows: dict[int, torch.Tensor] | None = None) -> dict:
    """Logits of every run {key: {block index: mode}}, each from the activation entering its first replaced
    block, with the segments between attention blocks that runs share computed once: "features.14:mean" and
    "all:mean" run features 14..21 alike (equal to `run_from` of each run, without the repeats).
    mean_rows: {index: (B, N)} the baseline's mean rows (`entering_blocks(mean_rows=)`), used where a run replaces a
    block's rows by its mean row and every block before it is the baseline's (else computed)."""
    mean_rows = mean_rows or {}
    blocks = sorted(entering)
    ends = {i: next((j for j in blocks if j > i), len(model.features)) for i in blocks}
    cache: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, modes in runs.items():
        start = min(modes)
        prefix = tuple((i, None) for i in blocks if i < start)  # what happened before: the baseline
        h = entering[start]
        for i in (j for j in blocks if j >= start):
            prefix += ((i, modes.get(i)),)
            if prefix not in cache:
                known = mean_rows.get(i) if all(mode is None for _, mode in prefix[:-1]) else None
                cache[prefix] = features_segment(model, h, i, ends[i], modes, known)
            h = cache[prefix]
        out[key] = model.forward_head(h)
    return out


@torch.no_grad()
def features_segment(model: VGG16WithAttention, h: torch.Tensor, start: int, stop: int,
                     modes: dict[int, str], mean_row: torch.Tensor | None = None) -> torch.Tensor:
    """model.features[start:stop] on h, the blocks in `modes` replaced by `intervene` (mean_row: h's at start)."""
    for i in range(start, stop):
        m = model.features[i]
        h = intervene(m, h, modes[i], mean_row if i == start else None) if i in modes else m(h)
    return h


# -- the dataset -----------------------------------------------------------------------------------

def class_mapping(folders: list[str], meta: dict) -> list[int]:
    """Checkpoint class index of each ImageFolder folder, matched by wnid (meta class_ids) or name."""
    names = list(meta["class_names"])
    ids = list(meta.get("class_ids") or [])
    lookup = {**{n: i for i, n in enumerate(names)}, **{w: i for i, w in enumerate(ids)}}
    unknown = [f for f in folders if f not in lookup]
    if unknown:
        known = f"wnids {ids} or names {names}" if ids else f"names {names}"
        raise StudyError(f"the data's class folders {unknown} match none of the checkpoint's classes ({known})")
    return [lookup[f] for f in folders]


def evenly_spaced(n: int, limit: int) -> list[int]:
    if limit <= 0 or limit >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, limit).round().astype(int).tolist()))


def load_split(root: str | Path, meta: dict, limit: int = 0) -> tuple[Subset, np.ndarray]:
    """(dataset of (image, checkpoint class) pairs, targets) of an ImageFolder split."""
    root = Path(root)
    if not root.is_dir():
        raise StudyError(f"{root} is not a directory (give an ImageFolder split: one folder per class)")
    try:
        ds = ImageFolder(root, transform=eval_transform(meta), loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        raise StudyError(f"{root} is not an ImageFolder split ({e})") from None
    mapping = class_mapping(ds.classes, meta)
    ds.target_transform = mapping.__getitem__
    keep = evenly_spaced(len(ds), limit)
    targets = np.array([mapping[ds.targets[i]] for i in keep])
    return Subset(ds, keep), targets


# -- the study -------------------------------------------------------------------------------------

def attention_indices(model: VGG16WithAttention) -> dict[str, int]:
    return {f"features.{i}": i for i, m in enumerate(model.features) if isinstance(m, GlobalAttention)}


def fresh_copy(model: VGG16WithAttention, seed: int) -> VGG16WithAttention:
    torch.manual_seed(seed)
    return VGG16WithAttention.from_config(model.config).to(next(model.parameters()).device).eval()


def reinit_qk(model: VGG16WithAttention, index: int, seed: int) -> GlobalAttention:
    """A copy of the block at features[index] with conv_query and conv_key re-initialised."""
    block = copy.deepcopy(model.features[index])
    torch.manual_seed(seed)
    block.conv_query.reset_parameters()
    block.conv_key.reset_parameters()
    return block


@torch.no_grad()
def entering_blocks(model: VGG16WithAttention, h: torch.Tensor, start: int, indices,
                    leaving: dict | None = None, mean_rows: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Run model.features from `start` on h -> (features output, {index: activation entering that block});
    leaving: a dict to fill with {index: the block's output} too; mean_rows: a dict to fill with {index: (B, N)
    float64 mean row}, kept by the block's own forward where it can (CPU inference: `attend_in_row_blocks`)."""
    entering = {}
    me = threading.get_ident()
    for i in range(start, len(model.features)):
        block = model.features[i]
        keep = mean_rows is not None and i in indices and isinstance(block, GlobalAttention)
        if i in indices:
            entering[i] = h
        if keep:
            block.summaries_for.add(me)
        try:
            h = block(h)
        finally:
            if keep:
                block.summaries_for.discard(me)
                kept = block.summaries.pop(me, None)
                if kept is not None:
                    mean_rows[i] = kept["mean_row"]
        if leaving is not None and i in indices:
            leaving[i] = h
    return h, entering


class Records:
    """A study's per-image records, one .npz file a batch, written as they are made (a killed study keeps what
    it wrote; `--resume` continues from it). folder None: kept in memory. Every array is indexed by image:
    "index" (the image's position in the split), "target", "top1:<run>", "<layer>:<statistic>", ..."""

    def __init__(self, folder: str | Path | None = None, rank: int = 0, kind: str = "part"):
        self.folder = Path(folder) if folder is not None else None
        self.rank, self.kind, self.memory = rank, kind, []
        self._others: dict[str, list] = {}  # in memory: the other kinds' records, shared with `of`
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def of(self, kind: str) -> "Records":
        """The records of another kind in the same folder (the faithfulness measures: "faith")."""
        other = Records(self.folder, self.rank, kind)
        if self.folder is None:
            other.memory = self._others.setdefault(kind, [])
        return other

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.kind}-*.npz")) if self.folder is not None else []

    def done(self) -> set[int]:
        """Indices of the images already recorded (by any rank)."""
        if self.folder is None:
            return {int(i) for r in self.memory for i in r["index"]}
        out = set()
        for part in self.parts():
            with np.load(part) as z:
                out |= {int(i) for i in z["index"]}
        return out

    def clear(self) -> None:
        self.memory.clear()
        for part in self.parts():
            part.unlink()

    def write(self, record: dict[str, np.ndarray]) -> None:
        if self.folder is None:
            self.memory.append(record)
            return
        name = f"{self.kind}-r{self.rank}-{int(record['index'][0]):07d}.npz"
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **record)
        os.replace(tmp, self.folder / name)  # whole or absent: a kill mid-write leaves no half part

    def load(self) -> dict[str, np.ndarray]:
        """Every record, merged: images in index order, each once (a DistributedSampler's padding repeats some)."""
        parts = self.memory if self.folder is None else []
        for path in self.parts():
            with np.load(path) as z:
                parts.append({k: z[k] for k in z.files})
        if not parts:
            raise StudyError(f"no {self.kind} records to merge")
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        _, first = np.unique(merged["index"], return_index=True)  # sorted by index, duplicates dropped
        return {k: v[first] for k, v in merged.items()}


def shard(n: int, rank: int, world: int) -> list[int]:
    """The image positions of one rank, as torch's DistributedSampler (no shuffle) gives them: every rank the
    same count, the last padded by repeating the first images (dropped again when records are merged)."""
    from torch.utils.data import DistributedSampler

    return list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)) if world > 1 \
        else list(range(n))


@torch.no_grad()
def run_study(model: VGG16WithAttention, meta: dict, data: str | Path, *, limit: int = 0, batch_size: int = 32,
              workers: int = 2, sanity_images: int = 256, n_boot: int = 2000, seed: int = 0,
              progress: bool = True, records: Records | None = None, resume: bool = False, rank: int = 0,
              world: int = 1, faithfulness_images: int = 64) -> dict | None:
    """The whole study as the JSON-ready dict `study.json` holds.

    Per batch: one forward keeping the activation entering and leaving each attention block; the
    intervention runs restart from the activation entering their first replaced block (the layers before
    it are the baseline's); the statistics of every image of the batch from the block's Q and K and its
    change to x (`batch_statistics`). Each batch's per-image results go to `records` as they are made.
    resume: skip the images `records` holds already. rank / world: this process's share of the images
    (`shard`); only world == 1 returns the study (ranks merge with `summarise` once all have written).
    faithfulness_images: evenly spaced images on which `vggattn.faithfulness` measures deletion and the sink's
    anatomy (records of their own: a finished study gains them with resume).
    """
    if not isinstance(model, VGG16WithAttention):
        raise StudyError("the study needs a VGG16WithAttention (its features are run block by block)")
    model = model.eval()
    device = next(model.parameters()).device
    layers = attention_indices(model)
    if not layers:
        raise StudyError("this model has no attention blocks (trained with --no-attention?)")
    ds, targets = load_split(data, meta, limit)
    n_images, input_size = len(ds), int(meta["input_size"])
    if n_images == 0:
        raise StudyError(f"{data} holds no images")
    records = records if records is not None else Records()
    faith = records.of("faith")
    if not resume and world == 1:  # several ranks: the launcher clears once, before any writes (main)
        records.clear()
        faith.clear()
    done_before = records.done() if resume else set()
    faith_set = set(evenly_spaced(n_images, faithfulness_images)) if faithfulness_images else set()
    faith_set -= faith.done() if resume else set()
    todo = [i for i in shard(n_images, rank, world) if i not in done_before or i in faith_set]
    first = min(layers.values())
    sanity_set = set(evenly_spaced(n_images, sanity_images)) if sanity_images else set()
    runs = run_modes(layers)
    random_model = fresh_copy(model, seed + 1) if sanity_set else None
    random_blocks = {name: reinit_qk(model, i, seed + 2 + j) for j, (name, i) in enumerate(layers.items())}
    t0 = time.perf_counter()
    batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
    loader = DataLoader(Subset(ds, todo), batch_size, num_workers=workers)
    for positions, (x, y) in tqdm(zip(batches, loader), total=len(batches), desc="study", unit="batch",
                                  disable=not progress):
        x, y, b = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device), len(y)
        record: dict[str, np.ndarray] = {"index": np.array(positions), "target": y.cpu().numpy()}
        leaving: dict[int, torch.Tensor] = {}
        mean_rows: dict[int, torch.Tensor] = {}
        out, entering = entering_blocks(model, model.features[:first](x), first, layers.values(), leaving, mean_rows)
        base_logits = model.forward_head(out)
        measure = [j for j in range(b) if positions[j] in faith_set]
        if measure:
            faith.write(faithfulness_record(model, layers, entering, leaving, base_logits, random_blocks,
                                            [positions[j] for j in measure], measure, seed))
        if all(p in done_before for p in positions):  # resumed for the faithfulness measures only
            continue
        logits = {"baseline": base_logits}
        logits |= run_all(model, entering, runs, mean_rows)
        for key, out in logits.items():
            k5 = out.topk(min(5, out.shape[1]), dim=1).indices  # (B, k)
            record[f"top1:{key}"] = (k5[:, 0] == y).cpu().numpy()
            record[f"top5:{key}"] = (k5 == y[:, None]).any(1).cpu().numpy()
        in_sanity = [j for j in range(b) if positions[j] in sanity_set]
        random_entering = entering_blocks(random_model, x[in_sanity], 0, layers.values())[1] if in_sanity else {}
        for name, i in layers.items():
            block = model.features[i]
            grid = tuple(entering[i].shape[-2:])
            record[f"{name}:grid"] = np.array([grid] * b)
            q, k = (conv(entering[i]).flatten(2).transpose(1, 2) for conv in (block.conv_query, block.conv_key))
            xs = entering[i].flatten(2).transpose(1, 2)  # (B, N, C)
            delta = (leaving[i] - entering[i]).flatten(2).transpose(1, 2)  # gamma * attention output, (B, N, C)
            stats = batch_statistics(q, k, grid, input_size, x=xs, delta=delta)  # every image of the batch at once
            for stat in STATS:
                record[f"{name}:{stat}"] = stats[stat]
            record[f"{name}:sink"] = stats["sink_index"]
            for kind in ("qk", "full"):
                record[f"{name}:sanity:{kind}"] = np.full(b, np.nan)
                for stat in SANITY_STATS:
                    record[f"{name}:sanity:{kind}:{stat}"] = np.full(b, np.nan)
            every = -(-q.shape[1] // SANITY_QUERIES)  # the Spearman's query rows: every `every`-th position
            for r, j in enumerate(in_sanity):  # rank agreement with re-initialised Q/K, and with a random model
                qa, ka, _ = qkv(random_blocks[name], entering[i][j:j + 1])
                qr, kr, _ = qkv(random_model.features[i], random_entering[i][r:r + 1])
                rho = spearman_rows(softmax_rows(q[j, ::every], k[j]), [softmax_rows(qa[0, ::every], ka[0]),
                                                                         softmax_rows(qr[0, ::every], kr[0])],
                                    len(range(0, q.shape[1], every)))
                for kind, (qo, ko), value in zip(("qk", "full"), ((qa, ka), (qr, kr)), rho):
                    record[f"{name}:sanity:{kind}"][j] = value
                    other_stats = batch_statistics(qo, ko, grid, input_size)
                    for stat in SANITY_STATS:
                        record[f"{name}:sanity:{kind}:{stat}"][j] = other_stats[stat][0]
        records.write(record)
    wall = time.perf_counter() - t0
    if world > 1:
        return None
    return summarise(records.load(), model, meta, data, n_images, wall, n_boot, seed, faith_records(faith))


SANITY_QUERIES = 256  # at most this many query rows (every k-th position) in an image's sanity Spearman
SANITY_STATS = ("sink_mass", "top1_weight", "cosine_distance", "jsd", "entropy_frac", "mean_distance_px")


@torch.no_grad()
def faithfulness_record(model: VGG16WithAttention, layers: dict[str, int], entering: dict, leaving: dict,
                        logits: torch.Tensor, random_blocks: dict, positions: list[int], rows: list[int],
                        seed: int) -> dict[str, np.ndarray]:
    """`vggattn.faithfulness.image_faithfulness` of the batch's images `rows` in every layer, as one record."""
    from . import faithfulness

    record: dict[str, list] = {"index": positions}
    for name, i in layers.items():
        block = model.features[i]
        for j in rows:
            h, w = entering[i].shape[-2:]

            def tail(tokens: torch.Tensor, i=i, h=h, w=w) -> torch.Tensor:  # (B, N, C) block outputs -> logits
                t = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w).contiguous(memory_format=torch.channels_last)
                return model.forward_head(model.features[i + 1:](t))

            xj = entering[i][j:j + 1]
            q, k, v = (faithfulness._tokens(c(xj)) for c in (block.conv_query, block.conv_key, block.conv_value))
            rq, rk = (faithfulness._tokens(c(xj)) for c in (random_blocks[name].conv_query, random_blocks[name].conv_key))
            measured = faithfulness.image_faithfulness(q, k, v, faithfulness._tokens(xj), faithfulness._tokens(leaving[i][j:j + 1]),
                                                       float(block.gamma), tail, int(logits[j].argmax()), (rq, rk),
                                                       seed=seed + positions[rows.index(j)])
            for key, value in measured.items():
                record.setdefault(f"{name}:{key}", []).append(value)
    return {key: np.asarray(value) for key, value in record.items()}


def run_modes(layers: dict[str, int]) -> dict[str, dict[int, str]]:
    """The 13 intervention runs: each layer and all of them, off / mean / uniform."""
    return {f"{name}:{mode}": {i: mode} for name, i in layers.items() for mode in MODES} \
        | {f"all:{mode}": {i: mode for i in layers.values()} for mode in MODES}


def faith_records(faith: Records) -> dict | None:
    try:
        return faith.load()
    except StudyError:  # measured on no image (--faithfulness-images 0)
        return None


def summarise(rec: dict[str, np.ndarray], model: VGG16WithAttention, meta: dict, data, n_images: int, wall: float,
              n_boot: int, seed: int, faith: dict | None = None) -> dict:
    """study.json from the merged per-image records (`Records.load`) of every image of the split, and of the
    faithfulness measures (their own records) where there are some."""
    from . import faithfulness

    if len(rec["index"]) != n_images or not np.array_equal(rec["index"], np.arange(n_images)):
        missing = sorted(set(range(n_images)) - set(rec["index"].tolist()))
        raise StudyError(f"the records miss {len(missing)} of {n_images} images (e.g. {missing[:5]}); "
                         "run again with --resume to finish them")
    layers = attention_indices(model)
    runs = ["baseline", *run_modes(layers)]
    targets = rec["target"]
    sanity = {}
    for name in layers:
        mask = ~np.isnan(rec[f"{name}:sanity:qk"])
        sanity[name] = {kind: rec[f"{name}:sanity:{kind}"][mask].tolist() for kind in ("qk", "full")}
        for kind in ("qk", "full"):
            sanity[name][f"{kind}_stats"] = [{stat: float(rec[f"{name}:sanity:{kind}:{stat}"][j]) for stat in SANITY_STATS}
                                             for j in np.nonzero(mask)[0]]
    return {"checkpoint": None, "data": str(data), "images": n_images, "input_size": int(meta["input_size"]),
            "class_names": list(meta["class_names"]), "wall_s": wall,
            "definitions": {"sink_dominated": f"sink_mass >= {SINK_DOMINATED}",
                            "ci": f"paired percentile bootstrap over images, {n_boot} resamples, seed {seed}",
                            "sanity_pass": f"mean row Spearman < {SANITY_SPEARMAN_MAX} for both randomisations",
                            "sanity_rows": f"each image's Spearman: the mean over at most {SANITY_QUERIES} query rows "
                                           "(every k-th position, k = ceil(N / that))"},
            "layers": {name: layer_summary({stat: rec[f"{name}:{stat}"] for stat in STATS}, rec[f"{name}:sink"],
                                           tuple(int(v) for v in rec[f"{name}:grid"][0]),
                                           float(model.features[i].gamma), targets, list(meta["class_names"]))
                       for name, i in layers.items()},
            "interventions": intervention_summary({k: rec[f"top1:{k}"] for k in runs}, {k: rec[f"top5:{k}"] for k in runs},
                                                  n_boot, seed),
            "sanity": sanity_summary(sanity),
            **({"faithfulness": faithfulness.summarise(faith, list(layers), n_boot, seed)} if faith is not None else {})}


@torch.no_grad()
def run_study_any(model: torch.nn.Module, meta: dict, data: str | Path, *, layers: list[str] | None = None,
                  limit: int = 0, batch_size: int = 32, workers: int = 2, sanity_images: int = 256, n_boot: int = 2000,
                  seed: int = 0, progress: bool = True, records: Records | None = None, resume: bool = False,
                  rank: int = 0, world: int = 1) -> dict | None:
    """The study of any model with attention blocks (`vggattn.adapters.find_blocks`), in study.json's form: per
    block the statistics of its rows (heads averaged; keys on their own grid), every intervention (off / mean /
    uniform, each block and all) as a whole forward under `Intervention`, and the randomisation sanity check (the
    parameters that make a block's logits, `Adapter.qk_modules`, re-initialised; and the whole model). No
    contribution or output distances. Each batch's per-image results go to `records` as they are made (as
    `run_study`'s do); resume: skip the images they hold already. rank / world: this process's share of the images
    (`shard`); only world == 1 returns the study (rank 0 merges with `summarise_any` once all have written)."""
    from .adapters import Intervention, randomised_copy, reinit_qk
    from .byo import blocks_of

    model = model.eval()
    device = next(model.parameters()).device
    blocks = blocks_of(model, meta, layers)
    names = [name for name, *_ in blocks]
    ds, targets = load_split(data, meta, limit)
    n_images, input_size = len(ds), int(meta["input_size"])
    if n_images == 0:
        raise StudyError(f"{data} holds no images")
    records = records if records is not None else Records()
    if not resume and world == 1:  # several ranks: the launcher clears once, before any writes (main_distributed)
        records.clear()
    done_before = records.done() if resume else set()
    todo = [i for i in shard(n_images, rank, world) if i not in done_before]
    runs = {f"{name}:{mode}": {name: mode} for name in names for mode in MODES} \
        | {f"all:{mode}": {name: mode for name in names} for mode in MODES}
    sanity_set = set(evenly_spaced(n_images, sanity_images)) if sanity_images else set()
    random_model = randomised_copy(model, seed + 1) if sanity_set else None
    random_blocks = {name: reinit_qk(module, adapter, seed + 2 + 10 * j) for j, (name, module, adapter) in enumerate(blocks)}
    t0 = time.perf_counter()
    batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
    loader = DataLoader(Subset(ds, todo), batch_size, num_workers=workers)
    for positions, (x, y) in tqdm(zip(batches, loader), total=len(batches), desc="study", unit="batch",
                                  disable=not progress):
        x, y, b = x.to(device), y.to(device), len(y)
        record: dict[str, np.ndarray] = {"index": np.array(positions), "target": y.cpu().numpy()}
        entering: dict[str, torch.Tensor] = {}
        handles = [module.register_forward_pre_hook(lambda m, args, n=name: entering.__setitem__(n, args[0]))
                   for name, module, _ in blocks]
        try:
            logits = {"baseline": model(x)}
        finally:
            for h in handles:
                h.remove()
        for key, modes in runs.items():
            with Intervention(model, modes):
                logits[key] = model(x)
        for key, out in logits.items():
            k5 = out.topk(min(5, out.shape[1]), dim=1).indices  # (B, k)
            record[f"top1:{key}"] = (k5[:, 0] == y).cpu().numpy()
            record[f"top5:{key}"] = (k5 == y[:, None]).any(1).cpu().numpy()
        in_sanity = [j for j in range(b) if positions[j] in sanity_set]
        random_entering = entering_any(random_model, x[in_sanity], blocks) if in_sanity else {}
        for name, module, adapter in blocks:
            maps = adapter.maps(module, entering[name])
            record[f"{name}:grid"] = np.array([maps.grid] * b)
            record[f"{name}:key_grid"] = np.array([maps.key_grid] * b)
            record[f"{name}:sink"] = np.zeros(b, dtype=np.int64)
            for stat in STATS:
                record[f"{name}:{stat}"] = np.full(b, np.nan)
            for kind in ("qk", "full"):
                record[f"{name}:sanity:{kind}"] = np.full(b, np.nan)
                for stat in SANITY_STATS:
                    record[f"{name}:sanity:{kind}:{stat}"] = np.full(b, np.nan)
            xs = entering[name].flatten(2).transpose(1, 2)  # (B, N, C)
            n = maps.grid[0] * maps.grid[1]
            for j in range(b):
                rows = mean_head_rows(maps.image(j))
                if j in in_sanity:  # rank agreement of the rows with those of re-initialised logits, and of a random model
                    qk = mean_head_rows(adapter.maps(random_blocks[name], entering[name][j:j + 1]))
                    r = in_sanity.index(j)
                    full = mean_head_rows(adapter.maps(dict(random_model.named_modules())[name], random_entering[name][r:r + 1]))
                    for kind, other in (("qk", qk), ("full", full)):
                        record[f"{name}:sanity:{kind}"][j] = spearman_rows(rows, other, n)
                        if maps.normalise == "softmax":
                            other_stats = attention_statistics(other, maps.grid, input_size, key_grid=maps.key_grid)
                            for stat in SANITY_STATS:
                                record[f"{name}:sanity:{kind}:{stat}"][j] = other_stats[stat]
                if maps.normalise != "softmax":  # rows that are no distributions: only the input's distances
                    record[f"{name}:cosine_distance_input"][j] = mean_cosine_distance(unit(xs[j].float()).sum(0).cpu(),
                                                                                       xs.shape[1])
                    continue
                stats = attention_statistics(rows, maps.grid, input_size, x=xs[j], key_grid=maps.key_grid)
                for stat, value in stats.items():
                    if stat in STATS:
                        record[f"{name}:{stat}"][j] = value
                record[f"{name}:sink"][j] = stats["sink_index"]
        records.write(record)
    if world > 1:
        return None
    return summarise_any(records.load(), blocks, meta, data, n_images, time.perf_counter() - t0, n_boot, seed)


def summarise_any(rec: dict[str, np.ndarray], blocks: list, meta: dict, data, n_images: int, wall: float,
                  n_boot: int, seed: int) -> dict:
    """study.json of any model from its merged per-image records (`run_study_any`'s)."""
    if len(rec.get("index", [])) != n_images or not np.array_equal(rec["index"], np.arange(n_images)):
        missing = sorted(set(range(n_images)) - set(rec.get("index", np.array([], dtype=int)).tolist()))
        raise StudyError(f"the records miss {len(missing)} of {n_images} images (e.g. {missing[:5]}); "
                         "run again with --resume to finish them")
    names = [name for name, *_ in blocks]
    runs = ["baseline", *[f"{n}:{m}" for n in names for m in MODES], *[f"all:{m}" for m in MODES]]
    sanity = {}
    for name in names:
        mask = ~np.isnan(rec[f"{name}:sanity:qk"])
        sanity[name] = {kind: rec[f"{name}:sanity:{kind}"][mask].tolist() for kind in ("qk", "full")}
        for kind in ("qk", "full"):
            keep = mask & ~np.isnan(rec[f"{name}:sanity:{kind}:sink_mass"])
            sanity[name][f"{kind}_stats"] = [{stat: float(rec[f"{name}:sanity:{kind}:{stat}"][j]) for stat in SANITY_STATS}
                                             for j in np.nonzero(keep)[0]]
    return {"checkpoint": None, "model": meta.get("source"), "data": str(data), "images": n_images,
            "input_size": int(meta["input_size"]), "class_names": list(meta["class_names"]), "wall_s": wall,
            "definitions": {"sink_dominated": f"sink_mass >= {SINK_DOMINATED}",
                            "ci": f"paired percentile bootstrap over images, {n_boot} resamples, seed {seed}",
                            "sanity_pass": f"mean row Spearman < {SANITY_SPEARMAN_MAX} for both randomisations (the "
                                           "logits' parameters re-initialised; the whole model)",
                            "heads": "several heads: the statistics of the mean of the heads' rows"},
            "layers": {name: {**layer_summary({stat: rec[f"{name}:{stat}"] for stat in STATS}, rec[f"{name}:sink"],
                                              tuple(int(v) for v in rec[f"{name}:key_grid"][0]),
                                              float(getattr(module, "gamma", float("nan"))), rec["target"],
                                              list(meta["class_names"])),
                              "query_grid": [int(v) for v in rec[f"{name}:grid"][0]], "family": adapter.family}
                       for name, module, adapter in blocks},
            "interventions": intervention_summary({k: rec[f"top1:{k}"] for k in runs},
                                                  {k: rec[f"top5:{k}"] for k in runs}, n_boot, seed),
            "sanity": sanity_summary(sanity)}


def mean_head_rows(maps) -> RowFn:
    """A batch-of-one BlockMaps' rows as the study reads them: (e - s, M) rows s..e, the mean of the heads'."""
    def rows(s: int, e: int) -> torch.Tensor:
        return maps.rows(None if maps.per_image else list(range(s, e)))[0].mean(0).expand(e - s, -1)
    return rows


@torch.no_grad()
def entering_any(model: torch.nn.Module, x: torch.Tensor, blocks) -> dict[str, torch.Tensor]:
    """{block name: the activation entering it} from one forward of `model` (forward pre-hooks, removed after)."""
    modules = dict(model.named_modules())
    entering: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_pre_hook(lambda m, args, n=name: entering.__setitem__(n, args[0]))
               for name, *_ in blocks]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return entering


def nanmean(v: np.ndarray) -> float:
    """The mean of the values measured (NaN: not measured for this model), NaN when none was."""
    v = np.asarray(v, dtype=np.float64)
    return float(v[~np.isnan(v)].mean()) if (~np.isnan(v)).any() else float("nan")


def layer_summary(vals: dict[str, np.ndarray], sinks: np.ndarray, grid: tuple[int, int], gamma: float,
                  targets: np.ndarray, class_names: list[str]) -> dict:
    """One layer's entry of study.json from its per-image statistics and sink cells."""
    heat = np.bincount(sinks, minlength=grid[0] * grid[1]).reshape(grid)
    rows, cols = np.divmod(sinks, grid[1])
    border = (rows == 0) | (cols == 0) | (rows == grid[0] - 1) | (cols == grid[1] - 1)
    top = int(heat.argmax())
    return {**{s: nanmean(vals[s]) for s in STATS},
            "grid": list(grid), "gamma": gamma,
            "sink_dominated_share": float(np.mean(vals["sink_mass"] >= SINK_DOMINATED)),
            "sink_border_share": float(border.mean()),
            "sink_top_cell": {"index": top, "row": top // grid[1], "col": top % grid[1],
                              "share": float(heat.max() / len(sinks))},
            "sink_heatmap": heat.tolist(),
            "distribution": {s: distribution(vals[s]) for s in STATS},
            "per_class": {class_names[c]: {s: nanmean(vals[s][targets == c]) for s in STATS}
                          for c in sorted(set(targets.tolist()))}}


def intervention_summary(top1: dict[str, np.ndarray], top5: dict[str, np.ndarray], n_boot: int, seed: int) -> dict:
    """Accuracy of every run, and each intervention's change against the baseline with its paired CI."""
    base1, base5 = top1["baseline"], top5["baseline"]
    out = {"baseline": {"top1": float(base1.mean()), "top5": float(base5.mean())}}
    for key in top1:
        if key != "baseline":
            lo, hi = paired_bootstrap_ci(top1[key], base1, n_boot, seed)
            out[key] = {"top1": float(top1[key].mean()), "top5": float(top5[key].mean()),
                        "top1_delta": float(top1[key].mean() - base1.mean()), "top1_delta_ci95": [lo, hi],
                        "top5_delta": float(top5[key].mean() - base5.mean())}
    return out


def sanity_summary(sanity: dict[str, dict[str, list]]) -> dict:
    """Mean row Spearman with each randomisation, pass/fail, and the randomised maps' statistics."""
    n = len(next(iter(sanity.values()))["qk"])
    out = {"images": n, "threshold": SANITY_SPEARMAN_MAX, "layers": {}}
    for name, s in sanity.items():
        if n:
            qk, full = float(np.mean(s["qk"])), float(np.mean(s["full"]))
            out["layers"][name] = {"spearman_qk_reinit": qk, "spearman_full_reinit": full,
                                   "passes": bool(qk < SANITY_SPEARMAN_MAX and full < SANITY_SPEARMAN_MAX),
                                   "qk_reinit": mean_stats(s["qk_stats"]), "full_reinit": mean_stats(s["full_stats"])}
    return out


def distribution(v: np.ndarray) -> dict:
    v = v[~np.isnan(v)]
    if not len(v):
        return {}
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    hist, edges = np.histogram(v, bins=20)
    return {"std": float(v.std()), "p05": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]),
            "p95": float(q[4]), "min": float(v.min()), "max": float(v.max()),
            "histogram": {"counts": hist.tolist(), "edges": edges.tolist()}}


def mean_stats(records: list[dict]) -> dict:
    keys = [k for k in records[0] if k != "sink_index"] if records else []
    return {k: float(np.mean([r[k] for r in records])) for k in keys}


def study_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint's shipped study lives: `<stem>.study.json` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".study.json")


def load_study(checkpoint: str | Path) -> dict | None:
    """The study shipped beside a checkpoint, which is resolved as `load_checkpoint` resolves it (a file, a
    folder holding model.safetensors, or a Hub id in huggingface_hub's cache); None when there is none."""
    from .checkpoint import resolve

    try:
        path = study_path(resolve(checkpoint))
    except CheckpointError:
        return None
    return json.loads(path.read_text()) if path.is_file() else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vggattn.study", description=__doc__.splitlines()[0])
    add_checkpoint_argument(p, "checkpoint to study")
    p.add_argument("--data", required=True, help="ImageFolder split (one folder per class, by wnid or class name)")
    p.add_argument("--out", required=True, help="output folder (study.json, report.html, PNG figures)")
    p.add_argument("--limit", type=int, default=0, help="study an evenly spaced subset of N images (0 = all)")
    p.add_argument("--sanity-images", type=int, default=256, help="images for the randomisation check (0 = skip)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the randomised weights")
    p.add_argument("--ship", action="store_true", help="also copy study.json to <checkpoint stem>.study.json beside it")
    p.add_argument("--faithfulness-images", type=int, default=64, help="images for the deletion and sink "
                   "measures (vggattn.faithfulness; 0 = skip)")
    p.add_argument("--resume", action="store_true", help="continue a study that was stopped: keep the per-image "
                   "records in OUT/records and study only the images they miss")
    add_model_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    own = wants_own_model(args)
    if not own:
        args.checkpoint = args.checkpoint or str(DEFAULT_CHECKPOINT)
    if args.ship and not (args.checkpoint and Path(args.checkpoint).exists()):
        log.error("error: --ship writes the study beside a local checkpoint; %s is not a file or folder here "
                  "(for a Hub id, add study.json to its repo instead)", args.checkpoint)
        return BAD_INPUT
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # started by torchrun: each rank studies its share, rank 0 merges
        return main_distributed(args, rank, world, own)
    try:
        if own:
            model, meta = load_from_args(args)
            if not meta.get("class_names"):
                raise StudyError("the study needs class names (--classes) to score predictions")
            study = run_study_any(model.to(resolve_device(args.device)), meta, args.data, layers=args.layers,
                                  limit=args.limit, batch_size=args.batch_size, workers=args.workers,
                                  sanity_images=args.sanity_images, n_boot=args.bootstrap, seed=args.seed,
                                  records=Records(Path(args.out) / "records"), resume=args.resume)
        else:
            model, meta = load_checkpoint(args.checkpoint, device=args.device)
            study = run_study(model, meta, args.data, limit=args.limit, batch_size=args.batch_size,
                              workers=args.workers, sanity_images=args.sanity_images, n_boot=args.bootstrap,
                              seed=args.seed, records=Records(Path(args.out) / "records"), resume=args.resume,
                              faithfulness_images=args.faithfulness_images)
    except (StudyError, CheckpointError, ValueError) as e:
        log.error("error: %s", e)
        return BAD_INPUT

    return finish(study, args, meta, own)


def finish(study: dict, args, meta: dict, own: bool = False) -> int:
    """Write study.json, the report and figures (and --ship's copy), and say what was found."""
    study["checkpoint"] = meta.get("source") if own else Path(args.checkpoint).name
    paths = write_study(study, args.out)
    if args.ship:
        from .checkpoint import resolve

        target = study_path(resolve(args.checkpoint))  # a folder: beside its model.safetensors
        target.write_text(json.dumps(study, indent=1))
        paths.append(target)
    for line in headline(study):
        log.info("%s", line)
    log.info("%d images in %.0f s; wrote %s", study["images"], study["wall_s"], ", ".join(str(p) for p in paths))
    return 0


def main_distributed(args, rank: int, world: int, own: bool = False) -> int:
    """Under torchrun: gloo on the CPU, NCCL on GPUs (--device cuda: this rank's LOCAL_RANK GPU). Every rank
    writes its share's records to OUT/records; rank 0 merges them (duplicates of the sampler's padding dropped)
    and writes the study."""
    import torch.distributed as dist

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
        if own:
            model, meta = load_from_args(args)
            model.to(device)
            if not meta.get("class_names"):
                raise StudyError("the study needs class names (--classes) to score predictions")
        else:
            model, meta = load_checkpoint(args.checkpoint, device=device)
        records = Records(Path(args.out) / "records", rank=rank)
        if rank == 0 and not args.resume:
            records.clear()
            records.of("faith").clear()
        dist.barrier()
        t0 = time.perf_counter()
        if own:
            run_study_any(model, meta, args.data, layers=args.layers, limit=args.limit, batch_size=args.batch_size,
                          workers=args.workers, sanity_images=args.sanity_images, n_boot=args.bootstrap,
                          seed=args.seed, progress=rank == 0, records=records, resume=args.resume, rank=rank,
                          world=world)
            dist.barrier()  # every share recorded
            if rank != 0:
                return 0
            from .byo import blocks_of

            ds, _ = load_split(args.data, meta, args.limit)
            study = summarise_any(records.load(), blocks_of(model, meta, args.layers), meta, args.data, len(ds),
                                  time.perf_counter() - t0, args.bootstrap, args.seed)
            study["world_size"] = world
            return finish(study, args, meta, own)
        run_study(model, meta, args.data, limit=args.limit, batch_size=args.batch_size, workers=args.workers,
                  sanity_images=args.sanity_images, n_boot=args.bootstrap, seed=args.seed, records=records,
                  resume=args.resume, rank=rank, world=world, progress=rank == 0,
                  faithfulness_images=args.faithfulness_images)
        dist.barrier()  # every share recorded
        if rank != 0:
            return 0
        ds, _ = load_split(args.data, meta, args.limit)
        study = summarise(records.load(), model, meta, args.data, len(ds), time.perf_counter() - t0, args.bootstrap,
                          args.seed, faith_records(records.of("faith")))
        study["world_size"] = world
        return finish(study, args, meta)
    except (StudyError, CheckpointError, ValueError) as e:
        log.error("error: %s", e)
        return BAD_INPUT
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
