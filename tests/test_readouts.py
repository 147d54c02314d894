"""Readouts, Grad-CAM and ablation on cases whose answer is known by hand."""

import math

import pytest
import torch
import torch.nn as nn

import vggattn
from conftest import tiny_meta, tiny_model
from vggattn.attention.adapters import BlockMaps, Intervention, adapter_for
from vggattn.analysis import BlockResult, ablate, analyze, contribution_map, with_gradcam
from vggattn.gradcam import grad_cam
from vggattn.attention.readouts import entropy, js_divergence, mean_distance, row_readouts, top_cells


def capture(query, key, grid):
    """A block's result whose rows are softmax(Q K^T) of the given (N, d) Q and K."""
    n = grid[0] * grid[1]
    maps = BlockMaps("test", query.reshape(1, 1, n, -1), key.reshape(1, 1, n, -1), grid, grid)
    return BlockResult("features.14", adapter_for(vggattn.GlobalAttention(8)), maps, (grid[1], grid[0]))


def query_dependence(layer, chunk=None):
    """(mean row (N,), JSD) as torch tensors; chunk: rows at a time (None: the default)."""
    import vggattn.analysis as analysis

    saved = analysis.DEPENDENCE_ELEMENTS
    if chunk:
        analysis.DEPENDENCE_ELEMENTS = chunk * layer.maps.grid[0] * layer.maps.grid[1]
    try:
        mean_map, jsd = layer.query_dependence()
    finally:
        analysis.DEPENDENCE_ELEMENTS = saved
    return torch.from_numpy(mean_map.reshape(-1)), torch.tensor(jsd)


def full_map(layer):
    return layer.maps.rows()[0, 0]


def one_hot_capture(grid, target):
    """Q, K on a circle with a huge radius: query i attends (to float precision) only to target[i]."""
    n = grid[0] * grid[1]
    angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    points = torch.stack([angle.cos(), angle.sin()], 1) * 60  # logit gap >= 3600 * (1 - cos(2 pi / n))
    return capture(points[torch.as_tensor(target)].float(), points.float(), grid)


def test_entropy_uniform_and_one_hot():
    n = 16
    assert float(entropy(torch.full((n,), 1 / n))) == pytest.approx(math.log(n))
    assert float(entropy(torch.eye(n)[3])) == 0.0
    r = row_readouts(torch.full((n,), 1 / n), 0, (4, 4), 128, (128, 128))
    assert r["entropy_fraction"] == pytest.approx(1.0)


def test_mean_distance_by_hand():
    # 2x2 grid over a 2x2 image: centres (0.5, 0.5), (1.5, 0.5), (0.5, 1.5), (1.5, 1.5)
    assert mean_distance(torch.full((4,), 0.25), 0, (2, 2), (2, 2)) == pytest.approx((0 + 1 + 1 + math.sqrt(2)) / 4)
    # one-hot from the top-left to the bottom-right cell of a 4x4 grid at 128 px: 3 cells of 32 px each way
    assert mean_distance(torch.eye(16)[15], 0, (4, 4), (128, 128)) == pytest.approx(96 * math.sqrt(2))
    # a non-square image: cells are 40 px wide and 10 px high
    assert mean_distance(torch.eye(16)[3], 0, (4, 4), (160, 40)) == pytest.approx(120)
    assert mean_distance(torch.eye(16)[5], 5, (4, 4), (128, 128)) == 0.0


def test_top_cells_order_and_positions():
    row = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15, 0.0])
    assert [i for i, _ in top_cells(row, 3)] == [1, 3, 4]
    r = row_readouts(row, 0, (2, 3), 64, (64, 64), k=2)
    assert r["top_cells"][1] == {"index": 3, "row": 1, "col": 0, "weight": pytest.approx(0.3)}


