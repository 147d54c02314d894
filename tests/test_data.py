import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_meta
from vggattn import cell_box, preprocess, query_index

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.mark.parametrize("size", [(64, 64), (300, 100), (37, 211), (16, 17)])
@pytest.mark.parametrize("grid", [(16, 16), (8, 8), (4, 4), (3, 5)])
def test_corners_map_to_corner_cells(size, grid):
    w, h = size
    gh, gw = grid
    assert query_index((0, 0), size, grid) == 0
    assert query_index((w - 1, 0), size, grid) == gw - 1
    assert query_index((0, h - 1), size, grid) == (gh - 1) * gw
    assert query_index((w - 1, h - 1), size, grid) == gh * gw - 1
    assert query_index((-5, 10 * h), size, grid) == (gh - 1) * gw  # clamped


def test_one_pixel_image_maps_to_the_centre_cell():
    assert query_index((0, 0), (1, 1), (16, 16)) == 8 * 16 + 8


def test_non_square_edges_and_middle():
    size, grid = (300, 100), (8, 8)  # a wide photo: cells are 37.5 x 12.5 px
    assert query_index((36, 0), size, grid) == 0  # pixel 36 spans [36, 37), inside cell 0
    assert query_index((38, 0), size, grid) == 1
    assert query_index((150, 50), size, grid) == 4 * 8 + 4
    assert query_index((299, 11), size, grid) == 7
    assert query_index((299, 13), size, grid) == 15


@pytest.mark.parametrize("size", [(128, 128), (640, 480), (101, 333)])
def test_every_cell_box_maps_back_to_its_query(size):
    grid = (16, 16)
    for q in range(16 * 16):
        x0, y0, x1, y1 = cell_box(q, size, grid)
        assert query_index(((x0 + x1) / 2, (y0 + y1) / 2), size, grid) == q
        assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
    assert cell_box(255, size, grid)[2:] == pytest.approx(size)
    with pytest.raises(IndexError):
        cell_box(256, size, grid)


def test_every_pixel_lands_in_the_box_of_its_query():
    size, grid = (50, 30), (4, 4)
    for x in range(50):
        for y in range(30):
            x0, y0, x1, y1 = cell_box(query_index((x, y), size, grid), size, grid)
            assert x0 <= x + 0.5 <= x1 and y0 <= y + 0.5 <= y1


def test_preprocess_whole_image_no_crop():
    meta = tiny_meta(input_size=32)
    img = np.zeros((20, 80, 3), np.uint8)
    img[:, -8:] = 255  # a white band at the right edge must survive (no centre crop)
    x = preprocess(Image.fromarray(img), meta)
    assert x.shape == (1, 3, 32, 32)
    raw = x[0] * torch.tensor(meta["std"]).view(3, 1, 1) + torch.tensor(meta["mean"]).view(3, 1, 1)
    assert raw[:, :, -2:].min() > 0.95 and raw[:, :, :20].max() < 0.05


def with_exif_orientation(img: Image.Image, orientation: int) -> Image.Image:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_preprocess_applies_exif_orientation():
    meta = tiny_meta(input_size=32)
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :20] = 255  # white on the left, stored landscape
    stored = Image.fromarray(img)
    rotated = with_exif_orientation(stored, 6)  # "rotate 90 CW to display": white ends up on top
    x = preprocess(rotated, meta)
    raw = x[0].mean(0)
    assert raw[:6].mean() > raw[-6:].mean() + 1.0  # the top is bright, the bottom dark


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_preprocess_any_mode(mode):
    rgb = Image.fromarray((np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8))
    img = rgb.convert(mode) if mode not in ("I;16",) else Image.fromarray((np.arange(1500).reshape(30, 50) * 40).astype(np.uint16))
    x = preprocess(img, tiny_meta(input_size=32))
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()


def test_to_rgb_copies_nothing_it_need_not(monkeypatch):
    """An upload is made RGB once: to_rgb hands an RGB image without orientation back as it is, and `analyze`
    of an opened photo calls it once (a 48 MP photo used to be copied three times)."""
    from vggattn import analysis, data
    from conftest import tiny_meta, tiny_model

    rgb = Image.new("RGB", (40, 30), (1, 2, 3))
    assert data.to_rgb(rgb) is rgb
    rotated = with_exif_orientation(Image.new("RGB", (40, 30)), 6)
    assert data.to_rgb(rotated).size == (30, 40)  # still turned
    calls = []
    real = data.to_rgb
    monkeypatch.setattr(analysis, "to_rgb", lambda im: calls.append(im) or real(im))
    monkeypatch.setattr(data, "to_rgb", lambda im: calls.append(im) or real(im))
    analysis.analyze(tiny_model(), tiny_meta(input_size=64), rgb)
    assert len(calls) == 1 and calls[0] is rgb


@pytest.mark.parametrize("wh, size", [((224, 224), 224), ((300, 200), 518), ((1000, 37), 96), ((7, 5), 128)])
def test_the_eval_transform_is_torchvisions_bit_for_bit(wh, size):
    """`eval_transform` (no torchvision import) gives exactly torchvision v2's PILToTensor, antialiased Resize,
    ToDtype(scale) and Normalize, down- and upsampling, on a photo and on noise."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2 as T

    from vggattn.data import eval_transform

    meta = {"input_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    theirs = T.Compose([T.PILToTensor(), T.Resize((size, size), antialias=True), T.ToDtype(torch.float32, scale=True),
                        T.Normalize(meta["mean"], meta["std"])])
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    for image in (Image.open(ASSETS / "church.jpg").convert("RGB").resize(wh), noise):
        assert torch.equal(eval_transform(meta)(image), theirs(image))
