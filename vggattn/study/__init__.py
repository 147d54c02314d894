"""What each attention block of a model does over a whole dataset, and whether it matters.

    python -m vggattn.study --checkpoint checkpoints/vgg16att-imagenette-w025-128.safetensors \
        --data ../shared/data/imagenette2-224/val --out study/        # any ImageFolder split
    python -m vggattn.study --data .../val --out study/ --limit 300   # an evenly spaced subset
    python -m vggattn.study --model vggattn.models.zoo:nonlocal_resnet \
        --checkpoint checkpoints/nonlocal-resnet-imagenette-128.safetensors --data .../val --out study/
    python -m vggattn.study --hf checkpoints/shapes-detector --tokens --data photos/ --out q/   # a detector's queries
    python -m vggattn.study --diffusers PIPELINE --prompts prompts.txt --out w/                 # a prompt's words

One engine for every model: its attention blocks are found and read through `vggattn.attention.adapters`. Writes
`study.json` (the contract below), `report.html` (self-contained: figures embedded) and the figures as PNG.
Per block and image, with A the N x M attention (N query positions, M key positions; several heads: the mean of
the heads' rows; rows sum to 1):

- sink_mass: max_j (1/N) sum_q A[q, j], the share of all attention the most attended key cell gets;
- top1_weight: (1/N) sum_q max_j A[q, j];
- cosine_distance: mean over pairs q != q' of 1 - cos(A[q], A[q']) (GCNet, Cao et al. 2019), and the same
  between the block's input features (`cosine_distance_input`) and what the block adds, y - x
  (`cosine_distance_output`), at different positions;
- jsd: mean Jensen-Shannon divergence (nats) of the rows from the image's mean row;
- entropy_frac: (1/N) sum_q H(A[q]) / ln M;
- mean_distance_px: (1/N) sum_q sum_j A[q, j] |c_q - c_j| in model-input pixels;
- contribution: mean over positions of ||y - x|| / ||x|| (the block's output y, its input x).
The output's measures need y of x's shape (NaN otherwise); rows that are no distributions get only the input's.

Interventions (top-1/top-5 over the split; paired bootstrap 95% CI of the top-1 change): each block and all of
them `off`, `mean` (every row replaced by the image's mean row: GCNet's query-independent block, no retraining),
`uniform` (every row 1/M: average pooling of the values), all of them and the baseline in one forward whose runs
share what they compute until the first block they differ in (`branched_forward`).
Sanity check (Adebayo et al. 2018): the rows' Spearman correlation with the same block's rows after
re-initialising what makes its logits (`Adapter.qk_modules`), and in a fully re-initialised model.
Faithfulness (`vggattn.study.faithfulness`): deleting a query's top keys against baselines, and the sink's anatomy.

Memory: the statistics build the rows a block of at most `STAT_BLOCK_ELEMENTS` weights at a time, so a 448 px
full-width study runs in bounded memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import faithfulness
from ..analysis import _ancestors, block_gamma
from ..attention.adapters import (BlockMaps, Intervention, SlowPath, TracedAdapter, cat_outputs, token_modes, output_tensor, randomised_copy, reinit_qk,
                                  replaced_forward, tokens)
from .bootstrap import paired_bootstrap_ci
from ..cli import SCOPES, study_args
from ..models.byo import blocks_of, load_from_args, wants_own_model
from ..models.checkpoint import BAD_INPUT, DEFAULT_CHECKPOINT, CheckpointError
from ..data import eval_transform, load_rgb
from ..attention.readouts import HIGH_NORM, SINK_DOMINATED, cell_centers
from .report import MODES, headline, write_study
from ..attention.trace import Call, Seen, Watch, watch

log = logging.getLogger("vggattn.study")

BLOCK_ELEMENTS = 1 << 22  # Spearman's row blocks: attention weights alive at once (16 MB in fp32)
STAT_BLOCK_ELEMENTS = 1 << 20  # batch_statistics' blocks: 4 MB of weights, mostly in the CPU's cache
STATS = ("sink_mass", "top1_weight", "cosine_distance", "cosine_distance_input", "cosine_distance_output", "jsd",
         "entropy_frac", "mean_distance_px", "contribution")
ROW_STATS = ("sink_mass", "top1_weight", "cosine_distance", "jsd", "entropy_frac", "mean_distance_px")
SANITY_STATS = ROW_STATS
SANITY_SPEARMAN_MAX = 0.5  # a layer passes when its rows correlate less than this with randomised ones
SANITY_QUERIES = 256  # at most this many query rows (every k-th position) in an image's sanity Spearman


class StudyError(ValueError):
    """A study that cannot run (classes that do not match, an empty folder); one sentence."""


# -- statistics of the rows ------------------------------------------------------------------------

RowFn = Callable[[int, int], torch.Tensor]  # (start, stop) -> (stop - start, M) attention rows


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


def mean_head_rows(maps: BlockMaps, queries: list[int] | None = None) -> RowFn:
    """A batch-of-one BlockMaps' rows as the study reads them, the mean of the heads' rows: rows s..e of the
    listed query positions (all when None); a map no query changes (GCNet) is every query's row."""
    def rows(s: int, e: int) -> torch.Tensor:
        picked = None if maps.per_image else list(range(s, e)) if queries is None else queries[s:e]
        return maps.rows(picked)[0].float().mean(0).expand(e - s, -1)  # (e - s, M)
    return rows


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


