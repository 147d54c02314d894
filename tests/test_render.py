import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_meta, tiny_model
from vggattn.analysis import analyze, render_attention
from vggattn.render import colorize, mark_query, overlay, upsample_map


def test_blocky_upsampling_repeats_each_cell():
    grid = np.array([[0.0, 1.0], [0.5, 0.25]], np.float32)
    out = upsample_map(grid, (4, 6), mode="blocky")  # (W, H) = (4, 6)
    assert out.shape == (6, 4)
    assert np.allclose(out[:3, :2], 0) and np.allclose(out[:3, 2:], 1) and np.allclose(out[3:, :2], 0.5)


def test_smooth_upsampling_is_normalised_and_between_cells():
    out = upsample_map(np.array([[0.0, 2.0]]), (8, 1), mode="smooth")
    assert out.min() == 0 and out.max() == 1 and 0 < out[0, 4] < 1
    assert np.all(upsample_map(np.full((3, 3), 0.7), (9, 9)) == 0)  # a flat map has no contrast
    with pytest.raises(ValueError, match="upsampling"):
        upsample_map(np.zeros((2, 2)), (4, 4), mode="cubic")


def test_overlay_extremes_and_checks():
    img = np.full((5, 6, 3), 100, np.uint8)
    heat = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    assert np.array_equal(overlay(img, heat, opacity=0.0), img)
    assert np.array_equal(overlay(img, heat, "viridis", opacity=1.0), colorize(heat, "viridis"))
    assert overlay(img, heat).dtype == np.uint8
    with pytest.raises(ValueError, match="uint8"):
        overlay(img.astype(np.float32), heat)
    with pytest.raises(ValueError, match="differ"):
        overlay(img, heat[:4])
    with pytest.raises(ValueError, match="opacity"):
        overlay(img, heat, opacity=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        colorize(heat * 2)
    with pytest.raises(ValueError, match="colormap"):
        colorize(heat, "rainbow-unicorn")


def test_mark_query_draws_on_a_copy():
    img = np.zeros((40, 40, 3), np.uint8)
    out = mark_query(img, (20, 20), (10, 10, 30, 30))
    assert img.max() == 0 and out[20, 20].tolist() == [255, 255, 255] and out[10, 25].tolist() == [255, 255, 255]


def test_render_attention_panels_follow_the_click():
    model, meta = tiny_model(), tiny_meta(input_size=64)
    image = Image.fromarray((np.random.default_rng(0).random((90, 160, 3)) * 255).astype(np.uint8))
    result = analyze(model, meta, image)
    assert result.size == (160, 90) and result.display.shape == (90, 160, 3)
    panels = render_attention(result, (159, 89))
    assert [p.query_index for p in panels] == [16 * 16 - 1, 8 * 8 - 1, 4 * 4 - 1]
    for p, layer in zip(panels, result.layers):
        assert p.image.shape == (90, 160, 3)
        np.testing.assert_allclose(p.attention_row.sum(), 1.0, rtol=1e-5)
        np.testing.assert_allclose(p.attention_row.ravel(), layer.row(p.query_index)[0].numpy())
    with pytest.raises(ValueError, match="outside"):
        render_attention(result, (160, 0))


def test_large_image_is_drawn_on_a_small_copy():
    model, meta = tiny_model(), tiny_meta(input_size=64)
    result = analyze(model, meta, Image.new("RGB", (3000, 1000), (10, 20, 30)))
    assert result.size == (3000, 1000) and result.display.shape == (171, 512, 3)
    assert render_attention(result, (2999, 999))[0].image.shape == (171, 512, 3)
    assert torch.isfinite(result.probs).all()


def test_scale_map_linear_is_the_map_and_log_spans_four_decades():
    from vggattn.render import LOG_DECADES, scale_map

    row = np.array([[0.9, 0.09], [1e-3, 1e-9]])
    np.testing.assert_allclose(scale_map(row, "linear"), row.astype(np.float32))
    logged = scale_map(row, "log")
    np.testing.assert_allclose(logged, np.log10([[0.9, 0.09], [1e-3, 0.9e-4]]), rtol=1e-6)  # floored
    assert logged.max() - logged.min() == pytest.approx(LOG_DECADES, rel=1e-6)
    assert not scale_map(np.zeros((2, 2)), "log").any()  # nothing to scale
    with pytest.raises(ValueError, match="scale"):
        scale_map(row, "sqrt")
