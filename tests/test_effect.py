"""What each key brings (vggattn.attention.effect): the value-weighted row and the effect map of a query, from the
keys' contributions read once, against the block's own forward with its weights changed, for every family: the
effect of key j is how far the block's output moves when j is removed from the query's row (every head) and the
rest renormalised; the value-weighted weight of j is the size of what the block outputs when the query's row holds
only j's weight, summed over heads."""

import pytest
import torch

from vggattn.attention import adapters
from vggattn.attention.adapters import output_tensor
from vggattn.attention.effect import NotOffered, contributions, effect, full_rows, value_weighted
from vggattn.attention.trace import record
from vggattn.models.families import BigGANAttention, NonLocalBlock2D, SelfAttn
from vggattn.models.vgg import GlobalAttention
from byo_models import randomised

timm = pytest.importorskip("timm", reason="timm is the optional extra vggattn[timm] (requirements.txt pins it)")


def x_for(channels: int, h: int = 6, w: int = 5) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, channels, h, w)


def check_adapter(block, x, query: int, keys=(0, 3, 7)):
    """An adapter's block: its own forward (`Adapter.forward` with rows replaced) against the closed forms."""
    adapter = adapters.adapter_for(block)
    maps = adapter.maps(block, x)
    u = contributions(adapter, block, x, maps)
    rows = maps.rows(dtype=torch.float64)  # (1, heads, N, M)
    a = full_rows(maps, query)
    got_effect, got_value = effect(a, u, maps.normalise), value_weighted(a, u)
    out = lambda r: output_tensor(adapter.forward(block, x, rows=r.float())).double()  # noqa: E731
    base = out(rows)
    m = rows.shape[-1]
    for j in keys:
        masked = rows.clone()
        masked[0, :, query, j] = 0
        if maps.normalise == "softmax":
            masked[0, :, query] /= masked[0, :, query].sum(-1, keepdim=True)
        else:  # the dot-product form: a mean over the keys, one fewer
            masked[0, :, query] *= m / (m - 1)
        moved = (out(masked) - base).norm()
        assert float(got_effect[j]) == pytest.approx(float(moved), rel=1e-4, abs=1e-6)
        zero = rows.clone()
        zero[0, :, query] = 0
        size = 0.0
        for h in range(rows.shape[1]):
            alone = zero.clone()
            alone[0, h, query, j] = rows[0, h, query, j]
            size += float((out(alone) - out(zero)).norm())
        assert float(got_value[j]) == pytest.approx(size, rel=1e-4, abs=1e-6)
    return u


def test_the_articles_global_attention_and_sagan():
    u = check_adapter(randomised(GlobalAttention(16)), x_for(16), query=4)
    assert u.shape == (1, 30, 16)
    check_adapter(randomised(SelfAttn(16)), x_for(16), query=11)


def test_biggan_with_its_pooled_keys_and_output_conv():
    check_adapter(randomised(BigGANAttention(16)), x_for(16, 8, 6), query=5, keys=(0, 5, 11))


@pytest.mark.parametrize("mode", ["embedded", "dot"])
def test_the_non_local_block_with_its_batchnorm(mode):
    block = randomised(NonLocalBlock2D(16, mode=mode, sub_sample=False)).eval()
    check_adapter(block, x_for(16), query=7)


def test_timm_bottleneck_attention_heads_and_relative_positions():
    from timm.layers.bottleneck_attn import BottleneckAttn

    block = randomised(BottleneckAttn(16, feat_size=(6, 6), num_heads=2, scale_pos_embed=True)).eval()
    check_adapter(block, x_for(16, 6, 6), query=9)


def test_timm_non_local_attn():
    from timm.layers import NonLocalAttn

    check_adapter(randomised(NonLocalAttn(16)).eval(), x_for(16), query=3)


