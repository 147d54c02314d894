"""Attention between the image and other tokens, read by what the code computes: one side on the image's grid, the
other a list of tokens with no place on it (a detector's object queries, a prompt's words, SAM's mask tokens).

    places = call_places(model, x, names)               # {block: {argument: TokenPlaces}} of its token arguments
    lay = cross_layout(block, call, places[name])        # which side sits on the grid, which side is tokens
    maps = CrossAdapter(block, places[name]).maps(block, x, events, call)   # BlockMaps: query_names or key_names

A block is read here when its own input (first tensor argument) has no place on the image but another of its
arguments has (DETR's decoder: the object queries attend to `encoder_hidden_states`), or the other way round. Every
tensor argument of the block's call is live for the trace (the keys come from one argument, the queries from
another); where each side sits is read from forward-mode tangents, as for self-attention
(`vggattn.attention.trace`): the placed argument carries its tokens' places, the other side carries none. Places
are read on the grid of the innermost module around the block whose input is a grid and whose tokens are that grid
flattened (`enclosing_places`: a UNet's transformer, SAM's mask decoder), else through the whole model from its
input image (`call_places`: DETR's encoder output). Tokens come as (B, T, C), or (B, 1, T, C) in one group (SAM's
per point batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

from .trace import (Call, Masses, NotAttention, Recorder, TokenPlaces, _input_tangents, _tensors, event_groups,
                    grid_cells, placing_passes, positions, prepare_forward_ad)


def _slots(call: Call) -> list[tuple[int | str, torch.Tensor]]:
    """The call's tensor arguments: (position or keyword, tensor)."""
    return [(i, a) for i, a in enumerate(call.args) if isinstance(a, torch.Tensor)] + \
        [(k, v) for k, v in call.kwargs.items() if isinstance(v, torch.Tensor)]


def _tokens(t: torch.Tensor | None) -> torch.Tensor | None:
    """A token argument as (B, T, C): itself, or (B, 1, T, C) with its one group squeezed (SAM's tokens come per
    point batch); None for anything else."""
    if t is None or t.dim() == 3:
        return t
    if t.dim() == 4 and t.shape[1] == 1:
        return t[:, 0]
    return None


def _with(call: Call, values: dict) -> tuple[tuple, dict]:
    """(args, kwargs) of the call with the given slots replaced."""
    return (tuple(values.get(i, a) for i, a in enumerate(call.args)),
            {k: values.get(k, v) for k, v in call.kwargs.items()})


def call_places(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, dict[int | str, TokenPlaces]]:
    """Where the tokens of each named block's token arguments (B, T, C), every one, positional or keyword, sit on the
    model's input image x: forward-mode tangents of the image's coordinates through the model, every attention's
    output given no tangent (`vggattn.attention.trace.token_places`, for all of a call's arguments, not only its
    first). An argument none of whose tokens has a place is left out."""
    prepare_forward_ad()
    passes, hw = placing_passes(model, x, names, lambda call: None if call is None or call.seq_first else
                                {s: _tokens(fwAD.unpack_dual(a).tangent) for s, a in _slots(call)
                                 if _tokens(a) is not None}, calls=True)
    out: dict[str, dict] = {}
    for name, slots in passes[0].items():
        for slot in slots:
            ts = [p.get(name, {}).get(slot) for p in passes]
            if any(t is None for t in ts):
                continue
            pos = positions(*(t[0] for t in ts))
            if bool(pos.valid.any()):
                out.setdefault(name, {})[slot] = TokenPlaces(pos, hw)
    return out


def cross_events(block: nn.Module, call: Call) -> list:
    """The attention events of one run of the block's own code on the call (one image), every tensor argument live."""
    args, kwargs = call.args, call.kwargs
    rec = Recorder(_tensors(args) + _tensors(kwargs))
    with torch.no_grad(), rec:
        block.forward(*args, **kwargs)
    return rec.events


