"""The one capture: `vggattn.attention.trace.watch` keeps each block's input and output in one forward, the adapters read
the block's rows from that input; on the article's model (tiny, random weights) against the article's maths."""

import threading

import pytest
import torch

import vggattn
from conftest import tiny_model
from vggattn.attention.adapters import find_blocks
from vggattn.analysis import contribution_map
from vggattn.attention.trace import watch

NAMES = ["features.14", "features.22", "features.30"]


def block_inputs(model, x):
    """Each GlobalAttention block's input, recorded independently of watch."""
    seen, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, vggattn.GlobalAttention):
            handles.append(m.register_forward_hook(lambda mod, a, o, name=name: seen.__setitem__(name, (mod, a[0].clone()))))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def reference_rows(block, x):
    """softmax(q_i . K) for every query i, recomputed from the block's own 1x1 convs -> (B, N, N)."""
    with torch.no_grad():
        q = block.conv_query(x).flatten(2).transpose(1, 2)  # (B, N, C')
        k = block.conv_key(x).flatten(2)  # (B, C', N)
        return torch.softmax(torch.bmm(q, k), dim=-1)


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def captured(model, x):
    """{block: (module, adapter, maps, Seen)} from one watched forward."""
    blocks = find_blocks(model)
    with torch.no_grad():
        out, seen = watch(model, x, [n for n, *_ in blocks])
        return out, {n: (m, a, a.maps(m, seen[n].input), seen[n]) for n, m, a in blocks}