def test_a_per_image_map_is_not_offered():
    from timm.layers import GlobalContext

    block = randomised(GlobalContext(16, fuse_add=True)).eval()
    adapter = adapters.adapter_for(block)
    x = x_for(16)
    with pytest.raises(NotOffered, match="one map per image"):
        contributions(adapter, block, x, adapter.maps(block, x))


def vit(library: str):
    torch.manual_seed(0)
    if library == "timm":
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=2, embed_dim=32,
                                 num_classes=3, pretrained=False).eval()
    T = pytest.importorskip("transformers")
    from vggattn.models.output import ImageOutput

    c = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
    return ImageOutput(T.ViTForImageClassification(c).eval())


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_a_vision_transformers_attention_read_by_what_it_computes(library):
    """A ViT block (class token, 2 heads) of timm and of transformers (its attention module holds the output
    projection): the traced attention's own forward with the query's event row changed, the class token's key
    included."""
    from vggattn.analysis import analyze

    model = vit(library)
    from PIL import Image
    import numpy as np

    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    meta = {"input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "class_names": ["a", "b", "c"]}
    result = analyze(model, meta, image)
    block = result.blocks[1]
    u, why = block.keys_contributions()
    assert why == "" and u.shape == (2, 16 + 1, 32)  # 4x4 patches, then the class token
    module, x, call = block.source
    lay = block.adapter.layout(module, x, call)
    query = 5  # a patch
    a = full_rows(block.maps, query)
    got_effect, got_value = effect(a, u), value_weighted(a, u)
    held = block.adapter.call(x, call, 0)
    base = output_tensor(record(module, x, call=held)[1]).double()
    row = [int(lay.iq[h, query]) for h in range(2)]  # the query's row in each head's lead

    def changed(fn):
        return output_tensor(record(module, x, replace={lay.group[0]: fn}, call=held)[1]).double()
    for slot in (0, 9, 16):  # two patches' keys and the class token's
        key = int((lay.kcell[lay.lq[0, 0]] == slot).nonzero()) if slot < 16 else int(
            (lay.kprefix[lay.lq[0, 0]] == 0).nonzero())

        def drop(w):
            new = w.reshape(-1, *w.shape[-2:]).clone()
            for h in range(2):
                r = new[int(lay.lq[h, 0]), row[h]]
                r[key] = 0
                r /= r.sum()
            return new.reshape(w.shape)
        assert float(got_effect[slot]) == pytest.approx(float((changed(drop) - base).norm()), rel=1e-4, abs=1e-6)

        def only(h):
            def fn(w):
                new = torch.zeros_like(w).reshape(-1, *w.shape[-2:])
                new[int(lay.lq[h, 0]), row[h], key] = w.reshape(-1, *w.shape[-2:])[int(lay.lq[h, 0]), row[h], key]
                return new.reshape(w.shape)
            return fn

        def none(w):
            return torch.zeros_like(w)
        size = sum(float((changed(only(h)) - changed(none)).norm()) for h in range(2))
        assert float(got_value[slot]) == pytest.approx(size, rel=1e-4, abs=1e-6)


def test_the_live_page_shows_the_same_value_weighted_rows_and_effects(browser, tmp_path):
    """The page's own script (the live file, as the app's page runs it) against the closed forms here: the shipped
    checkpoint's three blocks, and a DINOv2 with registers (random weights; its prefix keys too), every head and one
    head; switching the view redraws the panels."""
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from test_live import opened

    import vggattn
    from vggattn.analysis import analyze
    from vggattn.models.byo import describe
    from vggattn.view import live
    from vggattn.view.hover import pages

    here = Path(__file__).resolve().parents[1]
    model, meta = vggattn.load_checkpoint(device="cpu")
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=2,
                            num_classes=5).eval()
    cases = [(model, meta), (vit, describe("timm:vit_small_patch14_reg4_dinov2", 56, [f"c{i}" for i in range(5)]))]
    for n, (net, m) in enumerate(cases):
        result = analyze(net, m, Image.open(here / "assets" / "church.jpg"))
        layers = pages(result)
        assert all(layer.u is not None for layer in layers)
        path = tmp_path / f"view{n}.html"
        path.write_text(live.live_html(result, layers, title="church"))
        page, errors, _ = opened(browser, path)
        assert page.locator("label.vggattn-measure-label").is_visible()
        for li, block in enumerate(result.blocks):
            u, _ = block.keys_contributions()
            q = block.maps.grid[0] * block.maps.grid[1] // 3
            for head in ["mean"] + ([1] if block.maps.heads > 1 else []):
                a = full_rows(block.maps, q)
                uu = u
                if head != "mean":
                    a, uu = a[head:head + 1], u[head:head + 1]
                for how, want in (("value", value_weighted(a, uu)), ("effect", effect(a, uu, block.maps.normalise))):
                    got = page.evaluate("([l, q, how, h]) => window.vggattnHover.measured(l, q, how, h)",
                                        [li, q, how, head])
                    np.testing.assert_allclose(got, want.numpy(), rtol=2e-4, atol=1e-6 * float(want.max()))
        before = page.evaluate("document.querySelector('canvas.vggattn-hover').toDataURL()")
        page.locator("select.vggattn-measure").select_option("effect")
        page.wait_for_function("document.querySelector('.vggattn-hover-line').textContent.includes('moves')")
        assert page.evaluate("document.querySelector('canvas.vggattn-hover').toDataURL()") != before
        assert not errors
        page.close()


