"""Capture what every GlobalAttention block attends to, with forward hooks.

    with AttentionCapture(model) as cap:
        logits = model(x)
    for layer in cap.layers:                  # forward order
        layer.name, layer.gamma, layer.grid   # "features.14", 0.12, (32, 32)
        layer.row(q)                          # (B, N): where query position q looks; sums to 1
        layer.attention                       # (B, N, N), built only when asked

Hooks on each block's `conv_query` and `conv_key` keep the very Q and K of that forward (no
recomputation), so `row(q) = softmax(q_i . K)` is the softmax the model used, up to rounding, and
storage is linear in N (B * N * C/4 per layer) instead of the N x N map. Captures belong to the
capture object and to the thread that entered it: two threads capturing on one model at once
never see each other's maps. Every hook is removed on exit, also when the forward raises, and
exceptions are never swallowed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn as nn

from .model import GlobalAttention


@dataclass
class LayerCapture:
    """One attention layer's capture from one forward (tensors detached, on the model's device)."""

    name: str  # module name, e.g. "features.14"
    gamma: float  # the learned residual scale
    grid: tuple[int, int]  # (H, W) of the layer's feature map; N = H * W query positions
    query: torch.Tensor  # (B, N, C') the block's Q
    key: torch.Tensor  # (B, N, C') the block's K
    contribution: torch.Tensor  # (B, H, W) ||gamma * attention_out|| / ||x|| per position

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1]

    def rows(self, queries: torch.Tensor | list[int]) -> torch.Tensor:
        """Attention rows of several query positions -> (B, len(queries), N), each row sums to 1."""
        idx = torch.as_tensor(queries, dtype=torch.long, device=self.query.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_positions):
            raise IndexError(f"query index out of range for {self.name}'s {self.grid[0]}x{self.grid[1]} grid "
                             f"(0..{self.num_positions - 1})")
        q = self.query[:, idx].float()  # (B, Q, C')
        logits = torch.bmm(q, self.key.float().transpose(1, 2))  # (B, Q, N)
        return torch.softmax(logits, dim=-1)

    def row(self, query: int) -> torch.Tensor:
        """Attention weights of one query position over all N positions -> (B, N)."""
        return self.rows([int(query)])[:, 0]

    @property
    def attention(self) -> torch.Tensor:
        """The full (B, N, N) softmax(Q K^T) map; quadratic in N, built on demand."""
        logits = torch.bmm(self.query.float(), self.key.float().transpose(1, 2))  # (B, N, N)
        return torch.softmax(logits, dim=-1)

    @property
    def nbytes(self) -> int:
        """Bytes this capture stores (Q, K and the contribution map)."""
        return sum(t.numel() * t.element_size() for t in (self.query, self.key, self.contribution))


class AttentionCapture:
    """Context manager that records every GlobalAttention block of `module` on each forward.

    `layers` holds the last forward's captures in forward order; a new forward of `module`
    clears them first. Only forwards run by the thread that entered the context are recorded.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.layers: list[LayerCapture] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._owner: int | None = None

    def __enter__(self) -> "AttentionCapture":
        if self._handles:
            raise RuntimeError("AttentionCapture is already active")
        self._owner = threading.get_ident()
        self.layers, self._pending = [], {}
        blocks = [(n, m) for n, m in self.module.named_modules() if isinstance(m, GlobalAttention)]
        if not blocks:
            raise ValueError("AttentionCapture: the module has no GlobalAttention block")
        try:
            self._handles.append(self.module.register_forward_pre_hook(self._on_root_forward))
            for name, block in blocks:
                self._handles.append(block.conv_query.register_forward_hook(self._keep(name, "query")))
                self._handles.append(block.conv_key.register_forward_hook(self._keep(name, "key")))
                self._handles.append(block.register_forward_hook(self._finish(name)))
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.release()
        return False  # never swallow exceptions

    def release(self) -> None:
        """Remove every hook handle (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending.clear()

    def __getitem__(self, name: str) -> LayerCapture:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no capture for layer {name!r}; captured: {[l.name for l in self.layers]}")

    # -- hooks -------------------------------------------------------------------------------
    def _mine(self) -> bool:
        return threading.get_ident() == self._owner

    def _on_root_forward(self, module, args) -> None:
        if self._mine():
            self.layers, self._pending = [], {}

    def _keep(self, name: str, what: str):
        def hook(module, args, output: torch.Tensor) -> None:
            if self._mine():
                self._pending.setdefault(name, {})[what] = output.detach()  # (B, C', H, W)
        return hook

    def _finish(self, name: str):
        def hook(block: GlobalAttention, args, output: torch.Tensor) -> None:
            if not self._mine():
                return
            pending = self._pending.pop(name, {})
            x = args[0].detach()
            B, C, H, W = x.shape
            delta = (output.detach() - x).float()  # gamma * attention_out, (B, C, H, W)
            contribution = delta.norm(dim=1) / x.float().norm(dim=1).clamp_min(1e-12)  # (B, H, W)
            self.layers.append(LayerCapture(
                name=name,
                gamma=float(block.gamma.detach().float().reshape(-1)[0]),
                grid=(H, W),
                query=pending["query"].flatten(2).transpose(1, 2),  # (B, N, C')
                key=pending["key"].flatten(2).transpose(1, 2),  # (B, N, C')
                contribution=contribution,
            ))
        return hook
