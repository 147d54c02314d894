"""Adapters (vggattn.attention.adapters) of every non-local block family, against direct computations on random weights:
the rows to 1e-5, and the block's output as its own forward gives it, with and without interventions."""

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vggattn.attention import adapters
from vggattn.models.families import BigGANAttention, NonLocalBlock2D, SelfAttn
from vggattn.models.vgg import GlobalAttention
from byo_models import randomised

timm = pytest.importorskip("timm", reason="timm is the optional extra vggattn[timm] (requirements.txt pins it)")


def x_for(channels: int, h: int = 8, w: int = 6) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, channels, h, w)  # not square: a transposed grid would show


def tokens(t):  # (B, C, h, w) -> (B, h*w, C)
    return t.flatten(2).transpose(1, 2)


def interventions_by_hand(rows, values, finish, x):
    """The block's output for each mode, from its rows (B, N, M) and values (B, M, Cv)."""
    mean = rows.mean(1, keepdim=True).expand_as(rows)
    uniform = torch.full_like(rows, 1 / rows.shape[-1])
    return {None: finish(rows @ values), "mean": finish(mean @ values), "uniform": finish(uniform @ values), "off": x}


def check(block, x, rows, outputs, *, key_grid=None, atol=1e-5):
    adapter = adapters.adapter_for(block)
    assert adapter is not None, type(block)
    with torch.no_grad():
        maps = adapter.maps(block, x)
        torch.testing.assert_close(maps.rows()[:, 0] if maps.heads == 1 else maps.rows(), rows, atol=atol, rtol=0)
        assert maps.grid == tuple(x.shape[-2:]) and maps.key_grid == (key_grid or tuple(x.shape[-2:]))
        for mode, expected in outputs.items():
            got = adapter.forward(block, x, mode)
            for a, b in zip(got if isinstance(got, tuple) else [got], expected if isinstance(expected, tuple) else [expected]):
                torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=f"mode {mode}")
    return maps


def test_the_articles_global_attention():
    block, x = randomised(GlobalAttention(32)), x_for(32)
    q, k, v = (tokens(c(x)) for c in (block.conv_query, block.conv_key, block.conv_value))
    rows = torch.softmax(q @ k.transpose(1, 2), dim=-1)
    outputs = interventions_by_hand(rows, v, lambda a: x + block.gamma * a.transpose(1, 2).reshape(x.shape), x)
    with torch.no_grad():
        assert torch.allclose(outputs[None], block(x), atol=1e-5)  # the block's own forward
    check(block, x, rows, outputs)


def test_sagan_self_attn_returns_its_attention_too():
    block, x = randomised(SelfAttn(32)), x_for(32)
    with torch.no_grad():
        out, attention = block(x)  # the reference returns the map: the rows are that
    v = tokens(block.value_conv(x))
    outputs = interventions_by_hand(attention, v, lambda a: block.gamma * a.transpose(1, 2).reshape(x.shape) + x, x)
    outputs = {m: (o, attention) for m, o in outputs.items() if m in (None, "off")}
    check(block, x, attention, outputs)
    assert set(block.state_dict()) == {"query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
                                       "value_conv.weight", "value_conv.bias", "gamma"}


def test_biggan_attention_pools_keys_to_a_half_grid():
    block, x = randomised(BigGANAttention(32)), x_for(32)
    w = {n: getattr(block, n).normalised_weight() for n in ("theta", "phi", "g", "o")}  # W / sigma, as BigGAN
    theta = tokens(F.conv2d(x, w["theta"]))
    phi = tokens(F.max_pool2d(F.conv2d(x, w["phi"]), 2))
    g = tokens(F.max_pool2d(F.conv2d(x, w["g"]), 2))
    rows = torch.softmax(theta @ phi.transpose(1, 2), dim=-1)  # (B, 48, 12)
    finish = lambda a: block.gamma * F.conv2d(a.transpose(1, 2).reshape(2, 16, 8, 6), w["o"]) + x  # noqa: E731
    outputs = interventions_by_hand(rows, g, finish, x)
    with torch.no_grad():
        assert torch.allclose(outputs[None], block(x), atol=1e-5)
    maps = check(block, x, rows, outputs, key_grid=(4, 3))
    assert maps.rows().shape == (2, 1, 48, 12)
    names = set(block.state_dict())
    assert {"theta.weight", "theta.u0", "theta.sv0", "o.weight", "gamma"} <= names  # BigGAN-PyTorch's names


