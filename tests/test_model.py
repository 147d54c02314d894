import pytest
import torch

import article_reference as article
import vggattn
from conftest import tiny_model
from vggattn.attention.adapters import adapter_for
from vggattn.models.vgg import attend_in_row_blocks, fold_batchnorm, unfold_batchnorm


@pytest.fixture(scope="module")
def pair():
    """The article's full model and ours with the same (random, gamma != 0) weights."""
    torch.manual_seed(0)
    ref = article.vgg16_with_attention(num_classes=10).eval()
    for m in ref.modules():
        if isinstance(m, article.GlobalAttention):
            m.gamma.data.normal_()
    ours = vggattn.vgg16_with_attention(num_classes=10).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_state_dict_layout_equals_article(pair):
    ref, ours = pair
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert vggattn.attention_layer_names(ours) == ["features.14", "features.22", "features.30"]
    for name in ("features.14", "features.22", "features.30"):
        assert {f"{name}.{p}" for p in ("gamma", "conv_query.weight", "conv_key.bias", "conv_value.weight")} <= set(b)
    assert {"classifier.0.weight", "classifier.3.weight", "classifier.6.weight"} <= set(b)


@pytest.mark.parametrize("size", [32, 64])
def test_same_weights_same_logits(pair, size):
    ref, ours = pair
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels,hw,batch", [(256, (56, 56), 1), (64, (20, 13), 3), (512, (7, 7), 2)])
def test_fast_attention_matches_article_math(channels, hw, batch):
    torch.manual_seed(1)
    ref = article.GlobalAttention(channels)
    ref.gamma.data.fill_(0.7)
    ours = vggattn.GlobalAttention(channels)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(batch, channels, *hw)
    with torch.no_grad():
        expected = ref(x)
    for grad in (False, True):  # CPU inference runs row blocks; with autograd on, SDPA's fused kernel
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours(x.contiguous(memory_format=torch.channels_last)), expected,
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_elements", [1, 7 * 50, 50 * 50, 1 << 21])  # 1 row, 7 rows (50 = 7*7+1), all
def test_row_blocks_equal_the_full_map(block_elements):
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 50, 4), torch.randn(2, 50, 4), torch.randn(2, 50, 16)
    expected = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    torch.testing.assert_close(attend_in_row_blocks(q, k, v, block_elements), expected, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_forward():
    block = vggattn.GlobalAttention(64)
    block.gamma.data.fill_(1.0)
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        expected = block.forward_reference(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = block(x)
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_gamma_starts_at_zero_and_block_is_identity():
    block = vggattn.GlobalAttention(64)
    assert block.gamma.item() == 0.0
    x = torch.randn(1, 64, 5, 5)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("kw", [{}, {"attention": False}, {"batch_norm": True}])
def test_tiny_variants_forward_backward(kw):
    model = tiny_model(**kw).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    has_attention = bool(vggattn.attention_layer_names(model))
    assert has_attention == kw.get("attention", True)


def test_width_and_hidden_shape_the_model():
    model = vggattn.vgg16_with_attention(7, width=0.25, hidden=64)
    sd = model.state_dict()
    assert sd["features.0.weight"].shape == (16, 3, 3, 3)
    assert sd["features.14.conv_query.weight"].shape == (8, 64, 1, 1)
    assert sd["classifier.0.weight"].shape == (64, 128 * 49)
    assert sd["classifier.6.weight"].shape == (7, 64)
    with pytest.raises(TypeError):
        vggattn.vgg16_with_attention(7, 0.25)  # extras are keyword-only


def test_fold_batchnorm_is_exact_in_eval():
    model = tiny_model(batch_norm=True).train()
    with torch.no_grad():  # give the BatchNorms non-trivial statistics and affine params
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    folded = fold_batchnorm(model).eval()
    assert not folded.config.batch_norm
    assert list(folded.state_dict()) == list(tiny_model().state_dict())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_unfold_batchnorm_inverts_folding():
    """A warm start re-inserts BatchNorm: the same function in eval mode, and on its batch in train mode."""
    torch.manual_seed(0)
    plain = tiny_model(dropout=0.0).eval()
    batch = torch.randn(16, 3, 64, 64) * 2 + 0.5
    bn = unfold_batchnorm(plain, batch)
    assert bn.config.batch_norm and not bn.training
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bn(x), plain(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.train()(batch), plain(batch), rtol=1e-4, atol=1e-4)  # batch statistics
        torch.testing.assert_close(fold_batchnorm(bn.eval()).eval()(x), plain(x), rtol=1e-4, atol=1e-5)
    scales = [m.weight for m in bn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(scales) == 13 and all(not torch.allclose(s, torch.ones_like(s)) for s in scales)  # set from data


def test_from_torchvision_equals_torchvision_with_zero_gamma():
    from torchvision.models import vgg16

    torch.manual_seed(0)
    tv = vgg16(weights=None, num_classes=10).eval()
    ours = vggattn.from_torchvision(tv).eval()
    assert [b.gamma.item() for b in ours.modules() if isinstance(b, vggattn.GlobalAttention)] == [0.0, 0.0, 0.0]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))
    from_sd = vggattn.from_torchvision(tv.state_dict()).eval()
    with torch.no_grad():
        assert torch.equal(from_sd(x), tv(x))


def test_from_torchvision_rejects_other_architectures():
    from torchvision.models import vgg11, vgg16_bn

    with pytest.raises(ValueError, match="13 convs"):
        vggattn.from_torchvision(vgg11(weights=None))
    with pytest.raises(ValueError, match="vgg16_bn"):
        vggattn.from_torchvision(vgg16_bn(weights=None))


def test_article_attention_names_follow_from_the_config():
    from vggattn.models.vgg import ARTICLE_ATTENTION_NAMES

    assert tuple(vggattn.attention_layer_names(tiny_model())) == ARTICLE_ATTENTION_NAMES


def test_global_attention_is_the_query_averaged_block_with_the_articles_state_dict():
    """attention="global": every row replaced by the image's mean row, in training and inference alike."""
    torch.manual_seed(0)
    full = vggattn.vgg16_with_attention(10, width=0.125, hidden=32)
    averaged = vggattn.vgg16_with_attention(10, width=0.125, hidden=32, attention="global")
    assert list(full.state_dict()) == list(averaged.state_dict())
    averaged.load_state_dict(full.state_dict())
    block = averaged.features[14]
    assert block.query_averaged and not full.features[14].query_averaged
    block.gamma.data.fill_(1.0)
    x = 3 * torch.randn(2, block.conv_value.in_channels, 6, 5)
    with torch.no_grad():  # by hand: every position gets the mean row's context, gamma * (mean row @ V) + x
        q, k, v = (c(x).flatten(2).transpose(1, 2).double() for c in (block.conv_query, block.conv_key, block.conv_value))
        mean_row = torch.softmax(q @ k.transpose(1, 2), dim=-1).mean(1, keepdim=True)  # (B, 1, N), the whole map
        by_hand = x + block.gamma * (mean_row @ v).transpose(1, 2).reshape(2, -1, 1, 1).float()
        torch.testing.assert_close(block(x), by_hand, rtol=1e-5, atol=1e-5)
        full.features[14].gamma.fill_(1.0)  # the full block with its rows replaced by the mean row: the same
        replaced = adapter_for(full.features[14]).forward(full.features[14], x, mode="mean")
        torch.testing.assert_close(replaced, by_hand, rtol=1e-5, atol=1e-5)
    y = block(x.requires_grad_())  # and it trains: gradients reach Q, K, V and gamma
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_mean_attention_row_does_not_depend_on_the_row_blocks():
    from vggattn.models.vgg import mean_attention_row

    torch.manual_seed(0)
    q, k = torch.randn(2, 30, 4), torch.randn(2, 30, 4)
    want = torch.softmax(q @ k.transpose(1, 2), dim=-1).mean(1)  # (B, N), the whole map at once
    for block_elements in (1, 7 * 2 * 30, 1 << 21):  # one row, 7 rows (not dividing N), all rows
        torch.testing.assert_close(mean_attention_row(q, k, block_elements), want)
