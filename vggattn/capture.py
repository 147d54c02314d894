"""Every attention block's maps on a batch, in one forward: the Python user's way in beside `analyze` (one photo).

    output, maps = vggattn.capture(model, x)          # x: (B, 3, H, W); any model, any block vggattn finds
    for name, m in maps.items():                       # in module order
        rows = m.rows()                                # (B, heads, N, M): each query's weights over the key cells
        m.grid, m.key_grid, m.prefix_names, m.prefix, m.gamma
                                                       # cross-attention: m.query_names (object queries) or m.key_names

The model runs once under `no_grad` with each block's attention recorded as it computes it (`trace.watch`); rows
are computed on demand; no hook stays on the model afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .attention.adapters import BlockMaps, CrossAdapter, TracedAdapter, find_blocks, locate_tokens
from .attention.trace import Event, watch
from .models.output import image_model


@dataclass
class Maps:
    """One block's attention on a batch."""

    name: str
    maps: BlockMaps
    gamma: float | None  # the block's learned residual scale, where it has one

    def rows(self, queries: list[int] | None = None) -> torch.Tensor:
        """(B, heads, N, M): the rows of the given query cells (all when None) over the key grid's M cells, row-major;
        one map per image (GCNet): (B, heads, 1, M)."""
        return self.maps.rows(queries)

    @property
    def grid(self) -> tuple[int, int]:
        """The queries' grid (h, w) on the image."""
        return self.maps.grid

    @property
    def key_grid(self) -> tuple[int, int]:
        """The keys' grid (pooled or spatially reduced keys: coarser than `grid`)."""
        return self.maps.key_grid

    @property
    def prefix_names(self) -> list[str] | None:
        """The tokens with no place on the image (class token, registers), by the parameter they come from."""
        return self.maps.prefix_names

    @property
    def prefix(self) -> torch.Tensor | None:
        """(B, heads, N, P): each row's weight on each prefix token (None where the block has none)."""
        return self.maps.prefix

    @property
    def query_names(self) -> list[str] | None:
        """Cross-attention: the tokens that are the queries ("query 3": a detector's object query), each looking at
        the key grid; rows (B, heads, T, M). None where the queries are the image's places."""
        return self.maps.query_names

    @property
    def key_names(self) -> list[str] | None:
        """Cross-attention: the tokens that are the keys (a prompt's words), looked at from each place of `grid`;
        rows (B, heads, N, T). None where the keys are the image's places."""
        return self.maps.key_names

    @property
    def meaning(self) -> str:
        return self.maps.meaning


def _per_image(events: list[Event], batch: int) -> list[list[Event]] | None:
    """A batch's events as each image's (leads split evenly, the batch outermost, as the blocks lay it out); None
    where an event's leads do not split by the batch."""
    out = [[] for _ in range(batch)]
    for ev in events:
        lead = (ev.held if ev.held is not None else ev.lse[..., None]).shape[:-2]  # a fused call's: its lse's
        L = int(torch.Size(lead).numel())
        if L % batch:
            return None
        flat = lambda t: None if t is None else t.expand(*lead, *t.shape[-2:]).reshape(L, *t.shape[-2:])  # noqa: E731
        w, v, q, k = flat(ev.held), flat(ev.values), flat(ev.query), flat(ev.key)
        lse = None if ev.lse is None else ev.lse.reshape(L, -1)
        step = L // batch
        for j in range(batch):
            cut = lambda t: None if t is None else t[j * step:(j + 1) * step]  # noqa: E731
            out[j].append(Event(ev.kind, cut(w), cut(v), cut(q), cut(k), ev.scale, ev.additive,
                                ev.normalised_over_keys, ev.qk_modules, cut(lse)))
    return out


def _stack(parts: list[BlockMaps]) -> BlockMaps:
    """Per-image maps of one block as one batch."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    window = None if first.window is None else (torch.cat([p.window[0] for p in parts]),
                                                torch.cat([p.window[1] for p in parts]))
    tokens = None if first.tokens_qk is None else (torch.cat([p.tokens_qk[0] for p in parts]),
                                                   torch.cat([p.tokens_qk[1] for p in parts]))
    stats = None if first.token_stats is None else (torch.cat([p.token_stats[0] for p in parts]), None)
    return BlockMaps(first.family, cat("query"), cat("key"), first.grid, first.key_grid, first.scale, cat("bias"),
                     first.normalise, first.meaning, cat("weights"), cat("padding"), window, cat("prefix"),
                     first.prefix_names, cat("prefix_rows"), tokens, stats, first.query_names, first.key_names)


@torch.no_grad()
def capture(model: nn.Module, x: torch.Tensor, layers: list[str] | None = None) -> tuple[torch.Tensor, dict[str, Maps]]:
    """(the model's output on x, {block name: its `Maps`} in module order) from one forward of x (B, C, H, W). A
    model whose forward returns a ModelOutput, dict or dataclass gives its logits (else its embedding). layers: the
    blocks by name (default: every block found)."""
    from .analysis import block_gamma

    model = image_model(model, x[:1])
    blocks = find_blocks(model, layers, example=x[:1], cross=True)
    cross = {name for name, _, adapter in blocks if isinstance(adapter, CrossAdapter)}
    traced = {name for name, _, adapter in blocks if isinstance(adapter, TracedAdapter)} | cross
    output, seen = watch(model, x, [name for name, *_ in blocks], traced, every_argument=cross)
    locate_tokens(model, x, blocks, {name: s.input for name, s in seen.items() if s.input is not None})
    out = {}
    for name, module, adapter in blocks:
        if name not in seen:  # a block the forward did not run
            continue
        kept = seen[name]
        if name in cross:
            images = _per_image(kept.events, len(x)) if len(x) > 1 else [kept.events]
            lay = adapter.layout(module, kept.input, kept.call)
            maps = adapter._maps(lay, images) if images is not None else adapter.maps(module, kept.input,
                                                                                      call=kept.call)
        elif name in traced:
            lay = adapter.layout(module, kept.input, kept.call)
            images = _per_image(kept.events, len(x)) if len(x) > 1 else [kept.events]
            if images is not None and all(len(e) > max(lay.group) for e in images):
                maps = _stack([adapter._maps(lay, [e]) for e in images])
            else:  # leads that do not split by image: the block again, image by image
                maps = adapter.maps(module, kept.input, call=kept.call)
        else:
            maps = adapter.maps(module, kept.input)
        if name in cross:
            _name_tokens(model, name, maps)
        out[name] = Maps(name, maps, block_gamma(module))
    return output, out


def _name_tokens(model: nn.Module, block: str, maps: BlockMaps) -> None:
    """SAM's mask decoder's tokens by what they are: its output tokens are its `iou_token` then its `mask_tokens`
    (learned embeddings, in that order), then the prompt's tokens (points, boxes); read from the module around the
    block that holds both embeddings."""
    names = maps.query_names or maps.key_names
    parts = block.split(".")
    for n in range(len(parts) - 1, -1, -1):
        holder = model.get_submodule(".".join(parts[:n])) if n else model
        iou, masks = getattr(holder, "iou_token", None), getattr(holder, "mask_tokens", None)
        if isinstance(iou, nn.Embedding) and isinstance(masks, nn.Embedding):
            k = iou.num_embeddings + masks.num_embeddings
            if len(names) >= k:
                new = ["IoU token"] * iou.num_embeddings + [f"mask token {i}" for i in range(masks.num_embeddings)] + \
                    [f"prompt token {i}" for i in range(len(names) - k)]
                names[:] = new
            return