@pytest.mark.parametrize("mode", ["embedded", "dot"])
@pytest.mark.parametrize("sub_sample", [True, False])
def test_non_local_block(mode, sub_sample):
    block, x = randomised(NonLocalBlock2D(32, mode=mode, sub_sample=sub_sample)), x_for(32)
    pool = (lambda t: F.max_pool2d(t, 2)) if sub_sample else (lambda t: t)
    conv = lambda c, t: F.conv2d(t, c.weight, c.bias)  # noqa: E731
    theta = tokens(conv(block.theta, x))
    phi = tokens(pool(conv(block.phi[0] if sub_sample else block.phi, x)))
    g = tokens(pool(conv(block.g[0] if sub_sample else block.g, x)))
    f = theta @ phi.transpose(1, 2)
    rows = torch.softmax(f, dim=-1) if mode == "embedded" else f / f.shape[-1]
    finish = lambda a: block.W(a.transpose(1, 2).reshape(2, 16, 8, 6)) + x  # noqa: E731
    outputs = interventions_by_hand(rows, g, finish, x)
    with torch.no_grad():
        assert torch.allclose(outputs[None], block(x), atol=1e-5)
    maps = check(block, x, rows, outputs, key_grid=(4, 3) if sub_sample else None)
    assert ("not a softmax" in maps.meaning) == (mode == "dot")
    prefix = "g.0." if sub_sample else "g."
    assert {prefix + "weight", "theta.weight", "W.0.weight", "W.1.running_mean"} <= set(block.state_dict())


def test_timm_non_local_attn():
    from timm.layers import NonLocalAttn

    block, x = randomised(NonLocalAttn(32)), x_for(32)
    t, p, g = (tokens(c(x)) for c in (block.t, block.p, block.g))
    rows = torch.softmax(t @ p.transpose(1, 2) * 32 ** -0.5, dim=-1)  # timm scales by in_channels ** -0.5
    finish = lambda a: block.norm(block.z(a.transpose(1, 2).reshape(2, -1, 8, 6))) + x  # noqa: E731
    outputs = interventions_by_hand(rows, g, finish, x)
    with torch.no_grad():
        assert torch.allclose(outputs[None], block(x), atol=1e-5)
    check(block, x, rows, outputs)


@pytest.mark.parametrize("scale_pos_embed", [False, True])
def test_timm_bottleneck_attn_heads_and_relative_positions(scale_pos_embed):
    from timm.layers.bottleneck_attn import BottleneckAttn

    block = randomised(BottleneckAttn(32, feat_size=(8, 6), num_heads=4, scale_pos_embed=scale_pos_embed))
    x = x_for(32)
    with torch.no_grad():
        q, k, v = torch.split(block.qkv(x), [block.dim_out_qk, block.dim_out_qk, block.dim_out_v], dim=1)
        q = q.reshape(8, block.dim_head_qk, -1).transpose(-1, -2)  # (B * heads, N, d), as timm lays them out
        k = k.reshape(8, block.dim_head_qk, -1)
        v = v.reshape(8, block.dim_head_v, -1).transpose(-1, -2)
        rel = block.pos_embed(q)
        logits = (q @ k + rel) * block.scale if scale_pos_embed else (q @ k) * block.scale + rel
        rows = logits.softmax(-1).reshape(2, 4, 48, 48)
        expected = block(x)
        assert torch.allclose(expected, (rows.reshape(8, 48, 48) @ v).transpose(-1, -2).reshape(2, -1, 8, 6), atol=1e-5)
        adapter = adapters.adapter_for(block)
        maps = adapter.maps(block, x)
        assert maps.heads == 4 and maps.bias is not None
        torch.testing.assert_close(maps.rows(), rows, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter.forward(block, x), expected, atol=1e-5, rtol=1e-5)
        mean = rows.mean(2, keepdim=True).expand_as(rows)
        by_hand = (mean.reshape(8, 48, 48) @ v).transpose(-1, -2).reshape(2, -1, 8, 6)
        torch.testing.assert_close(adapter.forward(block, x, "mean"), by_hand, atol=1e-5, rtol=1e-5)
        assert not adapter.forward(block, x, "off").any()


