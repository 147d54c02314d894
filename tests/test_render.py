"""Rendering (vggattn.view.render): levels, upsampling, the weight-as-visibility tint, pixel-rule marks; and
the panels of a click (vggattn.view.hover.PageLayer.picture)."""

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_meta, tiny_model
from vggattn.analysis import analyze
from vggattn.view.hover import page_layer
from vggattn.view.render import (COLORMAPS, FULL_AT, LOG_DECADES, MARK_COLOR, QUERY_COLOR, attention_picture, cell_rect, map_levels,
                            mark_cells, mark_query, marked_indices, overlay, palette, tint_alpha, top_indices, upsample)


def test_levels_linear_keep_zero_at_zero_and_log_spans_four_decades():
    row = np.array([[0.5, 0.25], [5e-3, 0.0]])
    np.testing.assert_allclose(map_levels(row), [[1.0, 0.5], [0.01, 0.0]])
    logged = map_levels(row, "log")
    # 0.5 -> 1; 0.5e-2 is two of four decades down -> 0.5; 0 is floored at 0.5e-4 -> 0
    np.testing.assert_allclose(logged, [[1.0, 1 - np.log10(2) / LOG_DECADES], [0.5, 0.0]], atol=1e-12)
    np.testing.assert_allclose(map_levels(np.full((2, 2), 0.01), floor=0.25), 0.04)  # the column's 1/N floor
    assert not map_levels(np.zeros((2, 2)), "log").any()  # nothing to scale
    with pytest.raises(ValueError, match="scale"):
        map_levels(row, "sqrt")


def test_upsampling_blocky_is_flat_per_cell_and_smooth_is_pils_bilinear():
    grid = np.arange(6, dtype=np.float64).reshape(3, 2) / 5
    blocky = upsample(grid, (4, 6), mode="blocky")  # (W, H) = (4, 6)
    assert blocky.shape == (6, 4) and np.array_equal(blocky, np.kron(grid, np.ones((2, 2))))
    rng = np.random.default_rng(0)
    m = rng.random((7, 5)).astype(np.float32)
    for size in ((37, 61), (5, 7), (512, 300)):  # the reference: PIL's bilinear resize of a float image
        ref = np.asarray(Image.fromarray(m, mode="F").resize(size, Image.Resampling.BILINEAR))
        np.testing.assert_allclose(upsample(m, size, "smooth"), ref, atol=1e-5)
    with pytest.raises(ValueError, match="upsampling"):
        upsample(grid, (4, 4), mode="cubic")


def test_tint_fades_with_the_weight():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(overlay(img, np.zeros((8, 8))), img)  # weight 0: the photo as it is
    assert np.array_equal(overlay(img, np.ones((8, 8)), opacity=0.0), img)
    top = matplotlib.colormaps["viridis"](1.0)[:3]
    full = overlay(img, np.ones((8, 8)), "viridis", opacity=1.0)
    assert np.abs(full.astype(int) - np.array(top) * 255).max() <= 1  # the colormap's top colour, opaque
    assert tint_alpha(0.8)[0] == 0 and tint_alpha(0.8)[255] == 0.8
    assert tint_alpha(0.8)[round(255 * FULL_AT)] == pytest.approx(0.8)  # full opacity from FULL_AT up
    assert tint_alpha(0.8)[round(255 * FULL_AT / 2)] == pytest.approx(0.4, abs=0.01)  # half way: half
    faint = overlay(img, np.full((8, 8), 0.01), opacity=1.0)
    assert np.abs(faint.astype(int) - img).max() <= 255 * 0.01 / FULL_AT + 1
    with pytest.raises(ValueError, match="uint8"):
        overlay(img.astype(np.float32), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="differ"):
        overlay(img, np.zeros((4, 8)))
    with pytest.raises(ValueError, match="opacity"):
        overlay(img, np.zeros((8, 8)), opacity=1.5)
    with pytest.raises(ValueError, match="heat"):
        overlay(img, np.full((8, 8), 2.0))
    with pytest.raises(ValueError, match="colormap"):
        palette("rainbow-unicorn")


