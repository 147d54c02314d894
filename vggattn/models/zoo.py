"""Small trained models of other families, for the general path on real weights.

    model = nonlocal_resnet()       # ResNet-18 layout at half width, a Wang et al. non-local block after stage 3
    python -m vggattn.explain photo.jpg --model vggattn.models.zoo:nonlocal_resnet \\
        --checkpoint checkpoints/nonlocal-resnet-imagenette-128.safetensors --input-size 128 --out o/

`scripts/train_zoo.py` trains it on Imagenette; checkpoints/README.md has its card.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .families import NonLocalBlock2D


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class NonLocalResNet(nn.Module):
    """ResNet-18's layout (2 basic blocks a stage) at widths (32, 64, 128, 256), a non-local block (embedded
    Gaussian, keys sub-sampled 2x2, W with BatchNorm initialised to 0: the identity at start) after stage 3."""

    def __init__(self, num_classes: int = 10, widths=(32, 64, 128, 256)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.nonlocal3 = NonLocalBlock2D(widths[2], mode="embedded", sub_sample=True)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.layer4(self.nonlocal3(self.layer3(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean((2, 3)))


def nonlocal_resnet(num_classes: int = 10) -> NonLocalResNet:
    return NonLocalResNet(num_classes)


def vit_imagenette(num_classes: int = 10, registers: int = 0):
    """A small ViT for 96 px Imagenette (needs timm): 8 px patches (a 12x12 grid), width 192, 6 blocks of 3 heads, a
    class token, `registers` register tokens (Darcet et al. 2023), learned positions on the patches only."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=96, patch_size=8, embed_dim=192, depth=6, num_heads=3, num_classes=num_classes,
                             reg_tokens=registers, no_embed_class=True)


def vit_imagenette_reg4(num_classes: int = 10):
    """`vit_imagenette` with 4 registers."""
    return vit_imagenette(num_classes, registers=4)