def test_query_dependence_uniform_attention_is_zero():
    grid = (4, 5)
    layer = capture(torch.zeros(20, 2), torch.randn(20, 2), grid)  # Q = 0: every row uniform
    mean_row, jsd = query_dependence(layer)
    torch.testing.assert_close(mean_row, torch.full((20,), 1 / 20, dtype=torch.float64))
    assert float(jsd) == pytest.approx(0.0, abs=1e-6)  # float32 rows


def test_query_dependence_one_hot_rows_by_hand():
    grid, n = (3, 4), 12
    layer = one_hot_capture(grid, list(range(n)))  # row i = e_i
    torch.testing.assert_close(full_map(layer), torch.eye(n), atol=1e-6, rtol=0)
    mean_row, jsd = query_dependence(layer, chunk=5)  # chunks that do not divide N
    torch.testing.assert_close(mean_row, torch.full((n,), 1 / n, dtype=torch.float64))
    # JSD(e_i || u) with a = (e_i + u) / 2: a_i = (n + 1) / 2n, else 1 / 2n
    kl_e = math.log(2 * n / (n + 1))
    kl_u = (1 / n) * math.log(2 / (n + 1)) + (n - 1) / n * math.log(2)
    assert float(jsd) == pytest.approx(0.5 * kl_e + 0.5 * kl_u, rel=1e-5)
    # all rows on one cell: the rows do not depend on the query
    _, same = query_dependence(one_hot_capture(grid, [7] * n))
    assert float(same) == pytest.approx(0.0, abs=1e-7)


def test_query_dependence_chunking_matches_the_full_map():
    torch.manual_seed(0)
    layer = capture(torch.randn(30, 4), torch.randn(30, 4), (5, 6))
    full = torch.softmax(layer.maps.query[0, 0] @ layer.maps.key[0, 0].T, dim=-1)
    mean_row, jsd = query_dependence(layer, chunk=7)
    torch.testing.assert_close(mean_row.float(), full.mean(0))
    assert float(jsd) == pytest.approx(float(js_divergence(full, full.mean(0)[None]).mean()), rel=1e-5)


def test_one_hot_readouts_mean_distance_and_entropy():
    layer = one_hot_capture((4, 4), [15] * 16)  # every query looks at the bottom-right cell
    r = row_readouts(full_map(layer)[0], 0, (4, 4), 128, (256, 128))
    assert r["entropy_nats"] == pytest.approx(0.0, abs=1e-6)
    assert r["mean_distance_input_px"] == pytest.approx(96 * math.sqrt(2), rel=1e-5)
    assert r["mean_distance_image_px"] == pytest.approx(math.hypot(192, 96), rel=1e-5)
    assert r["top_cells"][0]["index"] == 15


def test_effective_contribution_by_hand():
    """Q = 0 (uniform attention), V = identity, gamma = 1: every position gets mean_j x_j added,
    so the contribution at i is ||mean_j x_j|| / ||x_i||; with gamma = 0 it is 0 everywhere."""
    block = vggattn.GlobalAttention(16)
    with torch.no_grad():
        block.conv_query.weight.zero_()
        block.conv_query.bias.zero_()
        block.conv_value.weight.copy_(torch.eye(16)[:, :, None, None])
        block.conv_value.bias.zero_()
        block.gamma.fill_(1.0)
    x = torch.randn(1, 16, 3, 5)
    with torch.no_grad():
        got = contribution_map(x, block(x))
    expected = x.mean((2, 3), keepdim=True).norm(dim=1) / x.norm(dim=1)  # (1, 3, 5)
    torch.testing.assert_close(torch.from_numpy(got), expected[0])
    with torch.no_grad():
        block.gamma.zero_()
        assert (contribution_map(x, block(x)) == 0).all()


@pytest.fixture(scope="module")
def church():
    from PIL import Image

    from vggattn.app import HERE
    return Image.open(HERE / "assets" / "church.jpg").convert("RGB")