def enclosing_places(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, dict[int | str, TokenPlaces]]:
    """Where the tokens of each named block's token arguments sit on the grid of the innermost module around it
    whose input is a grid (1, C, H, W) (a diffusion UNet's transformer over the latent at that resolution): that
    module run alone with forward-mode tangents of its own grid's coordinates (norms held constant, every
    attention's output given none, as `call_places` does for the whole model). Exact where the tokens are that
    grid flattened, which a trace through the whole model is not: an upsampled grid's tokens sit between its
    source cells and the skip connection's. Blocks with no such module around them (other than the model itself)
    are left out."""
    from .trace import Watch, _Enough, watch

    modules = dict(model.named_modules())
    around = {n: [a for a in (n.rsplit(".", k)[0] for k in range(1, n.count(".") + 1)) if a in modules]
              for n in names}
    wanted = sorted({a for v in around.values() for a in v})
    if not wanted:
        return {}
    _, seen = watch(model, x[:1], wanted)
    out: dict[str, dict] = {}
    for name in names:
        for a in around[name]:
            s = seen.get(a)
            if s is None or s.call is None or s.input.dim() != 4 or s.input.shape[0] != 1 or s.call.seq_first:
                continue
            grid_input = s.input
            inputs, hw, _ = _input_tangents(grid_input, None)
            rel, passes, masses = name[len(a) + 1:], [], Masses()
            with torch.no_grad(), fwAD.dual_level():
                for i, t in enumerate(inputs):
                    if i:
                        masses.next_pass()
                    dual = fwAD.make_dual(grid_input, t.contiguous())
                    args, kwargs = s.call.with_input(dual)
                    with Recorder([dual], keep=False, tangents=True, drop_attended=True, masses=masses), \
                            Watch(modules[a], [rel], keep_graph=True, until_seen=True) as w:
                        try:
                            modules[a].forward(*args, **kwargs)
                        except _Enough:
                            pass
                    call = w.seen[rel].call if rel in w.seen else None
                    passes.append({} if call is None else {slot: _tokens(fwAD.unpack_dual(v).tangent)
                                                            for slot, v in _slots(call) if _tokens(v) is not None})
            places = {}
            for slot in passes[0]:
                ts = [p.get(slot) for p in passes]
                if all(t is not None for t in ts):
                    pos = positions(*(t[0] for t in ts))
                    if bool(pos.valid.any()):
                        places[slot] = TokenPlaces(pos, hw)
            # the module's grid is the tokens' own where one argument holds every cell of it (that grid flattened);
            # else (a module fed tokens as (B, 1, T, C), read as a grid) look further out
            if any(int(p.positions.valid.sum()) == hw[0] * hw[1] for p in places.values()):
                out[name] = places
                break
    return out


@dataclass
class CrossLayout:
    """How one attention between the image's places and other tokens lies: rows (heads, nq, nk) of its weights,
    one side on a grid of the model's input image, the other tokens in their order."""

    group: list[int]  # the events that make it (one)
    grid: tuple[int, int]  # the placed side's grid on the image
    heads: int
    cells: torch.Tensor  # (heads, n) the grid cell of each placed token (-1: a placed-side token with no place)
    tokens: int  # how many tokens the other side has
    queries_placed: bool  # True: queries on the grid, keys tokens (a latent looking at words); False: the other way
    kind: str
    meaning: str
    qk_modules: tuple[str, ...]


