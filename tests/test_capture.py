import threading

import pytest
import torch

import vggattn
from conftest import tiny_model
from vggattn import AttentionCapture


def block_inputs(model, x):
    """Each GlobalAttention block's input, recorded independently of AttentionCapture."""
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


@pytest.mark.parametrize("size,batch", [(64, 1), (32, 3), (100, 2), (72, 1)])
def test_rows_equal_independent_softmax(size, batch):
    model = tiny_model()
    x = torch.randn(batch, 3, size, size)
    inputs = block_inputs(model, x)
    with AttentionCapture(model) as cap, torch.no_grad():
        model(x)
    assert [layer.name for layer in cap.layers] == ["features.14", "features.22", "features.30"]
    for layer in cap.layers:
        block, xin = inputs[layer.name]
        H, W = xin.shape[-2:]
        assert layer.grid == (H, W)
        assert layer.gamma == pytest.approx(0.5)
        expected = reference_rows(block, xin)  # (B, N, N)
        for q in {0, H * W // 2, H * W - 1}:
            row = layer.row(q)
            assert row.shape == (batch, H * W)
            torch.testing.assert_close(row, expected[:, q], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(row.sum(-1), torch.ones(batch))
        torch.testing.assert_close(layer.attention, expected, rtol=1e-5, atol=1e-6)


def test_capture_leaves_outputs_unchanged_and_removes_hooks():
    model = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        with AttentionCapture(model):
            captured = model(x)
    assert torch.equal(plain, captured)
    assert no_hooks_left(model)


def test_hooks_removed_and_exception_propagates():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionCapture(model):
            assert not no_hooks_left(model)
            raise RuntimeError("boom")
    assert no_hooks_left(model)
    with pytest.raises(RuntimeError):  # a forward that raises (wrong channel count)
        with AttentionCapture(model):
            model(torch.randn(1, 4, 64, 64))
    assert no_hooks_left(model)


def test_each_forward_replaces_the_capture():
    model = tiny_model()
    with AttentionCapture(model) as cap, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        model(torch.randn(1, 3, 96, 96))
    assert [layer.grid for layer in cap.layers] == [(24, 24), (12, 12), (6, 6)]
    assert cap["features.30"].grid == (6, 6)
    with pytest.raises(KeyError):
        cap["features.0"]


def test_module_without_attention_is_an_error():
    with pytest.raises(ValueError, match="no GlobalAttention"):
        with AttentionCapture(tiny_model(attention=False)):
            pass


def test_two_threads_capture_on_one_model_without_cross_talk():
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
            with AttentionCapture(model) as cap, torch.no_grad():
                model(inputs[i])
            results[i] = cap
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    meet.remove()
    assert not errors
    for i, cap in results.items():
        assert len(cap.layers) == 3
        torch.testing.assert_close(cap["features.14"].attention, expected[i], rtol=1e-5, atol=1e-6)
    assert no_hooks_left(model)


def test_capture_storage_is_linear_not_quadratic():
    model = tiny_model()
    with AttentionCapture(model) as cap, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    first = cap.layers[0]
    full_map_bytes = first.num_positions ** 2 * 4
    assert first.grid == (56, 56)
    assert first.nbytes < full_map_bytes / 10


def test_contribution_is_zero_when_gamma_is_zero():
    model = tiny_model()
    model.features[22].gamma.data.zero_()
    with AttentionCapture(model) as cap, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert cap["features.22"].contribution.abs().max() == 0
    assert cap["features.14"].contribution.mean() > 0


def test_row_index_out_of_range():
    model = tiny_model()
    with AttentionCapture(model) as cap, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(IndexError, match="16x16"):
        cap.layers[0].row(16 * 16)


def test_query_and_key_are_the_forwards_own_bitwise():
    """The capture computes Q and K on read from the block's input; they equal, bit for bit, the
    outputs conv_query and conv_key gave inside the forward (recorded here by separate hooks)."""
    model = tiny_model().to(memory_format=torch.channels_last)
    seen, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, vggattn.GlobalAttention):
            for what in ("query", "key"):
                conv = getattr(m, f"conv_{what}")
                handles.append(conv.register_forward_hook(
                    lambda mod, a, o, key=(name, what): seen.__setitem__(key, o.flatten(2).transpose(1, 2).clone())))
    x = torch.randn(2, 3, 64, 48).contiguous(memory_format=torch.channels_last)
    with AttentionCapture(model) as cap, torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    for layer in cap.layers:
        assert torch.equal(layer.query, seen[layer.name, "query"])
        assert torch.equal(layer.key, seen[layer.name, "key"])


def test_reading_after_an_in_place_weight_update_raises():
    model = tiny_model()
    with AttentionCapture(model) as cap, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    first, second = cap.layers[0], cap.layers[1]
    _ = first.query  # read before the update: kept as computed
    with torch.no_grad():
        model.features[14].conv_query.weight.add_(1.0)
        model.features[22].conv_key.weight.add_(1.0)
    assert first.row(0).shape == (1, 16 * 16)
    with pytest.raises(RuntimeError, match="read the capture before updating the model"):
        _ = second.key


def test_the_forward_hands_the_capture_log_z_and_the_mean_row():
    """On the CPU inference path the block's own forward fills each layer's log Z and mean row from the weights it
    computes (no second pass); they equal the ones computed from Q and K, and other threads' forwards keep none."""
    import threading

    from vggattn.capture import log_normalisers

    model = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), vggattn.AttentionCapture(model) as cap:
        model(x)
        for layer in cap.layers:
            assert layer._log_z is not None and layer._mean_row is not None  # from the forward itself
            log_z, mean_row = log_normalisers(layer.query, layer.key, mean_row=True)
            torch.testing.assert_close(layer.log_normalisers, log_z, rtol=0, atol=2e-5)
            torch.testing.assert_close(layer.mean_row, mean_row, rtol=0, atol=1e-7)
        blocks = [m for m in model.modules() if isinstance(m, vggattn.GlobalAttention)]
        other = threading.Thread(target=lambda: model(x))
        other.start()
        other.join()
        assert all(not b.summaries for b in blocks)  # the other thread's forward kept nothing
    assert all(not b.summaries_for and not b.summaries for b in blocks)  # released on exit
