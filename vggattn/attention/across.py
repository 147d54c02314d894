"""Across a transformer's layers: where the class token's output comes from, three ways, beside rollout
(`vggattn.analysis.attention_rollout`).

    flow = attention_flow(mats, source)            # (T,) Abnar and Zuidema 2020: max-flow over the layer graph
    rel = relevance(model, x, blocks, target)      # (T, T) Chefer et al. 2021: gradient-weighted attention
    square(adapter, module, x, call, w)            # a traced block's weights (event coordinates) as (heads, T, T)

Tokens are in the page's order: the key grid's cells, then the prefix tokens (class, registers). These need every
block to attend over the same T tokens (a ViT); a CNN's blocks change grids and convolutions sit between them: not
offered there (the page and the report say so).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .adapters import TracedAdapter, output_tensor
from .trace import Call, record

FLOW_SCALE = 1_000_000  # capacities as integers (scipy's max-flow takes no floats): weights to 1e-6


def residual_mixed(a: torch.Tensor) -> torch.Tensor:
    """(T, T) a head-mean attention with the residual as Abnar and Zuidema model it: (A + I) / 2, rows renormalised."""
    a = 0.5 * a.double() + 0.5 * torch.eye(a.shape[0], dtype=torch.float64)
    return a / a.sum(-1, keepdim=True)


def attention_flow(mats: list[torch.Tensor], source: int) -> np.ndarray:
    """(T,) Abnar and Zuidema's attention flow from token `source` after the last block to every input token: the
    maximum flow through the layered graph whose edge from token i at layer l + 1 to token j at layer l has the
    capacity `residual_mixed(A_l)[i, j]` (mats: each block's head-mean (T, T) attention, first block first)."""
    try:
        from scipy.sparse import csr_array
        from scipy.sparse.csgraph import maximum_flow
    except ImportError as e:
        raise ImportError(f"attention flow needs scipy: pip install scipy ({e})") from e

    t, layers = mats[0].shape[0], len(mats)
    rows, cols, caps = [], [], []
    for level, a in enumerate(mats):  # edges from layer level + 1 (nodes (level + 1) * t + i) down to layer level
        cap = np.rint(residual_mixed(a).numpy() * FLOW_SCALE).astype(np.int64)
        i, j = np.nonzero(cap)
        rows.append((level + 1) * t + i), cols.append(level * t + j), caps.append(cap[i, j])
    n = (layers + 1) * t
    graph = csr_array((np.concatenate(caps).astype(np.int32), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n, n))
    top = layers * t + source
    return np.array([maximum_flow(graph, top, j).flow_value for j in range(t)], dtype=np.float64) / FLOW_SCALE


def square(adapter: TracedAdapter, module: nn.Module, x: torch.Tensor, call, w: torch.Tensor) -> torch.Tensor:
    """(heads, T, T) a traced block's weights-shaped tensor w (its one attention call's (lead..., nq, nk)) in the
    page's order of queries and keys (grid cells, then prefix tokens)."""
    lay = adapter.layout(module, x, call)
    if len(lay.group) != 1 or lay.windowed or lay.prefix_queries is None or lay.kprefix is None:
        raise ValueError("not one attention over the same tokens")
    flat = w.reshape(-1, *w.shape[-2:])
    m = lay.key_grid[0] * lay.key_grid[1]
    out = []
    for h in range(lay.heads):
        lead = int(lay.lq[h, 0])
        order = torch.cat([lay.iq[h], lay.prefix_queries[h]])  # page's queries -> event rows
        slot = lay.kcell[lead].clone()
        on_prefix = lay.kprefix[lead] >= 0
        slot[on_prefix] = m + lay.kprefix[lead][on_prefix]
        rows = flat[lead, order]  # (T, nk)
        out.append(rows.new_zeros(rows.shape[0], int(slot.max()) + 1).index_copy_(1, slot, rows))
    return torch.stack(out)


def relevance(model: nn.Module, x: torch.Tensor, blocks: list, target: int) -> torch.Tensor:
    """(T, T) float64 Chefer et al. 2021 ("Generic Attention-model Explainability"): R = I, then per block in the
    forward's order R += mean_h (dA/dy_target * A)^+ @ R, A each head's attention, y_target the logit of class
    `target`; row i says how relevant each input token is to token i's output for that class. blocks: (name, module,
    adapter) of traced blocks over the same tokens (`find_blocks`), in order. Each block runs once more inside its
    forward hook with a zero added to its weights (its output is that run's): that zero's gradient is the weights'."""
    leaves: dict[str, tuple] = {}

    def hook(name, adapter):
        def fn(module, args, kwargs, out):
            call = Call.of(args, kwargs, module)
            x_in = call.input
            lay = adapter.layout(module, x_in, call)

            def leaf(w):  # w plus a zero leaf: its gradient is dy/dA with A still made by the block's Q and K
                zero = torch.zeros_like(w, requires_grad=True)
                leaves[name] = (zero, w.detach(), module, x_in.detach(), call)
                return w + zero
            new = record(module, x_in, replace={lay.group[0]: leaf}, call=call)[1]
            return new if isinstance(out, torch.Tensor) else type(out)((output_tensor(new), *out[1:]))
        return fn
    handles = [module.register_forward_hook(hook(name, adapter), with_kwargs=True) for name, module, adapter in blocks]
    try:
        with torch.enable_grad():
            logits = output_tensor(model(x[:1]))
            logits = getattr(logits, "logits", logits)
            grads = torch.autograd.grad(logits[0, target], [leaves[n][0] for n, *_ in blocks if n in leaves])
    finally:
        for h in handles:
            h.remove()
    r = None
    for (name, _, adapter), g in zip([b for b in blocks if b[0] in leaves], grads):
        _, held, module, x_in, call = leaves[name]
        cam = square(adapter, module, x_in, call, (g * held).detach()).double().clamp_min(0).mean(0)  # (T, T)
        r = torch.eye(cam.shape[0], dtype=torch.float64) if r is None else r
        r = r + cam @ r
    return r
