"""The reference Non-local code's `NONLocalBlock2D` (Wang et al. 2018, as the widely used PyTorch repository writes it
in four files, one per pairwise function), re-typed for the tests: the same parameter names (`g`, `theta`, `phi`,
`W`, `concat_project`), sub-sampling by max-pooling `g` and `phi`, and the same maths. vggattn has no adapter for
it: it is found by what it computes."""

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMS = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


class NONLocalBlock2D(nn.Module):
    def __init__(self, in_channels, inter_channels=None, sub_sample=True, bn_layer=True, form="embedded_gaussian"):
        super().__init__()
        assert form in FORMS
        self.form, self.in_channels = form, in_channels
        self.inter_channels = inter_channels or max(1, in_channels // 2)
        self.g = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        if bn_layer:
            self.W = nn.Sequential(nn.Conv2d(self.inter_channels, in_channels, kernel_size=1), nn.BatchNorm2d(in_channels))
            nn.init.constant_(self.W[1].weight, 0)
            nn.init.constant_(self.W[1].bias, 0)
        else:
            self.W = nn.Conv2d(self.inter_channels, in_channels, kernel_size=1)
            nn.init.constant_(self.W.weight, 0)
            nn.init.constant_(self.W.bias, 0)
        if form != "gaussian":
            self.theta = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
            self.phi = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        if form == "concatenation":
            self.concat_project = nn.Sequential(nn.Conv2d(self.inter_channels * 2, 1, 1, 1, 0, bias=False), nn.ReLU())
        if sub_sample:
            self.g = nn.Sequential(self.g, nn.MaxPool2d(kernel_size=(2, 2)))
            self.phi = nn.Sequential(self.phi, nn.MaxPool2d(kernel_size=(2, 2))) if form != "gaussian" \
                else nn.MaxPool2d(kernel_size=(2, 2))

    def forward(self, x):
        b = x.size(0)
        g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)  # (b, M, c)
        if self.form == "gaussian":
            theta_x = x.view(b, self.in_channels, -1).permute(0, 2, 1)  # (b, N, C)
            phi_x = (self.phi(x) if hasattr(self, "phi") else x).view(b, self.in_channels, -1)  # (b, C, M)
            f_div_c = F.softmax(torch.matmul(theta_x, phi_x), dim=-1)
        elif self.form == "concatenation":
            theta_x = self.theta(x).view(b, self.inter_channels, -1, 1)  # (b, c, N, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, 1, -1)  # (b, c, 1, M)
            h, w = theta_x.size(2), phi_x.size(3)
            f = self.concat_project(torch.cat([theta_x.repeat(1, 1, 1, w), phi_x.repeat(1, 1, h, 1)], dim=1))
            f = f.view(b, h, w)  # (b, N, M)
            f_div_c = f / f.size(-1)
        else:
            theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)  # (b, N, c)
            phi_x = self.phi(x).view(b, self.inter_channels, -1)  # (b, c, M)
            f = torch.matmul(theta_x, phi_x)
            f_div_c = F.softmax(f, dim=-1) if self.form == "embedded_gaussian" else f / f.size(-1)
        y = torch.matmul(f_div_c, g_x).permute(0, 2, 1).contiguous()  # (b, c, N)
        y = y.view(b, self.inter_channels, *x.size()[2:])
        return self.W(y) + x
