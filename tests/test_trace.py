"""Attention found by what the code computes (vggattn.attention.trace, adapters.TracedAdapter), on the libraries' own blocks:
each block's rows against a direct computation from its own submodules (1e-5), its output rebuilt from the rows
(the block's forward with its weights replaced by the rows on the grids) against its own forward, interventions
against the block's maths by hand, and what is no map over positions named and skipped."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vggattn import explain

from vggattn.attention import adapters
from vggattn.attention.adapters import TracedAdapter, find_blocks
from vggattn.attention.trace import NotAttention

mmcv_cnn = pytest.importorskip("mmcv.cnn", reason="mmcv-lite is a test-only extra (requirements.txt pins it)")
timm = pytest.importorskip("timm", reason="timm is the optional extra vggattn[timm] (requirements.txt pins it)")
diffusers = pytest.importorskip("diffusers", reason="diffusers is a test-only extra (requirements.txt pins it)")
import byo_models  # noqa: E402
from byo_models import randomised  # noqa: E402
from nonlocal_reference import FORMS, NONLocalBlock2D as Reference  # noqa: E402


def x_for(channels: int = 32, h: int = 12, w: int = 8) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, channels, h, w)  # not square: a transposed grid would show


def tokens(t):  # (B, C, h, w) -> (B, h*w, C)
    return t.flatten(2).transpose(1, 2)


def traced(block, x, rows, *, key_grid=None, heads=1, atol=1e-5):
    """The traced rows against `rows` (B, heads, N, M) and the block's own output rebuilt from them."""
    adapter = TracedAdapter(block)
    with torch.no_grad():
        maps = adapter.maps(block, x)
        assert maps.grid == tuple(x.shape[-2:]) and maps.key_grid == (key_grid or tuple(x.shape[-2:]))
        assert maps.heads == heads
        torch.testing.assert_close(maps.rows(dtype=torch.float64), rows.double(), atol=atol, rtol=1e-5)
        own = block(x)
        rebuilt = adapter.forward(block, x)  # the block's forward with its weights taken from the rows on the grids
        torch.testing.assert_close(rebuilt, own, atol=1e-5 * float(own.abs().max()), rtol=1e-5)
    return adapter, maps


def nonlocal_rows(theta, phi, form, w_concat=None):
    """Rows of Wang et al.'s four pairwise forms from (B, N, c) theta and (B, M, c) phi tokens."""
    if form == "concatenation":
        c = theta.shape[-1]
        w1, w2 = w_concat[:c], w_concat[c:]
        f = F.relu((theta @ w1)[:, :, None] + (phi @ w2)[:, None, :])  # (B, N, M)
        return f / phi.shape[1]
    f = theta @ phi.transpose(1, 2)
    if form == "dot_product":
        return f / phi.shape[1]
    if form == "embedded_gaussian_scaled":
        f = f / theta.shape[-1] ** 0.5
    return torch.softmax(f, dim=-1)