def test_the_apps_page_fetches_what_each_key_brings_when_asked(browser, tmp_path):
    """In the app, an upload sends no contributions (they are the bulk: 4.5 MB of 5.8 for the shipped checkpoint);
    switching the view fetches each layer's, and the page's effect then equals the closed form here."""
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from server import uploaded

    import vggattn
    from vggattn.analysis import analyze

    here = Path(__file__).resolve().parents[1]
    model, meta = vggattn.load_checkpoint(device="cpu")
    with uploaded(browser, model, meta, here / "assets" / "church.jpg") as page:
        sent = page.evaluate("window.vggattnHover.state().sent")
        assert sent < 2_000_000  # the weights' payload only
        assert page.evaluate("window.vggattnHover.measured(0, 5, 'effect')") is None  # not fetched yet
        page.locator("select.vggattn-measure").select_option("effect")
        page.wait_for_function("window.vggattnHover.measured(2, 5, 'effect') !== null", timeout=30_000)
        result = analyze(model, meta, Image.open(here / "assets" / "church.jpg"))
        for li, block in enumerate(result.blocks):
            page.wait_for_function(f"window.vggattnHover.measured({li}, 5, 'effect') !== null", timeout=30_000)
            u, _ = block.keys_contributions()
            want = effect(full_rows(block.maps, 5), u).numpy()
            got = page.evaluate(f"window.vggattnHover.measured({li}, 5, 'effect')")
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * float(want.max()))


@pytest.mark.parametrize("heads", [1, 2])
def test_every_querys_effect_at_once_equals_one_query_at_a_time(heads):
    from timm.layers.bottleneck_attn import BottleneckAttn

    from vggattn.attention.effect import effect_all

    block = randomised(GlobalAttention(16) if heads == 1 else
                       BottleneckAttn(16, feat_size=(6, 6), num_heads=2)).eval()
    x = x_for(16, 6, 6)
    adapter = adapters.adapter_for(block)
    maps = adapter.maps(block, x)
    u = contributions(adapter, block, x, maps)
    rows = maps.rows(dtype=torch.float64)[0]
    peaked = rows.clone()
    peaked[:, 3] = 0
    peaked[:, 3, 7] = 1 - 1e-13  # a key holding nearly the whole row: no cancellation
    peaked[:, 3, 8] = 1e-13
    for r in (rows, peaked):
        got = effect_all(r, u)
        want = torch.stack([effect(r[:, q], u) for q in range(r.shape[1])])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
