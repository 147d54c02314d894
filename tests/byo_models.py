"""Small models of other families for the bring-your-own-model tests (`--model byo_models:<factory>`)."""

import torch.nn as nn

from vggattn.models.families import BigGANAttention, NonLocalBlock2D, SelfAttn


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


class EveryFamily(nn.Module):
    """One block of every family the adapters know, on a 16x16 grid of 32 channels (64 px input), 5 classes: the
    app's page and server are compared on each (tests/test_browser_any.py)."""

    def __init__(self):
        from timm.layers import GlobalContext, NonLocalAttn
        from timm.layers.bottleneck_attn import BottleneckAttn

        from vggattn.models.vgg import GlobalAttention

        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 4, 4), nn.ReLU())
        self.blocks = nn.ModuleDict({
            "article": GlobalAttention(32), "sagan": SelfAttn(32), "biggan": BigGANAttention(32),
            "nonlocal_gauss": NonLocalBlock2D(32, sub_sample=True), "nonlocal_dot": NonLocalBlock2D(32, mode="dot"),
            "timm_nonlocal": NonLocalAttn(32), "botnet": BottleneckAttn(32, feat_size=(16, 16), num_heads=4),
            "gcnet": GlobalContext(32, fuse_add=True, fuse_scale=True)})
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks.values():
            h = block(h)
            h = h[0] if isinstance(h, tuple) else h
        return self.head(h.mean((2, 3)))


def every_family(seed: int = 0):
    """EveryFamily with every weight random and large enough that rows are far from uniform."""
    return randomised(EveryFamily(), seed, scale=0.5)


def randomised(module: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Every parameter N(0, scale) and every BatchNorm's statistics random (gammas and zero-initialised outputs
    included), in eval mode."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return module.eval()


class ThirdParty(nn.Module):
    """A small classifier around attention blocks of other libraries, none of which vggattn knows by class: mmcv's
    NonLocal2d (embedded Gaussian, keys sub-sampled) and ContextBlock, timm's HaloAttn (windows with halos, two
    heads), a diffusers VAE mid-block (its Attention with SDPA), and the reference Non-local code's concatenation
    form; 64 px input, a 16x16 grid of 32 channels, 10 classes (as Imagenette)."""

    def __init__(self):
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D
        from mmcv.cnn import ContextBlock, NonLocal2d
        from timm.layers.halo_attn import HaloAttn

        from nonlocal_reference import NONLocalBlock2D as ReferenceNonLocal

        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 4, 4), nn.ReLU())
        self.nonlocal2d = NonLocal2d(32, mode="embedded_gaussian", sub_sample=True)
        self.halo = HaloAttn(32, 32, num_heads=2, block_size=4, halo_size=1)
        self.vae_mid = UNetMidBlock2D(32, temb_channels=None, resnet_groups=8, attention_head_dim=32,
                                      add_attention=True)
        self.context = ContextBlock(32, 0.25)
        self.reference = ReferenceNonLocal(32, form="concatenation")
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.stem(x)
        h = self.nonlocal2d(h)
        h = self.halo(h) + h
        h = self.vae_mid(h)
        h = self.reference(self.context(h))
        return self.head(h.mean((2, 3)))


def third_party(seed: int = 0):
    return randomised(ThirdParty(), seed, scale=0.3)