@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"])
def test_mmcv_nonlocal2d_every_mode(mode, sub_sample):
    """mmcv's NonLocal2d (the Non-local and GCNet configs' block): the four modes, keys sub-sampled or not."""
    block, x = randomised(mmcv_cnn.NonLocal2d(32, mode=mode, sub_sample=sub_sample)), x_for()
    pool = (lambda t: F.max_pool2d(t, 2)) if sub_sample else (lambda t: t)
    with torch.no_grad():
        if mode == "gaussian":
            theta, phi = tokens(x), tokens(pool(x))
        else:
            theta, phi = tokens(block.theta(x)), tokens(block.phi(x))  # phi holds the pool when sub-sampled
        form = "embedded_gaussian_scaled" if mode == "embedded_gaussian" and block.use_scale else mode
        w = block.concat_project.conv.weight.reshape(-1) if mode == "concatenation" else None
        rows = nonlocal_rows(theta, phi, form, w)[:, None]
        values = tokens(block.g(x))
    key_grid = (6, 4) if sub_sample else None
    adapter, maps = traced(block, x, rows, key_grid=key_grid)
    assert maps.normalise == ("softmax" if mode in ("gaussian", "embedded_gaussian") else
                              "mean" if mode == "dot_product" else "weights")
    assert ("sums to 1" in maps.meaning) == (mode in ("gaussian", "embedded_gaussian"))
    with torch.no_grad():  # uniform rows: every query gets the mean value; off: no attended values at all
        finish = lambda a: x + block.conv_out(a.transpose(1, 2).reshape(2, -1, *x.shape[-2:]))  # noqa: E731
        uniform = values.mean(1, keepdim=True).expand(-1, rows.shape[2], -1)
        torch.testing.assert_close(adapter.forward(block, x, "uniform"), finish(uniform), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(adapter.forward(block, x, "off"), finish(torch.zeros_like(uniform)), atol=1e-5, rtol=0)
        mean = rows[:, 0].mean(1, keepdim=True) @ values
        torch.testing.assert_close(adapter.forward(block, x, "mean"), finish(mean.expand_as(uniform)), atol=1e-4, rtol=1e-4)
    if mode == "embedded_gaussian":
        assert set(adapter.qk_modules) == {"theta.conv", "phi.0.conv" if sub_sample else "phi.conv"}


def test_mmcv_context_block_is_one_map_per_image():
    block, x = randomised(mmcv_cnn.ContextBlock(32, 0.25)), x_for()
    with torch.no_grad():
        rows = torch.softmax(block.conv_mask(x).flatten(1), dim=-1)[:, None, None]  # (B, 1, 1, N)
    adapter, maps = traced(block, x, rows)
    assert maps.per_image and "one map per image" in maps.meaning
    with torch.no_grad():  # uniform: GCNet's context becomes average pooling
        pooled = x.mean((2, 3), keepdim=True)
        torch.testing.assert_close(adapter.forward(block, x, "uniform"), x + block.channel_add_conv(pooled),
                                   atol=1e-5, rtol=1e-5)
    assert adapter.qk_modules == ("conv_mask",)


@pytest.mark.parametrize("processor", ["AttnProcessor2_0", "AttnProcessor"])
def test_diffusers_vae_mid_block_attention(processor):
    """diffusers' Attention inside a VAE mid-block, with SDPA (AttnProcessor2_0) and with baddbmm + softmax
    (AttnProcessor): found inside the mid-block (its ResNets compute none), its rows from GroupNorm, to_q, to_k."""
    from diffusers.models import attention_processor as ap
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

    mid = UNetMidBlock2D(32, temb_channels=None, resnet_groups=8, attention_head_dim=32, add_attention=True)
    block = mid.attentions[0]
    block.set_processor(getattr(ap, processor)())
    randomised(mid)
    model = nn.Sequential(nn.Conv2d(3, 32, 4, 4), mid)
    x = x_for()
    assert [n for n, *_ in find_blocks(model, example=torch.randn(1, 3, 48, 32))] == ["1.attentions.0"]
    with torch.no_grad():
        B, C, H, W = x.shape
        normed = block.group_norm(x.view(B, C, H * W)).transpose(1, 2)  # (B, N, C)
        q, k = block.to_q(normed), block.to_k(normed)
        rows = torch.softmax(q @ k.transpose(1, 2) * block.scale, dim=-1)[:, None]
        # the library's own probabilities (what AttnProcessor multiplies the values by), same q and k
        own = block.get_attention_scores(block.head_to_batch_dim(q), block.head_to_batch_dim(k), None)
        torch.testing.assert_close(rows[:, 0], own, rtol=1e-5, atol=1e-6)
    adapter, maps = traced(block, x, rows)
    assert maps.normalise == "softmax" and set(adapter.qk_modules) >= {"to_q", "to_k"}


def halo_rows_by_hand(block, x):
    """HaloAttn's rows with its relative-position logits zero: per head, a query's keys are the (bs + 2 halo)^2
    window around its block, padding included (keys of zeros: logit 0). -> rows on the grid, padding shares."""
    B, C, H, W = x.shape
    heads, bs, halo = block.num_heads, block.block_size, block.halo_size
    q = block.q(x).reshape(B, heads, -1, H, W)
    k, _ = block.kv(x).reshape(B, heads, -1, H, W).split([block.dim_head_qk, block.dim_head_v], dim=2)
    rows = torch.zeros(B, heads, H * W, H * W, dtype=torch.float64)
    padding = torch.zeros(B, heads, H * W, dtype=torch.float64)
    for i in range(H):
        for j in range(W):
            y0, x0 = (i // bs) * bs - halo, (j // bs) * bs - halo
            cells = [(y, xx) for y in range(y0, y0 + bs + 2 * halo) for xx in range(x0, x0 + bs + 2 * halo)]
            inside = [(y, xx) for y, xx in cells if 0 <= y < H and 0 <= xx < W]
            logits = torch.stack([(q[:, :, :, i, j] * k[:, :, :, y, xx]).sum(2) for y, xx in inside], -1) * block.scale
            outside = len(cells) - len(inside)  # keys on padding: logit 0
            z = torch.logsumexp(torch.cat([logits.double(), torch.zeros(B, heads, outside, dtype=torch.float64)], -1)
                                if outside else logits.double(), -1, keepdim=True)
            w = torch.exp(logits.double() - z)
            for n, (y, xx) in enumerate(inside):
                rows[:, :, i * W + j, y * W + xx] = w[..., n]
            padding[:, :, i * W + j] = 1 - w.sum(-1)
    return rows, padding


def test_timm_halo_attention_windows_with_padding():
    """HaloAttn: queries in 4x4 blocks, keys in 6x6 windows with a 1-cell halo, two heads. With the relative
    logits zeroed the rows are checked cell by cell by hand, and each row's share on padding too; with random ones
    the block's output is rebuilt from the rows."""
    from timm.layers.halo_attn import HaloAttn

    block, x = randomised(HaloAttn(32, 32, num_heads=2, block_size=4, halo_size=1)), x_for(h=12, w=8)
    with torch.no_grad():
        block.pos_embed.height_rel.zero_()
        block.pos_embed.width_rel.zero_()
        rows, padding = halo_rows_by_hand(block, x)
    adapter, maps = traced(block, x, rows, heads=2)
    torch.testing.assert_close(maps.padding.double(), padding, atol=1e-5, rtol=0)
    assert float(maps.padding[0, 0, 0]) > 0 and "padding" in maps.meaning  # a corner: 11 of its 36 keys on padding
    torch.testing.assert_close(maps.rows().sum(-1) + maps.padding, torch.ones_like(maps.padding), atol=1e-5, rtol=0)
    block = randomised(HaloAttn(32, 32, num_heads=2, block_size=4, halo_size=1), seed=3)
    adapter = TracedAdapter(block)
    with torch.no_grad():  # the output rebuilt from the rows on the grid (the padding keys' values are zeros)
        maps = adapter.maps(block, x)
        v = block.kv(x).reshape(2, 2, -1, 12 * 8)[:, :, block.dim_head_qk:]  # (B, heads, dv, N)
        out = (maps.rows() @ v.transpose(-1, -2)).transpose(-1, -2).reshape(2, -1, 12, 8)
        torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_the_reference_nonlocal_code(form):
    """The reference Non-local code's NONLocalBlock2D (g, theta, phi, W), in its four forms, keys sub-sampled."""
    block, x = randomised(Reference(32, form=form)), x_for()
    with torch.no_grad():
        theta = tokens(x if form == "gaussian" else block.theta(x))
        phi = tokens(block.phi(x))
        w = block.concat_project[0].weight.reshape(-1) if form == "concatenation" else None
        rows = nonlocal_rows(theta, phi, form, w)[:, None]
    traced(block, x, rows, key_grid=(6, 4))


def test_the_families_we_have_adapters_for_read_the_same_when_traced():
    """Every family of vggattn.attention.adapters (the article's GlobalAttention, SAGAN, BigGAN, Wang et al.'s two forms,
    timm's NonLocalAttn, BottleneckAttn and GlobalContext) read by tracing: the adapters' rows (tested against
    the families' maths in test_adapters.py) and their interventions."""
    model = byo_models.every_family()
    torch.manual_seed(2)
    x = torch.randn(2, 32, 16, 16)
    for name, block in model.blocks.items():
        known, traced_ = adapters.adapter_for(block), TracedAdapter(block)
        with torch.no_grad():
            a, b = known.maps(block, x), traced_.maps(block, x)
            assert (a.grid, a.key_grid, a.heads, a.per_image) == (b.grid, b.key_grid, b.heads, b.per_image), name
            torch.testing.assert_close(b.rows(dtype=torch.float64), a.rows(dtype=torch.float64), atol=1e-5, rtol=1e-5,
                                       msg=name)
            for mode in ("mean", "uniform"):
                want, got = known.forward(block, x, mode), traced_.forward(block, x, mode)
                want, got = (w[0] if isinstance(w, tuple) else w for w in (want, got))
                torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5, msg=f"{name} {mode}")


class ChannelAttention(nn.Module):
    """XCiT-style cross-covariance attention on a feature map: a softmax over channels, not positions."""

    def __init__(self, c):
        super().__init__()
        self.qkv = nn.Conv2d(c, 3 * c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)  # (B, C, N) each
        attn = torch.softmax(F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(1, 2), dim=-1)  # (B, C, C)
        return x + (attn @ v).reshape(B, C, H, W)


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


def test_what_is_no_map_over_positions_is_named_and_skipped(caplog):
    """Attention over channels and a lambda layer are named in one line each and skipped; a squeeze-excite block
    computes no attention at all; the mmcv block beside them is found."""
    from timm.layers.lambda_layer import LambdaLayer

    model = nn.Sequential(nn.Conv2d(3, 32, 4, 4), ChannelAttention(32), LambdaLayer(32, 32, dim_head=8, r=3),
                          SqueezeExcite(32), mmcv_cnn.NonLocal2d(32)).eval()
    found = find_blocks(model, example=torch.randn(1, 3, 48, 32))
    assert [n for n, *_ in found] == ["4"]
    skipped = adapters.traced_blocks(model).skipped
    assert any(s.startswith("1 (ChannelAttention)") and "not positions" in s for s in skipped), skipped
    assert any(s.startswith("2 (LambdaLayer)") for s in skipped), skipped
    assert "1 (ChannelAttention)" in caplog.text
    with pytest.raises(ValueError, match=r"3 \(SqueezeExcite\): not an attention block"):
        find_blocks(model, ["3"])
    with pytest.raises(ValueError, match=r"1 \(ChannelAttention\).*not positions"):
        find_blocks(model, ["1"])
    with pytest.raises(NotAttention):
        TracedAdapter(model[1]).maps(model[1], torch.randn(1, 32, 6, 6))


def test_a_model_of_third_party_blocks_in_explain(tmp_path):
    """vggattn-explain --model on a classifier of mmcv, timm, diffusers and reference blocks: every block found,
    its rows on the key grid in <block>_attention.npy, the halo's padding shares in result.json."""
    import numpy as np

    from vggattn.app import HERE

    out = tmp_path / "out"
    assert explain.main([str(HERE / "assets" / "church.jpg"), "--model", "byo_models:third_party", "--input-size", "64",
                         "--point", "0,0", "--point", "120,80", "--out", str(out)]) == 0
    result = json.loads((out / "church" / "result.json").read_text())
    names = [b["name"] for b in result["layers"]]
    assert names == ["nonlocal2d", "halo", "vae_mid.attentions.0", "context", "reference"]
    halo = result["layers"][1]
    shares = [p["layers"]["halo"]["padding_share"] for p in result["points"]]
    assert halo["heads"] == 2 and shares[0] > 0  # a corner
    assert shares[1] == 0  # (120, 80): cell (5, 8) of 16x16, its window (rows 3-8, cols 7-12) inside
    rows = np.load(out / "church" / "nonlocal2d_attention.npy")
    assert rows.shape == (2, 8, 8)  # keys sub-sampled: an 8x8 key grid
    np.testing.assert_allclose(rows.sum((1, 2)), 1, rtol=1e-5)


def test_the_app_on_third_party_blocks():
    """The any-model app on the classifier of third-party blocks: a panel per block, the page's rows equal the traced
    rows, a pinned point's readouts with the halo's share on padding, and an ablation through the traced block."""
    import numpy as np

    from vggattn import app
    from vggattn.app import HERE
    from vggattn.models.byo import describe

    model = byo_models.third_party()
    meta = describe("byo_models:third_party", 64, [f"c{i}" for i in range(10)])
    demo = app.build_demo(model, meta)
    ui = demo.ui
    assert len(ui.panels) == 5
    out = app.on_image(ui, model, meta, str(HERE / "assets" / "church.jpg"))
    state = out[ui.state]
    kinds = {layer.name: layer.kind for layer in state.layers}
    assert kinds == {"nonlocal2d": "qk", "halo": "window", "vae_mid.attentions.0": "qk", "context": "map",
                     "reference": "rows"}
    for layer, block in zip(state.layers, state.result.blocks):
        want = block.maps.rows(dtype=torch.float64)[0].mean(0)  # (N or 1, M), the mean of heads
        for i in (0, 100, layer.n - 1):
            np.testing.assert_allclose(layer.row(i), want[0 if layer.kind == "map" else i].numpy(), rtol=1e-5,
                                       atol=1e-6, err_msg=layer.name)
        if layer.kind != "map":
            for j in (0, 37, layer.m - 1):  # columns too: every query's weight on key cell j
                np.testing.assert_allclose(layer.column(j), want[:, j].numpy(), rtol=1e-4, atol=1e-6, err_msg=layer.name)
    halo = next(layer for layer in state.layers if layer.kind == "window")
    assert halo.values_.shape[-1] == 36 < halo.m  # 6 x 6 keys a row, sent instead of the 256 cells
    pinned = app.on_point(ui, state, 0, 0)
    assert "of the row on padding" in pinned[ui.readouts] and "vae_mid.attentions.0" in pinned[ui.readouts]
    ablated = app.on_ablate(ui, model, state, ["halo", "vae_mid.attentions.0"], "uniform")
    with torch.no_grad(), adapters.Intervention(model, {"halo": "uniform", "vae_mid.attentions.0": "uniform"}):
        expected = torch.softmax(model(state.result.input), -1)[0]
    with torch.no_grad():
        plain = torch.softmax(model(state.result.input), -1)[0]
    assert not torch.allclose(expected, plain)  # the intervention changes the output
    column = [c for c in ablated[ui.ablation].columns if "uniform" in c][0]
    top = int(plain.argmax())  # the table's first row: the top class as computed
    assert ablated[ui.ablation][column][0] == pytest.approx(round(float(expected[top]), 4), abs=1e-4)


def test_the_study_of_third_party_blocks(tmp_path, data_root):
    """vggattn-study --model on the classifier of third-party blocks, 4 Imagenette images: every block studied,
    interventions through the traced blocks, the sanity check per block."""
    from vggattn import study

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(sorted(p.name for p in (data_root / "val").iterdir())))
    out = tmp_path / "study"
    assert study.main(["--model", "byo_models:third_party", "--input-size", "64", "--classes", str(classes),
                       "--data", str(data_root / "val"), "--out", str(out), "--limit", "4", "--batch-size", "2",
                       "--workers", "0", "--bootstrap", "20", "--device", "cpu"]) == 0
    s = json.loads((out / "study.json").read_text())
    assert list(s["layers"]) == ["nonlocal2d", "halo", "vae_mid.attentions.0", "context", "reference"]
    assert all("found by what it computes" in v["family"] for v in s["layers"].values())
    assert 0 < s["layers"]["vae_mid.attentions.0"]["sink_mass"] <= 1
    assert {"halo:uniform", "context:off", "all:mean"} <= set(s["interventions"])
    assert set(s["sanity"]["layers"]) == set(s["layers"])


