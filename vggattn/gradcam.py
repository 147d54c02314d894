"""Grad-CAM of a class at a model's last conv layer.

    cam = grad_cam(model, x)                       # (B, h, w) >= 0 for each image's top class

Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of d score / d A_k,
A the last conv layer's activation as the rest of the network reads it (after an in-place ReLU, as in VGG:
the hook's tensor is the one the ReLU overwrote). One forward and one backward to A (no weight gradients).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention.trace import watch


def last_conv(model: nn.Module) -> nn.Conv2d | None:
    """The model's last nn.Conv2d in module order (VGG: features.28), or None."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def grad_cam(model: nn.Module, x: torch.Tensor, class_index: int | torch.Tensor | None = None,
             layer: nn.Module | None = None) -> torch.Tensor | None:
    """Grad-CAM (B, h, w) of `class_index` (an int or a (B,) tensor; None: each image's top class) at `layer`
    (default: the last conv) for input x (B, 3, S, S); None for a model without convs."""
    layer = layer or last_conv(model)
    if layer is None:
        return None
    name = next(n for n, m in model.named_modules() if m is layer)
    with torch.enable_grad():  # the input needs grad, so A has a graph
        logits, seen = watch(model, x.detach().requires_grad_(True), [name], keep_graph=True)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        if class_index is None:
            class_index = logits.argmax(1)
        cls = torch.as_tensor(class_index, device=logits.device).expand(logits.shape[0])
        score = logits.float().gather(1, cls[:, None]).sum()
        (grad,) = torch.autograd.grad(score, seen[name].output)
    a = seen[name].output.detach().float()
    weights = grad.float().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    return torch.relu((weights * a).sum(1))  # (B, h, w)