def test_overlay_is_the_page_blend_per_pixel():
    """Every pixel is base + (colour - base) * alpha at its level, in float64, rounded half to even (the page's
    Uint8ClampedArray), for every colormap and a few opacities (the overlay reads a table of those values)."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    heat = rng.random((40, 50))
    heat[:5] = 0.0
    heat[5:8] = 1.0
    for colormap in COLORMAPS:
        for opacity in (0.0, 0.35, 0.8, 1.0):
            level = np.clip(np.floor(heat * 255 + 0.5), 0, 255).astype(int)
            alpha = opacity * np.minimum(1.0, level / (255 * FULL_AT))
            colour = palette(colormap)[level].astype(np.float64)
            want = np.rint(img + (colour - img) * alpha[..., None]).astype(np.uint8)
            assert np.array_equal(overlay(img, heat, colormap, opacity), want), (colormap, opacity)


def test_cell_rects_tile_the_picture_exactly_once():
    for grid, size in (((4, 4), (64, 64)), ((16, 16), (160, 90)), ((8, 8), (37, 501)), ((32, 32), (20, 20))):
        count = np.zeros(size[::-1], int)
        for j in range(grid[0] * grid[1]):
            x0, y0, x1, y1 = cell_rect(j, grid, size)
            count[y0:y1, x0:x1] += 1
        if size[0] >= grid[1] and size[1] >= grid[0]:
            assert (count == 1).all(), (grid, size)
        else:  # a picture smaller than the grid: every cell still gets a pixel
            assert (count >= 1).all()
    with pytest.raises(IndexError):
        cell_rect(16, (4, 4), (64, 64))


def test_marks_are_drawn_on_a_copy():
    img = np.zeros((40, 40, 3), np.uint8)
    out = mark_query(img, (20.5, 20.5), (10, 10, 30, 30))
    assert img.max() == 0 and out[20, 20].tolist() == list(QUERY_COLOR) and out[10, 25].tolist() == list(QUERY_COLOR)
    assert out[20, 24].tolist() == [0, 0, 0]  # the dot's black ring
    cells = mark_cells(img, [(10, 10, 20, 20), (25, 25, 30, 30)])  # frames drawn just outside the cells
    assert cells[9, 15].tolist() == list(MARK_COLOR) and cells[8, 15].tolist() == [0, 0, 0]
    assert not cells[10:20, 10:20].any() and not cells[25:30, 25:30].any()  # the cells themselves untouched
    assert (cells == np.array(MARK_COLOR)).all(-1).sum() >= 44 + 24 + 10  # two frames (12² - 10², 7² - 5²) and two digits
    assert top_indices(np.array([0.1, 0.3, 0.3, 0.2]), 3) == [1, 2, 3]  # ties: the lower index first


def test_only_cells_that_hold_weight_are_numbered():
    """A one-hot row has one cell holding weight: one frame, not five (four of them on empty cells); a row whose
    fifth cell holds 0.5% of the largest numbers four."""
    rng = np.random.default_rng(2)
    img = rng.integers(40, 216, (128, 128, 3), dtype=np.uint8)
    one_hot = np.zeros((16, 16))
    one_hot[3, 12] = 1.0
    style = dict(query=5 * 16 + 5, point_xy=(44.0, 44.0))
    assert np.array_equal(attention_picture(img, one_hot, top_k=5, **style), attention_picture(img, one_hot, top_k=1, **style))
    assert not np.array_equal(attention_picture(img, one_hot, top_k=1, **style), attention_picture(img, one_hot, top_k=0, **style))
    row = np.full((16, 16), 1e-9)
    row.flat[[10, 50, 90, 130, 170]] = [1.0, 0.5, 0.2, 0.05, 0.005]
    assert marked_indices(row) == [10, 50, 90, 130]
    assert np.array_equal(attention_picture(img, row, top_k=5, **style), attention_picture(img, row, top_k=4, **style))
    assert marked_indices(-np.ones((4, 4))) == []  # f / M rows can be all negative: nothing holds weight


def test_attention_picture_leaves_unattended_cells_alone():
    rng = np.random.default_rng(1)
    img = rng.integers(40, 216, (128, 128, 3), dtype=np.uint8)
    row = np.full((16, 16), 1e-5)
    row[3, 12], row[10, 2] = 0.6, 0.3
    pic = attention_picture(img, row / row.sum(), query=5 * 16 + 5, point_xy=(44.0, 44.0), top_k=0)
    diff = np.abs(pic.astype(int) - img).mean(-1)
    assert diff[3 * 8:4 * 8, 12 * 8:13 * 8].mean() > 30 and diff[10 * 8 + 2:11 * 8 - 2, 2 * 8 + 2:3 * 8 - 2].mean() > 20
    assert diff[100:, 100:].max() == 0  # far from anything attended and from the marks: untouched


def pages(result):
    return [page_layer(b.name, b.maps, b.family, "qk") for b in result.blocks]


def reference_rows(block):
    """softmax(Q K^T) of the block's maps, in float64: (N, N)."""
    q, k = block.maps.query[0, 0].double(), block.maps.key[0, 0].double()
    return torch.softmax(q @ k.T, dim=-1).numpy()


def test_a_clicks_pictures_follow_the_click():
    model, meta = tiny_model(), tiny_meta(input_size=64)
    image = Image.fromarray((np.random.default_rng(0).random((90, 160, 3)) * 255).astype(np.uint8))
    result = analyze(model, meta, image)
    assert result.size == (160, 90) and result.display.shape == (90, 160, 3)
    style = dict(scale="linear", mode="smooth", colormap="inferno", opacity=0.8, top_k=5)
    for layer, block in zip(pages(result), result.blocks):
        rgb, cell, values = layer.picture(result.display, result.size, (159, 89), **style)
        assert cell == layer.n - 1 and rgb.shape == (90, 160, 3)  # the bottom-right query
        np.testing.assert_allclose(values.sum(), 1.0, rtol=1e-12)
        np.testing.assert_allclose(values.ravel(), reference_rows(block)[cell], atol=1e-9)
        column, _, _ = layer.picture(result.display, result.size, (10, 10), view="column", **style)
        row, _, _ = layer.picture(result.display, result.size, (10, 10), **style)
        assert not np.array_equal(column, row)


def test_column_equals_the_full_maps_column():
    model, meta = tiny_model(), tiny_meta(input_size=64)
    result = analyze(model, meta, Image.new("RGB", (64, 64), (100, 50, 20)))
    for layer, block in zip(pages(result), result.blocks):
        for j in (0, layer.m - 1):
            np.testing.assert_allclose(layer.column(j), reference_rows(block)[:, j], rtol=1e-5, atol=1e-9)  # float32 log Z


def test_large_image_is_drawn_on_a_small_copy():
    model, meta = tiny_model(), tiny_meta(input_size=64)
    result = analyze(model, meta, Image.new("RGB", (3000, 1000), (10, 20, 30)))
    assert result.size == (3000, 1000) and result.display.shape == (171, 512, 3)
    assert pages(result)[0].picture(result.display, result.size, (2999, 999))[0].shape == (171, 512, 3)
    assert torch.isfinite(result.probs).all()
    decoded = np.asarray(Image.open(__import__("io").BytesIO(result.display_jpeg)).convert("RGB"))
    assert np.array_equal(decoded, result.display)  # the server draws on the very JPEG the page gets
