"""What attention takes, not only where it looks: each key's contribution to a query's output, from the same rows.

A block's attention output at query i (after its output projection, before the residual, all heads) is
    o_i = sum_h sum_j a^h_ij u^h_j + b,      u^h_j = W_o^h v^h_j
(v^h_j: key j's value in head h, its bias included; W_o^h: the output projection's part for head h; b its bias).
`contributions` reads U = (u^h_j) for a block once per image; then, per pointed query, from its rows a^h_i.:
- `value_weighted`: sum_h |a^h_ij| ||u^h_j|| (Kobayashi et al. 2020, "Attention is Not Only a Weight": the norm of what
  key j brings, not its weight; summed over heads);
- `effect`: ||o_i - o_i(without j)|| where key j is removed from every head's softmax and the rest renormalised:
  o^h - o^h(without j) = a^h_j / (1 - a^h_j) (u^h_j - o^h), o^h = sum_k a^h_k u^h_k, summed over heads before the
  norm (the bias cancels).

U comes from the block itself: for a block vggattn has an adapter for, its values (`Adapter.values`) through its
output map, read by probing `Adapter.output` on a one-cell input (the map must be linear and position-wise: checked);
for a block read by what it computes, from its own forward with its weights replaced: one forward per head with
each query attending only to the key at its own position (so the output there is u^h of that key), and one with
every weight 0 (the bias). Not offered (with the reason): one map per image (GCNet: its transform is no linear map),
windowed attention, several attention calls in one block, queries and keys that are not the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .adapters import Adapter, CrossAdapter, TracedAdapter, output_tensor
from .trace import record

MAX_HEADS_PROBED = 64  # heads x value channels of an adapter's output map read in one probe batch are at most 64 x Cv


class NotOffered(ValueError):
    """The block's contributions cannot be read (the reason in words)."""


def contributions(adapter: Adapter, module: nn.Module, x: torch.Tensor, maps, call=None) -> torch.Tensor:
    """(heads, M + P, C) float32: u^h_j of every key of the block on image x (batch of one), keys in the page's order
    (the key grid's cells, then the prefix tokens). Raises NotOffered with the reason."""
    if maps.per_image:
        raise NotOffered("one map per image: what the block does with its context is no linear map of it")
    if isinstance(adapter, CrossAdapter):
        raise NotOffered("cross-attention: not offered yet")
    with torch.no_grad():
        try:
            if isinstance(adapter, TracedAdapter):
                return _traced(adapter, module, x[:1], call)
            return _adapted(adapter, module, x[:1])
        except NotOffered:
            raise
        except Exception as e:  # noqa: BLE001 (a block whose output map cannot be probed: said, the page goes on)
            raise NotOffered(f"its output map could not be read ({type(e).__name__}: {e})") from e


def _adapted(adapter: Adapter, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An adapter's block: values (1, heads, M, Cv) through the output map read at a one-cell input."""
    v = adapter.values(module, x)[0].float()  # (heads, M, Cv)
    heads, _, cv = v.shape
    one = torch.zeros(1, x.shape[1], 1, 1, dtype=x.dtype, device=x.device)

    def out(attended):  # (K, heads, 1, Cv) -> (K, C): the output at the one cell, less the input
        k = attended.shape[0]
        rows = torch.ones(k, heads, 1, 1, dtype=attended.dtype, device=attended.device)
        return (output_tensor(adapter.output(module, one.expand(k, -1, -1, -1), attended.to(x.dtype), rows))
                - one).reshape(k, -1).float()
    base = out(torch.zeros(1, heads, 1, cv, device=x.device))
    basis = torch.eye(heads * cv, device=x.device).reshape(heads * cv, heads, 1, cv)
    w = torch.cat([out(basis[s:s + MAX_HEADS_PROBED * cv]) for s in range(0, heads * cv, MAX_HEADS_PROBED * cv)]) - base
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1, heads, 1, cv, generator=g).to(x.device) for _ in range(2))
    if not torch.allclose(out(a + b) - base, (out(a) - base) + (out(b) - base), rtol=1e-3, atol=1e-4 * float(
            w.abs().max().clamp_min(1e-12))):
        raise NotOffered("the block's output is no linear map of its attended values")
    w = w.reshape(heads, cv, -1)  # (heads, Cv, C): W_o^h transposed
    return torch.einsum("hmv,hvc->hmc", v, w)


