"""Does a position's attention row say what its output is made of? Deletion and sink anatomy, per block, for any
model: every measure is a block forward with its rows replaced (`Adapter.forward(module, x, rows=...)`; for a
family adapter, its output from attended values computed without an N x M product per replaced row).

    rec = record(model, blocks, x, random_blocks, positions, seed)   # per image and block, as the study records
    section = summarise(records, layers, n_boot, seed)               # study.json's "faithfulness"

Query-conditioned deletion (no pixels are masked, so no shape leaks): for a query q, the values of the k keys a
selection names are replaced by the image's mean value, in q's weighted sum only: q's row with those weights set to 0
and their sum spread evenly over the M keys (sum_j w'_j v_j = sum_{j not in S} w_j v_j + (sum_S w) mean_v). Every
query's own deletion runs at once, one block forward per selection and k; a position's change is its own where its
output depends only on its own row (every non-local family here). Measured per query, mean over all queries:

- del: |change of the block's output at q| / |what attention adds there| (the output against that of zero rows);
- logit: |change of the image's top-1 logit| with only q's output changed, to first order (the logit's gradient at
  the block's output, from one backward, times the change).

Where the output is not on the query grid, or one map serves every position (GCNet), the whole output is one
position. Selections: "top" (q's own k largest weights), against "random" k keys (what uniform rows would pick),
"bottom" (q's k smallest), "mean_row" (the image's query-averaged row's top k: the same keys for every query) and
"reinit_qk" (the top k of q's row after re-initialising what makes the logits), and the top k of q's other maps
(`vggattn.attention.effect`): "value" (what each key brings, Kobayashi et al.) and "effect" (how far q's output moves
when each key alone is removed), where the block's keys' contributions can be read (else they are the weights'
"top"). A faithful map: "top" far above the rest, and above "mean_row" where the rows differ between queries.

Sink anatomy: at the image's sink (the most attended key), what its value adds when it takes a query's whole
attention against the mean over keys (each query given the key of its own cell; where the output is per position),
and the share of what attention adds at each query that the sink's term A[q, s] v_s makes up, averaged over
queries. A "nop" sink takes the attention and adds almost nothing (share < 0.1); a "broadcast" sink adds one vector
to every position (share >= 0.5).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..attention.adapters import TracedAdapter, output_tensor
from ..attention.trace import watch
from .bootstrap import paired_bootstrap_ci

KS = (1, 4, 16)  # deleted keys
SELECTIONS = ("top", "random", "bottom", "mean_row", "reinit_qk", "value", "effect")
NOP_BELOW, BROADCAST_FROM = 0.1, 0.5
VARIANTS = 2  # replaced rows run through the block at once (each (heads, N, M): 64 MB for a 64 x 64 grid)


def delete_keys(rows: torch.Tensor, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """rows (heads, N, M) with each query's keys (N, k) deleted, written into `out`: their values replaced by the mean
    value, so their weights become 0 and their sum is spread evenly over the M keys."""
    keys = keys.expand(rows.shape[0], -1, -1)  # (heads, N, k)
    taken = rows.gather(-1, keys).sum(-1, keepdim=True)  # (heads, N, 1)
    return out.copy_(rows).scatter_(-1, keys, 0.0).add_(taken / rows.shape[-1])


def own_cells(grid: tuple[int, int], key_grid: tuple[int, int]) -> torch.Tensor:
    """(N,) the key cell under each query cell (keys on a coarser grid: the cell that covers it)."""
    rows = torch.arange(grid[0]) * key_grid[0] // grid[0]
    cols = torch.arange(grid[1]) * key_grid[1] // grid[1]
    return (rows[:, None] * key_grid[1] + cols[None, :]).flatten()


def own_rows(cells: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Rows (heads, N, M), written into `out`, in which each query puts all its weight on its own cell's key."""
    out.zero_()[:, torch.arange(out.shape[1], device=out.device), cells] = 1.0
    return out


def sink_rows(rows: torch.Tensor, sink: int, out: torch.Tensor) -> torch.Tensor:
    """rows (heads, N, M) with every weight but the sink's set to 0, written into `out`."""
    out.zero_()[..., sink] = rows[..., sink]
    return out


def position_norms(t: torch.Tensor, per_position: bool) -> torch.Tensor:
    """|t| at each position of a (1, C, h, w) output, (N,); not per position: the whole output's norm, (1,)."""
    return t[0].flatten(1).norm(dim=0) if per_position else t.norm()[None]


