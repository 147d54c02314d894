"""Numbers that say what an attention layer does, beyond its maps.

    layer = result.layers[0]                       # a LayerCapture (batch of one)
    row = layer.row(q)[0]                          # (N,) where query q looks
    entropy(row), entropy(row) / math.log(N)       # nats; 1.0 = uniform, 0 = one cell
    mean_distance(row, q, layer.grid, (128, 128))  # pixels between the query and what it attends to
    top_cells(row, 5)                              # [(index, weight), ...]
    mean_row, jsd = query_dependence(layer)        # (B, N) map, (B,) mean JS divergence from it

All functions take attention rows (non-negative, summing to 1 over the last dimension) as tensors.
`query_dependence` builds the N x N map a chunk of rows at a time, so memory stays linear in N.
"""

from __future__ import annotations

import math

import torch

from .capture import LayerCapture

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


def mean_distance(row: torch.Tensor, query: int, grid: tuple[int, int], size_wh: tuple[float, float]) -> float:
    """Expected distance in pixels, in an image of size_wh, from query cell's centre to the attended cells'."""
    centers = cell_centers(grid, size_wh)  # (N, 2)
    d = (centers - centers[int(query)]).norm(dim=1)  # (N,)
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


@torch.no_grad()
def query_dependence(layer: LayerCapture, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_row (B, N), jsd (B,)): the query-averaged map, and the mean JS divergence (nats) of the N
    rows from it. jsd = 0 when every query looks at the same place; up to ln 2 when the rows are
    disjoint one-hots. Two passes over the rows in chunks (never the whole N x N map at once)."""
    n = layer.num_positions
    starts = range(0, n, chunk)
    mean_row = sum(layer.rows(list(range(s, min(n, s + chunk)))).double().sum(1) for s in starts) / n  # (B, N)
    jsd = sum(js_divergence(layer.rows(list(range(s, min(n, s + chunk)))), mean_row[:, None]).sum(1)
              for s in starts) / n  # (B,)
    return mean_row.float(), jsd.float()


def row_readouts(row: torch.Tensor, query: int, grid: tuple[int, int], input_size: int,
                 image_size: tuple[int, int], k: int = 5) -> dict:
    """Entropy, mean distance and top-k cells of one (N,) row, as plain numbers for tables and JSON."""
    n = grid[0] * grid[1]
    h = float(entropy(row))
    return {
        "query_index": int(query),
        "entropy_nats": h,
        "entropy_fraction": h / math.log(n) if n > 1 else 0.0,
        "mean_distance_input_px": mean_distance(row, query, grid, (input_size, input_size)),
        "mean_distance_image_px": mean_distance(row, query, grid, image_size),
        "top_cells": [{"index": i, "row": i // grid[1], "col": i % grid[1], "weight": w} for i, w in top_cells(row, k)],
    }


def readouts_markdown(panels) -> str:
    """Per layer, a clicked query's entropy, mean attention distance and top-5 cells, as a markdown
    table, with each layer's sink note (panels: `vggattn.analysis.Panel`s of one click)."""
    rows = []
    for p in panels:
        r = p.readouts
        cells = ", ".join(f"({c['row']},{c['col']}) {c['weight']:.3f}" for c in r["top_cells"][:5])
        rows.append(f"| `{p.layer}` | {p.query_index} | {r['entropy_nats']:.3f} | {r['entropy_fraction']:.2f} | "
                    f"{r['mean_distance_input_px']:.1f} | {cells} |")
    return ("| layer | query | entropy (nats) | entropy / log N | mean distance (input px) | top-5 cells (row,col) weight |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) +
            "\n\nEntropy / log N: 1 = the query looks everywhere equally, 0 = at one cell. "
            "Top-5 cells are numbered on the maps." + sink_notes_markdown(panels))


def sink_notes_markdown(panels) -> str:
    """Each sink-dominated layer's note (`vggattn.analysis.sink_note`) as a paragraph; "" when none is."""
    return "".join(f"\n\n⚠ `{p.layer}`: {p.sink_note}." for p in panels if p.sink_note)


def dependence_markdown(layers: list[LayerCapture], dependence: list[tuple]) -> str:
    """Per layer, the mean JS divergence of the rows from the mean row (`Analysis.query_dependence`)."""
    rows = [f"| `{layer.name}` | {jsd:.4f} | {jsd / math.log(2):.1%} |" for layer, (_, jsd) in zip(layers, dependence)]
    return ("| layer | mean JSD of rows from the mean row (nats) | of the maximum ln 2 |\n|---|---|---|\n" + "\n".join(rows) +
            "\n\n0 means every position attends to the same place (the map does not depend on the query); "
            "the images show where attention goes on average.")