# -- implementations written here, that no adapter and no test above has seen ----------------------------------------

class EinsumHeads(nn.Module):
    """Four heads through einsum, channels first: logits 'bhdn,bhdm->bhnm', values 'bhnm,bhdm->bhdn'."""

    def __init__(self, c=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)  # (B, h, d, N) each
        attn = torch.einsum("bhdn,bhdm->bhnm", q, k).mul(q.shape[2] ** -0.5).softmax(-1)
        out = torch.einsum("bhnm,bhdm->bhdn", attn, v).reshape(B, C, H, W)
        return x + self.proj(out)


class ReducedKeys(nn.Module):
    """PVT-style spatial reduction: tokens (B, N, C) with heads last-but-one, keys and values from a strided 2x2
    conv, F.scaled_dot_product_attention."""

    def __init__(self, c=32, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.kv = nn.Linear(c, c), nn.Linear(c, 2 * c)
        self.sr, self.norm = nn.Conv2d(c, c, 2, 2), nn.LayerNorm(c)

    def forward(self, x):
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        q = self.q(t).reshape(B, H * W, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        r = self.norm(self.sr(x).flatten(2).transpose(1, 2))  # (B, M, C), M = N / 4
        k, v = self.kv(r).reshape(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, M, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return x + out.transpose(1, 2).reshape(B, H * W, C).transpose(1, 2).reshape(B, C, H, W)


class Windows(nn.Module):
    """Swin-style attention inside non-overlapping 4x4 windows (no shift), tokens partitioned by view/permute."""

    def __init__(self, c=32, win=4):
        super().__init__()
        self.win, self.qkv = win, nn.Linear(c, 3 * c)

    def forward(self, x):
        B, C, H, W = x.shape
        s = self.win
        t = x.permute(0, 2, 3, 1).reshape(B, H // s, s, W // s, s, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, C)
        q, k, v = self.qkv(t).chunk(3, dim=-1)  # (B * windows, s*s, C)
        out = (q @ k.transpose(-2, -1) / C ** 0.5).softmax(dim=-1) @ v
        out = out.reshape(B, H // s, W // s, s, s, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        return x + out


class QueriesNormalised(nn.Module):
    """A softmax over the queries (dim 1), then the product with the values over the keys: rows need not sum to 1."""

    def __init__(self, c=32):
        super().__init__()
        self.q, self.k, self.v = nn.Conv2d(c, 8, 1), nn.Conv2d(c, 8, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k = self.q(x).flatten(2).transpose(1, 2), self.k(x).flatten(2).transpose(1, 2)  # (B, N, 8)
        attn = torch.softmax(q @ k.transpose(1, 2), dim=1)  # normalised over the queries
        return x + (attn @ self.v(x).flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)


def test_einsum_heads_channels_first():
    block, x = randomised(EinsumHeads()), x_for()
    with torch.no_grad():
        q, k, _ = block.qkv(x).reshape(2, 3, 4, 8, -1).unbind(1)
        rows = torch.softmax(q.transpose(-1, -2) @ k / 8 ** 0.5, dim=-1)  # (B, 4, N, N)
    _, maps = traced(block, x, rows, heads=4)
    assert maps.query is not None and maps.normalise == "softmax"  # the page gets Q and K


def test_spatially_reduced_keys_through_sdpa():
    block, x = randomised(ReducedKeys()), x_for()
    with torch.no_grad():
        t = x.flatten(2).transpose(1, 2)
        q = block.q(t).reshape(2, -1, 2, 16).transpose(1, 2)
        r = block.norm(block.sr(x).flatten(2).transpose(1, 2))
        k = block.kv(r)[..., :32].reshape(2, -1, 2, 16).transpose(1, 2)
        rows = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1)  # (B, 2, 96, 24)
    traced(block, x, rows, heads=2, key_grid=(6, 4))


def test_swin_style_windows():
    block, x = randomised(Windows()), x_for()
    with torch.no_grad():
        t = x.flatten(2).transpose(1, 2)  # (B, N, C) in row-major order
        q, k, _ = block.qkv(t).chunk(3, dim=-1)
        logits = q @ k.transpose(1, 2) / 32 ** 0.5  # (B, N, N) over the whole grid
        cell = torch.arange(12 * 8)
        window = (cell // 8 // 4) * 2 + (cell % 8) // 4  # the 4x4 window of each cell on the 12x8 grid
        same = window[:, None] == window[None, :]
        rows = torch.softmax(logits.masked_fill(~same, float("-inf")), dim=-1)[:, None]
    _, maps = traced(block, x, rows)
    assert maps.padding is None


def test_weights_normalised_over_the_queries_are_read_as_they_enter_the_output():
    block, x = randomised(QueriesNormalised()), x_for()
    with torch.no_grad():
        q, k = (c(x).flatten(2).transpose(1, 2) for c in (block.q, block.k))
        rows = torch.softmax(q @ k.transpose(1, 2), dim=1)[:, None]  # row i: the weights of the values in i's output
    _, maps = traced(block, x, rows)
    assert maps.normalise == "weights" and "need not sum to 1" in maps.meaning


def test_strided_halo_attention_puts_its_queries_on_a_coarser_grid():
    """HaloAttn with stride 2 (HaloNet's downsampling blocks): queries from a strided conv on a 6x4 grid over the
    12x8 input, keys on the 12x8 grid; the output (at 6x4) rebuilt from the rows."""
    from timm.layers.halo_attn import HaloAttn

    block, x = randomised(HaloAttn(32, 32, stride=2, num_heads=2, block_size=4, halo_size=1)), x_for()
    adapter = TracedAdapter(block)
    with torch.no_grad():
        maps = adapter.maps(block, x)
        assert (maps.grid, maps.key_grid, maps.heads) == ((6, 4), (12, 8), 2)
        torch.testing.assert_close(adapter.forward(block, x), block(x), atol=1e-5, rtol=1e-5)
        q = block.q(x).reshape(2, 2, -1, 6, 4)  # (B, heads, d, 6, 4): the query of cell (i, j) sits at (2i, 2j)
        k = block.kv(x).reshape(2, 2, -1, 12, 8)[:, :, :block.dim_head_qk]
        logit = (q[..., 1, 1] * k[..., 2, 3]).sum(2) * block.scale  # cell (1, 1) on key (2, 3): in its window
        assert bool((maps.rows()[:, :, 1 * 4 + 1, 2 * 8 + 3] > 0).all()) and logit.shape == (2, 2)
        assert float(maps.rows()[0, 0, 0, 11 * 8 + 7]) == 0  # the far corner is outside the first window


def test_timm_halonets_are_found_and_lambda_layers_named():
    """timm's halonet26t (random weights): every HaloAttn found by tracing; lambda_resnet26t's LambdaLayers are
    no map over positions: the model has none, and the sentence says why."""
    model = timm.create_model("halonet26t", pretrained=False).eval()
    found = find_blocks(model, example=torch.randn(1, 3, 256, 256))
    assert len(found) == sum(type(m).__name__ == "HaloAttn" for m in model.modules()) == 3
    assert all(isinstance(a, TracedAdapter) for *_, a in found)
    lam = timm.create_model("lambda_resnet26t", pretrained=False).eval()
    with pytest.raises(ValueError, match=r"no attention in this model.*LambdaLayer\): not an attention block over "
                                         r"positions"):
        find_blocks(lam, example=torch.randn(1, 3, 256, 256))


def test_one_forward_records_every_traced_block_as_running_it_alone_does():
    """analyze records the traced blocks' weights while the model runs (a Recorder inside each block only):
    the same rows as each block run on its own input, and no hook left behind."""
    from PIL import Image

    from vggattn.app import HERE
    from vggattn.analysis import analyze
    from vggattn.models.byo import describe

    model = byo_models.third_party()
    meta = describe("byo_models:third_party", 64, [f"c{i}" for i in range(10)])
    result = analyze(model, meta, Image.open(HERE / "assets" / "church.jpg"))
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0])) for n, m in model.named_modules()
               if n in {b.name for b in result.blocks}]
    with torch.no_grad():
        model(result.input)
    for h in handles:
        h.remove()
    for block in result.blocks:
        module = model.get_submodule(block.name)
        alone = block.adapter.maps(module, inputs[block.name])
        torch.testing.assert_close(block.maps.rows(), alone.rows(), atol=1e-6, rtol=1e-5, msg=block.name)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class DeepTokens(nn.Module):
    """A patch embedding, forty residual MLP blocks on its tokens, then one attention block."""

    class Attention(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)

        def forward(self, t):
            q, k, v = self.qkv(t).chunk(3, -1)
            return torch.softmax(q @ k.transpose(1, 2) / 8, -1) @ v

    def __init__(self, depth: int = 40, dim: int = 64):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.mlps = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                                nn.Linear(4 * dim, dim)) for _ in range(depth))
        self.attention = self.Attention(dim)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, 64)
        for mlp in self.mlps:
            t = t + mlp(t)
        return self.attention(t)


