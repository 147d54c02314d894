"""The article's attention-VGG16: `GlobalAttention` and `VGG16WithAttention`.

The state_dict layout is exactly the article's (attention blocks at `features.14`,
`features.22`, `features.30`; `classifier.0/.3/.6`), so a `model.state_dict()` saved with the
article's code loads unchanged. Beyond the article, all keyword-only and defaulting to it:

- `width`: channel multiplier for the 13 convs (the shipped checkpoint is a small model);
- `hidden`: size of the two hidden classifier layers (4096 in the article);
- `attention=False`: the same network without the three blocks (the A/B baseline);
  `attention="global"`: every attention row replaced by the image's query-averaged row, in training
  too (GCNet's query-independent block; the same state_dict);
- `batch_norm=True`: BatchNorm after each conv, for training only; `fold_batchnorm` turns such a
  model into the article's layout exactly (eval mode).

    model = vgg16_with_attention(num_classes=10, width=0.25, hidden=256)
"""

from __future__ import annotations


from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# VGG16 ("D" in torchvision) with the article's three attention blocks: ints are 3x3 convs
# (output channels before `width`), "M" a 2x2 max-pool, "A" a GlobalAttention block.
VGG16_ATTENTION_CFG: list[int | str] = [
    64, 64, "M",
    128, 128, "M",
    256, 256, "A", 256, "M",
    512, 512, "A", 512, "M",
    512, 512, "A", 512, "M",
]  # fmt: skip
AVGPOOL_SIZE = 7  # the article's AdaptiveAvgPool2d((7, 7))
ARTICLE_ATTENTION_NAMES = ("features.14", "features.22", "features.30")  # where the cfg's "A"s land


@dataclass
class ModelConfig:
    num_classes: int = 1000  # classifier outputs
    width: float = 1.0  # multiplier on every conv's channels (1.0 = the article)
    hidden: int = 4096  # the two hidden classifier layers (4096 = the article)
    dropout: float = 0.5  # classifier dropout (nn.Dropout() default, as in the article)
    attention: bool | str = True  # False: no GlobalAttention blocks; "global": query-averaged rows (GCNet)
    batch_norm: bool = False  # BatchNorm after each conv (training aid; fold before export)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def scaled_channels(channels: int, width: float) -> int:
    """Channels of a conv after the width multiplier (at least 8, so C/8 >= 1)."""
    return max(8, int(round(channels * width)))