@pytest.mark.parametrize("size,batch", [(64, 1), (32, 3), (100, 2), (72, 1)])
def test_rows_equal_independent_softmax(size, batch):
    model = tiny_model()
    x = torch.randn(batch, 3, size, size)
    inputs = block_inputs(model, x)
    _, got = captured(model, x)
    assert list(got) == NAMES
    for name, (module, _, maps, _) in got.items():
        block, xin = inputs[name]
        H, W = xin.shape[-2:]
        assert maps.grid == maps.key_grid == (H, W)
        assert float(module.gamma.detach()) == pytest.approx(0.5)
        expected = reference_rows(block, xin)  # (B, N, N)
        for q in {0, H * W // 2, H * W - 1}:
            row = maps.rows([q])[:, 0, 0]
            assert row.shape == (batch, H * W)
            torch.testing.assert_close(row, expected[:, q], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(row.sum(-1), torch.ones(batch))
        torch.testing.assert_close(maps.rows()[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_watch_leaves_outputs_unchanged_and_removes_hooks():
    model = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
    out, _ = captured(model, x)
    assert torch.equal(plain, out)
    assert no_hooks_left(model)


def test_hooks_removed_when_the_forward_raises():
    model = tiny_model()
    with pytest.raises(RuntimeError), torch.no_grad():  # a forward that raises (wrong channel count)
        watch(model, torch.randn(1, 4, 64, 64), NAMES)
    assert no_hooks_left(model)
    boom = model.features[22].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():  # raised inside a traced block's Recorder
        watch(model, torch.randn(1, 3, 64, 64), NAMES, traced={"features.22"})
    boom.remove()
    assert no_hooks_left(model)
    assert not torch.overrides._is_torch_function_mode_enabled()  # no Recorder left entered


def test_a_block_that_runs_twice_keeps_its_first_run():
    model = tiny_model()
    block = model.features[30]
    twice = torch.nn.Sequential(model.features[:30], block, block)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first_in = model.features[:30](x)
        _, seen = watch(twice, x, ["1"])
    assert torch.equal(seen["1"].input, first_in)
    torch.testing.assert_close(seen["1"].output, block(first_in))


def test_two_threads_watch_one_model_without_cross_talk():
    model = tiny_model()
    inputs = {0: torch.randn(1, 3, 64, 64), 1: torch.randn(1, 3, 64, 64) * 3}
    expected = {i: reference_rows(*block_inputs(model, x)["features.14"]) for i, x in inputs.items()}
    barrier = threading.Barrier(2, timeout=30)

    def meet_midway(module, args):  # both threads are mid-forward at once
        barrier.wait()

    meet = model.features[15].register_forward_pre_hook(meet_midway)
    results, errors = {}, []

    def work(i):
        try:
            results[i] = captured(model, inputs[i])[1]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    meet.remove()
    assert not errors
    for i, got in results.items():
        assert list(got) == NAMES
        torch.testing.assert_close(got["features.14"][2].rows()[:, 0], expected[i], rtol=1e-5, atol=1e-6)
    assert no_hooks_left(model)


def test_contribution_is_gamma_times_the_attention_output_over_x():
    model = tiny_model()
    model.features[22].gamma.data.zero_()
    x = torch.randn(1, 3, 64, 64)
    _, got = captured(model, x)
    assert contribution_map(got["features.22"][3].input, got["features.22"][3].output).max() == 0
    block, xin = block_inputs(model, x)["features.14"]
    with torch.no_grad():  # the article's maths by hand: gamma * V A^T over ||x|| per position
        v = block.conv_value(xin).flatten(2)  # (1, C, N)
        out = block.gamma * torch.bmm(v, reference_rows(block, xin).transpose(1, 2))
        by_hand = (out.norm(dim=1) / xin.flatten(2).norm(dim=1)).reshape(xin.shape[-2:])
    seen = got["features.14"][3]
    torch.testing.assert_close(torch.from_numpy(contribution_map(seen.input, seen.output)), by_hand, rtol=1e-4, atol=1e-6)


def test_query_and_key_are_the_forwards_own_bitwise():
    """The adapter computes Q and K from the block's input kept by watch; they equal, bit for bit, the outputs
    conv_query and conv_key gave inside the forward (recorded here by separate hooks)."""
    model = tiny_model().to(memory_format=torch.channels_last)
    seen, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, vggattn.GlobalAttention):
            for what in ("query", "key"):
                conv = getattr(m, f"conv_{what}")
                handles.append(conv.register_forward_hook(
                    lambda mod, a, o, key=(name, what): seen.__setitem__(key, o.flatten(2).transpose(1, 2).clone())))
    x = torch.randn(2, 3, 64, 48).contiguous(memory_format=torch.channels_last)
    _, got = captured(model, x)
    for h in handles:
        h.remove()
    for name, (_, _, maps, _) in got.items():
        assert torch.equal(maps.query[:, 0], seen[name, "query"])
        assert torch.equal(maps.key[:, 0], seen[name, "key"])


def test_the_public_capture_gives_every_blocks_rows_and_gamma_on_a_batch_and_leaves_no_hook():
    """`vggattn.capture(model, x)`: the model's output and, per block in module order, rows on demand equal to the
    article's softmax on each image, the grids and γ; nothing stays hooked."""
    model = tiny_model()
    x = torch.randn(3, 3, 48, 48)
    inputs = block_inputs(model, x)
    out, maps = vggattn.capture(model, x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
    assert list(maps) == NAMES and no_hooks_left(model)
    for name, m in maps.items():
        block, xin = inputs[name]
        assert m.grid == m.key_grid == tuple(xin.shape[-2:]) and m.gamma == pytest.approx(0.5)
        assert m.prefix is None and m.prefix_names is None
        torch.testing.assert_close(m.rows()[:, 0], reference_rows(block, xin), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.rows([5])[:, 0, 0], reference_rows(block, xin)[:, 5], rtol=1e-5, atol=1e-6)


def test_the_public_capture_on_a_vit_batch_equals_each_images_own_attention():
    """A timm ViT with registers (fused attention) on a batch of 3: each image's rows and prefix weights are the
    model's own unfused attention of that image, the prefix tokens by name; a transformers model in hand gives its
    logits."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, reg_tokens=2, num_classes=3,
                              depth=2).eval()
    x = torch.randn(3, 3, 32, 32)
    _, maps = vggattn.capture(model, x)
    assert no_hooks_left(model)
    from test_vit import own_attention

    want = own_attention(model, x)  # the model's own unfused attention, per image of the batch
    assert list(maps) == ["blocks.0.attn", "blocks.1.attn"]
    for name, m in maps.items():
        a = want[name]  # (3, heads, 3 + 4, 3 + 4)
        assert m.prefix_names == ["cls_token", "reg_token[0]", "reg_token[1]"] and m.gamma is None
        torch.testing.assert_close(m.rows(), a[:, :, 3:, 3:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.prefix, a[:, :, 3:, :3], rtol=1e-5, atol=1e-6)
    transformers = pytest.importorskip("transformers")
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
        num_labels=3)).eval()
    out, maps = vggattn.capture(vit, x)
    with torch.no_grad():
        torch.testing.assert_close(out, vit(pixel_values=x).logits)
    assert maps[next(iter(maps))].rows().shape == (3, 2, 16, 16)