def test_tokens_keep_their_places_through_a_deep_stack_of_feature_mixing_layers():
    """Forty residual MLP blocks between the patch embedding and an attention block (a deep MetaFormer's last stage
    sits after 33): the masses through the MLPs' |W| grew by about 32x a block and overflowed float32, so every
    token lost its place ("its keys carry no position"); they are kept at their scale, and each token still sits
    inside its own patch."""
    from vggattn.attention.trace import token_places

    torch.manual_seed(0)
    places = token_places(DeepTokens().eval(), torch.randn(1, 3, 32, 32), ["attention"])["attention"]
    assert bool(places.positions.valid.all())
    cy, cx = torch.arange(4)[:, None] * 8 + 3.5, torch.arange(4)[None] * 8 + 3.5
    assert float((places.positions.y.reshape(4, 4) - cy).abs().max()) < 4
    assert float((places.positions.x.reshape(4, 4) - cx).abs().max()) < 4


def test_running_out_of_memory_while_placing_tokens_is_said_in_words():
    """The reason a block is skipped reads as words, not as PyTorch's allocator message."""
    from vggattn.attention.adapters import in_words

    err = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 3221225472 bytes. Error code 12 (Cannot allocate memory)")
    assert in_words(err) == "there was not enough memory for the passes that place them (about three forwards at once)"
    assert in_words(MemoryError()) == in_words(err)
    assert in_words(RuntimeError("no forward AD formula for foo\nmore")) == "no forward AD formula for foo"
