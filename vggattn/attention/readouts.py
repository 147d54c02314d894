"""Numbers that say what an attention layer does, beyond its maps.

    entropy(row), entropy(row) / math.log(M)       # nats; 1.0 = uniform, 0 = one cell
    mean_distance(row, q, grid, (128, 128))        # pixels between the query and what it attends to
    top_cells(row, 5)                              # [(index, weight), ...]
    js_divergence(rows, mean_row)                  # how far each row is from the image's mean row

All functions take attention rows (non-negative, summing to 1 over the last dimension) as tensors.
"""

from __future__ import annotations

import math

import numpy as np

import torch

HIGH_NORM = 4.0  # a patch token this many times the median patch norm is high-norm (Darcet et al. 2023)
SINK_DOMINATED = 0.5  # an image's layer is sink-dominated when one cell takes at least this share of all attention
UNSURE_PRECISION = 0.5  # predictions are "unsure" below the confidence where val top-1 precision falls under this


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last dimension (0 log 0 = 0)."""
    p = p.double()
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def cell_centers(grid: tuple[int, int], size_wh: tuple[float, float]) -> torch.Tensor:
    """(N, 2) (x, y) centres of a grid's cells in pixels of an image of size (width, height)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) * size_wh[0] / w, (ys.flatten() + 0.5) * size_wh[1] / h], dim=1)


def mean_distance(row: torch.Tensor, query: int, grid: tuple[int, int], size_wh: tuple[float, float],
                  key_grid: tuple[int, int] | None = None) -> float:
    """Expected distance in pixels, in an image of size_wh, from query cell's centre (on `grid`) to the attended
    cells' (on key_grid, default the same grid)."""
    d = (cell_centers(key_grid or grid, size_wh) - cell_centers(grid, size_wh)[int(query)]).norm(dim=1)  # (M,)
    return float((row.double().reshape(-1) * d).sum())


def top_cells(row: torch.Tensor, k: int = 5) -> list[tuple[int, float]]:
    """The k most attended cells of one row: [(flat index, weight)], largest first."""
    w, i = row.reshape(-1).topk(min(k, row.numel()))
    return [(int(a), float(b)) for a, b in zip(i.tolist(), w.tolist())]


def js_divergence(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in nats (0 .. ln 2) between distributions on the last dim, as float64.
    Terms in float32 (two logs per entry; what an upload costs in the app), sums in float64."""
    p, m = p.float(), m.float()
    log_a = torch.log((0.5 * (p + m)).clamp_min(1e-30))  # weights below 1e-30 add nothing: 0 log 0 = 0
    kl_p = (torch.xlogy(p, p) - p * log_a).sum(-1, dtype=torch.float64)
    kl_m = (torch.xlogy(m, m) - m * log_a).sum(-1, dtype=torch.float64)
    return 0.5 * kl_p + 0.5 * kl_m


def row_readouts(row: torch.Tensor, query: int, grid: tuple[int, int], input_size: int,
                 image_size: tuple[int, int], k: int = 5, key_grid: tuple[int, int] | None = None) -> dict:
    """Entropy, mean distance and top-k cells of one (M,) row of a distribution over the key cells (key_grid,
    default the query grid), as plain numbers for tables and JSON."""
    key_grid = key_grid or grid
    m = key_grid[0] * key_grid[1]
    h = float(entropy(row))
    return {
        "query_index": int(query),
        "entropy_nats": h,
        "entropy_fraction": h / math.log(m) if m > 1 else 0.0,
        "mean_distance_input_px": mean_distance(row, query, grid, (input_size, input_size), key_grid),
        "mean_distance_image_px": mean_distance(row, query, grid, image_size, key_grid),
        "top_cells": [{"index": i, "row": i // key_grid[1], "col": i % key_grid[1], "weight": w}
                      for i, w in top_cells(row, k)],
    }


def unsure_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """The top-1 probability below which predictions are right less than half the time: the largest
    confidence c such that the predictions with confidence <= c have top-1 precision under 50% (0 if
    even the least confident prediction alone is right). Fitted on a val split; stored as
    meta["unsure_below"]."""
    order = np.argsort(confidence, kind="stable")
    conf, hits = np.asarray(confidence, dtype=np.float64)[order], np.asarray(correct, dtype=np.float64)[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)  # of the k least confident predictions
    below = np.nonzero(precision < UNSURE_PRECISION)[0]
    return float(conf[below[-1]]) if len(below) else 0.0


def row_summaries(query: torch.Tensor, key: torch.Tensor, scale: float = 1.0, chunk: int = 1024
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Z (..., N) float64, the mean row (..., M)) of the rows softmax(scale q_i . K) of (..., N, d) Q and
    (..., M, d) K, from one pass over the rows a block at a time with one exponential a weight (never the N x M map).
    The rows are summed in Q's dtype; log Z is made exact for the page (`exact_log_z`): each row's largest logit
    recomputed as the page computes logits, float64 products of the same Q and K."""
    k = key.to(query.dtype).transpose(-1, -2)
    n, parts, tops, total = query.shape[-2], [], [], 0
    for s in range(0, n, chunk):
        logits = (query[..., s:s + chunk, :] @ k) * scale  # (..., R, M)
        top, index = logits.max(-1, keepdim=True)  # (..., R, 1)
        weights = torch.exp(logits.sub_(top))  # unnormalised rows, in place
        z = weights.sum(-1, keepdim=True)  # (..., R, 1)
        total = total + (z.reciprocal().transpose(-1, -2) @ weights)[..., 0, :].double()  # the rows, summed over queries
        parts.append(-torch.log(z.double())[..., 0])  # log of the largest weight, 1 / z
        tops.append(index[..., 0])
    return exact_log_z(query, key, scale, torch.cat(tops, -1), torch.cat(parts, -1)), (total / n).to(query.dtype)


def exact_log_z(query: torch.Tensor, key: torch.Tensor, scale: float, top: torch.Tensor,
                log_top_weight: torch.Tensor) -> torch.Tensor:
    """log Z (..., N) float64 of the rows softmax(scale q_i . K), as the page's float64 logits of the same float32 Q
    and K would give it: the largest logit of each row (its key `top` (..., N)) recomputed in float64, minus the
    log of that key's weight (float64 (..., N), as the forward or a float32 pass computed it). A float32 log Z
    would be off by the logits' rounding, 6e-8 |logit|, so that a column exp(q k_j - log Z) could pass 1."""
    k = key.double()  # (..., M, d)
    picked = torch.gather(k, -2, top[..., None].expand(*top.shape, k.shape[-1]))  # (..., N, d): each row's top key
    return (query.double() * picked).sum(-1) * scale - log_top_weight