def held(maps: BlockMaps) -> torch.Tensor:
    """The first tensor the maps hold (its batch and device are the maps')."""
    return next(t for t in (maps.query, maps.key, maps.weights, maps.window and maps.window[0],
                            maps.tokens_qk and maps.tokens_qk[0]) if t is not None)


def row_block(maps: BlockMaps, b0: int, b1: int, s0: int, s1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images b0:b1 and queries s0:s1 of the maps -> (the mean of the heads' rows (g, R, M) float32, sum_j a log a
    of each row (g, R) float64). One softmax head from Q and K (the article's block, the non-local block): the
    entropy from the logits, no log per weight (log Z = max_j l_j - log max_j a_j, sum_j a_j log a_j =
    sum_j a_j l_j - log Z); any other map from its rows."""
    if maps.query is not None and maps.heads == 1 and maps.normalise == "softmax":
        logits = maps.scale * torch.bmm(maps.query[b0:b1, 0, s0:s1].float(),
                                        maps.key[b0:b1, 0].float().transpose(1, 2))  # (g, R, M)
        if maps.bias is not None:
            logits = logits + maps.bias[b0:b1, 0, s0:s1].float()
        a = torch.softmax(logits, dim=-1)
        log_z = logits.amax(2).double() - torch.log(a.amax(2).double())
        return a, torch.linalg.vecdot(a, logits).double() - log_z
    a = torch.stack([mean_head_rows(maps.image(j))(s0, s1) for j in range(b0, b1)])  # (g, R, M)
    return a, torch.xlogy(a, a).sum(2, dtype=torch.float64)


@torch.no_grad()
def batch_statistics(maps: BlockMaps, input_size: int, *, x: torch.Tensor | None = None,
                     delta: torch.Tensor | None = None, block_elements: int = STAT_BLOCK_ELEMENTS,
                     keep_elements: int = 1 << 25) -> dict[str, np.ndarray]:
    """Every per-image statistic of one block's rows (`ROW_STATS`, the mean of the heads' rows, keys on their own
    grid) for every image of a batch at once -> {statistic: (B,) float64, "sink_index": (B,)}; with x, the block's
    input (B, N', C), also cosine_distance_input; with delta = output - x (B, N', C), cosine_distance_output and
    contribution.

    One pass builds each block of rows once (several images at a time when N is small) and takes every statistic
    from it, in blocks small enough to stay in the CPU's cache (`STAT_BLOCK_ELEMENTS`, 4 MB): the column sums and
    the unit rows' sum in one product (rows [1 / |a_q|, 1] times A), the distance-weighted sum as each row's dot
    product with the distance matrix (made once per grids), and the JSD from entropies: JSD = H(s / 2) - (H(p) +
    H(m)) / 2 with s = p + m, and sum s/2 log s/2 = (sum s log s) / 2 - log 2 per row, so one more log per weight.
    The rows of an image are kept for the JSD pass when they fit `keep_elements`, else rebuilt. Terms in float32,
    sums of blocks in float64."""
    B, device = held(maps).shape[0], held(maps).device
    n, m = maps.grid[0] * maps.grid[1], maps.key_grid[0] * maps.key_grid[1]
    dist = cell_distances(maps.grid, maps.key_grid, input_size, device)
    per = max(1, block_elements // m)  # rows a block
    out = {k: np.zeros(B) for k in ROW_STATS}
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
            a, entropy = row_block(maps, b0, b1, s0, s1)
            if kept is not None:
                kept.append(a)
            inv = 1.0 / torch.linalg.vector_norm(a, dim=2).clamp_min(1e-12)  # (g, R)
            sums = torch.bmm(torch.stack([inv, torch.ones_like(inv)], 1), a).double()  # (g, 2, M)
            unit_sum += sums[:, 0]
            col_sum += sums[:, 1]
            top1 += a.amax(2).sum(1, dtype=torch.float64)
            plogp += entropy.sum(1)
            distance += torch.linalg.vecdot(a, dist[s0:s1]).double().sum(1)  # rows in float32, their sum in float64
        mean_row = (col_sum / n).float()  # (g, M)
        mlogm = torch.xlogy(mean_row, mean_row).sum(1, dtype=torch.float64)  # (g,)
        slogs = torch.zeros(g, dtype=torch.float64, device=device)
        for i, (s0, s1) in enumerate(steps):
            a = kept[i] if kept is not None else row_block(maps, b0, b1, s0, s1)[0]
            s = a.add_(mean_row[:, None, :]).clamp_min_(1e-30)  # in place: the rows are not needed after this
            slogs += torch.linalg.vecdot(s, torch.log(s)).double().sum(1)  # sum s log s, rows in float32
        alog = 0.5 * slogs - n * math.log(2.0)  # sum over queries and keys of a log a, a = (p + m) / 2
        # JSD_q = H(a) - (H(p_q) + H(m)) / 2 = (sum_j p log p + m log m) / 2 - sum_j a log a, summed over queries
        jsd = (0.5 * (plogp + n * mlogm) - alog) / n
        out["sink_index"][b0:b1] = col_sum.argmax(1).cpu().numpy()
        out["sink_mass"][b0:b1] = (col_sum.max(1).values / n).cpu().numpy()
        out["top1_weight"][b0:b1] = (top1 / n).cpu().numpy()
        out["jsd"][b0:b1] = jsd.clamp_min(0).cpu().numpy()
        out["entropy_frac"][b0:b1] = ((-plogp / n) / math.log(m) if m > 1 else 0 * plogp).cpu().numpy()
        out["mean_distance_px"][b0:b1] = (distance / n).cpu().numpy()
        out["cosine_distance"][b0:b1] = [mean_cosine_distance(u, n) for u in unit_sum.cpu()]
    out.update(output_statistics(x, delta))
    return out


def output_statistics(x: torch.Tensor | None, delta: torch.Tensor | None) -> dict[str, np.ndarray]:
    """cosine_distance_input of x (B, N, C), the block's input; with delta = output - x (B, N, C) also
    cosine_distance_output and contribution, mean over positions of |delta| / |x|."""
    out = {}
    if x is not None:
        out["cosine_distance_input"] = np.array([mean_cosine_distance(unit(xi.float()).sum(0).cpu(), len(xi)) for xi in x])
    if x is not None and delta is not None:
        out["cosine_distance_output"] = np.array([mean_cosine_distance(unit(d.float()).sum(0).cpu(), len(d)) for d in delta])
        ratio = delta.float().norm(dim=2) / x.float().norm(dim=2).clamp_min(1e-12)  # (B, N)
        out["contribution"] = ratio.double().mean(1).cpu().numpy()
    return out


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
        from torchvision.datasets import ImageFolder  # (2 s to import: only where a dataset is read)

        ds = ImageFolder(root, transform=eval_transform(meta), loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        raise StudyError(f"{root} is not an ImageFolder split ({e})") from None
    if not meta.get("class_names"):  # a model with no classifier (a backbone): the folders' own indices
        mapping = list(range(len(ds.classes)))
    else:
        mapping = class_mapping(ds.classes, meta)
        ds.target_transform = mapping.__getitem__
    keep = evenly_spaced(len(ds), limit)
    targets = np.array([mapping[ds.targets[i]] for i in keep])
    return Subset(ds, keep), targets


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


# -- the study -------------------------------------------------------------------------------------


def run_modes(names: list[str], tokens: list[str] = (), scope: str = "each") -> dict[str, dict[str, str]]:
    """The intervention runs: each block (scope "each") and all of them, off / mean / uniform, and a transformer's
    `TOKEN_MODES` (tokens: those that apply, `token_modes`) in all blocks at once ({run: {block name: mode}});
    scope "none": no runs."""
    if scope not in SCOPES:
        raise StudyError(f"interventions must be one of {SCOPES}, got {scope!r}")
    if scope == "none":
        return {}
    each = {f"{name}:{mode}": {name: mode} for name in names for mode in MODES} if scope == "each" else {}
    return each | {f"all:{mode}": {name: mode for name in names} for mode in (*MODES, *tokens)}


@torch.no_grad()
def intervention_logits(model: torch.nn.Module, x: torch.Tensor, runs: dict[str, dict[str, str]]) -> dict:
    """{run: the model's logits on x with that run's blocks replaced}: one whole forward each under `Intervention`."""
    out = {}
    for key, modes in runs.items():
        with Intervention(model, modes):
            out[key] = model(x)
    return out


class Branches:
    """The runs one forward carries side by side: the batch is `len(self.runs)` branches of B images, each branch
    the runs that have computed the same so far (the first holds "baseline")."""

    def __init__(self, runs: dict[str, dict[str, str]], b: int):
        self.modes, self.b = {"baseline": {}, **runs}, b
        self.runs = [list(self.modes)]
        self.seen: dict[str, Seen] = {}

    def forward(self, name: str, module, adapter):
        """The block's forward for `replaced_forward`: `split` at each call (its every argument kept)."""
        return lambda *args, **kwargs: self.split(name, module, adapter, Call.of(args, kwargs, module))

    def split(self, name: str, module, adapter, call: Call):
        """The block's output for every branch of its input: each branch split by its runs' modes here (its own
        forward first), the new branches' outputs in order; the baseline's input and output kept in `seen` (first
        call). The block's other arguments (masks, position embeddings, sizes) go with each branch, sliced alike."""
        x = call.input
        if len(x) != len(self.runs) * self.b:
            raise BranchError(f"{name} got a batch of {len(x)}, not {len(self.runs)} branches of {self.b}")
        outs, runs = [], []
        for i, branch in enumerate(self.runs):
            part = call.sliced(slice(i * self.b, (i + 1) * self.b))
            by_mode: dict[str | None, list[str]] = {}
            for run in branch:
                by_mode.setdefault(self.modes[run].get(name), []).append(run)
            for mode in sorted(by_mode, key=lambda m: m is not None):  # the own forward first: baseline stays first
                outs.append(module.forward(*part.args, **part.kwargs) if mode is None else
                            adapter.forward(module, part.input, mode, call=part) if isinstance(adapter, TracedAdapter)
                            else adapter.forward(module, part.input, mode))
                runs.append(by_mode[mode])
        if name not in self.seen:
            first = call.sliced(slice(0, self.b)).detached()
            self.seen[name] = Seen(first.input, output_tensor(outs[0]), call=first)
        self.runs = runs
        return cat_outputs(outs, call.seq_first)


_UNBRANCHED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # models that mixed branches: tried once each


class BranchError(RuntimeError):
    """The model mixed branches (a block's input used after it, a batch size kept from before a block)."""


@torch.no_grad()
def branched_forward(model: torch.nn.Module, x: torch.Tensor, blocks: list,
                     runs: dict[str, dict[str, str]]) -> tuple[dict[str, torch.Tensor], dict[str, Seen]]:
    """({"baseline" and every run: the model's logits on x}, {block: Seen(its input, its output) in the baseline})
    from one forward in which runs share what they compute until they differ (`Branches`): the part of the model
    before the first block runs once, each block runs its own forward once per branch and each intervention only
    where a run asks for it. A model that mixes branches (e.g. a shortcut around a block: an error or a wrong batch
    at the end) gets one forward a run instead (`trace.watch`, `intervention_logits`), in this batch and every
    later one."""
    if model in _UNBRANCHED:
        base, seen = watch(model, x, [name for name, *_ in blocks])
        return {"baseline": base} | intervention_logits(model, x, runs), seen
    branches = Branches(runs, len(x))
    try:
        with ExitStack() as stack:
            stack.enter_context(SlowPath())  # (a fused encoder layer would not call its attention block)
            for name, module, adapter in blocks:
                stack.enter_context(replaced_forward(module, branches.forward(name, module, adapter)))
            logits = model(x)
        if len(logits) != len(branches.runs) * len(x) or len(branches.seen) != len(blocks):
            raise BranchError(f"{len(logits)} logits for {len(branches.runs)} branches of {len(x)}")
    except RuntimeError as err:  # BranchError, or a shape error from branches mixed
        log.info("runs one forward each from here on: %s", err)
        _UNBRANCHED.add(model)
        base, seen = watch(model, x, [name for name, *_ in blocks])
        return {"baseline": base} | intervention_logits(model, x, runs), seen
    parts = logits.split(len(x))
    return {run: parts[i] for i, branch in enumerate(branches.runs) for run in branch}, branches.seen


def sampled_queries(maps: BlockMaps) -> list[int]:
    """The sanity Spearman's query rows: at most `SANITY_QUERIES`, every k-th position (one for a per-image map)."""
    n = 1 if maps.per_image else maps.grid[0] * maps.grid[1]
    return list(range(0, n, -(-n // SANITY_QUERIES)))


@torch.no_grad()
def block_record(name: str, module, adapter, seen, random_input: torch.Tensor | None, random_module,
                 random_block, in_sanity: list[int], input_size: int) -> dict[str, np.ndarray]:
    """One block's per-image record of a batch: its statistics (batched), sink cells and grids, and the sanity
    check's Spearman and randomised statistics on the images `in_sanity` (NaN elsewhere)."""
    x, y = seen.input, output_tensor(seen.output)
    b = x.shape[0]
    maps = adapter.maps(module, x)
    record = {f"{name}:grid": np.array([maps.grid] * b), f"{name}:key_grid": np.array([maps.key_grid] * b),
              f"{name}:sink": np.zeros(b, dtype=np.int64), **{f"{name}:{s}": np.full(b, np.nan) for s in STATS}}
    for kind in ("qk", "full"):
        record[f"{name}:sanity:{kind}"] = np.full(b, np.nan)
        for stat in SANITY_STATS:
            record[f"{name}:sanity:{kind}:{stat}"] = np.full(b, np.nan)
    xs = tokens(x)[:, 0] if x.dim() == 4 else None  # (B, N, C)
    delta = tokens(y - x)[:, 0] if xs is not None and y.shape == x.shape else None
    softmax = maps.normalise == "softmax" or token_rows(maps)
    stats = token_statistics(maps, input_size) if token_rows(maps) else \
        batch_statistics(maps, input_size, x=xs, delta=delta) if softmax else output_statistics(xs, delta)
    for stat, values in stats.items():
        record[f"{name}:sink" if stat == "sink_index" else f"{name}:{stat}"] = values
    if maps.prefix is not None:  # a transformer: each head's mean weight (over the patch queries) on each prefix token
        record[f"{name}:prefix"] = maps.prefix.double().mean(2).cpu().numpy()  # (B, heads, P)
    if maps.prefix_rows is not None:  # each prefix token's own row: what it reads (mean of heads)
        own = maps.prefix_rows.double()  # (B, heads, P, M + P)
        m = own.shape[-1] - own.shape[-2]
        on = own[..., :m].sum(-1)  # (B, heads, P): its share on the patches
        spread = own[..., :m] / on[..., None].clamp_min(1e-300)
        entropy = -(spread * spread.clamp_min(1e-300).log()).sum(-1) / math.log(m)  # of its patch part, / ln M
        record[f"{name}:prefix_own"] = torch.stack([on.mean(1), entropy.mean(1)], -1).cpu().numpy()  # (B, P, 2)
    if not in_sanity:
        return record
    others = {"qk": adapter.maps(random_block, x[in_sanity]), "full": adapter.maps(random_module, random_input)}
    queries = sampled_queries(maps)
    for r, j in enumerate(in_sanity):  # rank agreement with re-initialised logits, and with a random model
        rho = spearman_rows(mean_head_rows(maps.image(j), queries),
                            [mean_head_rows(o.image(r), queries) for o in others.values()], len(queries))
        for kind, value in zip(others, rho):
            record[f"{name}:sanity:{kind}"][j] = value
    for kind, other in others.items():
        if softmax:
            other_stats = token_statistics(other, input_size) if token_rows(other) else batch_statistics(other, input_size)
            for stat in SANITY_STATS:
                record[f"{name}:sanity:{kind}:{stat}"][in_sanity] = other_stats[stat]
    return record


def token_rows(maps: BlockMaps) -> bool:
    """A transformer's rows: a softmax over the grid's keys and the prefix tokens' (the grid's part is held whole)."""
    return maps.prefix is not None and (maps.weights is not None or maps.lean) and maps.window is None


def token_statistics(maps: BlockMaps, input_size: int) -> dict[str, np.ndarray]:
    """`batch_statistics` of a transformer's rows: the masses (sink_mass: the share of all attention on the image's
    most attended patch; top1_weight) of the patches' weights as they are, the row shapes (entropy, JSD, mean
    distance, cosine distance) of the patch part renormalised to a distribution over the patches."""
    import dataclasses

    masses = batch_statistics(maps, input_size)
    w = maps.rows()
    shapes = batch_statistics(dataclasses.replace(maps, weights=w / w.sum(-1, keepdim=True).clamp_min(1e-30)), input_size)
    return {**shapes, **{k: masses[k] for k in ("sink_index", "sink_mass", "top1_weight")}}


@torch.no_grad()
def run_study(model: torch.nn.Module, meta: dict, data: str | Path, *, layers: list[str] | None = None,
              limit: int = 0, batch_size: int = 32, workers: int = 2, sanity_images: int = 256, n_boot: int = 2000,
              seed: int = 0, progress: bool = True, records: Records | None = None, resume: bool = False,
              rank: int = 0, world: int = 1, faithfulness_images: int = 64, interventions: str = "each") -> dict | None:
    """The whole study of any model with attention blocks (`byo.blocks_of`; layers: by module name) as the
    JSON-ready dict `study.json` holds.

    Per batch: one forward giving the baseline, every intervention run and each block's input and output in the
    baseline (`branched_forward`); the statistics of every image of the batch at once (`batch_statistics`);
    the sanity check on the images among `sanity_images` evenly spaced ones (the parameters that make a block's
    logits re-initialised, `adapters.reinit_qk`; and the whole model, `adapters.randomised_copy`). Each batch's
    per-image results go to `records` as they are made. resume: skip the images `records` holds already. rank /
    world: this process's share of the images (`shard`); only world == 1 returns the study (ranks merge with
    `summarise` once all have written). faithfulness_images: evenly spaced images on which `vggattn.study.faithfulness`
    measures deletion and the sink's anatomy (records of their own: a finished study gains them with resume).
    """
    model = model.eval()
    device = next(model.parameters()).device
    blocks = blocks_of(model, meta, layers)
    names = [name for name, *_ in blocks]
    scored = bool(meta.get("class_names"))  # no class names (a backbone): no top-1, so no interventions to score
    interventions = interventions if scored else "none"
    ds, _ = load_split(data, meta, limit)
    n_images, input_size = len(ds), int(meta["input_size"])
    if n_images == 0:
        raise StudyError(f"{data} holds no images")
    records = records if records is not None else Records()
    faith = records.of("faith")
    if not resume and world == 1:  # several ranks: the launcher clears once, before any writes (main_distributed)
        records.clear()
        faith.clear()
    done_before = records.done() if resume else set()
    faith_set = set(evenly_spaced(n_images, faithfulness_images)) if faithfulness_images else set()
    faith_set -= faith.done() if resume else set()
    todo = [i for i in shard(n_images, rank, world) if i not in done_before or i in faith_set]
    sanity_set = set(evenly_spaced(n_images, sanity_images)) if sanity_images else set()
    runs = run_modes(names, token_modes(blocks), interventions)
    random_model = randomised_copy(model, seed + 1) if sanity_set else None
    random_modules = dict(random_model.named_modules()) if random_model is not None else {}
    random_blocks = {name: reinit_qk(module, adapter, seed + 2 + 10 * j) for j, (name, module, adapter) in enumerate(blocks)}
    t0 = time.perf_counter()
    batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
    loader = DataLoader(Subset(ds, todo), batch_size,  # workers pay their start-up back over several batches only
                        num_workers=workers if len(batches) > workers else 0)
    for positions, (x, y) in tqdm(zip(batches, loader), total=len(batches), desc="study", unit="batch",
                                  disable=not progress):
        x, y, b = x.to(device), y.to(device), len(y)
        measure = [j for j in range(b) if positions[j] in faith_set]
        if measure:
            faith.write(faithfulness.record(model, blocks, x[measure], random_blocks,
                                            [positions[j] for j in measure], seed))
        if all(p in done_before for p in positions):  # resumed for the faithfulness measures only
            continue
        record: dict[str, np.ndarray] = {"index": np.array(positions), "target": y.cpu().numpy()}
        with ResidualNorms(model, blocks) as residual:
            logits, seen = branched_forward(model, x, blocks, runs)
        for key, out in logits.items() if scored else ():
            k5 = out.topk(min(5, out.shape[1]), dim=1).indices  # (B, k)
            record[f"top1:{key}"] = (k5[:, 0] == y).cpu().numpy()
            record[f"top5:{key}"] = (k5 == y[:, None]).any(1).cpu().numpy()
        in_sanity = [j for j in range(b) if positions[j] in sanity_set]
        random_seen = watch(random_model, x[in_sanity], names)[1] if in_sanity else {}
        for name, module, adapter in blocks:
            record |= block_record(name, module, adapter, seen[name],
                                   random_seen[name].input if in_sanity else None, random_modules.get(name),
                                   random_blocks[name], in_sanity, input_size)
            record |= residual.record(name, adapter, seen[name].input)
        records.write(record)
    if world > 1:
        return None
    return summarise(records.load(), blocks, meta, data, n_images, time.perf_counter() - t0, n_boot, seed,
                     faith_records(faith), interventions)


class ResidualNorms:
    """Forward pre-hooks on the modules enclosing a transformer's attentions: the first input each takes in a
    forward (the baseline's rows: the first of a branched batch), from which `record` reads the norms of the
    residual stream's tokens entering each attention (as `vggattn.analysis.residual_stream` picks it: the nearest
    enclosing module taking other tokens of the attention input's shape) -- Darcet et al.'s high-norm tokens."""

    def __init__(self, model: torch.nn.Module, blocks: list):
        modules = dict(model.named_modules())
        self.names = {name: [a for a in _ancestors(name) if a in modules] for name, _, adapter in blocks
                      if getattr(adapter, "places", None)}
        self.watch = Watch(model, sorted({a for v in self.names.values() for a in v}))

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        return {name: s.input for name, s in self.watch.seen.items() if s.input is not None}

    def __enter__(self) -> "ResidualNorms":
        self.watch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.watch.__exit__(*exc)

    def record(self, name: str, adapter, x: torch.Tensor) -> dict[str, np.ndarray]:
        """{name:high_norm (B,): patches over HIGH_NORM x the median patch norm, name:norm_max (B,): the largest
        patch norm / the median, name:prefix_norm (B, P): each prefix token's norm / the median patch norm}."""

        places = getattr(adapter, "places", {}).get(tuple(x.shape[1:]))
        if name not in self.names or places is None or not places.prefix:
            return {}
        b = x.shape[0]
        stream = next((t for a in self.names[name] if (t := self.inputs.get(a)) is not None
                       and t.shape[1:] == x.shape[1:] and t.data_ptr() != x.data_ptr()), x)[:b]
        norms = stream.double().norm(dim=-1)  # (B, T)
        prefix = torch.as_tensor(places.prefix)
        patch = torch.ones(norms.shape[1], dtype=torch.bool)
        patch[prefix] = False
        median = norms[:, patch].median(1).values.clamp_min(1e-300)  # (B,)
        ratio = norms / median[:, None]
        return {f"{name}:high_norm": (ratio[:, patch] > HIGH_NORM).sum(1).cpu().numpy(),
                f"{name}:norm_max": ratio[:, patch].amax(1).cpu().numpy(),
                f"{name}:prefix_norm": ratio[:, prefix].cpu().numpy()}


def faith_records(faith: Records) -> dict | None:
    try:
        return faith.load()
    except StudyError:  # measured on no image (--faithfulness-images 0)
        return None


def summarise(rec: dict[str, np.ndarray], blocks: list, meta: dict, data, n_images: int, wall: float,
              n_boot: int, seed: int, faith: dict | None = None, interventions: str = "each") -> dict:
    """study.json from the merged per-image records (`Records.load`) of every image of the split, and of the
    faithfulness measures (their own records) where there are some."""
    if len(rec["index"]) != n_images or not np.array_equal(rec["index"], np.arange(n_images)):
        missing = sorted(set(range(n_images)) - set(rec["index"].tolist()))
        raise StudyError(f"the records miss {len(missing)} of {n_images} images (e.g. {missing[:5]}); "
                         "run again with --resume to finish them")
    names = [name for name, *_ in blocks]
    scored = bool(meta.get("class_names"))
    interventions = interventions if scored else "none"
    runs = ["baseline", *run_modes(names, token_modes(blocks), interventions)]
    sanity = {}
    for name in names:
        mask = ~np.isnan(rec[f"{name}:sanity:qk"])
        sanity[name] = {kind: rec[f"{name}:sanity:{kind}"][mask].tolist() for kind in ("qk", "full")}
        for kind in ("qk", "full"):
            keep = mask & ~np.isnan(rec[f"{name}:sanity:{kind}:sink_mass"])
            sanity[name][f"{kind}_stats"] = [{stat: float(rec[f"{name}:sanity:{kind}:{stat}"][j]) for stat in SANITY_STATS}
                                             for j in np.nonzero(keep)[0]]
    class_names = list(meta["class_names"]) if scored else sorted(p.name for p in Path(data).iterdir() if p.is_dir())
    faith = faithfulness.summarise(faith, names, n_boot, seed) if faith is not None else None
    return {"checkpoint": None, "model": meta.get("source"), "data": str(data), "images": n_images,
            "input_size": int(meta["input_size"]), "class_names": class_names, "wall_s": wall,
            "definitions": {"sink_dominated": f"sink_mass >= {SINK_DOMINATED}",
                            "ci": f"paired percentile bootstrap over images, {n_boot} resamples, seed {seed}",
                            "sanity_pass": f"mean row Spearman < {SANITY_SPEARMAN_MAX} for both randomisations (the "
                                           "logits' parameters re-initialised; the whole model)",
                            "sanity_rows": f"each image's Spearman: the mean over at most {SANITY_QUERIES} query rows "
                                           "(every k-th position, k = ceil(N / that))",
                            "heads": "several heads: the statistics of the mean of the heads' rows"},
            "layers": {name: {**layer_summary({stat: rec[f"{name}:{stat}"] for stat in STATS}, rec[f"{name}:sink"],
                                              tuple(int(v) for v in rec[f"{name}:key_grid"][0]), float(np.nan if block_gamma(module) is None else block_gamma(module)),
                                              rec["target"], class_names),
                              "query_grid": [int(v) for v in rec[f"{name}:grid"][0]], "family": adapter.family,
                              **prefix_summary(rec.get(f"{name}:prefix"), adapter, n_boot, seed),
                              **token_summary(rec, name, adapter)}
                       for name, module, adapter in blocks},
            "interventions_scope": interventions, "scored": scored,
            "interventions": intervention_summary({k: rec[f"top1:{k}"] for k in runs},
                                                  {k: rec[f"top5:{k}"] for k in runs}, n_boot, seed) if scored else {},
            "sanity": sanity_summary(sanity),
            **({"faithfulness": faith} if faith and faith["layers"] else {})}


def prefix_summary(shares: np.ndarray | None, adapter, n_boot: int, seed: int) -> dict:
    """A transformer layer's attention on its prefix tokens, from the per-image (heads, P) mean weights of the patch
    queries: {"prefix": {"tokens", "share" (the mean over images and heads, with a 95% CI over images), "per_head"}},
    or {} for a layer without prefix tokens."""
    if shares is None:
        return {}
    places = getattr(adapter, "places", {}) or {}
    names = next((p.names for p in places.values() if p.names), None) or [f"prefix {j}" for j in range(shares.shape[-1])]
    per_image = shares.mean(1)  # (images, P): mean of heads
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(per_image), (n_boot, len(per_image)))
    total = per_image.sum(1)
    return {"prefix": {
        "tokens": list(names),
        "share": {n: float(per_image[:, j].mean()) for j, n in enumerate(names)},
        "share_ci95": {n: [float(v) for v in np.percentile(per_image[picks, j].mean(1), [2.5, 97.5])]
                       for j, n in enumerate(names)},
        "total": float(total.mean()), "total_ci95": [float(v) for v in np.percentile(total[picks].mean(1), [2.5, 97.5])],
        "per_head": {n: shares[:, :, j].mean(0).tolist() for j, n in enumerate(names)},
        "definition": "the mean weight of the patch queries' rows on each prefix token (class, registers), "
                      "over queries, heads and images; CIs: percentile bootstrap over images"}}


def token_summary(rec: dict[str, np.ndarray], name: str, adapter) -> dict:
    """A transformer layer's prefix tokens' own rows and the residual stream's norms over the split:
    {"prefix_own": {token: share of its own row on the patches, and that part's entropy / ln M}, "norms": {images
    with a high-norm patch, mean high-norm patches an image, largest patch / median, each prefix token's norm /
    the median patch norm}}; {} where the layer has none."""

    places = getattr(adapter, "places", {}) or {}
    names = next((p.names for p in places.values() if p.names), None)
    out = {}
    own = rec.get(f"{name}:prefix_own")
    if own is not None:
        names = names or [f"prefix {j}" for j in range(own.shape[1])]
        out["prefix_own"] = {n: {"on_patches": float(own[:, j, 0].mean()), "patch_entropy": float(own[:, j, 1].mean())}
                             for j, n in enumerate(names)}
        out["prefix_own_definition"] = ("each prefix token's own row, mean of heads and images: its share on the "
                                        "patches, and the entropy of that part (renormalised) / ln M (1: it reads "
                                        "every patch alike, a broadcast of the whole image; 0: one patch)")
    high = rec.get(f"{name}:high_norm")
    if high is not None:
        pn = rec[f"{name}:prefix_norm"]
        names = names or [f"prefix {j}" for j in range(pn.shape[1])]
        out["norms"] = {"images_with_high_norm": float((high > 0).mean()), "high_norm_per_image": float(high.mean()),
                        "max_over_median": float(np.median(rec[f"{name}:norm_max"])),
                        "prefix_over_median": {n: float(np.median(pn[:, j])) for j, n in enumerate(names)},
                        "definition": f"norms of the residual stream's tokens entering the layer; a patch over "
                                      f"{HIGH_NORM:g}x the image's median patch norm is high-norm (Darcet et al. 2023); "
                                      "ratios: medians over images"}
    return out


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
    from ..models.checkpoint import resolve

    try:
        path = study_path(resolve(checkpoint))
    except CheckpointError:
        return None
    return json.loads(path.read_text()) if path.is_file() else None


parse_args = study_args


def load(args) -> tuple[torch.nn.Module, dict]:
    """The model the flags name (`byo.load_from_args`: the article's checkpoint, --model, --timm); without class
    names (a backbone such as timm's DINOv2) the study measures attention only."""
    model, meta = load_from_args(args)
    if not meta.get("class_names"):
        log.warning("the model has no class names (a backbone, or give --classes): the study measures its attention "
                    "and runs no interventions (there is no top-1 to score them by)")
    return model, meta


def study_kwargs(args) -> dict:
    return dict(layers=args.layers, limit=args.limit, batch_size=args.batch_size, workers=args.workers,
                sanity_images=args.sanity_images, n_boot=args.bootstrap, seed=args.seed, resume=args.resume,
                faithfulness_images=args.faithfulness_images, interventions=args.interventions)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.ship and not (args.checkpoint and Path(args.checkpoint).exists()):
        log.error("error: --ship writes the study beside a local checkpoint; %s is not a file or folder here "
                  "(for a Hub id, add study.json to its repo instead)", args.checkpoint)
        return BAD_INPUT
    if args.tokens or args.diffusers or args.maps:
        return tokens_study(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # started by torchrun: each rank studies its share, rank 0 merges
        return main_distributed(args, rank, world)
    try:
        model, meta = load(args)
        study = run_study(model, meta, args.data, records=Records(Path(args.out) / "records"), **study_kwargs(args))
    except (StudyError, CheckpointError, ValueError) as e:
        log.error("error: %s", e)
        return BAD_INPUT
    return finish(study, args, meta)


def _images(args) -> list:
    """The image files under --data (any folder), an evenly spaced --limit of them."""
    from ..data import collect_images

    images = collect_images([args.data])
    if args.limit:
        images = images[:: max(1, len(images) // args.limit)][:args.limit]
    if not images:
        raise ValueError(f"no images in {args.data}")
    return images


def tokens_study(args) -> int:
    """--tokens (a detector's queries over --data's images) or --diffusers with --prompts (a pipeline's words):
    study.json and report.html in --out."""
    from .report import write_tokens_study

    try:
        if args.maps:
            from .maps import KINDS, maps_study

            kinds = tuple(k.strip() for k in args.maps.split(",") if k.strip())
            bad = [k for k in kinds if k not in KINDS]
            if bad:
                raise ValueError(f"--maps: unknown kind(s) {bad}; the kinds are {', '.join(KINDS)}")
            model, meta = load_from_args(args)
            study = {"maps": maps_study(model, meta, _images(args), kinds, n_boot=args.bootstrap, seed=args.seed)}
        elif args.diffusers:
            from ..diffusion import load_pipeline, word_study

            prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
            if not prompts:
                raise ValueError(f"no prompts in {args.prompts}")
            study = word_study(load_pipeline(args.diffusers), prompts, steps=args.steps, seed=args.seed,
                               resamples=args.bootstrap)
        else:
            from ..tokens import query_study

            model, meta = load_from_args(args)
            study = query_study(model, meta, _images(args), seed=args.seed, resamples=args.bootstrap)
    except (CheckpointError, OSError, ValueError, ImportError) as e:
        log.error("error: %s", e)
        return BAD_INPUT
    paths = write_tokens_study(study, args.out)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return 0


def finish(study: dict, args, meta: dict) -> int:
    """Write study.json, the report and figures (and --ship's copy), and say what was found."""
    study["checkpoint"] = meta.get("source") if wants_own_model(args) else \
        Path(args.checkpoint or DEFAULT_CHECKPOINT).name
    paths = write_study(study, args.out)
    if args.ship:
        from ..models.checkpoint import resolve

        target = study_path(resolve(args.checkpoint))  # a folder: beside its model.safetensors
        target.write_text(json.dumps(study, indent=1))
        paths.append(target)
    for line in headline(study):
        log.info("%s", line)
    log.info("%d images in %.0f s; wrote %s", study["images"], study["wall_s"], ", ".join(str(p) for p in paths))
    return 0


def main_distributed(args, rank: int, world: int) -> int:
    """Under torchrun: gloo on the CPU, NCCL on GPUs (--device cuda: this rank's LOCAL_RANK GPU). Every rank
    writes its share's records to OUT/records; rank 0 merges them (duplicates of the sampler's padding dropped)
    and writes the study."""
    import torch.distributed as dist

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        args.device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
        model, meta = load(args)
        records = Records(Path(args.out) / "records", rank=rank)
        if rank == 0 and not args.resume:
            records.clear()
            records.of("faith").clear()
        dist.barrier()
        t0 = time.perf_counter()
        run_study(model, meta, args.data, progress=rank == 0, records=records, rank=rank, world=world,
                  **study_kwargs(args))
        dist.barrier()  # every share recorded
        if rank != 0:
            return 0
        ds, _ = load_split(args.data, meta, args.limit)
        study = summarise(records.load(), blocks_of(model, meta, args.layers), meta, args.data, len(ds),
                          time.perf_counter() - t0, args.bootstrap, args.seed, faith_records(records.of("faith")),
                          args.interventions)
        study["world_size"] = world
        return finish(study, args, meta)
    except (StudyError, CheckpointError, ValueError) as e:
        log.error("error: %s", e)
        return BAD_INPUT
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
