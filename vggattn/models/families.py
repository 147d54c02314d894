"""Non-local attention blocks of other CNN families, written from their papers' maths with the parameter
names of their reference code, so that those projects' checkpoints load into them.

    SelfAttn(256)                         # SAGAN (Zhang et al. 2019): query_conv, key_conv, value_conv, gamma
    BigGANAttention(256)                  # BigGAN (Brock et al. 2019): theta, phi, g, o, gamma; SN; keys pooled 2x2
    NonLocalBlock2D(256, mode="dot")      # Non-local (Wang et al. 2018): g, theta, phi, W (conv + BatchNorm)

timm's `NonLocalAttn`, `BottleneckAttn` and `GlobalContext` are used from timm itself (`vggattn[timm]`);
`vggattn.attention.adapters` reads all of them, and the article's `GlobalAttention`, the same way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttn(nn.Module):
    """SAGAN's self-attention: softmax(Q K^T) over N positions, V with C channels, `gamma * out + x`.
    Like the reference, forward returns (out, attention (B, N, N))."""

    def __init__(self, in_dim: int, activation=None):
        super().__init__()
        self.chanel_in = in_dim  # sic: the reference's attribute name
        self.activation = activation  # kept by the reference, never used
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, H, W = x.shape
        query = self.query_conv(x).flatten(2).transpose(1, 2)  # (B, N, C')
        key = self.key_conv(x).flatten(2)  # (B, C', N)
        attention = torch.softmax(torch.bmm(query, key), dim=-1)  # (B, N, N)
        value = self.value_conv(x).flatten(2)  # (B, C, N)
        out = torch.bmm(value, attention.transpose(1, 2)).view(B, C, H, W)
        return self.gamma * out + x, attention


class SNConv2d(nn.Conv2d):
    """BigGAN-PyTorch's spectrally normalised conv: the weight divided by its largest singular value, estimated
    by one power iteration from the buffer `u0` (updated in training only); `sv0` keeps the last estimate.
    Buffer names as the reference's, so its checkpoints load."""

    def __init__(self, *args, eps: float = 1e-8, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps
        self.register_buffer("u0", torch.randn(1, self.out_channels))
        self.register_buffer("sv0", torch.ones(1))

    def normalised_weight(self) -> torch.Tensor:
        w = self.weight.view(self.weight.size(0), -1)  # (out, in * k * k)
        with torch.no_grad():
            v = F.normalize(self.u0 @ w, eps=self.eps)  # one singular value: Gram-Schmidt against none
            u = F.normalize(v @ w.t(), eps=self.eps)
            if self.training:
                self.u0[:] = u
        sv = torch.squeeze((v @ w.t()) @ u.t())
        if self.training:
            with torch.no_grad():
                self.sv0[:] = sv
        return self.weight / sv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.normalised_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class BigGANAttention(nn.Module):
    """BigGAN's self-attention: theta (C/8) queries at every position, phi (C/8) keys and g (C/2) values max-pooled
    2x2 (keys on a grid half the size), o back to C channels, `gamma * o + x`."""

    def __init__(self, ch: int, which_conv=SNConv2d):
        super().__init__()
        self.ch = ch
        self.theta = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = which_conv(ch, ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = which_conv(ch // 2, ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor, y=None) -> torch.Tensor:
        B, C, H, W = x.shape
        theta = self.theta(x).view(B, C // 8, H * W)  # (B, C/8, N)
        phi = F.max_pool2d(self.phi(x), [2, 2]).view(B, C // 8, -1)  # (B, C/8, M), M = N / 4
        g = F.max_pool2d(self.g(x), [2, 2]).view(B, C // 2, -1)  # (B, C/2, M)
        beta = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)  # (B, N, M)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(B, C // 2, H, W))
        return self.gamma * o + x


class NonLocalBlock2D(nn.Module):
    """Wang et al.'s non-local block: y = f(theta(x), phi(x)) g(x), z = W(y) + x with W a 1x1 conv and (bn_layer)
    a zero-initialised BatchNorm. mode "embedded": f is softmax(theta^T phi) (embedded Gaussian); "dot": f is
    theta^T phi / M (dot product, M key positions). sub_sample: phi and g max-pooled 2x2 (names g.0, phi.0)."""

    def __init__(self, in_channels: int, inter_channels: int | None = None, mode: str = "embedded",
                 sub_sample: bool = True, bn_layer: bool = True):
        super().__init__()
        if mode not in ("embedded", "dot"):
            raise ValueError(f"mode must be 'embedded' or 'dot', got {mode!r}")
        self.mode = mode
        self.in_channels = in_channels
        self.inter_channels = inter_channels or max(1, in_channels // 2)
        self.sub_sample = sub_sample
        conv = lambda: nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)  # noqa: E731
        self.g, self.theta, self.phi = conv(), conv(), conv()
        if bn_layer:
            self.W = nn.Sequential(nn.Conv2d(self.inter_channels, in_channels, kernel_size=1), nn.BatchNorm2d(in_channels))
            nn.init.zeros_(self.W[1].weight)
            nn.init.zeros_(self.W[1].bias)
        else:
            self.W = nn.Conv2d(self.inter_channels, in_channels, kernel_size=1)
            nn.init.zeros_(self.W.weight)
            nn.init.zeros_(self.W.bias)
        if sub_sample:
            self.g = nn.Sequential(self.g, nn.MaxPool2d(2))
            self.phi = nn.Sequential(self.phi, nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.size(0)
        g_x = self.g(x).view(B, self.inter_channels, -1).transpose(1, 2)  # (B, M, C')
        theta_x = self.theta(x).view(B, self.inter_channels, -1).transpose(1, 2)  # (B, N, C')
        phi_x = self.phi(x).view(B, self.inter_channels, -1)  # (B, C', M)
        f = theta_x @ phi_x  # (B, N, M)
        f_div_c = torch.softmax(f, dim=-1) if self.mode == "embedded" else f / f.size(-1)
        y = (f_div_c @ g_x).transpose(1, 2).reshape(B, self.inter_channels, *x.shape[2:])
        return self.W(y) + x