def _traced(adapter: TracedAdapter, module: nn.Module, x: torch.Tensor, call) -> torch.Tensor:
    """A traced block: its own forward, once with every weight 0 (the bias), then once a head with each query
    attending only to its own key (identity rows)."""
    lay = adapter.layout(module, x, call)
    if len(lay.group) != 1:
        raise NotOffered("its attention runs as several calls (query blocks): not offered yet")
    if lay.windowed:
        raise NotOffered("windowed attention: not offered yet")
    held = adapter.call(x, call, 0)
    rec, _ = record(module, x, call=held)
    ev = rec.events[lay.group[0]]
    w = ev.weights
    nq, nk = w.shape[-2:]
    if nq != nk:
        raise NotOffered("its queries and keys are not the same tokens")
    leads = w.reshape(-1, nq, nk).shape[0]
    heads = lay.heads
    if lay.lq.shape[0] != heads or any(len(set(lay.lq[h].tolist())) != 1 for h in range(heads)) or leads != heads:
        raise NotOffered("its heads do not each hold one whole attention")

    def run(head: int | None) -> torch.Tensor:
        def fn(weights):
            new = torch.zeros_like(weights).reshape(-1, nq, nk)
            if head is not None:
                new[int(lay.lq[head, 0])] = torch.eye(nq, dtype=new.dtype, device=new.device)
            return new.reshape(weights.shape)
        out = output_tensor(record(module, x, replace={lay.group[0]: fn}, call=held)[1]).float()
        if adapter._seq_first(x, call) and out.dim() == 3:
            out = out.transpose(0, 1)
        if out.dim() == 4 and out.shape[-2] * out.shape[-1] == nk:  # a grid (1, C, H, W): its cells in order
            return out[0].flatten(1).T
        if out.dim() == 3 and out.shape[1] == nk:  # tokens (1, T, C) in the keys' order
            return out[0]
        raise NotOffered(f"its output {tuple(out.shape)} does not hold one token per key")
    bias = run(None)
    u = torch.stack([run(h) - bias for h in range(heads)])  # (heads, nk, C): key k's contribution at its own token
    lead = lay.lq[:, 0]
    kcell = lay.kcell[lead[0]]
    m = lay.key_grid[0] * lay.key_grid[1]
    p = 0 if lay.kprefix is None else int(lay.kprefix[lead[0]].max()) + 1
    slot = kcell.clone()
    if lay.kprefix is not None:
        on_prefix = lay.kprefix[lead[0]] >= 0
        slot[on_prefix] = m + lay.kprefix[lead[0]][on_prefix]
    if (slot < 0).any():
        raise NotOffered("some keys fall on padding")
    out = u.new_zeros(heads, m + p, u.shape[-1])
    out[:, slot] = u
    return out


def full_rows(maps, query: int) -> torch.Tensor:
    """(heads, M + P) float64: query `query`'s rows over the key grid, then over the prefix tokens."""
    grid = maps.rows([query], torch.float64)[0, :, 0]
    if maps.prefix is None:
        return grid
    return torch.cat([grid, maps.prefix[0, :, query].double()], -1)


