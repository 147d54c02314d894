"""Grad-CAM of a class at the last conv layer, and switching attention layers off for one forward.

    cam = grad_cam(model, x)                       # (h, w) >= 0 for the top class, at H/16 x W/16
    with AttentionOff(model, ["features.22"]):     # that block returns its input: gamma = 0
        probs_without = model(x).softmax(-1)

Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of
d score / d A_k, A the activation after the last conv's ReLU. Only the layers after A (the last
attention block, pooling and classifier) run with gradients: `grad_cam_from` takes an A kept
from an earlier forward, so the app gets Grad-CAM without running the network again.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn

from .model import VGG16WithAttention


def gradcam_layer(model: VGG16WithAttention) -> int:
    """Index in model.features of the activation Grad-CAM uses: the ReLU after the last conv."""
    last_conv = max(i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d))
    return next(i for i in range(last_conv, len(model.features)) if isinstance(model.features[i], nn.ReLU))


def grad_cam_from(model: VGG16WithAttention, activation: torch.Tensor, index: int,
                  class_index: int | torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM (B, h, w) from `activation` = the output of model.features[index] for some input.

    class_index: an int or a (B,) tensor of classes; None = each image's top class.
    """
    a = activation.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_head(model.features[index + 1:](a))  # (B, num_classes)
        if class_index is None:
            class_index = logits.argmax(1)
        cls = torch.as_tensor(class_index, device=logits.device).expand(logits.shape[0])
        score = logits.gather(1, cls[:, None]).sum()
        (grad,) = torch.autograd.grad(score, a)  # only this gradient: no weight gradients are formed
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    return torch.relu((weights * a.detach()).sum(1))  # (B, h, w)


@torch.no_grad()
def grad_cam(model: VGG16WithAttention, x: torch.Tensor, class_index: int | None = None) -> torch.Tensor:
    """Grad-CAM (B, h, w) of `class_index` (default: the top class) for input x (B, 3, S, S)."""
    index = gradcam_layer(model)
    return grad_cam_from(model, model.features[: index + 1](x), index, class_index)


class KeepOutput:
    """Context manager keeping `module`'s output of the forwards run by the entering thread."""

    def __init__(self, module: nn.Module):
        self.module, self.output, self._owner, self._handle = module, None, None, None

    def __enter__(self) -> "KeepOutput":
        self._owner = threading.get_ident()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, module, args, output) -> None:
        if threading.get_ident() == self._owner:
            self.output = output.detach().clone()  # the next in-place ReLU must not change it

    def __exit__(self, *exc) -> bool:
        self._handle.remove()
        return False


class AttentionOff:
    """Context manager: the named attention blocks return their input (exactly gamma = 0) in forwards run by
    the entering thread; other threads using the model are not affected. `vggattn.adapters.Intervention`
    with mode "off" for every name (any block family)."""

    def __new__(cls, model: nn.Module, names: list[str]):
        from .adapters import Intervention

        return Intervention(model, {name: "off" for name in names})