def position_dots(g: torch.Tensor, t: torch.Tensor, per_position: bool) -> torch.Tensor:
    """g . t at each position of (1, C, h, w) outputs, (N,); not per position: over the whole output, (1,)."""
    return (g * t)[0].flatten(1).sum(0) if per_position else (g * t).sum()[None]


def deleted_terms(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """(heads, N, Cv): sum over each query's deleted keys (N, k) of weight x value, a block of queries at a time."""
    out = values.new_empty(rows.shape[0], rows.shape[1], values.shape[-1])
    for s in range(0, rows.shape[1], chunk):
        k = keys[s:s + chunk]  # (R, k)
        w = rows[:, s:s + chunk].gather(-1, k.expand(rows.shape[0], -1, -1))  # (heads, R, k)
        out[:, s:s + chunk] = (w.unsqueeze(-1) * values[:, k]).sum(-2)  # values[:, k]: (heads, R, k, Cv)
    return out


def attended_variants(rows: torch.Tensor, values: torch.Tensor, sink: int, chosen: dict, ks, kmax: int,
                      cells: torch.Tensor | None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The variants of `image_faithfulness` as attended values (heads, N, Cv) rather than rows: a deletion is the
    block's own attended values less its deleted keys' terms plus their weight times the mean value (the rows of
    `delete_keys` times the values, without an N x M product per deletion)."""
    base = rows @ values  # (heads, N, Cv)
    mean_v = values.mean(-2, keepdim=True)  # (heads, 1, Cv)

    def deleted(out, keys):
        taken = rows.gather(-1, keys.expand(rows.shape[0], -1, -1)).sum(-1, keepdim=True)  # (heads, N, 1)
        return out.copy_(base).sub_(deleted_terms(rows, keys, values)).add_(taken * mean_v)

    variants = {"as is": lambda out: out.copy_(base), "zero": lambda out: out.zero_(),
                "sink": lambda out: torch.mul(rows[..., sink, None], values[:, sink, None, :], out=out),
                **{f"{sel}:{k}": (lambda out, keys=keys[:, :min(k, kmax)]: deleted(out, keys))
                   for sel, keys in chosen.items() for k in ks}}
    if cells is not None:
        variants["own"] = lambda out: out.copy_(values[:, cells])
    return variants


@torch.no_grad()
def image_faithfulness(forward: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, reinit_rows: torch.Tensor,
                       grad: torch.Tensor, grid: tuple[int, int], key_grid: tuple[int, int], *, seed: int = 0,
                       ks=KS, values: torch.Tensor | None = None, kinds: dict | None = None) -> dict[str, float]:
    """One image and block: forward(rows (V, heads, N, M)) -> the block's outputs (V, ...) with those rows; rows
    (heads, N, M) its own (N = 1: one map for every position); reinit_rows the same after re-initialising what makes
    the logits; grad (1, ...) the gradient of the image's top-1 logit at the block's output. With `values` (heads, M,
    Cv), what each key contributes, forward takes attended values (V, heads, N, Cv) instead of rows (the fast path
    for blocks whose output is a function of them). -> {"del:<selection>:<k>", "logit:<selection>:<k>",
    "sink_value_ratio", "sink_share", "sink_mass"}."""
    heads, n, m = rows.shape
    kmax = min(max(ks), m)
    head_mean = rows.mean(0)  # (N, M)
    mean_row = head_mean.mean(0)  # (M,)
    sink = int(mean_row.argmax())
    gen = torch.Generator().manual_seed(seed)
    chosen = {"top": head_mean.topk(kmax, 1).indices,
              "random": torch.rand(n, m, generator=gen).topk(kmax, 1).indices.to(rows.device),  # k distinct keys
              "bottom": head_mean.topk(kmax, 1, largest=False).indices,
              "mean_row": mean_row.topk(kmax).indices.expand(n, -1),
              "reinit_qk": reinit_rows.mean(0).topk(kmax, 1).indices}
    for kind, picked in (kinds or {}).items():  # other maps of the same rows: their own top k
        chosen[kind] = picked.topk(kmax, 1).indices.to(rows.device)
    for kind in ("value", "effect"):
        chosen.setdefault(kind, chosen["top"])
    per_query = n == grid[0] * grid[1]
    cells = own_cells(grid, key_grid).to(rows.device)
    if values is not None:
        variants = attended_variants(rows, values.to(rows.dtype), sink, chosen, ks, kmax, cells if per_query else None)
        buffer = rows.new_empty(len(variants), heads, n, values.shape[-1])  # attended values: N x Cv each
        batch = len(variants)
    else:
        variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {  # each fills its `out` with replaced rows
            "as is": lambda out: out.copy_(rows), "zero": lambda out: out.zero_(),
            "sink": lambda out: sink_rows(rows, sink, out),
            **{f"{sel}:{k}": (lambda out, keys=keys[:, :min(k, kmax)]: delete_keys(rows, keys, out))
               for sel, keys in chosen.items() for k in ks},
            **({"own": lambda out: own_rows(cells, out)} if per_query else {})}
        buffer = rows.new_empty(VARIANTS, *rows.shape)
        batch = VARIANTS
    names = list(variants)
    outs = {}
    for s in range(0, len(names), batch):  # a few replaced rows at a time: bounded memory
        part = names[s:s + batch]
        for i, k in enumerate(part):
            variants[k](buffer[i])
        y = forward(buffer[:len(part)])
        outs |= {k: y[i:i + 1] for i, k in enumerate(part)}
    y, y0 = outs["as is"], outs["zero"]
    per_position = per_query and y.dim() == 4 and tuple(y.shape[-2:]) == tuple(grid)
    added = position_norms(y - y0, per_position).clamp_min(1e-12)  # what attention adds at each position
    out = {}
    for sel in SELECTIONS:
        for k in ks:
            change = outs[f"{sel}:{k}"] - y
            out[f"del:{sel}:{k}"] = float((position_norms(change, per_position) / added).double().mean())
            out[f"logit:{sel}:{k}"] = float(position_dots(grad, change, per_position).abs().double().mean())
    value_ratio = float("nan")
    if per_position:  # each query's output with its own cell's key taking all of its attention: that key's value
        norms = position_norms(outs["own"] - y0, True)
        value_ratio = float(norms[cells == sink].mean() / norms.mean().clamp_min(1e-12))
    share = position_norms(outs["sink"] - y0, per_position) / added
    return {**out, "sink_value_ratio": value_ratio, "sink_share": float(share.double().mean()),
            "sink_mass": float(mean_row[sink])}


def output_gradients(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple]:
    """{block name: (its input, the gradient of each image's top-1 logit at its output)} from one forward and one
    backward of x (`trace.watch` keeping the outputs in the graph)."""
    with torch.enable_grad():
        logits, seen = watch(model, x.detach().requires_grad_(), names, keep_graph=True)
        outputs = [output_tensor(seen[n].output) for n in names]
        score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()  # images are independent in eval mode
        grads = torch.autograd.grad(score, outputs, allow_unused=True)
    return {n: (seen[n].input.detach(), torch.zeros_like(out) if g is None else g)
            for n, out, g in zip(names, outputs, grads)}


@torch.no_grad()
def record(model: torch.nn.Module, blocks: list, x: torch.Tensor, random_blocks: dict, positions: list[int],
           seed: int) -> dict[str, np.ndarray]:
    """`image_faithfulness` of every image of x (B, 3, H, W) in every block whose rows are distributions over the key
    grid (softmax rows held whole, not windowed), as one record of the faithfulness measures. random_blocks: {name:
    the block with its logits' parameters re-initialised}; positions: the images' indices in the split."""
    kept = output_gradients(model, x, [name for name, *_ in blocks])
    out: dict[str, list] = {"index": list(positions)}
    for name, module, adapter in blocks:
        xin, grad = kept[name]
        maps = adapter.maps(module, xin)
        if maps.normalise != "softmax" or maps.window is not None:
            continue
        reinit = adapter.maps(random_blocks[name], xin)
        for j, position in enumerate(positions):
            xj = xin[j:j + 1]

            rows = maps.image(j).rows()[0].float()
            values = None if isinstance(adapter, TracedAdapter) else adapter.values(module, xj)[0].float()

            def forward(replaced: torch.Tensor, xj=xj, rows=rows) -> torch.Tensor:
                xs = xj.expand(len(replaced), *xj.shape[1:]).contiguous()
                if values is None:  # the block's own code with its rows replaced
                    return output_tensor(adapter.forward(module, xs, rows=replaced))
                if replaced.shape[2] == 1 and not maps.per_image:
                    replaced = replaced.expand(-1, -1, maps.grid[0] * maps.grid[1], -1)
                return output_tensor(adapter.output(module, xs, replaced.to(xj.dtype),
                                                    rows[None].expand(len(replaced), *rows.shape)))

            measured = image_faithfulness(forward, rows, reinit.image(j).rows()[0].float(), grad[j:j + 1], maps.grid,
                                          maps.key_grid, seed=seed + position, values=values,
                                          kinds=other_maps(adapter, module, xj, maps.image(j), rows))
            for key, value in measured.items():
                out.setdefault(f"{name}:{key}", []).append(value)
    return {key: np.asarray(value) for key, value in out.items()}


def other_maps(adapter, module, x: torch.Tensor, maps, rows: torch.Tensor) -> dict | None:
    """{"value", "effect": (N, M)} of every query's row (`vggattn.attention.effect`), or None where the block's keys'
    contributions cannot be read (or its rows have prefix keys: those of the grid only are deleted here)."""
    from ..attention.effect import NotOffered, contributions, effect_all

    if maps.prefix is not None or rows.shape[1] == 1:
        return None
    try:
        u = contributions(adapter, module, x, maps)
    except NotOffered:
        return None
    return {"value": torch.einsum("hnm,hm->nm", rows.abs().double(), u.double().norm(dim=-1)).float(),
            "effect": effect_all(rows, u).float()}


def _ci(values: np.ndarray, n_boot: int, seed: int) -> list[float]:
    return list(paired_bootstrap_ci(values, np.zeros_like(values), n_boot, seed))


def summarise(rec: dict[str, np.ndarray], layers: list[str], n_boot: int, seed: int, ks=KS) -> dict:
    """study.json's "faithfulness" section from the merged per-image records of the images it was measured on (the
    layers it measured: those among `layers` with records)."""
    out = {"images": int(len(rec["index"])), "ks": list(ks), "selections": list(SELECTIONS),
           "definitions": {
               "deletion": "values of the selected k keys replaced by the image's mean value in one query's weighted "
                           "sum; del: |change of that position's block output| / |what attention adds there|; logit: "
                           "|change of the top-1 logit| with only that position changed, to first order (its "
                           "gradient at the block's output times the change); both the mean over all queries (where "
                           "the output is not on the query grid or one map serves every position: the whole output)",
               "selections": "top: the query's own k largest weights; random: k random keys (uniform rows' choice); "
                             "bottom: its k smallest; mean_row: the image's mean row's top k; reinit_qk: the top k "
                             "after re-initialising the parameters that make the logits; value: the top k of what each "
                             "key brings (sum over heads of |weight| x the norm of its value through the output map, "
                             "Kobayashi et al.); effect: the top k by how far the query's output moves when the key "
                             "alone is removed and the rest renormalised (both: the weights' top k where the block's "
                             "keys' contributions cannot be read)",
               "sink": f"nop: the sink term is < {NOP_BELOW} of what attention adds; broadcast: >= {BROADCAST_FROM}; "
                       "value norm: what the sink's value adds when it takes a query's whole attention, against the "
                       "mean over keys",
               "ci": f"percentile bootstrap over images, {n_boot} resamples, seed {seed}"},
           "layers": {}}
    for name in (n for n in layers if f"{n}:sink_mass" in rec):
        layer = {"deletion": {}, "logit": {}}
        for what in ("del", "logit"):
            for sel in SELECTIONS:
                curve = []
                for kk in ks:
                    v = rec[f"{name}:{what}:{sel}:{kk}"]
                    curve.append({"k": kk, "mean": float(v.mean()), "ci95": _ci(v, n_boot, seed)})
                layer["deletion" if what == "del" else "logit"][sel] = curve
        top, rand = rec[f"{name}:del:top:{ks[1]}"], rec[f"{name}:del:random:{ks[1]}"]
        layer["top_minus_random"] = {"k": ks[1], "mean": float((top - rand).mean()), "ci95": _ci(top - rand, n_boot, seed)}
        share, ratio = rec[f"{name}:sink_share"], rec[f"{name}:sink_value_ratio"]
        dominated = rec[f"{name}:sink_mass"] >= 0.5
        layer["sink"] = {"value_norm_ratio": float(ratio.mean()), "value_norm_ratio_ci95": _ci(ratio, n_boot, seed),
                         "output_share": float(share.mean()), "output_share_ci95": _ci(share, n_boot, seed),
                         "sink_dominated_images": int(dominated.sum()),
                         "nop_share": float((share[dominated] < NOP_BELOW).mean()) if dominated.any() else None,
                         "broadcast_share": float((share[dominated] >= BROADCAST_FROM).mean()) if dominated.any() else None}
        out["layers"][name] = layer
    return out
