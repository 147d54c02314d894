"""Capture what every GlobalAttention block attends to, with forward hooks.

    with AttentionCapture(model) as cap:
        logits = model(x)
    for layer in cap.layers:                  # forward order
        layer.name, layer.gamma, layer.grid   # "features.14", 0.12, (32, 32)
        layer.row(q)                          # (B, N): where query position q looks; sums to 1
        layer.attention                       # (B, N, N), built only when asked

One forward hook per block keeps references to the block's input x and output y: the forward
under capture runs no extra op and copies nothing. On first read, Q and K are computed from that x
with the block's own `conv_query` / `conv_key` weights (the same ops on the same tensors as in the
forward, so the very Q and K the model used: bitwise equal on CPU), and then x and y are let go;
storage is linear in N (B * N * C/4 per layer) instead of the N x N map. Reading a capture after
the weights or those activations were changed in place (e.g. an optimizer step) raises instead of
answering wrongly: read it first. Captures belong to the capture object and to the thread that
entered it: two threads capturing on one model at once never see each other's maps. Every hook is
removed on exit, also when the forward raises, and exceptions are never swallowed.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import GlobalAttention


def log_normalisers(query: torch.Tensor, key: torch.Tensor, chunk: int = 1024, *, mean_row: bool = False):
    """log Z_i = logsumexp_j (q_i . k_j) of every row of (B, N, C') Q and (B, M, C') K -> (B, N) float32 (float64
    for a float64 Q), a block of rows at a time (never the N x M map); the logits in float32, as
    `LayerCapture.rows` computes them. mean_row: also return the query-averaged row (B, M) float64, from the
    same logits (what the image's sink is read from), so an upload builds every row once."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k = query.to(dtype), key.to(dtype).transpose(1, 2)  # (B, N, C'), (B, C', M)
    n = q.shape[1]
    parts, total = [], None
    for s in range(0, n, chunk):
        logits = torch.bmm(q[:, s:s + chunk], k)  # (B, R, M)
        log_z = torch.logsumexp(logits, dim=-1)  # (B, R)
        parts.append(log_z)
        if mean_row:  # the rows themselves, summed over the queries: the same pass
            rows = torch.exp(logits.sub_(log_z[..., None]))
            total = rows.sum(1, dtype=torch.float64) if total is None else total + rows.sum(1, dtype=torch.float64)
    log_z = torch.cat(parts, dim=1)
    return (log_z, total / n) if mean_row else log_z


class LayerCapture:
    """One attention layer's capture from one forward (tensors detached, on the model's device)."""

    def __init__(self, name: str, gamma: float, grid: tuple[int, int], query: torch.Tensor, key: torch.Tensor,
                 contribution: torch.Tensor):
        self.name = name  # module name, e.g. "features.14"
        self.gamma = gamma  # the learned residual scale
        self.grid = grid  # (H, W) of the layer's feature map; N = H * W query positions
        self._query, self._key, self._contribution = query, key, contribution
        self._forward: tuple | None = None  # (block, (x, y, Q/K weights), their versions) until first read
        self._log_z: torch.Tensor | None = None  # (B, N), on first use
        self._mean_row: torch.Tensor | None = None  # (B, N) float64, with log Z

    @classmethod
    def from_forward(cls, name: str, block: GlobalAttention, x: torch.Tensor, y: torch.Tensor) -> "LayerCapture":
        """A capture that holds the block's input x and output y and computes the rest when read."""
        layer = cls(name, float(block.gamma.detach().item()), tuple(x.shape[-2:]), None, None, None)
        tensors = (x, y, *[p for c in (block.conv_query, block.conv_key) for p in (c.weight, c.bias)])
        layer._forward = (block, tensors, [t._version for t in tensors])
        return layer

    def _read(self) -> None:
        if self._forward is None:
            return
        block, tensors, versions = self._forward
        if [t._version for t in tensors] != versions:
            raise RuntimeError(f"{self.name}: the block's activations or conv_query/conv_key weights were changed "
                               "in place after the captured forward; read the capture before updating the model")
        x, y, wq, bq, wk, bk = tensors
        with torch.no_grad():  # .to(x.device): the model may have been moved since the forward (same values)
            qk = [F.conv2d(x, w.to(x.device), b.to(x.device), c.stride, c.padding, c.dilation, c.groups).flatten(2).transpose(1, 2)
                  for c, w, b in ((block.conv_query, wq, bq), (block.conv_key, wk, bk))]  # (B, N, C') each
            delta = (y - x).float()  # gamma * attention_out, (B, C, H, W)
            contribution = delta.norm(dim=1) / x.float().norm(dim=1).clamp_min(1e-12)  # (B, H, W)
        self._query, self._key, self._contribution = *qk, contribution
        self._forward = None  # x and y are not needed any more

    @property
    def query(self) -> torch.Tensor:
        """(B, N, C'): the block's Q."""
        self._read()
        return self._query

    @property
    def key(self) -> torch.Tensor:
        """(B, N, C'): the block's K."""
        self._read()
        return self._key

    @property
    def contribution(self) -> torch.Tensor:
        """(B, H, W): ||gamma * attention_out|| / ||x|| per position, how much the block changes x."""
        self._read()
        return self._contribution

    def __repr__(self) -> str:
        return f"LayerCapture(name={self.name!r}, gamma={self.gamma:+.4f}, grid={self.grid})"

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1]

    def rows(self, queries: torch.Tensor | list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Attention rows of several query positions -> (B, len(queries), N), each row sums to 1.
        dtype: of the logits and the softmax (float64: what the page computes from the same Q and K)."""
        idx = torch.as_tensor(queries, dtype=torch.long, device=self.query.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_positions):
            raise IndexError(f"query index out of range for {self.name}'s {self.grid[0]}x{self.grid[1]} grid "
                             f"(0..{self.num_positions - 1})")
        q = self.query[:, idx].to(dtype)  # (B, Q, C')
        logits = torch.bmm(q, self.key.to(dtype).transpose(1, 2))  # (B, Q, N)
        return torch.softmax(logits, dim=-1)

    def row(self, query: int) -> torch.Tensor:
        """Attention weights of one query position over all N positions -> (B, N)."""
        return self.rows([int(query)])[:, 0]

    @property
    def log_normalisers(self) -> torch.Tensor:
        """(B, N) float32: log Z_i = logsumexp_j (q_i . k_j) of every row, a block of rows at a time (never
        the N x N map); computed once. With them any column is A[:, j] = exp(Q k_j - log Z)."""
        if self._log_z is None:
            self._log_z, self._mean_row = log_normalisers(self.query, self.key, mean_row=True)  # (B, N) each
        return self._log_z

    @property
    def mean_row(self) -> torch.Tensor:
        """(B, N) float64: the query-averaged row (1/N) sum_i A[i, :], from the same pass as `log_normalisers`."""
        if self._mean_row is None:
            self.log_normalisers
        return self._mean_row

    def column(self, key: int) -> torch.Tensor:
        """How much every query position attends to position `key` -> (B, N) float64, A[:, key]
        (from the float32 log normalisers, as the page computes it)."""
        if not 0 <= key < self.num_positions:
            raise IndexError(f"key index {key} out of range for {self.name}'s grid (0..{self.num_positions - 1})")
        q, k = self.query.double(), self.key[:, int(key)].double()  # (B, N, C'), (B, C')
        logits = torch.bmm(q, k[:, :, None])[..., 0]  # (B, N)
        return torch.exp(logits - self.log_normalisers.double())

    @property
    def attention(self) -> torch.Tensor:
        """The full (B, N, N) softmax(Q K^T) map; quadratic in N, built on demand."""
        logits = torch.bmm(self.query.float(), self.key.float().transpose(1, 2))  # (B, N, N)
        return torch.softmax(logits, dim=-1)

    @property
    def nbytes(self) -> int:
        """Bytes this capture stores once read: Q, K and the contribution map."""
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
        self._blocks: list[GlobalAttention] = []
        self._owner: int | None = None

    def __enter__(self) -> "AttentionCapture":
        if self._handles:
            raise RuntimeError("AttentionCapture is already active")
        self._owner = threading.get_ident()
        self.layers = []
        blocks = [(n, m) for n, m in self.module.named_modules() if isinstance(m, GlobalAttention)]
        if not blocks:
            raise ValueError("AttentionCapture: the module has no GlobalAttention block")
        try:
            self._handles.append(self.module.register_forward_pre_hook(self._on_root_forward))
            for name, block in blocks:
                self._handles.append(block.register_forward_hook(self._keep(name)))
                block.summaries_for.add(self._owner)  # its forward keeps log Z and the mean row for us
                self._blocks.append(block)
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
        for block in self._blocks:
            block.summaries_for.discard(self._owner)
            block.summaries.pop(self._owner, None)
        self._blocks.clear()

    def __getitem__(self, name: str) -> LayerCapture:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no capture for layer {name!r}; captured: {[layer.name for layer in self.layers]}")

    # -- hooks -------------------------------------------------------------------------------
    def _mine(self) -> bool:
        return threading.get_ident() == self._owner

    def _on_root_forward(self, module, args) -> None:
        if self._mine():
            self.layers = []

    def _keep(self, name: str):
        def hook(block: GlobalAttention, args, output: torch.Tensor) -> None:
            if self._mine():
                layer = LayerCapture.from_forward(name, block, args[0].detach(), output.detach())
                kept = block.summaries.pop(self._owner, None)  # made by the forward itself (CPU inference)
                if kept is not None:
                    layer._log_z, layer._mean_row = kept["log_z"], kept["mean_row"]
                self.layers.append(layer)
        return hook