def attend_in_row_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         block_elements: int = 1 << 21) -> torch.Tensor:
    """softmax(Q K^T) V for (B, N, C') Q, K and (B, N, C) V -> (B, N, C), a block of query rows at a time.

    The CPU inference path of GlobalAttention: exactly the article's math (Q K^T at Q's own width,
    where SDPA's fused kernel needs Q and K zero-padded to V's), holding one block of at most
    `block_elements` attention weights (8 MB) instead of the N x N map. Faster than the padded fused
    kernel on the CPU; the measurements are in bench/README.md (model speed).
    """
    B, N, _ = query.shape
    out = value.new_empty(B, N, value.shape[-1])
    rows = max(1, block_elements // N)
    for b in range(B):
        key_t, v = key[b].transpose(0, 1), value[b]  # (C', N), (N, C)
        for start in range(0, N, rows):
            logits = query[b, start:start + rows] @ key_t  # (rows, N)
            weights = torch.softmax(logits, dim=-1)
            out[b, start:start + rows] = weights @ v  # (no out=: autocast skips out= calls)
    return out


def mean_attention_row(query: torch.Tensor, key: torch.Tensor, block_elements: int = 1 << 21) -> torch.Tensor:
    """(B, N): the query-averaged attention row (1/N) sum_q softmax(Q K^T)[q] of (B, N, C') Q and K,
    a block of query rows at a time (the N x N map is never whole; autograd works through it)."""
    B, N, _ = query.shape
    rows = max(1, block_elements // (B * N))
    key_t = key.transpose(1, 2)  # (B, C', N)
    return sum(torch.softmax(query[:, s:s + rows] @ key_t, dim=-1).sum(1) for s in range(0, N, rows)) / N


class GlobalAttention(nn.Module):
    """SAGAN-style non-local block: y = gamma * softmax(Q K^T) V + x, gamma initialised to 0.

    Computes exactly the article's `forward` (up to fp32 rounding) without materialising the N x N
    map: in CPU inference (autograd and autocast off) a block of query rows at a time
    (`attend_in_row_blocks`), otherwise (training, Grad-CAM, autocast, GPU) through
    `F.scaled_dot_product_attention(..., scale=1.0)`.
    To see the maps, `vggattn.analyze` reads Q and K from the block's input (`vggattn.attention.adapters`).
    """

    def __init__(self, in_channels: int, *, query_averaged: bool = False):
        super().__init__()
        # query_averaged: every row replaced by the image's query-averaged row, in training too (GCNet's
        # query-independent block, Cao et al. 2019); a plain attribute, so the state_dict is unchanged
        self.query_averaged = query_averaged
        self.conv_query = nn.Conv2d(in_channels, in_channels // 8, kernel_size=1)
        self.conv_key = nn.Conv2d(in_channels, in_channels // 8, kernel_size=1)
        self.conv_value = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        # The article also holds an nn.Softmax(dim=-1); it has no state, so the layout is equal.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        query = self.conv_query(x).flatten(2).transpose(1, 2)  # (B, N, C')
        key = self.conv_key(x).flatten(2).transpose(1, 2)  # (B, N, C')
        value = self.conv_value(x).flatten(2).transpose(1, 2)  # (B, N, C)
        if self.query_averaged:
            context = (mean_attention_row(query, key)[:, None] @ value).transpose(1, 2)  # (B, C, 1): one for all positions
            return x + self.gamma * context.reshape(B, C, 1, 1)
        if x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            out = attend_in_row_blocks(query, key, value)
        else:
            # Zero-padding Q and K to V's width leaves Q K^T unchanged and lets SDPA use its fused
            # kernel (with C' != C it falls back to the N x N math path; bench/train_throughput.py).
            # V is made contiguous: from a contiguous-format x it is a strided view, and SDPA would
            # fall back to the N x N map (bench/scale.py)
            pad = value.shape[-1] - query.shape[-1]
            out = F.scaled_dot_product_attention(F.pad(query, (0, pad)), F.pad(key, (0, pad)), value.contiguous(),
                                                 scale=1.0)
        out = out.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W), a channels_last view
        # x first: the sum takes x's memory format, so the next conv sees the layout it was given
        return x + self.gamma * out

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The article's math step by step (the N x N map materialised); for FLOP counts and checks."""
        B, C, H, W = x.shape
        query = self.conv_query(x).flatten(2).transpose(1, 2)  # (B, N, C')
        key = self.conv_key(x).flatten(2)  # (B, C', N)
        value = self.conv_value(x).flatten(2)  # (B, C, N)
        attention = torch.softmax(torch.bmm(query, key), dim=-1)  # (B, N, N)
        out = torch.bmm(value, attention.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.gamma * out


def make_features(cfg: list[int | str], width: float, attention: bool, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif v == "A":
            if attention:
                layers.append(GlobalAttention(in_channels, query_averaged=attention == "global"))
        else:
            out_channels = scaled_channels(int(v), width)
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            in_channels = out_channels
    return nn.Sequential(*layers)


class VGG16WithAttention(nn.Module):
    """VGG16 with a GlobalAttention block in conv blocks 3, 4 and 5 (the article's model)."""

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        width: float = 1.0,
        hidden: int = 4096,
        dropout: float = 0.5,
        attention: bool | str = True,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.config = ModelConfig(num_classes, width, hidden, dropout, attention, batch_norm)
        self.features = make_features(VGG16_ATTENTION_CFG, width, attention, batch_norm)
        last_channels = scaled_channels(512, width)
        self.avgpool = nn.AdaptiveAvgPool2d((AVGPOOL_SIZE, AVGPOOL_SIZE))
        self.classifier = nn.Sequential(
            nn.Linear(last_channels * AVGPOOL_SIZE * AVGPOOL_SIZE, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

    @classmethod
    def from_config(cls, config: ModelConfig) -> "VGG16WithAttention":
        c = config
        return cls(c.num_classes, width=c.width, hidden=c.hidden, dropout=c.dropout,
                   attention=c.attention, batch_norm=c.batch_norm)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, C5, H/32, W/32)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(x)  # (B, C5, 7, 7)
        x = torch.flatten(x, 1)  # (B, C5*49)
        return self.classifier(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def vgg16_with_attention(num_classes: int = 1000, **kwargs) -> VGG16WithAttention:
    """The article's builder; keyword-only extras (width, hidden, ...) go to the model."""
    return VGG16WithAttention(num_classes=num_classes, **kwargs)


def attention_layer_names(model: nn.Module) -> list[str]:
    """Names of the GlobalAttention blocks in forward order (e.g. ['features.14', ...])."""
    return [name for name, m in model.named_modules() if isinstance(m, GlobalAttention)]


def gammas(model: nn.Module) -> dict[str, float]:
    """The learned gamma of each attention layer, by module name."""
    return {name: float(m.gamma.detach().float().reshape(-1)[0])
            for name, m in model.named_modules() if isinstance(m, GlobalAttention)}


@torch.no_grad()
def fold_batchnorm(model: VGG16WithAttention) -> VGG16WithAttention:
    """Return an equivalent model (in eval mode) with every BatchNorm folded into its conv.

    The result has batch_norm=False, i.e. exactly the article's state_dict layout.
    """
    if not model.config.batch_norm:
        return model
    cfg = ModelConfig.from_dict({**model.config.to_dict(), "batch_norm": False})
    folded = VGG16WithAttention.from_config(cfg).to(next(model.parameters()).device)
    src = [m for m in model.features if not isinstance(m, (nn.ReLU, nn.BatchNorm2d))]
    dst = [m for m in folded.features if not isinstance(m, nn.ReLU)]
    bns = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    assert len(src) == len(dst)
    bn_iter = iter(bns)
    for s, d in zip(src, dst):
        if isinstance(s, nn.Conv2d):
            bn = next(bn_iter)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
            d.weight.copy_(s.weight * scale[:, None, None, None])
            d.bias.copy_((s.bias - bn.running_mean) * scale + bn.bias)
        else:
            d.load_state_dict(s.state_dict())
    folded.classifier.load_state_dict(model.classifier.state_dict())
    folded.train(model.training)
    return folded


@torch.no_grad()
def unfold_batchnorm(model: VGG16WithAttention, batch: torch.Tensor) -> VGG16WithAttention:
    """Return a batch_norm=True copy of an article-layout model that computes the same function.

    The inverse of `fold_batchnorm`, for warm-starting BatchNorm training from a shipped file:
    each BatchNorm gets, from `batch` (a few hundred training images), its input's per-channel
    mean and variance as both its running statistics and its affine bias and scale, so it is
    the identity on that batch in train mode and exactly the identity in eval mode.
    """
    if model.config.batch_norm:
        return model
    cfg = ModelConfig.from_dict({**model.config.to_dict(), "batch_norm": True})
    bn_model = VGG16WithAttention.from_config(cfg).to(batch.device)
    src = [m for m in model.features if not isinstance(m, nn.ReLU)]
    dst = [m for m in bn_model.features if not isinstance(m, (nn.ReLU, nn.BatchNorm2d))]
    assert len(src) == len(dst)
    for s, d in zip(src, dst):
        d.load_state_dict(s.state_dict())
    bn_model.classifier.load_state_dict(model.classifier.state_dict())

    def set_identity(bn: nn.BatchNorm2d, args):
        x = args[0].float()
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.copy_(mean)

    hooks = [m.register_forward_pre_hook(set_identity) for m in bn_model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        bn_model.train()(batch)  # in order: each BatchNorm sees the output of already-set layers
    finally:
        for h in hooks:
            h.remove()
    return bn_model.train(model.training)


def from_torchvision(vgg16: nn.Module | dict[str, torch.Tensor]) -> VGG16WithAttention:
    """Build the attention model from a torchvision VGG16 (module or state_dict).

    Convs and classifier are copied (torchvision's feature indices shift by the three
    insertions); the attention blocks keep their fresh init with gamma = 0, so the result's
    logits equal torchvision's exactly until gamma is trained.
    """
    state = vgg16 if isinstance(vgg16, dict) else vgg16.state_dict()
    state = {k: v for k, v in state.items()}
    if any(".running_mean" in k for k in state):
        raise ValueError("from_torchvision: this looks like vgg16_bn; only plain VGG16 is supported")
    tv_conv_idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("features.") and k.endswith(".weight")})
    num_classes, hidden = state["classifier.6.weight"].shape[0], state["classifier.0.weight"].shape[0]
    width = state["features.0.weight"].shape[0] / 64
    model = VGG16WithAttention(num_classes, width=width, hidden=hidden)
    our_conv_idx = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    if len(tv_conv_idx) != len(our_conv_idx):
        raise ValueError(f"from_torchvision: expected {len(our_conv_idx)} convs (VGG16), found {len(tv_conv_idx)}")
    mapped = {}
    for tv_i, our_i in zip(tv_conv_idx, our_conv_idx):
        for p in ("weight", "bias"):
            mapped[f"features.{our_i}.{p}"] = state[f"features.{tv_i}.{p}"]
    mapped.update({k: v for k, v in state.items() if k.startswith("classifier.")})
    own = model.state_dict()
    mapped.update({k: v for k, v in own.items() if k not in mapped})  # fresh attention blocks
    model.load_state_dict(mapped, strict=True)
    return model