def cross_layout(block: nn.Module, call: Call, places: dict[int | str, TokenPlaces], attention: int = 0
                 ) -> CrossLayout:
    """The layout of the block's attention number `attention` as the model calls it (`call`, image 0 of its
    batch), with `places` of its token arguments (`call_places`). Raises NotAttention where neither side, or both,
    sit on the image."""
    one = call.sliced(slice(0, 1)).detached()
    slots = dict(_slots(one))
    placed = {s: p for s, p in places.items() if s in slots and _tokens(slots[s]) is not None
              and p.positions.y.shape[-1] == _tokens(slots[s]).shape[1]}
    if not placed:
        raise NotAttention("neither its queries nor its keys sit on the image (none of its token arguments does)")
    tangents = {s: [t.reshape(slots[s].shape) for t in _input_tangents(_tokens(slots[s]), p)[0]]
                for s, p in placed.items()}
    hw = next(iter(placed.values())).hw
    passes = []
    masses = Masses()
    with torch.no_grad(), fwAD.dual_level():
        for i in range(3):
            if i:
                masses.next_pass()
            duals = {s: fwAD.make_dual(slots[s], tangents[s][i].contiguous()) for s in placed}
            args, kwargs = _with(one, duals)
            rec = Recorder(_tensors(args) + _tensors(kwargs), tangents=True, masses=masses)
            with rec:
                block.forward(*args, **kwargs)
            tan = lambda z: None if z is None else fwAD.unpack_dual(z).tangent  # noqa: E731
            passes.append([(ev, tan(ev.query), tan(ev.values)) for ev in rec.events])
    events = [p[0] for p in passes[0]]
    # a softmax's only: with every argument live, a product of a concatenation (Conditional DETR's queries, content
    # and position side by side) with the keys looks like the concatenation form, and is the logits
    groups = [g for g in event_groups(events) if events[g[0]].kind in ("softmax", "sdpa")]
    if attention >= len(groups):
        raise NotAttention("its forward computes no softmax attention")
    group = groups[attention]
    if len(group) != 1:
        raise NotAttention("its attention is computed in pieces (query blocks), which cross-attention does not read yet")
    ev = passes[0][group[0]][0]

    def pos(k):  # the side's positions (L, n), None where it carries no tangent
        ts = [p[group[0]][k] for p in passes]
        if any(t is None for t in ts):
            return None
        lead = ev.weights.shape[:-2]
        return positions(*(t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:]) for t in ts))

    kpos, qpos = pos(2), pos(1)
    keys_on = kpos is not None and bool(kpos.valid.any())
    queries_on = qpos is not None and bool(qpos.valid.any())
    if keys_on == queries_on:
        raise NotAttention("both its queries and its keys sit on the image (self-attention)" if keys_on else
                           "neither its queries nor its keys sit on the image")
    side = kpos if keys_on else qpos
    cells, grid, _ = grid_cells(side, hw, "keys" if keys_on else "queries", 32)
    weights = ev.weights
    L, nq, nk = int(torch.Size(weights.shape[:-2]).numel()), *weights.shape[-2:]
    over_keys = bool(ev.normalised_over_keys)
    meaning = ("attention weights: softmax over the keys, each row sums to 1" if over_keys else
               "the weights with which each key's value enters the query's output (normalised over another axis)")
    meaning += (": the image's places (queries) over the other tokens (keys)" if queries_on else
                ": the other tokens (queries) over the image's places (keys)")
    return CrossLayout(group, tuple(grid), L, cells.reshape(L, -1), nk if queries_on else nq, queries_on, ev.kind,
                       meaning + ".", ev.qk_modules)


def cross_maps(lay: CrossLayout, per_image: list[list], token_names: list[str]) -> dict:
    """The fields of `vggattn.attention.adapters.BlockMaps` from the events of each image: rows (B, heads, T, M) for
    tokens looking at the grid, (B, heads, N, T) for the grid's places looking at tokens; a share of a row on
    placed-side tokens with no place is `padding`."""
    m = lay.grid[0] * lay.grid[1]
    rows, pads = [], []
    for events in per_image:
        w = events[lay.group[0]].weights
        w = w.reshape(-1, *w.shape[-2:]).float()  # (heads, nq, nk)
        on = lay.cells >= 0
        if lay.queries_placed:  # (heads, N, T): each cell's row over the tokens
            r = w.new_zeros(lay.heads, m, w.shape[-1])
            for h in range(lay.heads):
                r[h, lay.cells[h][on[h]]] = w[h][on[h]]
            rows.append(r)
            pads.append(None)
        else:  # (heads, T, M): each token's row over the cells
            cells = lay.cells[:, None, :].expand_as(w)
            ok = on[:, None, :].expand_as(w)
            rows.append(w.new_zeros(*w.shape[:2], m).scatter_add_(-1, cells.clamp_min(0), w * ok))
            pads.append((w * ~ok).sum(-1))
    padding = None if lay.queries_placed or not bool((lay.cells < 0).any()) else torch.stack(pads)
    grid = lay.grid if lay.queries_placed else (1, lay.tokens)
    key_grid = (1, lay.tokens) if lay.queries_placed else lay.grid
    return dict(query=None, key=None, grid=grid, key_grid=key_grid, normalise="weights", meaning=lay.meaning,
                weights=torch.stack(rows), padding=padding, query_names=None if lay.queries_placed else token_names,
                key_names=token_names if lay.queries_placed else None)