def value_weighted(rows: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(M + P,) sum_h |a^h_j| ||u^h_j|| (rows (heads, M + P), u (heads, M + P, C)): the size of what key j brings
    through each head (a weight is negative only in the dot-product form)."""
    return (rows.double().abs() * u.double().norm(dim=-1)).sum(0)


def effect(rows: torch.Tensor, u: torch.Tensor, normalise: str = "softmax") -> torch.Tensor:
    """(M + P,) ||sum_h a^h_j / (1 - a^h_j) (u^h_j - o^h)||: how far the output moves when key j is removed from every
    head's softmax and each renormalised (a key holding a whole row, every other weight 0, has no rest to
    renormalise: 0 is given). A key
    with over half a row's weight is computed as a_j ||u_j - (the others' weighted mean)||, the same number without
    the cancellation of 1 - a_j and u_j - o near a = 1.
    normalise "mean" (the dot-product non-local form, rows f / M): the mean over the other M - 1 keys instead,
    ||sum_h (M a^h_j u^h_j - o^h) / (M - 1)||."""
    a, u = rows.double(), u.double()
    o = torch.einsum("hm,hmc->hc", a, u)  # (heads, C)
    if normalise == "mean":
        m = a.shape[-1]
        return ((m * a[..., None] * u - o[:, None]) / (m - 1)).sum(0).norm(dim=-1)
    moved = (a / (1 - a))[..., None] * (u - o[:, None])  # (heads, M, C)
    for h in range(a.shape[0]):  # a key holding most of a row: 1 - a and u - o from the other keys, not by subtracting
        j = int(a[h].argmax())
        if a[h, j] > 0.5:
            rest = torch.cat([a[h, :j], a[h, j + 1:]])
            others = torch.cat([u[h, :j], u[h, j + 1:]])
            moved[h, j] = a[h, j] * (u[h, j] - rest @ others / rest.sum()) if rest.sum() > 0 else 0.0
    return moved.sum(0).norm(dim=-1)


def effect_all(rows: torch.Tensor, u: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """(N, M) `effect` of every query's row (rows (heads, N, M) softmax rows over the grid's keys, u (heads, M, C)).
    One head: |c| sqrt(||u_j||^2 - 2 u_j . o_q + ||o_q||^2) from matrix products, the key holding over half a row
    from the others' weighted mean (as `effect`); several heads: directly, queries a chunk at a time."""
    a, u = rows.double(), u.double()
    heads, n, m = a.shape
    o = a @ u  # (heads, N, C)
    if heads > 1:
        out = []
        step = max(1, chunk // max(1, m * u.shape[-1]))
        for s in range(0, n, step):
            part = a[:, s:s + step]
            c = part / (1 - part)
            moved = c[..., None] * (u[:, None] - o[:, s:s + step, None])  # (heads, q, M, C)
            dom = part > 0.5
            if dom.any():
                h, q, j = dom.nonzero(as_tuple=True)
                rest = part.clone()
                rest[h, q, j] = 0
                means = torch.einsum("hqm,hmc->hqc", rest, u) / rest.sum(-1, keepdim=True).clamp_min(1e-300)
                moved[h, q, j] = part[h, q, j, None] * (u[h, j] - means[h, q])
            out.append(moved.sum(0).norm(dim=-1))
        return torch.cat(out)
    a0, u0, o0 = a[0], u[0], o[0]
    sq = ((u0 * u0).sum(-1)[None] - 2 * o0 @ u0.T + (o0 * o0).sum(-1, keepdim=True)).clamp_min(0)  # (N, M)
    out = (a0 / (1 - a0)).abs() * sq.sqrt()
    top, at = a0.max(-1)
    q = (top > 0.5).nonzero(as_tuple=True)[0]
    if len(q):
        rest = a0[q].clone()
        rest[torch.arange(len(q)), at[q]] = 0
        s = rest.sum(-1, keepdim=True)
        means = (rest @ u0) / s.clamp_min(1e-300)
        exact = top[q] * (u0[at[q]] - means).norm(dim=-1)
        out[q, at[q]] = torch.where(s[:, 0] > 0, exact, torch.zeros_like(exact))
    return out