def test_ablation_with_gamma_already_zero_changes_nothing(church):
    model = tiny_model()
    with torch.no_grad():
        model.features[14].gamma.zero_()
    meta = tiny_meta(input_size=64)
    result = analyze(model, meta, church)
    assert torch.equal(ablate(model, result, {"features.14": "off"}), result.probs)
    assert not torch.equal(ablate(model, result, {"features.22": "off"}), result.probs)  # gamma 0.5 does matter


def test_ablating_every_layer_equals_the_network_without_attention(church):
    model = tiny_model()
    meta = tiny_meta(input_size=64)
    result = analyze(model, meta, church)
    plain = vggattn.vgg16_with_attention(10, width=0.125, hidden=32, attention=False).eval()
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    for src, dst in zip(convs, [m for m in plain.features if isinstance(m, nn.Conv2d)]):
        dst.load_state_dict(src.state_dict())
    plain.classifier.load_state_dict(model.classifier.state_dict())
    with torch.no_grad():
        expected = torch.softmax(plain(result.input), -1)[0]
    torch.testing.assert_close(ablate(model, result, dict.fromkeys(["features.14", "features.22", "features.30"], "off")),
                               expected)
    with pytest.raises(KeyError, match="features.99"):
        ablate(model, result, {"features.99": "off"})
    # the hooks are gone afterwards: the model is whole again
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(model(result.input), -1)[0], result.probs)


def test_grad_cam_matches_a_full_backward_reference():
    """Grad-CAM at the last conv's activation after its ReLU: a plain reference (a hook on that ReLU that keeps
    the activation's gradient in a full forward and backward) must agree."""
    model = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    index = max(i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)) + 1
    assert isinstance(model.features[index], nn.ReLU)
    kept = {}

    def hook(module, args, output):
        output.retain_grad()
        kept["a"] = output

    h = model.features[index].register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        h.remove()
    cls = logits.argmax(1)
    logits.gather(1, cls[:, None]).sum().backward()
    a, g = kept["a"].detach(), kept["a"].grad
    reference = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
    model.zero_grad()
    cam = grad_cam(model, x)
    assert cam.shape == (2, 4, 4)  # 64 px / 16
    torch.testing.assert_close(cam, reference, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # no weight gradients formed


def test_the_analysis_grad_cam_is_the_top_class_and_made_once(church):
    model, meta = tiny_model(), tiny_meta(input_size=64)
    result = analyze(model, meta, church)
    assert result.gradcam is None  # not made by the upload
    cam = with_gradcam(model, result)
    torch.testing.assert_close(torch.from_numpy(cam), grad_cam(model, result.input, int(result.probs.argmax()))[0])
    assert with_gradcam(model, result) is cam


def test_attention_off_only_affects_its_thread():
    import threading

    model = tiny_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        normal = model(x)
    barrier, seen = threading.Barrier(2), {}

    def other():
        barrier.wait()  # runs while the main thread holds AttentionOff
        with torch.no_grad():
            seen["other"] = model(x)
        barrier.wait()

    t = threading.Thread(target=other)
    t.start()
    with Intervention(model, {"features.14": "off"}), torch.no_grad():
        barrier.wait()
        barrier.wait()
        off = model(x)
    t.join()
    assert torch.equal(seen["other"], normal) and not torch.equal(off, normal)


def test_any_module_holding_attention_blocks_is_analysed_with_grad_cam(church):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model()

        def forward(self, x):
            return self.inner(x)

    model = Wrapper().eval()
    result = analyze(model, tiny_meta(input_size=64), church)
    assert [b.name for b in result.blocks] == ["inner.features.14", "inner.features.22", "inner.features.30"]
    assert not torch.equal(ablate(model, result, {"inner.features.14": "off"}), result.probs)
    torch.testing.assert_close(torch.from_numpy(with_gradcam(model, result)),
                               grad_cam(model.inner, result.input, int(result.probs.argmax()))[0])