def test_gcnet_global_context_is_one_map_per_image():
    from timm.layers import GlobalContext

    block, x = randomised(GlobalContext(32, fuse_add=True, fuse_scale=True)), x_for(32)
    with torch.no_grad():
        attn = torch.softmax(block.conv_attn(x).reshape(2, 48), dim=-1)  # (B, N): where the context comes from
        expected = block(x)
        adapter = adapters.adapter_for(block)
        maps = adapter.maps(block, x)
        assert maps.per_image and maps.rows().shape == (2, 1, 1, 48) and "no query changes it" in maps.meaning
        torch.testing.assert_close(maps.rows()[:, 0, 0], attn, atol=1e-6, rtol=0)
        torch.testing.assert_close(adapter.forward(block, x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter.forward(block, x, "mean"), expected, atol=1e-5, rtol=1e-5)  # already
        pooled = x.mean((2, 3), keepdim=True)  # uniform rows: GCNet's context becomes average pooling
        by_hand = x * block.gate(block.mlp_scale(pooled)) + block.mlp_add(pooled)
        torch.testing.assert_close(adapter.forward(block, x, "uniform"), by_hand, atol=1e-5, rtol=1e-5)
        assert torch.equal(adapter.forward(block, x, "off"), x)


def test_find_blocks_names_them_in_order_and_says_what_it_found_otherwise():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), SelfAttn(32), nn.ReLU(), NonLocalBlock2D(32), nn.Conv2d(32, 8, 1))
    found = adapters.find_blocks(model)
    assert [(n, a.family) for n, _, a in found] == [("1", "SAGAN Self_Attn"), ("3", "Non-local block (Wang et al. 2018)")]
    assert [n for n, *_ in adapters.find_blocks(model, ["3"])] == ["3"]
    with pytest.raises(ValueError, match=r"2 \(ReLU\): not an attention block"):
        adapters.find_blocks(model, ["2"])
    with pytest.raises(ValueError, match="no module named"):
        adapters.find_blocks(model, ["9"])
    with pytest.raises(ValueError, match="it is made of: Conv2d, ReLU"):
        adapters.find_blocks(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="mode must be one of"):
        adapters.adapter_for(model[1]).forward(model[1], torch.zeros(1, 32, 4, 4), "sideways")


def test_timm_models_blocks_are_found():
    """botnet26t_256 (random weights: nothing is fetched) holds BottleneckAttn blocks; the adapter reads each."""
    model = timm.create_model("botnet26t_256", pretrained=False).eval()
    found = adapters.find_blocks(model)
    assert found and all(a.family == "timm BottleneckAttn (BoTNet)" for *_, a in found)
    assert len(found) == sum(type(m).__name__ == "BottleneckAttn" for m in model.modules())


def test_the_query_averaged_arm_is_one_map_per_image():
    """GlobalAttention(query_averaged=True), the A/B's "global" arm: one row per image, built in row blocks."""
    block, x = randomised(GlobalAttention(32, query_averaged=True)), x_for(32)
    q, k = (tokens(c(x)) for c in (block.conv_query, block.conv_key))
    mean_row = torch.softmax(q @ k.transpose(1, 2), dim=-1).mean(1)  # (B, N)
    adapter = adapters.adapter_for(block)
    with torch.no_grad():
        maps = adapter.maps(block, x)
        assert maps.per_image
        torch.testing.assert_close(maps.rows()[:, 0, 0], mean_row, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(adapter.forward(block, x), block(x), atol=1e-5, rtol=1e-5)


def net_of_one_block():
    torch.manual_seed(0)
    block = GlobalAttention(16)
    block.gamma.data.fill_(1.0)
    return nn.Sequential(block).eval(), block, torch.randn(1, 16, 6, 5)


def test_an_intervention_runs_no_own_forward_of_the_block_and_only_in_its_thread(monkeypatch):
    from vggattn.models import vgg as model_code

    net, block, x = net_of_one_block()
    with torch.no_grad():
        plain, mean = block(x), adapters.adapter_for(block).forward(block, x, "mean")
    own, calls = model_code.attend_in_row_blocks, []
    monkeypatch.setattr(model_code, "attend_in_row_blocks",
                        lambda *a, **k: calls.append(threading.get_ident()) or own(*a, **k))
    barrier, seen = threading.Barrier(2), {}

    def other():
        barrier.wait()  # runs while the main thread holds the intervention
        with torch.no_grad():
            seen["other"] = net(x)
        barrier.wait()

    t = threading.Thread(target=other)
    t.start()
    with torch.no_grad(), adapters.Intervention(net, {"0": "mean"}):
        barrier.wait()
        barrier.wait()
        replaced = net(x)
    t.join()
    assert calls == [t.ident]  # the block's own attention ran in the other thread only
    torch.testing.assert_close(seen["other"], plain)
    torch.testing.assert_close(replaced, mean)
    assert "forward" not in vars(block)  # the class's forward again


def test_interventions_of_two_threads_end_in_any_order_and_on_errors():
    net, block, x = net_of_one_block()
    with torch.no_grad():
        plain = net(x)
    entered, first_left, got = threading.Event(), threading.Event(), {}

    def other():
        with torch.no_grad(), adapters.Intervention(net, {"0": "off"}):
            entered.set()
            first_left.wait()
            got["off"] = net(x)  # still replaced here after the main thread's intervention ended

    t = threading.Thread(target=other)
    t.start()
    with pytest.raises(RuntimeError, match="boom"), adapters.Intervention(net, {"0": "uniform"}):
        entered.wait()
        raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(net(x), plain)  # this thread: the block as it is
    first_left.set()
    t.join()
    assert torch.equal(got["off"], x) and "forward" not in vars(block)
