"""Attention found by what the code computes, in any module: no class names, no adapters to write.

    found = discover(model, example)          # {module name: Found} of every module whose forward computes attention
    layout = Layout.of(block, x)               # where each query and key of its attention sits on x's grid
    maps = TracedAdapter(block).maps(block, x) # vggattn.attention.adapters.BlockMaps, as for any other block
    TracedAdapter(block).forward(block, x, mode="mean")  # the block's own forward with its rows replaced

One `TorchFunctionMode` (`Recorder`) sees every torch call of a forward and keeps, per tensor, the call that made
it. Attention is a product of two tensors computed from the input in which one operand, the weights, comes from a
softmax, from another such product (Wang et al.'s dot product form) or from a concatenation of two (their
concatenation form); `F.scaled_dot_product_attention` is attention by name. The weights' axis contracted with the
values is the key axis, so a row holds the weight with which each key position's value enters the query's output,
whichever axis the library normalised. Where each query and key sits on the block's input grid is read from
forward-mode tangents: the input's tangent carries its (1, y, x) coordinates per position, so a token computed at one
position (1x1 convs, linear maps, reshapes, unfolds) carries that position, a pooled one a point in its window, and
one made of padding none (its share of a row is reported as `padding`). Normalisation statistics (GroupNorm) are
held constant for the tangents, so they do not spread positions. The same mode replaces the weights for
interventions, so one mechanism reads and changes every traced block.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..models.output import remember_output

PRODUCTS = {"matmul", "__matmul__", "__rmatmul__", "bmm", "einsum", "baddbmm"}
SOFTMAX = {"softmax", "_softmax"}
SDPA = "scaled_dot_product_attention"
MHA = "multi_head_attention_forward"  # nn.MultiheadAttention's (its fast path is off while a mode is active)
MHA_ARGS = ["query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
            "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
            "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
            "static_k", "static_v", "average_attn_weights", "is_causal"]
# calls that move or rename a tensor's elements without mixing positions (the walk from weights to their source)
TRANSPARENT = {"view", "reshape", "permute", "transpose", "t", "contiguous", "unsqueeze", "squeeze", "flatten",
               "to", "float", "double", "half", "bfloat16", "type", "type_as", "clone", "dropout", "expand",
               "expand_as", "movedim", "swapaxes", "__getitem__", "detach", "view_as", "reshape_as"}
SCALING = {"mul", "__mul__", "__rmul__", "div", "__truediv__", "mul_", "div_", "__imul__", "__itruediv__", "true_divide"}
ADDITIVE = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "sub_", "__isub__", "masked_fill",
            "masked_fill_", "where"}
NORMS = {"group_norm", "instance_norm", "layer_norm"}  # statistics: held constant for the tangents
MIXING = {"conv1d", "conv2d", "conv3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
          "adaptive_avg_pool2d", "interpolate", "linear"}  # linear maps that may mix positions (a linear map does
# where tokens of several places are concatenated, as Swin's patch merging): their tangents are masses (`Masses`)
SPREAD_LIMIT = 1.5  # grid cells: a token whose coordinates spread further is not at one position


class NotAttention(ValueError):
    """The module computes weights over something other than positions (channels, lambdas), or none at all."""


@dataclass(eq=False)
class Node:
    """The call that made a tensor: its name, the nodes of its tensor arguments, scalars it was scaled by."""

    op: str
    parents: tuple
    live: bool  # computed from the traced input (parameters and constants are not)
    module: str = ""  # the innermost module running when it was made
    scale: float | None = None  # for SCALING calls by a number: the factor
    swaps: bool = False  # a transpose that swaps the last two axes
    pairwise: bool = False  # a product of two live tensors
    extra: dict = field(default_factory=dict)


@dataclass(eq=False)
class Event:
    """One attention computation: weights (as the product got them) times values."""

    kind: str  # "softmax", "pairwise" (a product, scaled), "concat" or "sdpa"
    held: torch.Tensor | None  # (..., nq, nk) the weights after `move`; None: not made yet (see `lse`)
    values: torch.Tensor  # (..., nk, dv) after `move`
    query: torch.Tensor | None  # (..., nq, d): the logits' query operand, tokens on -2
    key: torch.Tensor | None  # (..., nk, d)
    scale: float | None  # logits = scale * query . key (+ bias when `additive`); None: unknown
    additive: bool  # extra logit terms (relative positions, masks)
    normalised_over_keys: bool | None  # softmax over the key axis (rows sum to 1); None: no softmax
    qk_modules: tuple[str, ...]  # submodules that make the logits
    lse: torch.Tensor | None = None  # (..., nq) float32: each row's log normaliser, where a fused kernel computed
    # the attention (the weights are then softmax(scale * query . key), made only when asked for)

    @property
    def weights(self) -> torch.Tensor:
        """(..., nq, nk): the weights (a fused call's made here once, from its query and key, on first use)."""
        if self.held is None:
            logits = (self.query.float() @ self.key.float().transpose(-1, -2)) * self.scale
            self.held = torch.exp(logits - self.lse[..., None]).to(self.query.dtype)
        return self.held


def _labels_matmul(a_dim: int, b_dim: int) -> tuple[list, list, list]:
    """Axis labels of a batched matmul: a (..., n, d) @ b (..., d, m) -> (..., n, m)."""
    lead = max(a_dim, b_dim) - 2
    la = [f"L{i}" for i in range(lead - (a_dim - 2), lead)] + ["n", "d"]
    lb = [f"L{i}" for i in range(lead - (b_dim - 2), lead)] + ["d", "m"]
    return la, lb, [f"L{i}" for i in range(lead)] + ["n", "m"]


def _labels_einsum(eq: str, a_dim: int, b_dim: int) -> tuple[list, list, list] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        return None
    ins, out = eq.split("->")
    a, b = ins.split(",")

    def expand(s, dim):
        if "..." not in s:
            return list(s)
        head, tail = s.split("...")
        n = dim - len(head) - len(tail)
        return list(head) + [f"E{i}" for i in range(n)] + list(tail)
    lead = max(a_dim - len(a.replace("...", "")), b_dim - len(b.replace("...", "")), 0)
    return expand(a, a_dim), expand(b, b_dim), expand(out, len(out.replace("...", "")) + lead)


def _moved(t: torch.Tensor, labels: list, token: str, feature: str | None, lead: list) -> torch.Tensor:
    """t with axes ordered lead..., token, feature (a missing lead axis becomes size 1; feature None: size 1)."""
    if feature is None:
        t, labels = t.unsqueeze(-1), labels + ["_f"]
        feature = "_f"
    for name in lead:
        if name not in labels:
            t, labels = t.unsqueeze(0), [name] + labels
    order = [labels.index(n) for n in lead] + [labels.index(token), labels.index(feature)]
    return t.permute(order)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


@dataclass
class Call:
    """How a module was called: its arguments, positional and keyword, as a forward pre-hook (with_kwargs) sees them.
    Its input is its first tensor argument (`slot`: a position or a keyword), the tensor vggattn reads positions
    from; the rest (heights and widths, position embeddings, masks) go back to the module as they came."""

    args: tuple
    kwargs: dict
    slot: int | str
    seq_first: bool = False  # the block takes tokens sequence first (T, B, C) (`sequence_first`): `input` is their
    # batch-first view (B, T, C), and `with_input` hands a batch-first x back to it transposed

    @staticmethod
    def of(args: tuple, kwargs: dict | None = None, module: nn.Module | None = None) -> "Call | None":
        """The call of these arguments (to `module`, where known); None where no argument is a tensor."""
        kwargs = dict(kwargs or {})
        slot = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
        if slot is None:
            slot = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
        if slot is None:
            return None
        call = Call(tuple(args), kwargs, slot)
        call.seq_first = module is not None and module in _SEQUENCE_FIRST and call.given.dim() == 3
        return call

    @property
    def given(self) -> torch.Tensor:
        """The input tensor as the module got it (sequence first where `seq_first`)."""
        return self.args[self.slot] if isinstance(self.slot, int) else self.kwargs[self.slot]

    @property
    def input(self) -> torch.Tensor:
        """The block's input as vggattn reads it: (B, C, H, W) or tokens (B, T, C), batch first."""
        return self.given.transpose(0, 1) if self.seq_first else self.given

    def with_input(self, x: torch.Tensor) -> tuple[tuple, dict]:
        """(args, kwargs) with x (as `input` is) wherever the input was (a self-attention given it as query, key and
        value)."""
        given, x = self.given, x.transpose(0, 1) if self.seq_first else x
        put = lambda a: x if a is given else a  # noqa: E731
        return tuple(put(a) for a in self.args), {k: put(v) for k, v in self.kwargs.items()}

    def _mapped(self, fn) -> "Call":
        """fn applied to every tensor argument, once per tensor (one passed twice stays one)."""
        memo: dict[int, torch.Tensor] = {}
        one = lambda a: memo.setdefault(id(a), fn(a)) if isinstance(a, torch.Tensor) else a  # noqa: E731
        return Call(tuple(one(a) for a in self.args), {k: one(v) for k, v in self.kwargs.items()}, self.slot,
                    self.seq_first)

    def sliced(self, rows: slice) -> "Call":
        """The call for images `rows` of the batch: the input and every tensor argument with the input's batch size
        (position embeddings, masks) sliced alike (sequence-first tokens on their second axis)."""
        b = self.input.shape[0]
        if self.seq_first:
            return self._mapped(lambda a: a[:, rows] if a.dim() == 3 and a.shape[1] == b else
                                a[rows] if a.dim() and a.shape[0] == b else a)
        return self._mapped(lambda a: a[rows] if a.dim() and a.shape[0] == b else a)

    def detached(self) -> "Call":
        return self._mapped(lambda a: a.detach())

    def key(self) -> tuple:
        """What a layout depends on besides the input's shape: the other arguments' shapes and plain values."""
        def one(a):
            if isinstance(a, torch.Tensor):
                return ("T", tuple(a.shape[1:]), a.dtype)
            if isinstance(a, (int, float, str, bool, type(None))):
                return a
            if isinstance(a, (tuple, list)):
                return tuple(one(v) for v in a)
            return type(a).__name__
        return (self.slot, self.seq_first, tuple(one(a) for i, a in enumerate(self.args) if i != self.slot),
                tuple((k, one(v)) for k, v in self.kwargs.items() if k != self.slot))


_SEQUENCE_FIRST: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def sequence_first(module: nn.Module) -> None:
    """Take the module's token input as sequence first (T, B, C), as nn.MultiheadAttention and nn.Transformer* take
    it with batch_first=False (their default): every `Call` of it reads (B, T, C) and hands it back transposed."""
    _SEQUENCE_FIRST.add(module)


def first_tensor(args: tuple, kwargs: dict | None = None, module: nn.Module | None = None) -> torch.Tensor | None:
    """A module call's input: its first tensor argument, positional or keyword (`Call.input`)."""
    call = Call.of(args, kwargs, module)
    return None if call is None else call.input


def _fused_with_lse(q, k, v, p: dict) -> bool:
    """Whether F.scaled_dot_product_attention's call can run as PyTorch's CPU flash kernel, which also returns each
    row's log normaliser: 4-D float tensors on the CPU, one head size, no mask, not causal, no grouped heads."""
    return (q.device.type == "cpu" and q.dim() == 4 and k.dim() == 4 and v.dim() == 4
            and q.dtype in (torch.float32, torch.float64, torch.bfloat16) and q.dtype == k.dtype == v.dtype
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and p.get("attn_mask") is None and not p.get("is_causal") and not p.get("dropout_p")
            and not p.get("enable_gqa"))


class Recorder(TorchFunctionMode):
    """Keeps, per tensor made in the forward, the call that made it; finds attention events as products run.

    inputs: the tensors the trace starts from (live). replace: {event index: fn(weights) -> new weights} swaps the
    weights of those events before the product runs (interventions). tangents: hold norm statistics constant."""

    def __init__(self, inputs, *, keep: bool = True, replace: dict | None = None, tangents: bool = False,
                 stack: list | None = None, drop_attended: bool = False, masses: "Masses | None" = None):
        super().__init__()
        self._nodes: dict[int, tuple] = {}
        self.keep, self.replace, self.tangents = keep, replace or {}, tangents
        self.masses = masses  # tangents through position-mixing maps as masses (with `tangents`)
        self.on_event = None  # called as each attention is found (`discover`: keep the running modules' calls)
        self.drop_attended = drop_attended  # an attention's output gets no tangent (`token_places`)
        self.stack = stack if stack is not None else []  # module names, innermost last (the discovery's hooks)
        self.events: list[Event] = []
        self.event_modules: list[list[str]] = []  # the module stack at each event
        for t in _tensors(inputs):
            self._set(t, Node("input", (), True))

    def tokens_live(self, args, kwargs, batch: int) -> None:
        """Tokens (batch, T, C) handed to a module that no trace reaches from the input (a prompt's embeddings, learned
        queries expanded over the batch) count as live from here on, so an attention between them and the image's
        places is found (`vggattn.attention.cross` reads which side sits where)."""
        for t in _tensors(args) + _tensors(kwargs):  # (B, T, C), or (B, 1, T, C): SAM's tokens per point batch
            if (t.dim() == 3 or (t.dim() == 4 and t.shape[1] == 1)) and t.shape[0] == batch \
                    and not isinstance(t, nn.Parameter) and not self.live(t) and t.is_floating_point():
                self._set(t, Node("tokens", (), True))

    def _set(self, t: torch.Tensor, node: Node) -> None:
        self._nodes[id(t)] = (weakref.ref(t), node)

    def node(self, t) -> Node | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._nodes.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def live(self, t) -> bool:
        n = self.node(t)
        return n is not None and n.live

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == SDPA:
            return self._dropped(self._sdpa(args, kwargs))
        if name == MHA:  # PyTorch's own attention runs as one call: computed here, op by op, under this mode
            out = self._mha(args, kwargs)
            if out is not None:
                return out
        if name in NORMS and self.tangents:
            out = self._norm_constant_stats(name, args, kwargs)
            if out is not None:
                self._record(name, args, kwargs, out)
                return out
        if name in MIXING and self.tangents and self.masses is not None:
            out = self.masses.apply(func, args, kwargs)
            if out is not None:
                self._record(name, args, kwargs, out)
                return out
        made = len(self.events)
        if name in PRODUCTS:
            args = self._product(name, args, kwargs)
        out = func(*args, **kwargs)
        self._record(name, args, kwargs, out)
        return self._dropped(out) if len(self.events) > made else out

    def _dropped(self, out):
        """An attention's output, with no tangent when `drop_attended` (so a token's tangent is only what its own
        residual stream carries)."""
        if not self.drop_attended or not isinstance(out, torch.Tensor):
            return out
        primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:
            return out
        new = fwAD.make_dual(primal, torch.zeros_like(primal))
        node = self.node(out)
        if node is not None:
            self._set(new, node)
        return new

    # -- provenance --------------------------------------------------------------------------------------------------
    def _record(self, name, args, kwargs, out) -> None:
        outs = _tensors(out)
        if not outs:
            return
        parents = tuple(n for t in _tensors(args) + _tensors(kwargs) if (n := self.node(t)) is not None)
        live = any(p.live for p in parents)
        node = Node(name, parents, live, self.stack[-1] if self.stack else "")
        if name in SCALING and len(args) >= 2:
            other = args[1] if isinstance(args[0], torch.Tensor) and self.node(args[0]) is not None else args[0]
            if isinstance(other, (int, float)) or (isinstance(other, torch.Tensor) and other.numel() == 1
                                                   and not self.live(other)):
                f = float(other)
                node.scale = 1.0 / f if name in {"div", "__truediv__", "div_", "__itruediv__", "true_divide"} else f
        if name in {"transpose", "swapaxes"} and len(args) >= 3 and isinstance(args[0], torch.Tensor):
            d = args[0].dim()
            node.swaps = {args[1] % d, args[2] % d} == {d - 1, d - 2}
        elif name == "t":
            node.swaps = True
        elif name == "permute" and isinstance(args[0], torch.Tensor):
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            d = args[0].dim()
            node.swaps = len(dims) == d and [dims[-2] % d, dims[-1] % d] == [d - 1, d - 2]
        if name in SOFTMAX:
            node.extra["dim"] = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if name == "baddbmm":
            node.extra.update(beta=kwargs.get("beta", 1), alpha=float(kwargs.get("alpha", 1)))
        if name in PRODUCTS:
            node.pairwise = self._pairwise(name, args)
            if self.keep and node.pairwise:
                node.extra["operands"] = self._operands(name, args)
        for t in outs:
            self._set(t, node)

    def _pairwise(self, name, args) -> bool:
        ops = self._operands(name, args)
        return ops is not None and all(self.live(t) for t in ops[:2])

    @staticmethod
    def _operands(name, args):
        """(a, b, (labels a, labels b, labels out)) of a two-operand product, or None."""
        if name == "einsum":
            eq, ops = args[0], args[1:]
            if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
                ops = tuple(ops[0])
            if len(ops) != 2 or not all(isinstance(t, torch.Tensor) for t in ops):
                return None
            labels = _labels_einsum(eq, ops[0].dim(), ops[1].dim())
            return None if labels is None else (ops[0], ops[1], labels)
        if name == "baddbmm":
            a, b = args[1], args[2]
        elif name == "__rmatmul__":
            b, a = args[0], args[1]
        else:
            a, b = args[0], args[1]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2 or b.dim() < 2:
            return None
        return a, b, _labels_matmul(a.dim(), b.dim())

    # -- finding attention -------------------------------------------------------------------------------------------
    def source(self, t) -> tuple[str, Node, bool] | None:
        """Where weights come from: ("softmax" | "pairwise" | "concat", node, swapped last two axes on the way)."""
        node, swapped = self.node(t), False
        for _ in range(12):
            if node is None or not node.live:
                return None
            if node.op in SOFTMAX:
                return "softmax", node, swapped
            if node.op in PRODUCTS and node.pairwise:
                return "pairwise", node, swapped
            if node.op == "cat" and sum(p.live for p in node.parents) >= 2:
                return "concat", node, swapped
            live = [p for p in node.parents if p.live]
            if len(live) != 1:
                return None
            if node.op in TRANSPARENT or node.op in SCALING:
                swapped ^= node.swaps
            elif node.op not in {"relu", "conv2d", "_conv_forward", "linear", "sigmoid"}:
                return None  # (the concatenation form reaches its cat through conv and relu)
            node = live[0]
        return None

    def logits(self, softmax_node: Node):
        """The product under a softmax: (node, scale or None, additive, swapped), or None."""
        node, scale, additive, swapped = softmax_node.parents[0] if softmax_node.parents else None, 1.0, False, False
        for _ in range(12):
            if node is None or not node.live:
                return None
            if node.op in PRODUCTS and node.pairwise:
                if node.op == "baddbmm":
                    additive |= node.extra.get("beta", 0) != 0
                    scale = None if scale is None else scale * node.extra.get("alpha", 1.0)
                return node, scale, additive, swapped
            live = [p for p in node.parents if p.live]
            if node.op in ADDITIVE:
                additive = True
            elif node.op in SCALING:
                scale = None if node.scale is None or scale is None else scale * node.scale
            elif node.op in TRANSPARENT:
                swapped ^= node.swaps
            else:
                return None
            if len(live) != 1:
                if node.op in ADDITIVE and live:  # the logits and a live bias: follow the product
                    live = [p for p in live if p.op in PRODUCTS] or live[:1]
                else:
                    return None
            node = live[0]
        return None

    def _product(self, name, args, kwargs):
        ops = self._operands(name, args)
        if ops is None:
            return args
        a, b, (la, lb, lo) = ops
        if not (self.live(a) and self.live(b)):
            return args
        for w_first in (True, False):
            w, v, lw, lv = (a, b, la, lb) if w_first else (b, a, lb, la)
            src = self.source(w)
            if src is None:
                continue
            contracted = [x for x in lw if x in lv and x not in lo]
            queries = [x for x in lw if x not in lv and x in lo]
            v_feature = [x for x in lv if x not in lw and x in lo]
            if len(contracted) != 1 or len(queries) > 1 or len(v_feature) > 1:
                continue
            key, query = contracted[0], (queries[0] if queries else None)
            lead = [x for x in lo if x != query and x not in v_feature]
            wm = _moved(w, lw, query or key, key if query else None, lead)  # (lead..., nq, nk)
            if query is None:  # one row per image: (lead..., 1, nk)
                wm = wm.transpose(-1, -2)
            vm = _moved(v, lv, key, v_feature[0] if v_feature else None, lead)  # (lead..., nk, dv)
            key_is_last = lw.index(key) == len(lw) - 1
            index = len(self.events)
            self.events.append(self._event(src, wm, vm, w, key_is_last))
            self.event_modules.append(list(self.stack))
            if self.on_event is not None:
                self.on_event()
            if index in self.replace:
                new = self.replace[index](wm)
                labels = lead + ([query, key] if query else ["_q", key])
                if query is None:
                    new = new.transpose(-1, -2)
                    labels = lead + [key, "_q"]
                extra = [x for x in labels if x not in lw]
                new = new.permute([labels.index(x) for x in extra + lw]).reshape(w.shape).to(w.dtype)
                args = list(args)
                if name == "einsum":
                    if len(args) == 2:
                        pair = list(args[1])
                        pair[0 if w_first else 1] = new
                        args[1] = pair
                    else:
                        args[1 if w_first else 2] = new
                else:
                    first, second = {"baddbmm": (1, 2), "__rmatmul__": (1, 0)}.get(name, (0, 1))
                    args[first if w_first else second] = new
                args = tuple(args)
            return args
        return args

    def _event(self, src, wm, vm, w, key_is_last) -> Event:
        kind, node, swapped = src
        query = key = None
        scale, additive, over_keys = None, False, None
        qk_nodes = [node]
        operands = None
        if kind == "softmax":
            found = self.logits(node)
            if found is not None:
                pnode, scale, additive, lswapped = found
                operands, swapped = pnode.extra.get("operands"), swapped ^ lswapped
            over_keys = wm.shape[-1] > 1 and bool(
                torch.allclose(wm.detach().float().sum(-1), torch.ones((), device=wm.device), atol=1e-3))
        elif kind == "pairwise":
            operands, scale = node.extra.get("operands"), 1.0
            chain = self.node(w)
            while chain is not None and chain is not node:  # the scalars between the product and the weights
                if chain.op in SCALING:
                    scale = None if chain.scale is None or scale is None else scale * chain.scale
                elif chain.op in ADDITIVE:
                    additive = True
                live = [p for p in chain.parents if p.live]
                chain = live[0] if live else None
        if operands is not None and wm.shape[-2] > 1:
            query, key = self._qk(*operands, wm, key_is_last ^ swapped)
        return Event(kind, wm, vm, query, key, scale, additive, over_keys, self._modules_of(qk_nodes))

    @staticmethod
    def _qk(a, b, labels, wm, key_on_last):
        """The logits' operands as (lead..., n, d) queries and keys, matched to the weights' (nq, nk) axes:
        key_on_last says whether the keys are the logits' last axis (from the transposes on the way)."""
        la, lb, lo = labels
        ta = [x for x in la if x in lo and x not in lb]
        tb = [x for x in lb if x in lo and x not in la]
        fa = [x for x in la if x in lb and x not in lo]
        if len(ta) != 1 or len(tb) != 1 or len(fa) != 1:
            return None, None
        lead = [x for x in lo if x not in (ta[0], tb[0])]
        ta_tokens, tb_tokens = _moved(a, la, ta[0], fa[0], lead), _moved(b, lb, tb[0], fa[0], lead)
        keys_are_b = (lo[-1] == tb[0]) == key_on_last
        nq, nk = wm.shape[-2:]
        if nq != nk:  # sizes decide where they can
            keys_are_b = tb_tokens.shape[-2] == nk
        return (ta_tokens, tb_tokens) if keys_are_b else (tb_tokens, ta_tokens)

    def _modules_of(self, nodes) -> tuple[str, ...]:
        """The modules that made the given nodes' ancestors (the submodules that make the logits)."""
        seen, out, todo = set(), [], list(nodes)
        while todo:
            n = todo.pop()
            if id(n) in seen or not n.live:
                continue
            seen.add(id(n))
            if n.module and n.module not in out:
                out.append(n.module)
            todo.extend(n.parents)
        return tuple(out)

    # -- calls handled here ------------------------------------------------------------------------------------------
    def _sdpa(self, args, kwargs):
        """F.scaled_dot_product_attention as softmax(q k^T * scale + mask) v, with the weights kept (and replaced)."""
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
        p = dict(zip(names, args))
        p.update(kwargs)
        q, k, v = p["query"], p["key"], p["value"]
        if self.keep and not self.tangents and not self.replace and _fused_with_lse(q, k, v, p):  # reading: the fused
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(  # kernel, and each row's log
                q, k, v, 0.0, False, scale=p.get("scale"))  # normaliser; weights made when asked for (`Event.weights`)
            scale = p.get("scale") or 1.0 / math.sqrt(q.shape[-1])
            if self.live(q) and self.live(v):
                self.events.append(Event("sdpa", None, v, q, k, float(scale), False, True,
                                         self._modules_of([n for n in (self.node(q), self.node(k)) if n is not None]),
                                         lse=lse))
                self.event_modules.append(list(self.stack))
                if self.on_event is not None:
                    self.on_event()
            self._record(SDPA, (q, k, v), {}, out)
            return out
        if not self.keep and not self.tangents and not self.replace:  # finding, not reading: the fused call, and
            out = F.scaled_dot_product_attention(*args, **kwargs)  # weights of the right shape that hold nothing
            if self.live(q) and self.live(v):
                empty = torch.empty((), dtype=q.dtype, device=q.device).expand(*q.shape[:-1], k.shape[-2])
                self.events.append(Event("sdpa", empty, v, q, k, p.get("scale"), p.get("attn_mask") is not None,
                                         True, ()))
                self.event_modules.append(list(self.stack))
                if self.on_event is not None:
                    self.on_event()
            self._record(SDPA, (q, k, v), {}, out)
            return out
        scale = p.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        if p.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
        # with tangents, positions ride on q, k and v (the event keeps them as they are); the N x M weights and the
        # output are computed from the primals, no forward-mode AD through them (the output carries no tangent)
        plain = (lambda t: fwAD.unpack_dual(t).primal) if self.tangents else (lambda t: t)  # noqa: E731
        qp, kp, vp = plain(q), plain(k), plain(v)
        logits = (qp @ kp.transpose(-1, -2)) * scale  # (..., L, S)
        mask, additive = p.get("attn_mask"), False
        if p.get("is_causal"):
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            logits, additive = logits.masked_fill(~causal, float("-inf")), True
        if mask is not None:
            mask = plain(mask)
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
            additive = True
        weights = torch.softmax(logits.float(), dim=-1).to(qp.dtype)
        index = len(self.events)
        live = self.live(q) and self.live(v)
        if live:
            self.events.append(Event("sdpa", weights, v, q, k, float(scale), additive, True,
                                     self._modules_of([n for n in (self.node(q), self.node(k)) if n is not None])))
            self.event_modules.append(list(self.stack))
            if self.on_event is not None:
                self.on_event()
            if index in self.replace:
                weights = self.replace[index](weights).to(v.dtype)
        out = weights @ vp
        self._record(SDPA, (q, k, v), {}, out)
        return out

    def _mha(self, args, kwargs):
        """F.multi_head_attention_forward as its ops (projections, softmax(q k^T / sqrt(d) + masks) v, the output
        projection), run under this mode so its attention is found and kept like any other; None (the native call)
        for what it rarely takes (bias_k, add_zero_attn, static keys)."""
        p = dict(zip(MHA_ARGS, args))
        p.update(kwargs)
        if p.get("bias_k") is not None or p.get("add_zero_attn") or p.get("static_k") is not None \
                or p.get("static_v") is not None:
            return None
        q, k, v = p["query"], p["key"], p["value"]
        unbatched = q.dim() == 2
        if unbatched:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        L, B, E = q.shape  # (L, B, E): sequence first, as nn.MultiheadAttention hands them over
        S, H = k.shape[0], p["num_heads"]
        d = E // H
        if p.get("use_separate_proj_weight"):
            w = (p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"])
        else:
            w = p["in_proj_weight"].chunk(3)
        b = (None,) * 3 if p.get("in_proj_bias") is None else p["in_proj_bias"].chunk(3)
        with self:
            heads = lambda t, n: t.reshape(n, B * H, d).transpose(0, 1).reshape(B, H, n, d)  # noqa: E731
            qh = heads(F.linear(q, w[0], b[0]), L)  # (B, H, L, d)
            kh, vh = heads(F.linear(k, w[1], b[1]), S), heads(F.linear(v, w[2], b[2]), S)  # (B, H, S, d)
            logits = (qh @ kh.transpose(-1, -2)) / math.sqrt(d)  # (B, H, L, S)
            mask = p.get("attn_mask")
            if p.get("is_causal") and mask is None:
                mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
            if mask is not None:
                mask = mask.reshape(B, H, L, S) if mask.dim() == 3 else mask
                logits = logits.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
            pad = p.get("key_padding_mask")
            if pad is not None:
                pad = pad.reshape(B, 1, 1, S)
                logits = logits.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else logits + pad
            weights = torch.softmax(logits, dim=-1)
            if p.get("training") and p.get("dropout_p", 0.0) > 0:
                weights = F.dropout(weights, p["dropout_p"])
            out = (weights @ vh).permute(2, 0, 1, 3).reshape(L, B, E)  # (L, B, E)
            out = F.linear(out, p["out_proj_weight"], p.get("out_proj_bias"))
        if unbatched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        if not p.get("need_weights", True):
            return out, None
        return out, weights.mean(1) if p.get("average_attn_weights", True) else weights

    def _norm_constant_stats(self, name, args, kwargs):
        """GroupNorm / InstanceNorm with the statistics of the primal held constant for the tangent (positions stay
        where they are; the true tangent would spread every position's over the whole group)."""
        if name == "layer_norm":
            return self._layer_norm_constant_stats(args, kwargs)
        names = ["input", "num_groups", "weight", "bias", "eps"] if name == "group_norm" else \
            ["input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"]
        p = dict(zip(names, args))
        p.update(kwargs)
        primal, tangent = fwAD.unpack_dual(p["input"])
        if tangent is None:
            return None
        plain = lambda t: None if t is None else fwAD.unpack_dual(t).primal  # noqa: E731
        B, C = primal.shape[:2]
        groups = p.get("num_groups", C) if name == "group_norm" else C
        eps = p.get("eps", 1e-5)
        weight, bias = plain(p.get("weight")), plain(p.get("bias"))
        var = primal.reshape(B, groups, -1).var(-1, unbiased=False)
        shape = (B, C) + (1,) * (primal.dim() - 2)
        factor = (var + eps).rsqrt().repeat_interleave(C // groups, 1).reshape(shape)
        if weight is not None:
            factor = factor * weight.reshape((1, C) + (1,) * (primal.dim() - 2))
        out = F.group_norm(primal, groups, weight, bias, eps)
        return fwAD.make_dual(out, tangent * factor)

    def _layer_norm_constant_stats(self, args, kwargs):
        """LayerNorm with the primal's statistics held constant for the tangent: a token's tangent is scaled, not mixed
        with the other features' (which, in a token made of several places, would spread its place)."""
        p = dict(zip(["input", "normalized_shape", "weight", "bias", "eps"], args))
        p.update(kwargs)
        primal, tangent = fwAD.unpack_dual(p["input"])
        if tangent is None:
            return None
        plain = lambda t: None if t is None else fwAD.unpack_dual(t).primal  # noqa: E731
        dims = tuple(range(-len(tuple(p["normalized_shape"])), 0))
        eps = p.get("eps", 1e-5)
        weight, bias = plain(p.get("weight")), plain(p.get("bias"))
        out = F.layer_norm(primal, tuple(p["normalized_shape"]), weight, bias, eps)
        factor = (primal.var(dims, unbiased=False, keepdim=True) + eps).rsqrt()
        return fwAD.make_dual(out, tangent * factor * (1 if weight is None else weight))


class Masses:
    """Tangents through linear maps that mix positions (convolutions, average pools, interpolation) as masses: the
    map's weights taken as their absolute values, and each input feature's tangents signed by its first pass's (the
    r_c pass), so that a mixed token's tangents are positively weighted sums and its coordinate a weighted centre of
    the places it mixes, inside them (the true tangents, with signed weights, cancel: a strided conv's token would
    sit anywhere). One object serves the three passes of one input (r_c first): the k-th mixing call of a later pass
    takes the signs of the first pass's k-th."""

    def __init__(self):
        self.signs: list[torch.Tensor] = []
        self.first, self.calls = True, 0

    def next_pass(self) -> None:
        self.first, self.calls = False, 0

    def apply(self, func, args, kwargs):
        """func(*args, **kwargs) with its tangent as masses; None where its input carries no tangent."""
        args = list(args)
        src = args[0] if args else kwargs.get("input")
        if not isinstance(src, torch.Tensor):
            return None
        primal, tangent = fwAD.unpack_dual(src)
        if tangent is None:
            return None
        plain = lambda a: fwAD.unpack_dual(a).primal if isinstance(a, torch.Tensor) else a  # noqa: E731
        rest = [plain(a) for a in args[1:]]
        kw = {k: plain(v) for k, v in kwargs.items() if k != "input"}
        out = func(primal, *rest, **kw)
        if self.first:
            self.signs.append(tangent < 0)
        negative = self.signs[self.calls] if self.calls < len(self.signs) else None
        self.calls += 1
        mass = tangent if negative is None else torch.where(negative, -tangent, tangent)
        name = getattr(func, "__name__", "")
        gain = None
        if name.startswith("conv") or name == "linear":  # weight (and no bias) as absolute values
            if len(rest) >= 1:
                rest[0] = rest[0].abs()
            if len(rest) >= 2:
                rest[1] = None
            if "weight" in kw:
                kw["weight"] = kw["weight"].abs()
            if "bias" in kw:
                kw["bias"] = None
            weight = rest[0] if rest and isinstance(rest[0], torch.Tensor) else kw.get("weight")
            if name == "linear" and isinstance(weight, torch.Tensor):  # mixes features, not places: its masses
                gain = weight.sum(-1).mean().clamp_min(1e-12)  # kept at their scale (a deep stack of |W| overflows:
                # 33 MetaFormer blocks reach float32's 3e38 and every place is lost), the same in every pass
        carried = func(mass, *rest, **kw)
        return fwAD.make_dual(out, carried if gain is None else carried / gain)


# -- where the tokens sit -----------------------------------------------------------------------------------------------

@dataclass
class Positions:
    """Per token (lead..., n): its (y, x) on the input grid, whether it sits anywhere (padding: not), its spread."""

    y: torch.Tensor
    x: torch.Tensor
    valid: torch.Tensor
    spread: torch.Tensor


def positions(t1: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor) -> Positions:
    """Tokens (..., n, f) from their tangents under the input tangents r_c, r_c * y and r_c * x: the least-squares
    coordinate over the token's features, and how far the features disagree (a token made from many places)."""
    a, b, c = (t.detach().double() for t in (t1, ty, tx))
    den = (a * a).sum(-1)
    valid = den > 1e-20 * den.amax().clamp_min(1e-300)
    safe = torch.where(valid, den, torch.ones_like(den))
    y, x = (a * b).sum(-1) / safe, (a * c).sum(-1) / safe
    res = ((b - y[..., None] * a) ** 2 + (c - x[..., None] * a) ** 2).sum(-1) / safe
    return Positions(y, x, valid, res.clamp_min(0).sqrt())


def grid_cells(pos: Positions, hw: tuple[int, int], what: str, max_stride: int = 1) -> tuple[torch.Tensor, tuple[int, int], int]:
    """Each token's cell on its grid (-1: padding): the finest grid of stride s over the H x W input (ceil(H/s) x
    ceil(W/s) cells: s = 1 the input's own, larger for pooled, sub-sampled or strided tokens) on which no two tokens
    of one lead share a cell and all tokens together cover every cell; a token may mix places up to SPREAD_LIMIT
    cells of that grid apart (`max_stride`: the coarsest grid the tokens can be on, e.g. a ViT's patch size in
    pixels). -> (cells (lead..., n), grid, stride)."""
    H, W = hw
    ok = pos.valid
    if not bool(ok.any()):
        raise NotAttention(f"its {what} carry no position of the block's input")
    spread = float(pos.spread[ok].max())
    unit = "px of the image" if max_stride > 1 else "cells of the block's input"  # tokens: places in image pixels
    if spread > SPREAD_LIMIT * max_stride:
        raise NotAttention(f"its {what} are not positions (each mixes places about {spread:.0f} {unit} apart: "
                           "attention over channels, or a lambda layer)")
    y, x = pos.y[ok], pos.x[ok]
    if float(y.min()) < -0.5 or float(x.min()) < -0.5 or float(y.max()) > H - 0.5 or float(x.max()) > W - 0.5:
        raise NotAttention(f"its {what} sit outside the block's {H}x{W} input")
    n = pos.y.shape[-1]
    for s in range(1, 33):
        gh, gw = -(-H // s), -(-W // s)
        if gh * gw > ok.sum():
            continue  # fewer tokens than cells: a coarser grid
        cells = torch.full(pos.y.shape, -1, dtype=torch.long)
        cy = (y / s + 1e-4).floor().long().clamp(0, gh - 1)
        cx = (x / s + 1e-4).floor().long().clamp(0, gw - 1)
        cells[ok] = cy * gw + cx
        if int(torch.unique(cells[ok]).numel()) != gh * gw:
            continue  # some cell has no token
        flat = cells.reshape(-1, n)
        if all(int(torch.unique(r[r >= 0]).numel()) == int((r >= 0).sum()) for r in flat):
            if spread > SPREAD_LIMIT * s:
                raise NotAttention(f"its {what} are not positions (each mixes places about {spread / s:.1f} cells "
                                   f"of its {gh}x{gw} grid apart: attention over channels, or a lambda layer)")
            return cells, (gh, gw), s
    ordinal = _ordinal_cells(pos, hw) if max_stride > 1 else None  # tokens placed on the image through a network
    if ordinal is not None:
        return ordinal
    raise NotAttention(f"its {n} {what} lie on no regular grid over the block's {H}x{W} input")


def _ordinal_cells(pos: Positions, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], int] | None:
    """`grid_cells` by order, for tokens whose every lead holds one token per cell of a grid of stride s over the
    H x W input: rows by y, then columns by x within each row, each row wholly above the next. A deep CNN's tokens
    (DETR's, through a ResNet) sit at weighted centres of receptive fields that the image's border cuts, drawn toward
    its middle: off their cells, in order all the same."""
    H, W = hw
    n = pos.y.shape[-1]
    ys, xs, oks = pos.y.reshape(-1, n), pos.x.reshape(-1, n), pos.valid.reshape(-1, n)
    counts = oks.sum(-1)
    if not bool((counts == counts[0]).all()):
        return None
    spread = float(pos.spread[pos.valid].max())
    for s in range(1, 65):
        gh, gw = -(-H // s), -(-W // s)
        if gh * gw != int(counts[0]) or spread > SPREAD_LIMIT * s:
            continue
        cells = torch.full(ys.shape, -1, dtype=torch.long)
        for r in range(ys.shape[0]):
            idx = torch.nonzero(oks[r]).flatten()
            rows = idx[torch.argsort(ys[r, idx], stable=True)].reshape(gh, gw)  # (gh, gw) token indices
            ry = ys[r, rows]
            if gh > 1 and not bool((ry[:-1].amax(-1) < ry[1:].amin(-1)).all()):
                break
            rows = rows.gather(1, torch.argsort(xs[r, rows], dim=-1, stable=True))
            cells[r, rows.reshape(-1)] = torch.arange(gh * gw)
        else:
            return cells.reshape(pos.y.shape), (gh, gw), s
    return None


def row_major(n: int, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """Cells of n tokens assumed in row-major order on the input grid or a pooled one (no tangents to read)."""
    H, W = hw
    for s in range(1, 33):
        gh, gw = -(-H // s), -(-W // s)
        if gh * gw == n:
            return torch.arange(n), (gh, gw)
    return None


# -- a block's layout ---------------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """How one attention of a block lies on the block input's grid, for one input shape. Its weights (L, nq, nk)
    (leads flattened; several events in query blocks are concatenated along nq) map to rows (heads, N, M): row (h, c)
    is weights[lq[h, c], iq[h, c]], whose keys fall on cells kcell[lq[h, c]] (-1: padding)."""

    group: list[int]  # the events (in the forward's order) that make this attention
    sizes: list[int]  # the queries of each of those events
    grid: tuple[int, int]
    key_grid: tuple[int, int]
    heads: int
    lq: torch.Tensor  # (heads, N) lead index of each row
    iq: torch.Tensor  # (heads, N) query index within the lead
    kcell: torch.Tensor  # (L, nk) key cell of each key (-1: padding)
    per_image: bool
    qk: bool  # rows are normalise(scale * Q K^T) of per-head Q, K on the grids (the page computes them)
    lk: torch.Tensor | None  # (heads,) lead of each head's keys, when qk
    key_order: torch.Tensor | None  # (M,) the key index of each key cell, when qk
    padded: bool  # some keys fall on padding
    meaning: str  # what the numbers are, in words
    qk_modules: tuple[str, ...]  # submodules (names within the block) that make the logits
    kind: str
    scale: float | None
    normalise: str  # "softmax" or "mean" (dot product / M): Q and K make the rows; "weights": the rows are given
    sums_to_one: bool  # every row is a distribution over the key cells (a softmax over the keys, none on padding)
    kprefix: torch.Tensor | None = None  # (L, nk) tokens: which prefix token each key is (-1: a place on the grid)
    prefix_names: list[str] | None = None  # the prefix tokens' names (`TokenPlaces.names`)
    prefix_queries: torch.Tensor | None = None  # (heads, P) tokens: the query index of each prefix token's row
    token_keys: torch.Tensor | None = None  # (M + P,) tokens whose rows are softmax(scale Q K^T) over all their keys:
    # the key index of each grid cell, then of each prefix token (the page computes every row, prefix rows too)

    @property
    def windowed(self) -> bool:
        """Each query sees only a window of the key grid (its keys are fewer than the grid's cells)."""
        return not self.qk and not self.per_image and self.kcell.shape[1] < self.key_grid[0] * self.key_grid[1]

    @staticmethod
    def of(block: nn.Module, x: torch.Tensor, attention: int = 0, places: "TokenPlaces | None" = None,
           call: Call | None = None) -> "Layout":
        """The layout of the block's attention number `attention` for inputs shaped like x (cached per shape and the
        call's other arguments); tokens (B, T, C) need their `places` on the image (`token_places`); call: how the
        model calls the block (its other arguments), where it takes more than x."""
        key = (tuple(x.shape[1:]), x.dtype, str(x.device), attention, None if call is None else call.key())
        cache = _LAYOUTS.setdefault(block, {})
        if key not in cache:
            shared = (structure(block), key, None if places is None else
                      (id(places.positions), tuple(places.names or ())))
            if shared not in _SHARED:  # no block of the same code, settings and input read yet
                one = None if call is None else call.sliced(slice(0, 1)).detached()
                _SHARED[shared] = (places, _layout(block, x[:1].detach(), attention, places, one))
                while len(_SHARED) > 1024:
                    _SHARED.pop(next(iter(_SHARED)))
            cache[key] = _SHARED[shared][1]
        return cache[key]

    def inverse(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, nq) head and grid cell of every (lead, query) entry; cell -1 for a query with no place (a prefix
        token's: its row is no row of the grid)."""
        L = self.kcell.shape[0]
        nq = max(int(self.iq.max()), -1 if self.prefix_queries is None else int(self.prefix_queries.max())) + 1
        h = torch.zeros(L, nq, dtype=torch.long)
        c = torch.full((L, nq), -1, dtype=torch.long)
        h[self.lq, self.iq] = torch.arange(self.heads)[:, None].expand_as(self.lq)
        c[self.lq, self.iq] = torch.arange(self.lq.shape[1])[None].expand_as(self.lq)
        return h, c


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# layouts by what decides them: the blocks of a transformer (same code, same settings, same tokens in the same places)
# share one, read once (the places are kept beside it so their id is not reused)
_SHARED: dict[tuple, tuple] = {}
_STRUCTURES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def structure(block: nn.Module) -> tuple:
    """What a block's layout depends on besides its input: the class and plain settings (ints, floats, strings,
    tuples of them: window sizes, shifts, head counts; not dropout rates) of it and every submodule, and their
    parameters' and buffers' shapes; not the weights' values (a layout says where queries and keys sit, which the
    code decides)."""
    if block not in _STRUCTURES:
        def plain(v):
            try:
                hash(v)
            except TypeError:
                return False
            return isinstance(v, (int, float, bool, str, type(None))) or \
                (isinstance(v, tuple) and all(isinstance(e, (int, float, bool, str)) for e in v))
        parts = []
        for name, m in block.named_modules():
            settings = tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"
                                    and "drop" not in k and plain(v)))  # dropout rates: nothing in eval mode
            tensors = tuple((n, tuple(t.shape)) for n, t in (*m.named_parameters(recurse=False),
                                                             *m.named_buffers(recurse=False)))
            parts.append((name, type(m), settings, tensors))
        _STRUCTURES[block] = (type(block), tuple(parts))
    return _STRUCTURES[block]


def _pre_hook(module: nn.Module, fn, name: str):
    """A forward pre-hook calling fn(module, args, kwargs, name). kwargs may be None: PyTorch marks a hook as taking
    them just after adding it, so a hook added while another thread's forward runs can be called once without."""
    return module.register_forward_pre_hook(lambda m, a, k=None, n=name: fn(m, a, k, n), with_kwargs=True)


class _Tracking:
    """Forward hooks on every submodule that keep the names of the modules running (this thread's only) on a stack;
    removed on exit."""

    def __init__(self, root: nn.Module, stack: list, inputs: dict | None = None, model_input=None,
                 calls: dict | None = None):
        self.root, self.stack, self.inputs, self.handles = root, stack, inputs, []
        self.model_input = model_input  # a module fed this very tensor is the model (a wrapper, a backbone): no shape
        self.calls = calls  # {name: its first Call} of the modules running when `mark` was called (`discover`)
        self._pending: dict[str, Call | None] = {}
        self._marked: set[str] = set()
        self.recorder: "Recorder | None" = None  # (`discover`) tokens handed to a module count as live there

    def mark(self) -> None:
        """Keep the calls of the modules running now (an attention was just found in them)."""
        self._marked.update(self.stack)

    def __enter__(self):
        me = threading.get_ident()

        def pre(module, args, kwargs, name):
            if threading.get_ident() == me:
                self.stack.append(name)
                if self.inputs is not None and name not in self.inputs:
                    first = first_tensor(args, kwargs, module)
                    self.inputs[name] = None if first is None or first is self.model_input else tuple(first.shape)
                if self.calls is not None and name not in self.calls and name not in self._pending:
                    self._pending[name] = Call.of(args, kwargs, module)
                if self.recorder is not None:
                    self.recorder.tokens_live(args, kwargs, self.model_input.shape[0])

        def post(module, args, out, name):
            if threading.get_ident() == me and self.stack:
                self.stack.pop()
                if name in self._pending:
                    call = self._pending.pop(name)
                    if name in self._marked and call is not None:
                        self.calls[name] = call.detached()
        try:
            for name, module in self.root.named_modules():
                if name:
                    self.handles.append(_pre_hook(module, pre, name))
                    self.handles.append(module.register_forward_hook(lambda m, a, o, n=name: post(m, a, o, n)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False


def record(block: nn.Module, x: torch.Tensor, *, replace: dict | None = None, tangents: bool = False,
           track: bool = False, call: Call | None = None, masses: "Masses | None" = None):
    """One forward of the block's own code (its hooks skipped) under a Recorder: (recorder, output). call: how the
    model called the block (its other arguments; x takes its input's place), for x's batch. track: also name the
    submodule that made each tensor (hooks on every submodule, for the layout's `qk_modules` only)."""
    stack: list = []
    rec = Recorder([x], replace=replace, tangents=tangents, stack=stack, masses=masses)
    given = lambda: ((x,), {}) if call is None else call.with_input(x)  # noqa: E731 (inside: a sequence-first
    if not track:  # input's transpose is seen as made from x)
        with rec:
            args, kwargs = given()
            return rec, block.forward(*args, **kwargs)
    with _Tracking(block, stack), rec:
        args, kwargs = given()
        out = block.forward(*args, **kwargs)
    return rec, out


class RowSums(TorchFunctionMode):
    """Inside a block whose forward computes its rows itself as a softmax over the last axis, a query's row a row and
    in query order (`Adapter.softmax_rows`), what gives the rows' log normalisers and their sum over queries, read
    from each softmax's output as the forward runs: each row's largest weight and its key (log Z = that key's logit
    - log(the weight), `vggattn.attention.readouts.exact_log_z`), and a sum over the rows. Two passes over weights the
    forward makes anyway, no exponential of its own."""

    def __init__(self):
        super().__init__()
        self.top: list[torch.Tensor] = []  # each row's largest weight's key
        self.log_top: list[torch.Tensor] = []  # the log of that weight (float64)
        self.total: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") in SOFTMAX and isinstance(out, torch.Tensor) and args \
                and isinstance(args[0], torch.Tensor) and args[0].shape == out.shape and out.dim() >= 2:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, out.dim() - 1):
                with torch.no_grad():
                    w = out.detach().reshape(-1, out.shape[-1])
                    largest, index = w.max(-1)
                    self.top.append(index)
                    self.log_top.append(largest.double().log())  # log Z = the largest logit - this (`exact_log_z`)
                    part = w.sum(0).double()
                    self.total = part if self.total is None else self.total + part
        return out

    def result(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(each row's largest weight's key (R,), the log of that weight (R,) float64, the rows' sum (M,) float64), of
        the R rows seen; None when no softmax ran."""
        return None if self.total is None else (torch.cat(self.top), torch.cat(self.log_top), self.total)


@dataclass
class TokenPlaces:
    """Where each token of a block's (B, T, C) input sits on the model's input image."""

    positions: Positions  # per token (T,): y and x in pixels; valid False: made from no place (a prefix token)
    hw: tuple[int, int]  # the image's (H, W)
    names: list[str] | None = None  # each prefix token's name (`name_prefix`), in order

    @property
    def prefix(self) -> list[int]:
        """The tokens with no place on the image (a class token, a distillation token, registers), in order."""
        return [int(i) for i in torch.nonzero(~self.positions.valid).flatten()]


class _Enough(Exception):
    """Raised from a pre-hook to stop a forward once every input it was run for has been seen."""


def _run_until(model: nn.Module, x, names: list[str], keep, calls: bool = False) -> None:
    """model(x) under a `Watch` of the named modules (their inputs as they are: tangents kept), stopped as soon as
    every one has been entered: keep(name, its input) once per name, in the forward's order (calls: keep(name, its
    whole `Call`))."""
    with Watch(model, names, keep_graph=True, until_seen=True) as w:
        try:
            model(x)
        except _Enough:
            pass
    for name, seen in w.seen.items():
        keep(name, seen.call if calls else seen.input)


def placing_passes(model: nn.Module, x: torch.Tensor, names: list[str], take, calls: bool = False
                   ) -> tuple[list[dict], tuple[int, int]]:
    """The model run on x[:1] once per tangent of the image's coordinates (`_input_tangents`: r_c, r_c * y, r_c * x),
    the image live so every attention computed from it is found and its output given no tangent, norms held
    constant, each run stopped once the named blocks are entered (`_run_until`) -> (per pass {name: take(its input,
    or its `Call` with calls)} where take gives something, the image's (H, W))."""
    inputs, hw, _ = _input_tangents(x[:1], None)
    masses, passes = Masses(), []
    with torch.no_grad(), fwAD.dual_level():
        for i, t in enumerate(inputs):
            got: dict = {}
            passes.append(got)
            if i:
                masses.next_pass()

            def keep(name, value, got=got):
                kept = take(value)
                if kept is not None:
                    got[name] = kept
            dual = fwAD.make_dual(x[:1].detach(), t.contiguous())
            with Recorder([dual], keep=False, tangents=True, drop_attended=True, masses=masses):
                _run_until(model, dual, names, keep, calls)
    return passes, hw


def firsts_by_shape(names: list[str], shapes: dict[str, tuple]) -> dict[str, str]:
    """{block: the first block (in `names`' order, the forward's) whose input has its shape}: blocks of one stage of a
    transformer take the same tokens in the same places (the residual stream keeps them), so the first stands for
    the rest."""
    first: dict[tuple, str] = {}
    return {n: first.setdefault(tuple(shapes[n]), n) for n in names}


def token_places(model: nn.Module, x: torch.Tensor, names: list[str],
                 shapes: dict[str, tuple] | None = None) -> dict[str, TokenPlaces]:
    """Where each token of the named blocks' inputs sits on the model's input image x (1, C, H, W), for the blocks
    whose input is tokens (B, T, C): forward-mode tangents of the image's coordinates through the model, with every
    attention's output given no tangent, so a token carries the place its residual stream started from (a patch: its
    pixels; a class token or a register, made from parameters: none) however many blocks it went through, and norms
    held constant. Derived from the model's code, not from its name. shapes: each block's input shape in a forward
    of x, in the forward's order; then only the first block of each shape is reached (`firsts_by_shape`) and the
    forward stops there (a ViT: its patch embedding only), the others share its places."""
    rep = firsts_by_shape(names, shapes) if shapes is not None else {n: n for n in names}
    wanted = list(dict.fromkeys(rep.values()))
    passes, hw = placing_passes(model, x, wanted, lambda first: fwAD.unpack_dual(first).tangent  # a block that runs
                                if first is not None and first.dim() == 3 else None)  # twice keeps its first input
    found = {}
    for n in passes[0]:  # the forward's order
        tangents = [p.get(n) for p in passes]
        if all(t is not None for t in tangents):
            found[n] = TokenPlaces(positions(*(t[0] for t in tangents)), hw)
    out = {}
    for first in found:  # each first, then the blocks it stands for, in the forward's order
        for n in names:
            if rep[n] == first:
                out[n] = found[first] if n == first else TokenPlaces(found[first].positions, hw)
    return out


def name_prefix(model: nn.Module, x: torch.Tensor, places: dict[str, TokenPlaces]) -> None:
    """Name each block's prefix tokens by the parameter they are made from: the model's token-shaped parameters
    ((1, k, D), (k, D) or (D,), `_token_shaped`) are changed one at a time (seen by this thread only), and a prefix
    token at the input of the first block (in the forward's order, `places`' order) of its token count that changes
    with one and no patch token does is that parameter's (its k-th row: "reg_token[2]"); any other is "prefix <i>".
    Each run stops at those first blocks. Later blocks keep their tokens' names (the residual stream keeps the
    tokens in place, as `token_places` reads it). Sets places' names."""
    order = list(places)  # the forward's order (`token_places`)
    if not order:
        return
    firsts: dict[tuple, str] = {}
    for n in order:
        firsts.setdefault((places[n].positions.y.shape[-1], tuple(places[n].prefix)), n)
    names = list(firsts.values())
    dims = {places[n].positions.y.shape[-1] for n in names}
    got: dict[str, torch.Tensor] = {}

    def keep(name, first):
        if first is not None:
            got[name] = first.detach().clone()

    found: dict[str, dict[int, str]] = {n: {} for n in names}
    with torch.no_grad():  # each forward stops once every first block's input is seen (`_run_until`)
        _run_until(model, x[:1], names, keep)
        base, got = got, {}
        width = {n: base[n].shape[-1] for n in base}
        for pname, p in model.named_parameters():
            if not _token_shaped(pname, p, max(dims), set(width.values())):
                continue
            # a random change (a constant one vanishes in a LayerNorm), seen by this thread's forward only: the
            # model's parameter is never touched, so other requests served meanwhile are not affected
            changed = p + torch.randn(p.shape, generator=torch.Generator().manual_seed(0)).to(p) * (1.0 + p.abs())
            with Substituted({p: changed}):
                _run_until(model, x[:1], names, keep)
            for n in names:
                if n not in got or n not in base:
                    continue
                changed = (got[n][0] - base[n][0]).abs().amax(-1) > 1e-6 * base[n].abs().amax().clamp_min(1e-30)
                prefix = places[n].prefix
                if bool(changed[places[n].positions.valid].any()):
                    continue  # it reaches the patches too (a position embedding)
                hit = [i for i in prefix if bool(changed[i])]
                for r, i in enumerate(hit):
                    found[n].setdefault(i, pname if len(hit) == 1 else f"{pname}[{r}]")
            got = {}
    for n, p in places.items():
        first = firsts.get((p.positions.y.shape[-1], tuple(p.prefix)), n)
        p.names = [found.get(first, {}).get(i, f"prefix {j}") for j, i in enumerate(p.prefix)]


def _token_shaped(name: str, p: torch.Tensor, most: int, widths: set[int]) -> bool:
    """Whether a parameter may be token embeddings: (1, k, D), (k, D) or (D,) with D a block's width and k at most
    its token count (timm's cls_token and reg_token, transformers' register_tokens, CLIP's class_embedding), and
    not a layer's weight or bias."""
    if name.split(".")[-1] in ("weight", "bias") or p.shape[-1] not in widths or not 1 <= p.dim() <= 3:
        return False
    return p.dim() == 1 or (p.numel() // p.shape[-1] <= most and (p.dim() == 2 or p.shape[0] == 1))


class Substituted(TorchFunctionMode):
    """In the entering thread only, every torch call given one of the keys (a parameter) gets its value instead: a
    model run as if that parameter were changed, without changing it (other threads' forwards see it as it is)."""

    def __init__(self, values: dict[torch.Tensor, torch.Tensor]):
        super().__init__()
        self.values = {id(k): (k, v) for k, v in values.items()}

    def _swap(self, a):
        if isinstance(a, torch.Tensor):
            kv = self.values.get(id(a))
            return kv[1] if kv is not None and kv[0] is a else a
        if isinstance(a, (list, tuple)):
            return type(a)(self._swap(v) for v in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        return func(*(self._swap(a) for a in args), **{k: self._swap(v) for k, v in kwargs.items()})


@dataclass
class Seen:
    """What one block did in a watched forward: its input, its output, and (traced blocks) the calls it made."""

    input: torch.Tensor
    output: object = None
    events: list | None = None
    call: Call | None = None  # how the model called the block (its other arguments, positional or keyword)
    row_sums: tuple[torch.Tensor, torch.Tensor] | None = None  # `summarised` blocks: RowSums.result()


class Watch:
    """While entered, each named block's first run in this thread's forwards: its input and output (detached;
    keep_graph: as they are, for a gradient at them), inside the `traced` ones a Recorder (entered by the block's
    forward pre-hook, left by its forward hook: no cost elsewhere), inside the `summarised` ones a RowSums, kept in
    `seen` ({block name: Seen}). Every hook is removed on exit, also when the forward raised. The one way vggattn
    observes a forward (`Intervention` is the one way it changes one).

        with Watch(model, ["blocks.0"]) as w:
            model(x)            # or any code that runs it: w.seen["blocks.0"].input
    """

    def __init__(self, model: nn.Module, names: list[str], traced: set[str] = frozenset(), keep_graph: bool = False,
                 summarised: set[str] = frozenset(), until_seen: bool = False, every_argument: set[str] = frozenset()):
        self.model, self.names, self.traced, self.summarised = model, list(names), traced, summarised
        self.every_argument = every_argument  # traced blocks whose every tensor argument is live, not only their
        # input (cross-attention: the keys come from another argument, `vggattn.attention.cross`)
        self.keep_graph, self.until_seen = keep_graph, until_seen  # until_seen: stop the forward (`_Enough`) once
        # every named module has been entered
        self.seen: dict[str, Seen] = {}
        self._active: dict[str, TorchFunctionMode] = {}
        self._handles: list = []
        self._me = threading.get_ident()

    def _enter(self, module, args, kwargs, name):
        if threading.get_ident() != self._me or name in self.seen:
            return
        given = Call.of(args, kwargs, module)
        call = given if given is None or self.keep_graph else given.detached()
        self.seen[name] = Seen(None if call is None else call.input, call=call)
        if self.until_seen and len(self.seen) == len(set(self.names)):
            raise _Enough
        if name in self.traced or name in self.summarised:
            live = [] if given is None else _tensors(given.args) + _tensors(given.kwargs) \
                if name in self.every_argument else [given.given]
            mode = Recorder(live) if name in self.traced else RowSums()
            mode.__enter__()
            self._active[name] = mode

    def _leave(self, module, args, out, name):
        seen = self.seen.get(name)
        if threading.get_ident() != self._me or seen is None or seen.output is not None:
            return
        if self.keep_graph:
            seen.output = out
        else:
            seen.output = out.detach() if isinstance(out, torch.Tensor) else \
                tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out) if isinstance(out, (tuple, list)) else out
        if name in self._active:
            mode = self._active.pop(name)
            mode.__exit__(None, None, None)
            if isinstance(mode, Recorder):
                seen.events = mode.events
            else:
                seen.row_sums = mode.result()

    def __enter__(self) -> "Watch":
        modules = dict(self.model.named_modules())
        self._me = threading.get_ident()
        try:
            for name in self.names:
                self._handles.append(_pre_hook(modules[name], self._enter, name))
                self._handles.append(modules[name].register_forward_hook(
                    lambda m, a, o, n=name: self._leave(m, a, o, n)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mode in reversed(list(self._active.values())):  # a forward that failed inside a block
            mode.__exit__(None, None, None)
        self._active.clear()
        return False


def watch(model: nn.Module, x: torch.Tensor, names: list[str], traced: set[str] = frozenset(),
          keep_graph: bool = False, summarised: set[str] = frozenset(), every_argument: set[str] = frozenset()
          ) -> tuple[object, dict]:
    """The model's forward on x under a `Watch` of the named blocks -> (the output, {block name: Seen})."""
    with Watch(model, names, traced, keep_graph, summarised, every_argument=every_argument) as w:
        out = model(x)
    return out, w.seen


def _rows(ev: Event) -> int:
    """How many query rows an event's weights have (a fused call's: its query's, its weights not made)."""
    return (ev.query if ev.held is None else ev.held).shape[-2]


def event_groups(events: list[Event]) -> list[list[int]]:
    """Attentions as lists of event indices: consecutive events with the same values (one attention computed a
    block of query rows at a time, as the article's CPU path does) are one, as long as their query rows together
    are no more than the keys (two full attentions over the same values, as a differential attention's two
    softmaxes, are two)."""
    groups: list[list[int]] = []
    for i, ev in enumerate(events):
        if groups:
            first = events[groups[-1][0]].values
            if ev.values.shape == first.shape and ev.values.data_ptr() == first.data_ptr() and \
                    sum(_rows(events[j]) for j in groups[-1]) + _rows(ev) <= first.shape[-2]:  # (the same keys:
                # never ask a fused call's events for weights here, which would make them)
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(lead..., n, f) -> (L, n, f)."""
    return t.reshape(-1, *t.shape[-2:])


def _input_tangents(x: torch.Tensor, places: "TokenPlaces | None", channels_last: bool = False
                    ) -> tuple[list, tuple[int, int], int]:
    """The three tangents of a block input that carry its positions (r_c, r_c * y, r_c * x), the grid they are on, and
    the coarsest stride its tokens may sit on: an image grid (B, C, H, W) carries its own; tokens (B, T, C) carry
    where `places` puts them on the model's input image (none for a prefix token); channels_last: the grid is
    (B, H, W, C)."""
    gen = torch.Generator().manual_seed(0)
    if x.dim() == 4 and channels_last:  # (B, H, W, C), as Swin's blocks take it
        B, H, W, C = x.shape
        r = (0.5 + torch.rand(C, generator=gen, dtype=torch.float64)).to(x.dtype).to(x.device).reshape(1, 1, 1, C)
        ys = torch.arange(H, dtype=x.dtype, device=x.device).reshape(1, H, 1, 1)
        xs = torch.arange(W, dtype=x.dtype, device=x.device).reshape(1, 1, W, 1)
        return [r.expand_as(x), (r * ys).expand_as(x), (r * xs).expand_as(x)], (H, W), 1
    if x.dim() == 4:
        B, C, H, W = x.shape
        r = (0.5 + torch.rand(C, generator=gen, dtype=torch.float64)).to(x.dtype).to(x.device).reshape(1, C, 1, 1)
        ys = torch.arange(H, dtype=x.dtype, device=x.device).reshape(1, 1, H, 1)
        xs = torch.arange(W, dtype=x.dtype, device=x.device).reshape(1, 1, 1, W)
        return [r.expand_as(x), (r * ys).expand_as(x), (r * xs).expand_as(x)], (H, W), 1
    if x.dim() != 3 or places is None or places.positions.y.shape[-1] != x.shape[1]:
        raise NotAttention(f"its input is {tuple(x.shape)}: neither an image grid (B, C, H, W) nor tokens whose "
                           "places on the image are known")
    B, T, C = x.shape
    pos = places.positions
    on = pos.valid.reshape(1, T, 1).to(x.dtype).to(x.device)
    r = (0.5 + torch.rand(C, generator=gen, dtype=torch.float64)).to(x.dtype).to(x.device).reshape(1, 1, C) * on
    ys = torch.where(pos.valid, pos.y, 0).to(x.dtype).to(x.device).reshape(1, T, 1)
    xs = torch.where(pos.valid, pos.x, 0).to(x.dtype).to(x.device).reshape(1, T, 1)
    return [r.expand_as(x), (r * ys).expand_as(x), (r * xs).expand_as(x)], places.hw, 32


def _layout(block: nn.Module, x: torch.Tensor, attention: int, places: "TokenPlaces | None" = None,
            call: Call | None = None) -> Layout:
    """The layout as `Layout.of` gives it; a 4-D input is read as (B, C, H, W), and where its keys are then no
    positions, as (B, H, W, C) (channels last, as Swin's blocks take it)."""
    try:
        return _layout_read(block, x, attention, places, call=call)
    except NotAttention as first:
        if x.dim() != 4 or places is not None:
            raise
        try:
            return _layout_read(block, x, attention, None, channels_last=True, call=call)
        except NotAttention:
            raise first from None


def _layout_read(block: nn.Module, x: torch.Tensor, attention: int, places: "TokenPlaces | None" = None,
                 channels_last: bool = False, call: Call | None = None) -> Layout:
    inputs, (H, W), max_stride = _input_tangents(x, places, channels_last)
    passes, reason = [], ""
    masses = Masses()
    try:
        with torch.no_grad(), fwAD.dual_level():
            for i, t in enumerate(inputs):
                if i:
                    masses.next_pass()
                rec, _ = record(block, fwAD.make_dual(x, t.contiguous()), tangents=True, track=True, call=call,
                                masses=masses)
                tan = lambda z: None if z is None else fwAD.unpack_dual(z).tangent  # noqa: E731
                prim = lambda z: None if z is None else fwAD.unpack_dual(z).primal  # noqa: E731
                passes.append([dict(ev=ev, w=prim(ev.weights), q=prim(ev.query), k=prim(ev.key), tq=tan(ev.query),
                                    tv=tan(ev.values), tk=tan(ev.key)) for ev in rec.events])
    except (RuntimeError, NotImplementedError) as err:  # an op without a forward-mode formula
        passes, reason = None, (str(err).splitlines() or [type(err).__name__])[0][:160]
    if passes is None:
        with torch.no_grad():
            rec, _ = record(block, x, track=True, call=call)
        groups = event_groups(rec.events)
        if attention >= len(groups):
            raise NotAttention("its forward computes no attention")
        return _layout_assumed(rec.events, groups[attention], (H, W), reason)
    groups = event_groups([p["ev"] for p in passes[0]])
    if attention >= len(groups):
        raise NotAttention("its forward computes no attention")
    group = groups[attention]
    first = passes[0][group[0]]
    ev = first["ev"]
    weights = _cat([passes[0][i]["w"] for i in group])
    lead_shape = weights.shape[:-2]
    nq, nk = weights.shape[-2:]
    L = int(math.prod(lead_shape))

    def tangents(k: str, all_events: bool):  # (t1, ty, tx) of the attention's queries, values or keys
        out = []
        for p in passes:
            parts = [p[i][k] for i in (group if all_events else group[:1])]
            if any(t is None for t in parts):
                return None
            out.append(_flat(_cat(parts).expand(*lead_shape, *parts[0].shape[-2:])))
        return out

    vt = tangents("tv", False)
    if vt is None:
        raise NotAttention("its values do not come from the block's input")
    kcell, key_grid, _ = grid_cells(positions(*vt), (H, W), "keys", max_stride)
    per_image, note, qt = nq == 1, "", None
    if per_image:
        lq, iq, grid, heads = torch.arange(L)[:, None], torch.zeros(L, 1, dtype=torch.long), (H, W), L
    else:
        qt = tangents("tq", True)
        if qt is not None:
            qcell, grid, _ = grid_cells(positions(*qt), (H, W), "queries", max_stride)
        else:  # no queries to follow: only the concatenation form's pairs are known to be laid out row-major
            rm = row_major(nq, (H, W)) if ev.kind == "concat" else None
            if rm is None:
                raise NotAttention(f"the {nq} rows of its weights follow from no position of its {H}x{W} input: "
                                   "its logits are no product of queries and keys made from it (heads mixed before "
                                   "the softmax, as talking-heads attention does; attention over channels; a lambda "
                                   "layer)")
            qcell, grid = rm[0].expand(L, nq), rm[1]
            note = " Query positions assumed in row-major order (the code makes no queries to follow)."
        lq, iq, heads = _heads(qcell, grid, unplaced=places is not None)
    padded = bool((kcell < 0).any())
    qk, lk, key_order, normalise = False, None, None, "weights"
    M = key_grid[0] * key_grid[1]
    if first["q"] is not None and not ev.additive and ev.scale is not None and not per_image and not padded \
            and nk == M and bool((lq == lq[:, :1]).all()):
        lk = lq[:, 0]
        key_order = torch.argsort(kcell[lk[0]])
        if all(torch.equal(kcell[int(h)], kcell[int(lk[0])]) for h in lk):
            some = _sampled(lq.shape[1])  # the rows checked: at most CHECKED_ROWS of them, spread over the grid
            q = _flat(_cat([passes[0][i]["q"] for i in group]).expand(*lead_shape, nq, -1))[lq[:, some], iq[:, some]]
            k = _flat(first["k"].expand(*lead_shape, nk, -1))[lk][:, key_order]  # (heads, M, d)
            normalise = "softmax" if ev.kind in ("softmax", "sdpa") else "mean"
            scale = ev.scale * (M if normalise == "mean" else 1)
            logits = scale * (q.double() @ k.double().transpose(-1, -2))
            rows = torch.softmax(logits, -1) if normalise == "softmax" else logits / M
            expect = _flat(weights)[lq[:, some], iq[:, some]][..., key_order].double()
            qk = bool(torch.allclose(rows, expect, rtol=1e-4, atol=1e-6 * float(expect.abs().max().clamp_min(1e-30))))
            normalise = normalise if qk else "weights"
    if ev.kind in ("softmax", "sdpa") and ev.normalised_over_keys:
        meaning = "attention weights: softmax over the key positions, each row sums to 1"
    elif ev.kind in ("softmax", "sdpa"):
        meaning = ("the weights with which each key position's value enters the query's output; the library "
                   "normalises over another axis, so a row need not sum to 1")
    elif ev.kind == "pairwise":
        meaning = ("the pairwise weights f(q, k) as the code scales them (a product, no softmax): rows need not "
                   "sum to 1 and weights can be negative")
    else:
        meaning = ("the pairwise weights of a concatenation form (ReLU of a projection of [q, k], scaled): rows "
                   "need not sum to 1")
    if padded and places is not None:
        meaning += ("; keys with no place on the image (prefix tokens: a class token, registers) are not on the map "
                    "(each row's share on them is reported)")
    elif padded:
        meaning += "; keys on padding are not on the map (each row's share on padding is reported)"
    if per_image:
        meaning = "one map per image: where the pooled context comes from, no query changes it; " + meaning
    sizes = [passes[0][i]["w"].shape[-2] for i in group]
    kprefix = pq = None
    if places is not None and places.prefix and bool(((kcell < 0).sum(-1) == len(places.prefix)).all()):
        kprefix = torch.full_like(kcell, -1)  # a lead's unplaced keys, in order, are the prefix tokens in order
        kprefix[kcell < 0] = torch.arange(len(places.prefix)).repeat(kcell.shape[0])
        if not per_image and qt is not None and bool((lq == lq[:, :1]).all()):  # one lead a head: its prefix rows
            unplaced = [torch.nonzero(qcell[int(lead)] < 0).flatten() for lead in lq[:, 0]]
            if all(u.numel() == len(places.prefix) for u in unplaced):
                pq = torch.stack(unplaced)
    token_keys = None
    if pq is not None and first["q"] is not None and not ev.additive and ev.scale is not None and not per_image \
            and ev.kind in ("softmax", "sdpa") and bool(ev.normalised_over_keys) and nk == M + len(places.prefix):
        lead = int(lq[0, 0])
        placed, cells = torch.nonzero(kcell[lead] >= 0).flatten(), kcell[lead]
        order = torch.cat([placed[torch.argsort(cells[placed])], torch.nonzero(kprefix[lead] >= 0).flatten()])
        if torch.equal(torch.sort(cells[placed]).values, torch.arange(M)) and \
                all(torch.equal(kcell[int(h)], kcell[lead]) for h in lq[:, 0]):
            q = _flat(_cat([passes[0][i]["q"] for i in group]).expand(*lead_shape, nq, -1))
            k = _flat(first["k"].expand(*lead_shape, nk, -1))
            rows_at = torch.cat([iq[:, _sampled(iq.shape[1])], pq], 1)  # (heads, n + P): grid queries (some), then
            # the prefix queries
            qq = q[lq[:, :1].expand_as(rows_at), rows_at].double()
            kk = k[lq[:, 0]][:, order].double()
            rows = torch.softmax(ev.scale * qq @ kk.transpose(-1, -2), -1)
            expect = _flat(weights)[lq[:, :1].expand_as(rows_at), rows_at][..., order].double()
            if torch.allclose(rows, expect, rtol=1e-4, atol=1e-6 * float(expect.abs().max().clamp_min(1e-30))):
                token_keys = order
    return Layout(group, sizes, tuple(grid), tuple(key_grid), int(heads), lq, iq, kcell, per_image, qk, lk, key_order,
                  padded, meaning + "." + note, ev.qk_modules, ev.kind, ev.scale, normalise,
                  ev.kind in ("softmax", "sdpa") and bool(ev.normalised_over_keys) and not padded, kprefix,
                  None if places is None else places.names, pq, token_keys)


CHECKED_ROWS = 64  # rows a layout checks against softmax(scale Q K^T) (each costs M keys in float64)


def _sampled(n: int) -> torch.Tensor:
    """At most CHECKED_ROWS indices spread evenly over n, the first and the last among them."""
    return torch.linspace(0, n - 1, min(n, CHECKED_ROWS)).round().long().unique()


def _heads(qcell: torch.Tensor, grid: tuple[int, int], unplaced: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows per grid cell: the (lead, query) entries at each cell, in lead order, are its heads. unplaced: queries
    with no place (a prefix token's) are left out of the grid's rows, else they are no attention over positions."""
    L, nq = qcell.shape
    n = grid[0] * grid[1]
    flat = qcell.reshape(-1)
    if bool((flat < 0).any()) and not unplaced:
        raise NotAttention("some of its queries carry no position")
    counts = torch.bincount(flat[flat >= 0], minlength=n)
    heads = int(counts[0])
    if heads == 0 or not bool((counts == heads).all()):
        raise NotAttention(f"its queries do not cover the {grid[0]}x{grid[1]} grid evenly")
    order = torch.argsort(flat * (L * nq) + torch.arange(L * nq), stable=True)  # by cell, then lead order
    order = order[flat[order] >= 0]  # queries with no place last out
    sel = order.reshape(n, heads).T  # (heads, N)
    return sel // nq, sel % nq, heads


def _layout_assumed(events: list[Event], group: list[int], hw, reason: str) -> Layout:
    """Without tangents: tokens assumed in row-major order on the input grid (or a pooled one), one lead a head."""
    ev = events[group[0]]
    w = _cat([events[i].weights for i in group])
    L = int(math.prod(w.shape[:-2]))
    nq, nk = w.shape[-2:]
    keys = row_major(nk, hw)
    if keys is None:
        raise NotAttention(f"its {nk} keys lie on no grid over its {hw[0]}x{hw[1]} input ({reason})")
    per_image = nq == 1
    if per_image:
        grid, lq, iq, heads = hw, torch.arange(L)[:, None], torch.zeros(L, 1, dtype=torch.long), L
    else:
        q = row_major(nq, hw)
        if q is None:
            raise NotAttention(f"its {nq} queries lie on no grid over its {hw[0]}x{hw[1]} input ({reason})")
        grid = q[1]
        lq, iq, heads = torch.arange(L)[:, None].expand(L, nq), torch.arange(nq)[None].expand(L, nq), L
    return Layout(group, [events[i].weights.shape[-2] for i in group], tuple(grid), tuple(keys[1]), heads, lq, iq, keys[0].expand(L, nk).clone(), per_image, False,
                  None, None, False, f"weights as the code computes them (positions assumed in row-major order: "
                  f"{reason}).", ev.qk_modules, ev.kind, ev.scale, "weights", False)


# -- finding blocks -----------------------------------------------------------------------------------------------------

@dataclass
class Found:
    """A module whose own forward computes attention: how many attentions, and the calls that made the first."""

    name: str
    attentions: int
    kinds: list[str]
    call: Call | None = None  # how the model called it in the forward that found it (its first run)


_FORWARD_AD = threading.Lock()
_forward_ad_started = False


def prepare_forward_ad() -> None:
    """Load PyTorch's forward-mode AD decompositions (about 0.35 s of Python compiling TorchScript, once a process, on
    the first `fwAD.make_dual`) in a thread, so that it overlaps the forward that finds the blocks; make_dual's own
    import of the same module then waits for it."""
    global _forward_ad_started
    with _FORWARD_AD:
        if _forward_ad_started:
            return
        _forward_ad_started = True
    threading.Thread(target=fwAD._maybe_load_decompositions, name="vggattn-forward-ad", daemon=True).start()


def discover(model: nn.Module, example: torch.Tensor) -> list[Found]:
    """Every module whose forward computes attention on `example`, in the order they ran. An attention belongs to
    the innermost module running it whose input (its first tensor argument) is an image grid (B, C, H, W) or tokens
    (B, T, C) of the example's batch: not windows or grid cells stacked on the batch axis (MaxViT's, Swin's), and
    other than the model's input itself (a module fed that is the model: a wrapper or a transformer's backbone); tokens
    that are the grid of an enclosing module flattened (T = H * W: timm's Swin block whose one window is its whole
    grid) go to that module where it holds no other attention block, its grid placing them without tracing the
    model; with none, to the innermost module running it."""
    prepare_forward_ad()  # (placing the tokens and reading layouts come next)
    stack: list = []
    shapes: dict = {}
    calls: dict[str, Call] = {}
    rec = Recorder([example], keep=False, stack=stack)
    with torch.no_grad(), _Tracking(model, stack, shapes, example, calls) as tracking, rec:
        rec.on_event, tracking.recorder = tracking.mark, rec
        remember_output(model, model(example))  # (what it returns: `vggattn.models.output.image_model` reads it)
    found: dict[str, Found] = {}
    groups = event_groups(rec.events)
    owners, grids = [], []
    for group in groups:
        where = rec.event_modules[group[0]]
        at_batch = [n for n in reversed(where) if shapes.get(n) is not None and len(shapes[n]) in (3, 4)
                    and shapes[n][0] == example.shape[0]]  # innermost first
        owner = at_batch[0] if at_batch else (where[-1] if where else "")
        grid = None
        if at_batch and len(shapes[owner]) == 3:  # tokens that are an enclosing block's grid, flattened
            t = shapes[owner][1]
            grid = next((n for n in at_batch[1:] if len(shapes[n]) == 4 and t in (shapes[n][2] * shapes[n][3],
                                                                                   shapes[n][1] * shapes[n][2])), None)
        owners.append(owner)
        grids.append(grid)
    for group, owner, grid in zip(groups, owners, grids):
        if grid is not None and len({o for o, g in zip(owners, grids) if g == grid}) == 1:  # its one attention block
            owner = grid
        entry = found.setdefault(owner, Found(owner, 0, [], calls.get(owner)))
        entry.attentions += 1
        entry.kinds.append(rec.events[group[0]].kind)
    return list(found.values())
