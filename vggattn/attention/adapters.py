"""One way in to any CNN's non-local attention: an adapter per block family.

    adapter = adapter_for(block)                  # by family; None for a module that is no attention block
    maps = adapter.maps(block, x)                 # from the block's input x: queries, keys, grids, logit terms
    maps.rows()                                   # (B, heads, N, M): each query's weights over the M keys
    adapter.forward(block, x)                     # the block's own output, recomputed from those rows
    adapter.forward(block, x, mode="mean")        # with every row replaced: "off", "mean" or "uniform"
    find_blocks(model)                            # [(name, module, adapter)] of every known block, in order

An adapter says, per image and head: the queries (one per position of the query grid) and the keys (one per
position of the key grid, smaller when keys are pooled), the extra logit terms (a scale, relative-position
logits), how rows are normalised (softmax; Wang et al.'s dot-product form divides by M instead), how the
attended values enter the output (γ, an output conv, a norm), and what "off" means for the block. Every
family is tested against its block's own forward (tests/test_adapters.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..models.families import BigGANAttention, NonLocalBlock2D, SelfAttn
from ..models.vgg import GlobalAttention, mean_attention_row
from .trace import (Call, Layout, NotAttention, TokenPlaces, discover, name_prefix, record, sequence_first,
                    token_places)

log = logging.getLogger("vggattn.attention.adapters")

MODES = ("off", "mean", "uniform")
# A transformer's interventions on its prefix tokens (blocks of tokens found by tracing, one attention call each):
TOKEN_MODES = {
    "no_registers": "no token attends to the registers: their weights set to 0, each row renormalised over the rest",
    "cls_mean": "the class token's own row replaced by the mean of the patches' rows (its own keys' order)",
}


def is_register(name: str) -> bool:
    """A prefix token named from a register parameter (timm's reg_token, transformers' register_tokens)."""
    return "reg" in name.split(".")[-1].lower()


def is_class_token(name: str) -> bool:
    return "cls" in name.split(".")[-1].lower()


def token_modes(blocks: list) -> list[str]:
    """The `TOKEN_MODES` that apply to these blocks (`find_blocks`' triples): their prefix tokens, by name."""
    names = {n for _, _, a in blocks for p in getattr(a, "places", {}).values() for n in (p.names or [])}
    return [m for m, applies in (("no_registers", any(map(is_register, names))),
                                 ("cls_mean", any(map(is_class_token, names)))) if applies]


class NoAttention(ValueError):
    """The model computes no attention over the image's positions that vggattn can read."""


@dataclass
class BlockMaps:
    """What one block attends to on a batch: rows = normalise(scale * Q K^T + bias)."""

    family: str
    query: torch.Tensor | None  # (B, heads, N, C'); None when one map serves every position (GCNet) or with weights
    key: torch.Tensor | None  # (B, heads, M, C'); with query None: the map's logits (B, 1, 1, M); None with weights
    grid: tuple[int, int]  # (h, w) of the queries
    key_grid: tuple[int, int]  # (hk, wk) of the keys (pooled keys: half the size)
    scale: float = 1.0
    bias: torch.Tensor | None = None  # (B, heads, N, M) logits added after the scale (relative positions)
    normalise: str = "softmax"  # "softmax", or "mean": (scale * Q K^T) / M, Wang et al.'s dot-product form; with
    # weights: "softmax" where each row is a distribution over the key cells, "weights" where it need not be
    meaning: str = "attention weights: softmax over the key positions, each row sums to 1"
    weights: torch.Tensor | None = None  # (B, heads, N or 1, M): the rows themselves (blocks found by tracing)
    padding: torch.Tensor | None = None  # (B, heads, N or 1): each row's share on keys that fall on padding
    window: tuple[torch.Tensor, torch.Tensor] | None = None  # windowed rows, sparse: (values, key cells), each
    # (B, heads, N, K): a row's K keys (its window) and where they fall (-1: padding); instead of weights
    prefix: torch.Tensor | None = None  # (B, heads, N, P) tokens: each row's weight on each prefix token (no place)
    prefix_names: list[str] | None = None  # their names ("cls_token", "reg_token[0]", ...)
    prefix_rows: torch.Tensor | None = None  # (B, heads, P, M + P) each prefix token's own row: its weights on the
    # key grid, then on the prefix tokens (the class token's row over the patches: DINO's view)
    tokens_qk: tuple[torch.Tensor, torch.Tensor] | None = None  # tokens whose every row is softmax(scale Q K^T):
    # Q (B, heads, N + P, d) with the scale in it and K (B, heads, M + P, d), grid cells first, then the prefix tokens
    token_stats: tuple[torch.Tensor, torch.Tensor | None] | None = None  # tokens read from a fused kernel (no weights
    # held): (log Z of every row (B, heads, N + P) float64, the rows' sum over all N + P queries (B, heads, M + P)
    # float64, None until `token_sums` makes it)
    query_names: list[str] | None = None  # cross-attention: the queries are these tokens, not places (grid (1, T));
    # rows (B, heads, T, M) over the key grid (`vggattn.attention.cross`)
    key_names: list[str] | None = None  # cross-attention: the keys are these tokens (key_grid (1, T))

    @property
    def lean(self) -> bool:
        """Tokens whose rows are not held: each is made from `tokens_qk` when asked for."""
        return self.weights is None and self.tokens_qk is not None

    @property
    def heads(self) -> int:
        held = self.tokens_qk[1] if self.lean else self.key if self.weights is None and self.window is None else \
            self.weights if self.weights is not None else self.window[0]
        return held.shape[1]

    @property
    def per_image(self) -> bool:
        """True for a map no query changes (one per image and head), like GCNet's global context."""
        return self.query is None and self.window is None and not self.lean and \
            (self.weights is None or self.weights.shape[2] == 1)

    def rows(self, queries: list[int] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, heads, Q, M) rows of the given query positions (all when None); per_image maps: (B, heads, 1, M).
        dtype: of the logits and the normalisation (float64: the dot-product form's f / M without cancellation)."""
        if self.weights is not None:
            w = self.weights if queries is None or self.per_image else self.weights[:, :, torch.as_tensor(queries)]
            return w.to(dtype)
        if self.lean:  # the grid's part of each softmax over the grid's and the prefix tokens' keys
            n, m = self.grid[0] * self.grid[1], self.key_grid[0] * self.key_grid[1]
            q, k = self.tokens_qk[0][:, :, :n], self.tokens_qk[1].to(dtype)
            q = (q if queries is None else q[:, :, torch.as_tensor(queries, dtype=torch.long)]).to(dtype)
            return torch.softmax(q @ k.transpose(-1, -2), dim=-1)[..., :m]
        if self.window is not None:  # scattered onto the key grid, only the rows asked for
            values, cells = self.window if queries is None else (t[:, :, torch.as_tensor(queries)] for t in self.window)
            m = self.key_grid[0] * self.key_grid[1]
            on = cells >= 0
            return values.new_zeros(*values.shape[:3], m, dtype=dtype).scatter_add_(
                -1, cells.clamp_min(0), values.to(dtype) * on)
        if self.query is None:
            return torch.softmax(self.key.float().to(dtype), dim=-1)
        q = self.query if queries is None else self.query[:, :, torch.as_tensor(queries, dtype=torch.long)]
        logits = self.scale * (q.float().to(dtype) @ self.key.float().to(dtype).transpose(-1, -2))  # (B, heads, Q, M)
        if self.bias is not None:
            logits = logits + (self.bias if queries is None else self.bias[:, :, torch.as_tensor(queries)]).float().to(dtype)
        if self.normalise == "softmax":
            return torch.softmax(logits, dim=-1)
        return logits / logits.shape[-1]

    def token_sums(self) -> torch.Tensor:
        """(B, heads, M + P) float64: every row (the grid's and the prefix tokens') summed over the queries, of tokens
        read from a fused kernel: a second fused call with queries and keys swapped (log sum_i exp(q_i . k_j - log
        Z_i) is key j's log normaliser over the queries), made on first use (the page's sink; capture never asks)."""
        log_z, sums = self.token_stats
        if sums is None:
            q, k = self.tokens_qk[0].float(), self.tokens_qk[1].float()  # (B, heads, N + P, d), (B, heads, M + P, d)
            one = torch.ones(1, dtype=q.dtype).expand(*k.shape[:-1], 1)
            swapped_q = torch.cat([k, one], -1)  # keys as queries
            swapped_k = torch.cat([q, -log_z.float()[..., None]], -1)  # queries as keys, each less its log Z
            _, log_sums = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                swapped_q, swapped_k, torch.ones_like(swapped_k), 0.0, False, scale=1.0)
            sums = log_sums.double().exp()
            self.token_stats = (log_z, sums)
        return sums

    def image(self, j: int) -> "BlockMaps":
        """The maps of image j of the batch alone (a batch of one)."""
        pick = lambda t: None if t is None else t[j:j + 1]  # noqa: E731
        return BlockMaps(self.family, pick(self.query), pick(self.key), self.grid, self.key_grid, self.scale,
                         pick(self.bias), self.normalise, self.meaning, pick(self.weights), pick(self.padding),
                         None if self.window is None else (pick(self.window[0]), pick(self.window[1])),
                         pick(self.prefix), self.prefix_names, pick(self.prefix_rows),
                         None if self.tokens_qk is None else (pick(self.tokens_qk[0]), pick(self.tokens_qk[1])),
                         None if self.token_stats is None else (pick(self.token_stats[0]), pick(self.token_stats[1])),
                         self.query_names, self.key_names)

    def mean_row(self, block_elements: int = 1 << 22) -> torch.Tensor:
        """(B, heads, 1, M): the query-averaged row, a block of query rows at a time (never all N x M at once)."""
        if self.per_image:
            return self.rows()
        if self.weights is not None:
            return self.weights.mean(2, keepdim=True)
        if self.lean and self.token_stats is not None:  # every query's sum, less the prefix tokens' own rows
            n, m = self.grid[0] * self.grid[1], self.key_grid[0] * self.key_grid[1]
            grid_sum = self.token_sums()[..., :m] - self.prefix_rows[..., :m].double().sum(2)
            return (grid_sum / n).to(self.tokens_qk[0].dtype)[:, :, None]
        if self.window is not None:  # every row's window summed onto the grid, / N
            values, cells = self.window
            m, n = self.key_grid[0] * self.key_grid[1], values.shape[2]
            flat = values.new_zeros(*values.shape[:2], m).scatter_add_(
                -1, cells.clamp_min(0).flatten(2), (values * (cells >= 0)).flatten(2))
            return (flat / n)[:, :, None]
        B, heads, n = self.query.shape[:3]
        step = max(1, block_elements // (B * heads * self.key.shape[2]))
        total = sum(self.rows(list(range(s, min(n, s + step)))).sum(2, keepdim=True) for s in range(0, n, step))
        return total / n


def tokens(t: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """(B, heads * C, h, w) -> (B, heads, h * w, C)."""
    B, C, h, w = t.shape
    return t.reshape(B, heads, C // heads, h * w).transpose(-1, -2)


def _grid(t: torch.Tensor) -> tuple[int, int]:
    return tuple(t.shape[-2:])


class Adapter:
    """Base: subclasses give `maps`, `values` and `output`; `forward` puts them together."""

    family = "?"
    residual = "?"  # how the attended values enter the block's output, in words
    off_means = "the block returns its input x"
    qk_modules: tuple[str, ...] = ()  # the submodules whose parameters make the logits (the sanity check's)
    # the block's own forward computes its rows as softmax(logits of `maps`) over the last axis, a row per query in
    # query order (on the CPU without autograd at least): its log normalisers and mean row are then read as it runs
    # (`vggattn.attention.trace.RowSums`), not computed again
    softmax_rows = False

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def maps(self, module: nn.Module, x: torch.Tensor) -> BlockMaps:
        raise NotImplementedError

    def values(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, M, Cv): what each key position contributes."""
        raise NotImplementedError

    def output(self, module: nn.Module, x: torch.Tensor, attended: torch.Tensor, rows: torch.Tensor):
        """The block's output from its input and the attended values (B, heads, N, Cv) (or (B, heads, 1, Cv))."""
        raise NotImplementedError

    def off(self, module: nn.Module, x: torch.Tensor):
        return x

    def forward(self, module: nn.Module, x: torch.Tensor, mode: str | None = None, rows: torch.Tensor | None = None):
        """The block's output, with its rows as computed (mode None), replaced by `rows`, or by an intervention:
        "off" (see `off_means`), "mean" (every row the image's mean row: GCNet's query-independent block),
        "uniform" (every row 1/M: average pooling of the values)."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "off":
            return self.off(module, x)
        maps = self.maps(module, x)
        if mode == "mean":  # one row for every query: the context is computed once, in bounded memory
            rows = maps.mean_row()
        elif mode == "uniform":
            m = maps.key.shape[-1] if maps.per_image else maps.key.shape[2]  # per-image maps hold (B, 1, 1, M) logits
            rows = torch.full((*maps.key.shape[:2], 1, m), 1.0 / m, device=x.device)
        elif rows is None:
            rows = maps.rows()
        attended = rows @ self.values(module, x).to(rows.dtype)  # (B, heads, N or 1, Cv)
        if attended.shape[2] == 1 and not maps.per_image:
            n = maps.grid[0] * maps.grid[1]
            attended, rows = attended.expand(-1, -1, n, -1), rows.expand(-1, -1, n, -1)
        return self.output(module, x, attended.to(x.dtype), rows)


class GlobalAttentionAdapter(Adapter):
    family = "vggattn GlobalAttention (the article's)"
    qk_modules = ("conv_query", "conv_key")
    residual = "x + γ · out"
    softmax_rows = True

    def matches(self, module):
        return isinstance(module, GlobalAttention)

    def maps(self, module, x):
        q, k = module.conv_query(x), module.conv_key(x)
        if module.query_averaged:
            rows = mean_attention_row(tokens(q)[:, 0], tokens(k)[:, 0])[:, None, None]  # (B, 1, 1, N), row blocks
            return BlockMaps("global-attention (query-averaged)", None, torch.log(rows.clamp_min(1e-30)), _grid(x),
                             _grid(x), meaning="the image's query-averaged row: one map for every position")
        return BlockMaps("global-attention", tokens(q), tokens(k), _grid(x), _grid(x))

    def values(self, module, x):
        return tokens(module.conv_value(x))

    def output(self, module, x, attended, rows):
        B, C, H, W = x.shape
        out = attended[:, 0].transpose(1, 2)  # (B, C, N or 1)
        out = out.reshape(B, C, H, W) if out.shape[-1] == H * W else out.reshape(B, C, 1, 1)
        return x + module.gamma * out


class SelfAttnAdapter(Adapter):
    family = "SAGAN Self_Attn"
    qk_modules = ("query_conv", "key_conv")
    residual = "γ · out + x; forward returns (out, attention)"
    off_means = "the block returns (x, its attention)"

    def matches(self, module):
        return isinstance(module, SelfAttn) or (type(module).__name__ == "Self_Attn" and hasattr(module, "query_conv"))

    def maps(self, module, x):
        return BlockMaps("sagan", tokens(module.query_conv(x)), tokens(module.key_conv(x)), _grid(x), _grid(x))

    def values(self, module, x):
        return tokens(module.value_conv(x))

    def output(self, module, x, attended, rows):
        B, C, H, W = x.shape
        return module.gamma * attended[:, 0].transpose(1, 2).reshape(B, C, H, W) + x, rows[:, 0]

    def off(self, module, x):
        return x, self.maps(module, x).rows()[:, 0]


class BigGANAttentionAdapter(Adapter):
    family = "BigGAN Attention"
    qk_modules = ("theta", "phi")
    residual = "γ · o(attended) + x"

    def matches(self, module):
        return isinstance(module, BigGANAttention) or (
            type(module).__name__ == "Attention" and all(hasattr(module, n) for n in ("theta", "phi", "g", "o", "gamma")))

    def maps(self, module, x):
        phi = F.max_pool2d(module.phi(x), [2, 2])
        return BlockMaps("biggan", tokens(module.theta(x)), tokens(phi), _grid(x), _grid(phi))

    def values(self, module, x):
        return tokens(F.max_pool2d(module.g(x), [2, 2]))

    def output(self, module, x, attended, rows):
        B, C, H, W = x.shape
        return module.gamma * module.o(attended[:, 0].transpose(1, 2).reshape(B, C // 2, H, W)) + x


class NonLocalAdapter(Adapter):
    family = "Non-local block (Wang et al. 2018)"
    qk_modules = ("theta", "phi")
    residual = "W(y) + x (W: 1x1 conv, with BatchNorm)"

    def matches(self, module):
        return isinstance(module, NonLocalBlock2D)

    def maps(self, module, x):
        phi = module.phi(x)
        dot = module.mode == "dot"
        return BlockMaps("non-local " + ("dot product" if dot else "embedded Gaussian"), tokens(module.theta(x)),
                         tokens(phi), _grid(x), _grid(phi), normalise="mean" if dot else "softmax",
                         meaning=("f / M: the dot product theta·phi divided by the number of key positions, not a "
                                  "softmax (rows need not sum to 1, weights can be negative)") if dot else
                         BlockMaps.meaning)

    def values(self, module, x):
        return tokens(module.g(x))

    def output(self, module, x, attended, rows):
        B = x.shape[0]
        return module.W(attended[:, 0].transpose(1, 2).reshape(B, module.inter_channels, *x.shape[2:])) + x


class TimmNonLocalAdapter(Adapter):
    family = "timm NonLocalAttn"
    qk_modules = ("t", "p")
    residual = "norm(z(attended)) + x"

    def matches(self, module):
        return type(module).__name__ == "NonLocalAttn" and all(hasattr(module, n) for n in ("t", "p", "g", "z", "norm"))

    def maps(self, module, x):
        return BlockMaps("timm non-local", tokens(module.t(x)), tokens(module.p(x)), _grid(x), _grid(x),
                         scale=float(module.scale))

    def values(self, module, x):
        return tokens(module.g(x))

    def output(self, module, x, attended, rows):
        B, _, H, W = x.shape
        y = attended[:, 0].transpose(1, 2).reshape(B, -1, H, W)
        return module.norm(module.z(y)) + x


class TimmBottleneckAdapter(Adapter):
    family = "timm BottleneckAttn (BoTNet)"
    qk_modules = ("qkv", "pos_embed")
    residual = "none inside the block: pool(attended) is its output (the bottleneck block adds the shortcut)"
    off_means = "the block outputs zeros (no attended values)"

    def matches(self, module):
        return type(module).__name__ == "BottleneckAttn" and hasattr(module, "qkv") and hasattr(module, "pos_embed")

    def _split(self, module, x):
        qkv = module.qkv(x)
        return torch.split(qkv, [module.dim_out_qk, module.dim_out_qk, module.dim_out_v], dim=1)

    def maps(self, module, x):
        B = x.shape[0]
        q, k, _ = self._split(module, x)
        heads = module.num_heads
        query, key = tokens(q, heads), tokens(k, heads)  # (B, heads, N, d)
        bias = module.pos_embed(query.reshape(B * heads, *query.shape[2:]))  # (B * heads, N, N)
        bias = bias.reshape(B, heads, *bias.shape[1:])
        if module.scale_pos_embed:  # (q k + rel) * scale
            bias = bias * module.scale
        return BlockMaps("botnet", query, key, _grid(x), _grid(x), scale=float(module.scale), bias=bias,
                         meaning="attention weights of one head: softmax over the key positions of scaled q·k plus "
                                 "relative-position logits; each row sums to 1")

    def values(self, module, x):
        return tokens(self._split(module, x)[2], module.num_heads)

    def output(self, module, x, attended, rows):
        B, _, H, W = x.shape
        out = attended.transpose(-1, -2).reshape(B, module.dim_out_v, H, W)  # heads concatenated, as timm does
        return module.pool(out)

    def off(self, module, x):
        B, _, H, W = x.shape
        return module.pool(x.new_zeros(B, module.dim_out_v, H, W))


class TimmGlobalContextAdapter(Adapter):
    family = "GCNet global context (timm GlobalContext)"
    qk_modules = ("conv_attn",)
    residual = "x · gate(mlp_scale(context)) and/or x + mlp_add(context)"

    def matches(self, module):
        return type(module).__name__ == "GlobalContext" and getattr(module, "conv_attn", None) is not None

    def maps(self, module, x):
        B, C, H, W = x.shape
        logits = module.conv_attn(x).reshape(B, 1, 1, H * W)
        return BlockMaps("gcnet", None, logits, _grid(x), _grid(x),
                         meaning="one map per image: where the global context is pooled from (softmax over the "
                                 "positions); no query changes it")

    def values(self, module, x):
        return tokens(x)

    def output(self, module, x, attended, rows):
        B, C = x.shape[:2]
        context = attended[:, 0].mean(1).reshape(B, C, 1, 1)  # every row is the same map: (B, C, 1, 1)
        if module.mlp_scale is not None:
            x = x * module.gate(module.mlp_scale(context))
        if module.mlp_add is not None:
            x = x + module.mlp_add(context)
        return x


def cat_outputs(outs: list, seq_first: bool = False):
    """Per-image outputs of a block (tensors, or tuples holding tensors) as one batch (seq_first: its tokens' outputs
    (T, B, C) on their second axis)."""
    cat = lambda ts: torch.cat(ts, 1 if seq_first and ts[0].dim() == 3 else 0)  # noqa: E731
    if isinstance(outs[0], torch.Tensor):
        return cat(outs)
    return type(outs[0])(cat([o[k] for o in outs]) if isinstance(outs[0][k], torch.Tensor) else outs[0][k]
                         for k in range(len(outs[0])))


class TracedAdapter(Adapter):
    """Any block whose forward computes attention, read from what it computes (`vggattn.attention.trace`): no class names.
    Its rows are the weights with which each key position's value enters a query's output, on the grids the
    tangents place them on; interventions run the block's own forward with its weights replaced."""

    residual = "as the block's own code adds it (its forward runs with the weights replaced)"
    off_means = "its attention adds nothing: every weight is 0 (what the block adds besides stays)"

    def __init__(self, module: nn.Module, attention: int = 0):
        cls = type(module)
        self.family = f"{cls.__name__} ({cls.__module__.split('.')[0]}), found by what it computes"
        self.attention = attention
        self.qk_modules: tuple[str, ...] = ()
        self.places: dict[tuple, TokenPlaces] = {}  # a block of tokens: where they sit, per input shape (`locate_tokens`)
        self.calls: dict[tuple, Call] = {}  # how the model calls the block (its other arguments), per input shape

    def matches(self, module):
        return False

    def call(self, x: torch.Tensor, call: Call | None, j: int | None = None) -> Call | None:
        """How to call the block on x (image j of it alone, when given): `call` as the model made it for x, else the
        one kept for x's shape when the block was found (its other arguments do not depend on the image)."""
        call = call or self.calls.get(tuple(x.shape[1:]))
        if call is None or j is None:
            return call
        return call.sliced(slice(j, j + 1) if call.input.shape[0] == x.shape[0] else slice(0, 1))

    def _seq_first(self, x: torch.Tensor, call: Call | None) -> bool:
        held = self.call(x, call)
        return held is not None and held.seq_first

    def layout(self, module: nn.Module, x: torch.Tensor, call: Call | None = None) -> Layout:
        lay = Layout.of(module, x, self.attention, self.places.get(tuple(x.shape[1:])), self.call(x, call))
        names = dict(module.named_modules())
        made = [n for n in lay.qk_modules if n in names and any(True for _ in names[n].parameters(recurse=False))]
        self.qk_modules = tuple(made)
        return lay

    def maps(self, module, x, events: list | None = None, call: Call | None = None):
        """The block's maps on x (B, C, H, W). events: the block's events from a forward already recorded (one image,
        `vggattn.attention.trace.Recorder` over the whole model: no second run of the block); None runs the block per
        image. call: the block's other arguments as the model gave them (`Seen.call`)."""
        lay = self.layout(module, x, call)
        if events is not None:
            return self._maps(lay, [events])
        per_image = []
        for j in range(x.shape[0]):
            with torch.no_grad():
                per_image.append(record(module, x[j:j + 1], call=self.call(x, call, j))[0].events)
        return self._maps(lay, per_image)

    def _maps(self, lay: Layout, per_image: list[list]) -> BlockMaps:
        parts, prefix_w, prefix_r, token_qk, stats = [], [], [], [], []
        for events in per_image:
            evs = [events[i] for i in lay.group]
            if lay.token_keys is not None and len(evs) == 1 and evs[0].held is None and evs[0].lse is not None:
                tq, tk, pw, pr, st = _lean_tokens(evs[0], lay)
                token_qk.append((tq, tk)), prefix_w.append(pw), prefix_r.append(pr), stats.append(st)
                continue
            w = torch.cat([e.weights for e in evs], dim=-2) if len(evs) > 1 else evs[0].weights
            w = w.reshape(-1, *w.shape[-2:])  # (L, nq, nk)
            if lay.qk:
                q = torch.cat([e.query for e in evs], dim=-2) if len(evs) > 1 else evs[0].query
                q = q.expand(*evs[0].weights.shape[:-2], *q.shape[-2:]).reshape(w.shape[0], -1, q.shape[-1])
                k = evs[0].key.expand(*evs[0].weights.shape[:-2], *evs[0].key.shape[-2:])
                k = k.reshape(w.shape[0], -1, k.shape[-1])
                parts.append((q[lay.lq, lay.iq], k[lay.lk][:, lay.key_order]))
                continue
            if lay.token_keys is not None:  # every row from Q and K: the page computes them (prefix rows too)
                q = torch.cat([e.query for e in evs], dim=-2) if len(evs) > 1 else evs[0].query
                q = q.expand(*evs[0].weights.shape[:-2], *q.shape[-2:]).reshape(w.shape[0], -1, q.shape[-1])
                k = evs[0].key.expand(*evs[0].weights.shape[:-2], *evs[0].key.shape[-2:])
                k = k.reshape(w.shape[0], -1, k.shape[-1])
                at = torch.cat([lay.iq, lay.prefix_queries], 1)
                token_qk.append((q[lay.lq[:, :1].expand_as(at), at] * lay.scale, k[lay.lq[:, 0]][:, lay.token_keys]))
            rows = _queries(w, lay)  # (heads, N, nk)
            plan = _gather_plan(lay)
            if plan is not None:  # every head's keys: a cell each, one order for all rows: gathers, not scatters
                order, prefix_order = plan[0].to(w.device), None if plan[1] is None else plan[1].to(w.device)
                grid_rows = _keys(rows, order)  # (heads, N, M)
                parts.append((grid_rows, rows.sum(-1) - grid_rows.sum(-1) if lay.padded else None))
                if prefix_order is not None:
                    prefix_w.append(_keys(rows, prefix_order))  # (heads, N, P)
                    if lay.prefix_queries is not None:
                        own = w[lay.lq[:, :1].expand_as(lay.prefix_queries), lay.prefix_queries]  # (heads, P, nk)
                        prefix_r.append(torch.cat([_keys(own, order), _keys(own, prefix_order)], -1))
                continue
            cells = lay.kcell.to(w.device)[lay.lq]  # (heads, N, nk)
            on = cells >= 0
            m = lay.key_grid[0] * lay.key_grid[1]
            pad = (rows * ~on).sum(-1) if lay.padded else None
            if lay.kprefix is not None:  # the weight on each prefix token, beside the share on all of them
                which = lay.kprefix.to(w.device)[lay.lq]  # (heads, N, nk)
                count = len(lay.prefix_names or []) or int(lay.kprefix.max()) + 1
                prefix_w.append(rows.new_zeros(*rows.shape[:2], count).scatter_add_(
                    -1, which.clamp_min(0), rows * (which >= 0)))
                if lay.prefix_queries is not None:  # the prefix tokens' own rows: on the grid, then on the prefix
                    lead = lay.lq[:, :1].expand_as(lay.prefix_queries)
                    own = w[lead, lay.prefix_queries]  # (heads, P, nk)
                    kc, kp = lay.kcell.to(w.device)[lead], lay.kprefix.to(w.device)[lead]
                    on_grid = own.new_zeros(*own.shape[:2], m).scatter_add_(-1, kc.clamp_min(0), own * (kc >= 0))
                    on_prefix = own.new_zeros(*own.shape[:2], count).scatter_add_(-1, kp.clamp_min(0), own * (kp >= 0))
                    prefix_r.append(torch.cat([on_grid, on_prefix], -1))
            if lay.windowed:  # each query sees a window of the keys: kept sparse (N x K, not N x M)
                parts.append(((rows, cells), pad))
                continue
            grid_rows = rows.new_zeros(*rows.shape[:2], m).scatter_add_(-1, cells.clamp_min(0), rows * on)
            parts.append((grid_rows, pad))
        family = f"{self.family}: {lay.kind}"
        if lay.qk:
            return BlockMaps(family, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), lay.grid,
                             lay.key_grid, scale=float(lay.scale * (lay.key_grid[0] * lay.key_grid[1]
                                                                   if lay.normalise == "mean" else 1)),
                             normalise=lay.normalise, meaning=lay.meaning)
        normalise = "softmax" if lay.sums_to_one else "weights"
        prefix = torch.stack(prefix_w) if prefix_w else None
        if stats:  # tokens from a fused kernel: no rows held
            return BlockMaps(family, None, None, lay.grid, lay.key_grid, normalise=normalise, meaning=lay.meaning,
                             padding=prefix.sum(-1) if lay.padded else None,  # (as the rows' share off the grid)
                             prefix=prefix, prefix_names=lay.prefix_names, prefix_rows=torch.stack(prefix_r),
                             tokens_qk=(torch.stack([t[0] for t in token_qk]), torch.stack([t[1] for t in token_qk])),
                             token_stats=(torch.stack(stats), None))
        pad = torch.stack([p[1] for p in parts]) if lay.padded else None
        if lay.windowed:
            window = (torch.stack([p[0][0] for p in parts]), torch.stack([p[0][1] for p in parts]))
            return BlockMaps(family, None, None, lay.grid, lay.key_grid, normalise=normalise, meaning=lay.meaning,
                             padding=pad, window=window)
        return BlockMaps(family, None, None, lay.grid, lay.key_grid, normalise=normalise, meaning=lay.meaning,
                         weights=torch.stack([p[0] for p in parts]), padding=pad, prefix=prefix,
                         prefix_names=lay.prefix_names if prefix is not None else None,
                         prefix_rows=torch.stack(prefix_r) if prefix_r else None,
                         tokens_qk=(torch.stack([t[0] for t in token_qk]), torch.stack([t[1] for t in token_qk]))
                         if token_qk else None)

    def forward(self, module, x, mode=None, rows=None, call: Call | None = None):
        """The block's own forward on x with its weights as they are (rows None, mode None: rebuilt from the rows
        on the grids), replaced by `rows` (B, heads, N or 1, M), or by an intervention: "off" (every weight 0),
        "mean" (every row the image's mean row, on each query's own keys), "uniform" (1 / keys of each query).
        call: the block's other arguments as the model gave them."""
        if mode is not None and mode not in MODES and mode not in TOKEN_MODES:
            raise ValueError(f"mode must be one of {MODES + tuple(TOKEN_MODES)}, got {mode!r}")
        lay = self.layout(module, x, call)
        if mode in TOKEN_MODES:
            held = self.places.get(tuple(x.shape[1:]))
            fn = self._token_replacement(lay, mode, lay.prefix_names or (held.names if held is not None else None))
            return cat_outputs([record(module, x[j:j + 1], replace={lay.group[0]: fn}, call=self.call(x, call, j))[1]
                                for j in range(x.shape[0])], self._seq_first(x, call))
        if rows is None and mode in (None, "mean"):
            maps = self.maps(module, x, call=call)
            if mode is None and maps.window is not None and len(lay.group) == 1:  # windowed rows, as they are
                return self._rebuilt(module, x, lay, maps.window[0], call)
            rows = maps.rows() if mode is None else maps.mean_row()
        head, cell = lay.inverse()
        outs = []
        offsets, start = {}, 0
        for i, n in zip(lay.group, lay.sizes):
            offsets[i], start = (start, start + n), start + n
        for j in range(x.shape[0]):
            replace = {i: self._replacement(lay, mode, None if rows is None else rows[j], head, cell, *offsets[i])
                       for i in lay.group}
            outs.append(record(module, x[j:j + 1], replace=replace, call=self.call(x, call, j))[1])
        return cat_outputs(outs, self._seq_first(x, call))

    def _rebuilt(self, module, x, lay: Layout, values: torch.Tensor, call: Call | None = None):
        """The block's forward with its weights put back from windowed rows (B, heads, N, K) (their own order)."""
        outs = []
        for j in range(x.shape[0]):
            def fn(w, v=values[j]):
                flat = w.reshape(-1, *w.shape[-2:]).clone()
                flat[lay.lq, lay.iq] = v.to(flat.dtype)
                return flat.reshape(w.shape)
            outs.append(record(module, x[j:j + 1], replace={lay.group[0]: fn}, call=self.call(x, call, j))[1])
        return cat_outputs(outs, self._seq_first(x, call))

    @staticmethod
    def _token_replacement(lay: Layout, mode: str, names: list[str] | None):
        """fn(weights (lead..., nq, nk) of the block's one attention call) -> its weights under a `TOKEN_MODES` mode
        (names: the prefix tokens')."""
        names = names or []
        if lay.kprefix is None or lay.prefix_queries is None or len(lay.group) != 1 or not names:
            raise ValueError(f"{mode}: not a block of tokens whose prefix tokens (class, registers) are known")
        regs = torch.tensor([j for j, n in enumerate(names) if is_register(n)], dtype=torch.long)
        cls = next((j for j, n in enumerate(names) if is_class_token(n)), None)
        if (mode == "no_registers" and not len(regs)) or (mode == "cls_mean" and cls is None):
            raise ValueError(f"{mode}: the block has no {'registers' if mode == 'no_registers' else 'class token'}")

        def fn(w):
            flat = w.reshape(-1, *w.shape[-2:]).clone()  # (L, nq, nk)
            if mode == "no_registers":
                drop = torch.isin(lay.kprefix, regs).to(w.device)  # (L, nk): the registers' keys
                flat = flat.masked_fill(drop[:, None, :], 0.0)
                flat = flat / flat.sum(-1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
            else:  # each head's class-token row -> the mean of its patches' rows
                for h, lead in enumerate(lay.lq[:, 0].tolist()):
                    flat[lead, int(lay.prefix_queries[h, cls])] = flat[lead, lay.iq[h]].mean(0)
            return flat.reshape(w.shape)
        return fn

    @staticmethod
    def _replacement(lay: Layout, mode, rows, head, cell, start, stop):
        """fn(weights (lead..., n, nk) of one event) -> its new weights, for queries start:stop of the attention."""
        def fn(w):
            flat = w.reshape(-1, *w.shape[-2:])  # (L, n, nk)
            if mode == "off":
                return torch.zeros_like(w)
            if mode == "uniform":
                return torch.full_like(w, 1.0 / w.shape[-1])
            L = flat.shape[0]
            h, c = head[:, start:stop].to(w.device), cell[:, start:stop].to(w.device)  # (L, n)
            r = rows.to(w.device, w.dtype)  # (heads, N or 1, M)
            picked = r[h, c.clamp_min(0) if r.shape[1] > 1 else torch.zeros_like(c)]  # (L, n, M)
            keys = lay.kcell.to(w.device)  # (L, nk)
            new = picked.gather(-1, keys.clamp_min(0)[:, None, :].expand(L, flat.shape[1], -1))
            new = torch.where(keys[:, None, :] >= 0, new, flat)  # keys on padding keep their weights
            if r.shape[1] > 1:  # rows a query: one with no place (a class token) has none among them, keeps its own
                new = torch.where(c[:, :, None] >= 0, new, flat)
            return new.reshape(w.shape)
        return fn


class CrossAdapter(Adapter):
    """A block whose attention runs between the image's places and tokens with no place on it (a detector's object
    queries over the encoder's grid, a latent's places over a prompt's words), found by what it computes
    (`vggattn.attention.cross`). Its rows: (B, heads, T, M) for tokens looking at the grid (`query_names`), (B,
    heads, N, T) for places looking at tokens (`key_names`)."""

    residual = "as the block's own code adds it"
    off_means = "no intervention on cross-attention yet"

    def __init__(self, module: nn.Module, places: dict, attention: int = 0):
        cls = type(module)
        self.family = f"{cls.__name__} ({cls.__module__.split('.')[0]}), found by what it computes"
        self.places = places  # {argument (position or keyword): TokenPlaces} of its placed token arguments
        self.attention = attention
        self.calls: dict[tuple, Call] = {}  # how the model calls the block, per input shape
        self.qk_modules: tuple[str, ...] = ()
        self._layouts: dict[tuple, object] = {}

    def matches(self, module):
        return False

    def layout(self, module: nn.Module, x: torch.Tensor, call: Call | None = None):
        from .cross import cross_layout

        call = call or self.calls.get(tuple(x.shape[1:]))
        if call is None:
            raise NotAttention("cross-attention is read from the model's own call of the block (none kept)")
        key = (tuple(x.shape[1:]), call.key())
        if key not in self._layouts:
            self._layouts[key] = cross_layout(module, call, self.places, self.attention)
        lay = self._layouts[key]
        self.qk_modules = lay.qk_modules
        return lay

    def maps(self, module, x, events: list | None = None, call: Call | None = None):
        from .cross import cross_events

        call = call or self.calls.get(tuple(x.shape[1:]))
        lay = self.layout(module, x, call)
        if events is not None:
            per_image = [events]
        else:
            per_image = [cross_events(module, call.sliced(slice(j, j + 1))) for j in range(x.shape[0])]
        return self._maps(lay, per_image)

    def _maps(self, lay, per_image: list[list]) -> BlockMaps:
        from .cross import cross_maps

        names = [f"token {i}" if lay.queries_placed else f"query {i}" for i in range(lay.tokens)]
        return BlockMaps(f"{self.family}: cross-attention", **cross_maps(lay, per_image, names))

    def forward(self, module, x, mode=None, rows=None, call: Call | None = None):
        raise NotImplementedError("interventions on cross-attention are not offered yet")


def _lean_tokens(ev, lay: Layout):
    """A block of tokens whose attention ran as one fused call (`vggattn.attention.trace.Event.lse`), read without its
    N x M weights: (Q with the scale in it (heads, N + P, d), K (heads, M + P, d), each grid row's weight on each
    prefix token (heads, N, P), the prefix tokens' own rows (heads, P, M + P), log Z (heads, N + P) float64). The
    rows' sum over the queries is `BlockMaps.token_sums`, made when asked for."""
    nq, nk = ev.query.shape[-2], ev.key.shape[-2]
    lead = ev.lse.shape[:-1]
    L = int(torch.Size(lead).numel())
    q = ev.query.expand(*lead, nq, ev.query.shape[-1]).reshape(L, nq, -1)
    k = ev.key.expand(*lead, nk, ev.key.shape[-1]).reshape(L, nk, -1)
    at = torch.cat([lay.iq, lay.prefix_queries], 1)  # (heads, N + P): the grid's queries, then the prefix tokens'
    leads = lay.lq[:, :1].expand_as(at)
    n, m = lay.iq.shape[1], len(lay.token_keys) - lay.prefix_queries.shape[1]
    tq, tk = q[leads, at] * lay.scale, k[lay.lq[:, 0]][:, lay.token_keys]
    log_z = ev.lse.reshape(L, nq)[leads, at].float()  # (heads, N + P)
    qf, kf = tq.float(), tk.float()
    prefix_w = torch.exp(qf[:, :n] @ kf[:, m:].transpose(-1, -2) - log_z[:, :n, None])  # (heads, N, P)
    prefix_r = torch.exp(qf[:, n:] @ kf.transpose(-1, -2) - log_z[:, n:, None])  # (heads, P, M + P)
    return (tq.to(ev.query.dtype), tk.to(ev.key.dtype), prefix_w.to(ev.query.dtype), prefix_r.to(ev.query.dtype),
            log_z.double())


def _queries(w: torch.Tensor, lay: Layout) -> torch.Tensor:
    """w[lay.lq, lay.iq] (heads, N, nk): a view where head h is lead h and its queries a run of consecutive rows (a
    ViT's patches after its class token and registers), else a gather."""
    heads, n = lay.lq.shape
    first = int(lay.iq[0, 0])
    if torch.equal(lay.lq, torch.arange(heads)[:, None].expand(heads, n)) and \
            torch.equal(lay.iq, torch.arange(first, first + n)[None].expand(heads, n)):
        return w[:heads, first:first + n]
    return w[lay.lq, lay.iq]


def _keys(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows[..., index]: a slice where the index is a run of consecutive keys (the patches after a ViT's class token
    and registers), else a gather."""
    first = int(index[0])
    if torch.equal(index, torch.arange(first, first + len(index), device=index.device)):
        return rows[..., first:first + len(index)]
    return rows.index_select(-1, index)


def _gather_plan(lay: Layout) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """Where a layout's rows can be read by gathering: not windowed, each head's queries in one lead, and every
    head's keys the same, one key a grid cell (and one a prefix token) -> (the key index of each grid cell (M,), of
    each prefix token (P,) or None, P); else None."""
    if lay.windowed or lay.per_image or not bool((lay.lq == lay.lq[:, :1]).all()):
        return None
    cells = lay.kcell[lay.lq[:, 0]]  # (heads, nk)
    if not bool((cells == cells[:1]).all()):
        return None
    cells, m = cells[0], lay.key_grid[0] * lay.key_grid[1]
    placed = torch.nonzero(cells >= 0).flatten()
    if placed.numel() != m or not torch.equal(torch.sort(cells[placed]).values, torch.arange(m)):
        return None
    order = placed[torch.argsort(cells[placed])]
    if lay.kprefix is None:
        return order, None, 0
    which = lay.kprefix[lay.lq[:, 0]]
    if not bool((which == which[:1]).all()):
        return None
    count = len(lay.prefix_names or []) or int(lay.kprefix.max()) + 1
    unplaced = torch.nonzero(which[0] >= 0).flatten()
    if unplaced.numel() != count:
        return None
    return order, unplaced[torch.argsort(which[0][unplaced])], count


def reset(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every parameter of `module` in place, as its layers initialise themselves (reset_parameters);
    parameters of modules without one (timm's relative-position tables) drawn from N(0, 0.02), as timm does."""
    torch.manual_seed(seed)
    covered = set()
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
            covered |= {id(p) for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in covered:
                nn.init.trunc_normal_(p, std=0.02)
    return module


def reinit_qk(module: nn.Module, adapter: "Adapter", seed: int) -> nn.Module:
    """A copy of the block with the parameters that make its logits re-initialised (`Adapter.qk_modules`)."""
    import copy

    block = copy.deepcopy(module)
    for i, name in enumerate(adapter.qk_modules):
        reset(block.get_submodule(name), seed + i)
    return block.eval()


def randomised_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of the whole model with every parameter re-initialised (the sanity check's "full" randomisation)."""
    import copy

    return reset(copy.deepcopy(model), seed).eval()


_REPLACED: dict[nn.Module, tuple[object, dict]] = {}  # module -> (its own instance forward or None, {thread id:
# that thread's forward of the module})
_REPLACED_LOCK = threading.Lock()


def _dispatcher(own, threads: dict):
    """A module's forward while some thread replaces it: the calling thread's replacement, else `own`. A call made
    from inside the replacement (an adapter re-running the block's code) reaches `own`."""
    def forward(*args, **kwargs):
        me = threading.get_ident()
        replacement = threads.get(me)
        if replacement is None:
            return own(*args, **kwargs)
        threads[me] = None
        try:
            return replacement(*args, **kwargs)
        finally:
            threads[me] = replacement
    return forward


@contextmanager
def replaced_forward(module: nn.Module, forward):
    """In the entering thread only, `module(...)` runs `forward(...)` instead of the module's own forward (its hooks
    still run around it) until exit, also on exceptions; every other thread runs the module as it is."""
    me = threading.get_ident()
    with _REPLACED_LOCK:
        if module not in _REPLACED:
            _REPLACED[module] = (module.__dict__.get("forward"), {})
            module.forward = _dispatcher(module.forward, _REPLACED[module][1])
        saved, threads = _REPLACED[module]
        before = threads.get(me)
        threads[me] = forward
    try:
        yield
    finally:
        with _REPLACED_LOCK:
            if before is None:
                del threads[me]
            else:
                threads[me] = before
            if not threads:  # no thread replaces it: the module's forward as it was
                del _REPLACED[module], module.forward
                if saved is not None:
                    module.forward = saved


class Intervention:
    """Context manager: the named blocks' forwards (in the entering thread only) run with their rows replaced,
    {name: "off" | "mean" | "uniform"}, in place of the block's own forward (`replaced_forward`); restored on exit,
    exceptions are never swallowed. The one way the app's ablation and the study switch attention off or replace
    it, for any family."""

    def __init__(self, model: nn.Module, modes: dict[str, str]):
        modules = dict(model.named_modules())
        unknown = [n for n in modes if n not in modules]
        if unknown:
            raise KeyError(f"no attention layer {unknown}; the model has {[n for n, *_ in find_blocks(model)]}")
        found = {n: (m, a) for n, m, a in find_blocks(model, list(modes))}
        bad = [m for m in modes.values() if m not in MODES and m not in TOKEN_MODES]
        if bad:
            raise ValueError(f"modes must be among {MODES + tuple(TOKEN_MODES)}, got {bad}")
        self.modes, self.found = dict(modes), found
        self._stack = ExitStack()

    def __enter__(self) -> "Intervention":
        with ExitStack() as stack:
            stack.enter_context(SlowPath())
            for name, mode in self.modes.items():
                module, adapter = self.found[name]
                stack.enter_context(replaced_forward(module, intervened(module, adapter, mode)))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> bool:
        self._stack.close()
        return False


class SlowPath(TorchFunctionMode):
    """While entered, in this thread only: PyTorch's fused transformer paths are off (nn.TransformerEncoderLayer's
    and nn.MultiheadAttention's fast path run the whole layer in one native call, never calling the attention
    module, and they check for an active mode), so a block whose forward is replaced (`replaced_forward`) runs.
    Every call goes through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def intervened(module: nn.Module, adapter: Adapter, mode: str):
    """The block's forward with its rows replaced by `mode` (for `replaced_forward`)."""
    def forward(*args, **kwargs):
        call = Call.of(args, kwargs, module)
        return adapter.forward(module, call.input, mode, call=call) if isinstance(adapter, TracedAdapter) else \
            adapter.forward(module, call.input, mode)
    return forward


ADAPTERS: tuple[Adapter, ...] = (GlobalAttentionAdapter(), SelfAttnAdapter(), BigGANAttentionAdapter(), NonLocalAdapter(),
                                 TimmNonLocalAdapter(), TimmBottleneckAdapter(), TimmGlobalContextAdapter())


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter of a module's family (a fast path that also knows its residual), or None."""
    return next((a for a in ADAPTERS if a.matches(module)), None)


def example_input(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """A seeded random input the model takes: channels from its first conv, size given, else timm's, else 64 px
    (small: a block at full resolution costs N^2; attention is found at any size a model takes)."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = tuple(cfg.get("input_size", (3, 64, 64))[1:]) if isinstance(cfg, dict) else 64
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    p = next(model.parameters(), None)
    x = torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(0))
    return x if p is None else x.to(p.device)


def in_words(err: BaseException) -> str:
    """A failure while placing tokens, as one line a person reads: running out of memory said as such (PyTorch's
    allocator says it as "[enforce fail at alloc_cpu.cpp:...] ... DefaultCPUAllocator: can't allocate memory")."""
    text = (str(err).splitlines() or [type(err).__name__])[0]
    if isinstance(err, MemoryError) or "allocat" in text.lower() or "out of memory" in text.lower():
        return "there was not enough memory for the passes that place them (about three forwards at once)"
    return text[:160]


@dataclass
class Traced:
    blocks: dict  # name -> TracedAdapter, in the order they ran
    skipped: list[str]  # "name (Class): why it is no per-position map", one line each
    example: tuple  # the input shape it was found on
    cross: dict = dataclasses.field(default_factory=dict)  # name -> CrossAdapter: between the image and other tokens


_TRACED: "weakref.WeakKeyDictionary[nn.Module, Traced]" = weakref.WeakKeyDictionary()


def traced_blocks(model: nn.Module, example: torch.Tensor | None = None) -> Traced:
    """The blocks of `model` that no family adapter knows, found by what their forwards compute on `example`
    (cached per model: the first call's example stands)."""
    if model in _TRACED:
        return _TRACED[model]
    example = example_input(model) if example is None else example
    modules = dict(model.named_modules())
    known = [n for n, m in modules.items() if adapter_for(m) is not None]
    inside_known = lambda n: any(n == k or n.startswith(k + ".") for k in known)  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        try:
            found = [f for f in discover(model, example) if f.name and not inside_known(f.name)]
        except Exception as err:  # a model that does not run on this input: the known families stand alone
            first = (str(err).splitlines() or [""])[0][:160]
            line = (f"could not run the model on a {'x'.join(map(str, example.shape[1:]))} input to find attention "
                    f"by what it computes ({type(err).__name__}: {first})")
            log.warning("%s", line)
            _TRACED[model] = Traced({}, [line], tuple(example.shape))
            return _TRACED[model]
        for f in found:  # tokens sequence first (T, B, C): nn.MultiheadAttention's with batch_first=False
            given = None if f.call is None else f.call.input
            if given is not None and given.dim() == 3 and given.shape[0] != example.shape[0] \
                    and given.shape[1] == example.shape[0]:
                sequence_first(modules[f.name])
                f.call = dataclasses.replace(f.call, seq_first=True)
        seen = {f.name: f for f in found if f.call is not None}  # the calls of the forward that found them
        inputs = {f.name: f.call.input for f in found if f.call is not None}
        tokens = [f.name for f in found if f.name in inputs and inputs[f.name].dim() == 3]
        places, unplaced = {}, ""
        if tokens:
            try:
                places = token_places(model, example, tokens, {n: tuple(inputs[n].shape[1:]) for n in tokens})
                name_prefix(model, example, places)
            except (RuntimeError, NotImplementedError, TypeError, MemoryError) as err:  # e.g. an op with no
                # forward-mode formula, or no memory left for the passes
                places, unplaced = {}, in_words(err)
        blocks, skipped, unplaced_tokens = {}, [], {}
        for f in found:
            module, adapter = modules[f.name], TracedAdapter(modules[f.name])
            if f.name in seen and seen[f.name].call is not None:
                adapter.calls[tuple(inputs[f.name].shape[1:])] = seen[f.name].call
            if f.name in places:
                adapter.places[tuple(inputs[f.name].shape[1:])] = places[f.name]
            try:
                if f.name not in inputs:
                    raise NotAttention("it takes no tensor input")
                if inputs[f.name].shape[0] != example.shape[0]:  # windows (MaxViT) or patches stacked on the batch
                    raise NotAttention(f"its input stacks {inputs[f.name].shape[0]} pieces of each image on the batch "
                                       "axis (windows or patches): its grid is a piece's, not the image's")
                if f.name in tokens and unplaced:
                    raise NotAttention(f"where its tokens sit could not be read ({unplaced})")
                if inputs[f.name].dim() == 4 and inputs[f.name].shape[1] == 1:  # (B, 1, T, C): tokens per group
                    raise NotAttention(f"its input {tuple(inputs[f.name].shape)} is tokens in one group (as SAM's "
                                       "per point batch), not a one-channel grid")
                adapter.layout(module, inputs[f.name])
            except NotAttention as err:
                line = f"{f.name} ({type(module).__name__}): not an attention block over positions: {err}"
                if f.name in inputs and f.name in seen and (inputs[f.name].dim() == 3 or (
                        inputs[f.name].dim() == 4 and inputs[f.name].shape[1] == 1)):  # (SAM's tokens: (B, 1, T, C))
                    unplaced_tokens[f.name] = line  # perhaps between the image and other tokens: tried below
                else:
                    skipped.append(line)
                continue
            if f.attentions > 1:
                log.info("%s computes %d attentions; the first is shown", f.name, f.attentions)
            blocks[f.name] = adapter
        cross = _cross_blocks(model, example, {f.name: f for f in found if f.name in unplaced_tokens}, unplaced_tokens,
                              skipped)
    finally:
        model.train(was_training)
    for line in skipped:
        log.warning("%s", line)
    _TRACED[model] = Traced(blocks, skipped, tuple(example.shape), cross)
    return _TRACED[model]


def _cross_blocks(model: nn.Module, example: torch.Tensor, found: dict, lines: dict[str, str], skipped: list[str]
                  ) -> dict[str, CrossAdapter]:
    """Of the blocks of tokens whose own input has no place, those whose attention runs between the image's places
    (another argument's tokens) and their tokens; the rest go to `skipped` with both reasons."""
    from .cross import call_places, enclosing_places

    if not found:
        return {}
    modules = dict(model.named_modules())
    try:  # on the grid of a module around the block where there is one, else traced through the whole model
        places = enclosing_places(model, example, list(found))
        rest = [n for n in found if n not in places]
        places.update(call_places(model, example, rest) if rest else {})
    except (RuntimeError, NotImplementedError, TypeError, MemoryError) as err:
        skipped.extend(f"{line} (nor could its arguments be placed: {in_words(err)})"
                       for line in lines.values())
        return {}
    out = {}
    for name, f in found.items():
        module = modules[name]
        adapter = CrossAdapter(module, places.get(name, {}))
        adapter.calls[tuple(f.call.input.shape[1:])] = f.call
        try:
            adapter.layout(module, f.call.input, f.call)
        except NotAttention as err:
            skipped.append(f"{lines[name]}; nor between the image and other tokens: {err}")
            continue
        out[name] = adapter
    return out


def locate_tokens(model: nn.Module, x: torch.Tensor, blocks: list, inputs: dict[str, torch.Tensor]) -> None:
    """Give each traced block whose input is tokens (B, T, C) where its tokens sit for an input of x's size
    (`vggattn.attention.trace.token_places`, one pass of the model per new input size). inputs: {block name: its
    input in a forward of x}."""
    todo = [name for name, _, adapter in blocks if isinstance(adapter, TracedAdapter) and name in inputs
            and inputs[name].dim() == 3 and tuple(inputs[name].shape[1:]) not in adapter.places]
    if not todo:
        return
    was_training = model.training
    model.eval()
    try:
        order = [n for n in inputs if n in todo]  # the forward's order (a watch's)
        places = token_places(model, x[:1], order, {n: tuple(inputs[n].shape[1:]) for n in order})
        name_prefix(model, x[:1], places)
    finally:
        model.train(was_training)
    for name, _, adapter in blocks:
        if name in places:
            adapter.places[tuple(inputs[name].shape[1:])] = places[name]


def find_blocks(model: nn.Module, names: list[str] | None = None, *, example: torch.Tensor | None = None,
                cross: bool = False) -> list[tuple[str, nn.Module, Adapter]]:
    """Every attention block in `model`, in module order: (name, module, adapter). A module of a family we have an
    adapter for is found by its class; any other whose forward computes attention is found by running the model on
    `example` (`example_input` when None) and reading what it computes (`vggattn.attention.trace`). names: point at modules by
    name instead. cross: also the blocks whose attention runs between the image and other tokens (`CrossAdapter`:
    a detector's object queries, a prompt's words); named ones are found either way. Nothing found is one sentence naming what the model is made of."""
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    if names is not None:
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing}; the model has e.g. {list(modules)[1:8]}")
        known = {n: adapter_for(modules[n]) for n in names}
        traced = traced_blocks(model, example) if any(a is None for a in known.values()) else None
        found, unknown = [], []
        for n in names:
            adapter = known[n] or (traced.blocks.get(n) or traced.cross.get(n) if traced else None)
            if adapter is None:
                why = next((s for s in (traced.skipped if traced else []) if s.startswith(n + " ")), None)
                unknown.append(why or f"{n} ({type(modules[n]).__name__}): not an attention block (its forward "
                                      "computes none that vggattn can read)")
            found.append((n, modules[n], adapter))
        if unknown:
            raise ValueError("; ".join(unknown))
        return found
    found = [(n, m, a) for n, m in modules.items() if (a := adapter_for(m)) is not None]
    traced = traced_blocks(model, example)
    found += [(n, modules[n], a) for n, a in traced.blocks.items()]
    if cross:  # blocks between the image and other tokens (`CrossAdapter`)
        found += [(n, modules[n], a) for n, a in traced.cross.items()]
    found.sort(key=lambda f: order[f[0]])
    if not found:
        kinds = sorted({type(m).__name__ for m in modules.values()} - {"Sequential", "ModuleList", "ModuleDict"})
        skipped = f" ({'; '.join(traced.skipped)})" if traced.skipped else ""
        raise NoAttention(f"no attention in this model: its forward computes none that maps positions to positions on "
                         f"a {'x'.join(map(str, traced.example[1:]))} input{skipped}; it is made of: "
                         f"{', '.join(kinds[:25])}{' ...' if len(kinds) > 25 else ''}")
    return found


def output_tensor(out) -> torch.Tensor:
    """A block's output tensor: the output itself, or the first of a tuple (SAGAN's block returns (out, attention))."""
    return out if isinstance(out, torch.Tensor) else out[0]
