"""Small models of other families for the bring-your-own-model tests (`--model byo_models:<factory>`)."""

import torch.nn as nn

from vggattn.families import BigGANAttention, NonLocalBlock2D, SelfAttn


class Discriminator(nn.Module):
    """A SAGAN-style discriminator: convs, Self_Attn (returns (out, attention)), BigGAN attention, one score."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 2, 1), nn.LeakyReLU(0.1), nn.Conv2d(16, 32, 4, 2, 1), nn.LeakyReLU(0.1))
        self.attn1 = SelfAttn(32)
        self.down = nn.Sequential(nn.Conv2d(32, 32, 4, 2, 1), nn.LeakyReLU(0.1))
        self.attn2 = BigGANAttention(32)
        self.last = nn.Conv2d(32, 1, 4)

    def forward(self, x):
        h, _ = self.attn1(self.stem(x))
        h = self.attn2(self.down(h))
        return self.last(h).mean((1, 2, 3))  # (B,): real / fake


class Classifier(nn.Module):
    """A small classifier with a non-local block (dot-product form, keys sub-sampled): 3 classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                      NonLocalBlock2D(32, mode="dot"), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.features(x))


def discriminator():
    return Discriminator()


def classifier():
    return Classifier()
