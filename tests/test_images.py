"""Hostile and odd uploads through the image loading + preprocessing path (unit level)."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import tiny_meta
from vggattn.data import MAX_IMAGE_PIXELS, ImageLoadError, open_image, preprocess

META = tiny_meta(input_size=32)


def save(tmp_path, name, img, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def png_declaring(width, height) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").touch()
    with pytest.raises(ImageLoadError, match="empty"):
        open_image(tmp_path / "empty.jpg")


def test_text_renamed_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("hello\n" * 100)
    with pytest.raises(ImageLoadError, match="not an image in a supported format"):
        open_image(tmp_path / "notes.jpg")


def test_truncated_jpeg(tmp_path):
    rgb = Image.fromarray((np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8))
    full = save(tmp_path, "full.jpg", rgb, quality=90).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        open_image(tmp_path / "cut.jpg")


@pytest.mark.parametrize("side", [30000, 9000])  # 900 MP (hard error in Pillow), 81 MP (warning -> error)
def test_decompression_bomb(tmp_path, side):
    assert side * side > MAX_IMAGE_PIXELS
    (tmp_path / "bomb.png").write_bytes(png_declaring(side, side))
    with pytest.raises(ImageLoadError, match="too large"):
        open_image(tmp_path / "bomb.png")


@pytest.mark.parametrize("name,content", [
    ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'),
    ("figure.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"),
    ("doc.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"),
])
def test_vector_and_document_formats_are_refused(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageLoadError, match="not an image in a supported format"):
        open_image(tmp_path / name)


def test_one_pixel_image(tmp_path):
    img = open_image(save(tmp_path, "dot.png", Image.new("RGB", (1, 1), (200, 10, 10))))
    assert img.size == (1, 1)
    assert preprocess(img, META).shape == (1, 3, 32, 32)


def test_large_legal_photo(tmp_path):
    big = Image.new("RGB", (8000, 6000), (30, 60, 90))
    img = open_image(save(tmp_path, "big.jpg", big, quality=50))
    assert img.size == (8000, 6000)
    x = preprocess(img, META)
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()


def make_mode(mode: str) -> tuple[Image.Image, dict]:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray((rng.random((24, 40, 3)) * 255).astype(np.uint8))
    if mode == "I;16":
        return Image.fromarray((rng.random((24, 40)) * 65535).astype(np.uint16)), {}
    if mode == "P+transparency":
        p = rgb.convert("P")
        return p, {"transparency": 0}
    return rgb.convert(mode), {}


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"),
                                      ("P+transparency", "PNG"), ("LA", "PNG"), ("1", "BMP"), ("RGB", "WEBP"),
                                      ("RGB", "TIFF")])
def test_modes_become_rgb(tmp_path, mode, fmt):
    img, kw = make_mode(mode)
    path = save(tmp_path, f"x.{fmt.lower()}", img, format=fmt, **kw)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (40, 24)
    assert torch.isfinite(preprocess(out, META)).all()


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    out = np.asarray(open_image(save(tmp_path, "ramp16.png", Image.fromarray(ramp))))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255  # scaled to 8 bit, not clipped


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = np.asarray(open_image(path))
    assert out[10, 10, 0] > 200 and out[10, 10, 2] < 50


def test_exif_orientation_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # bright on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = save(tmp_path, "rot.jpg", Image.fromarray(stored), exif=exif, quality=95)
    out = np.asarray(open_image(path))
    assert out.shape == (40, 20, 3)  # displayed portrait
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the bright band is now on top


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
def test_fuzz_random_bytes_only_clean_errors(tmp_path, data):
    path = tmp_path / "fuzz.bin"
    path.write_bytes(data)
    try:
        img = open_image(path)
    except ImageLoadError:
        return
    assert preprocess(img, META).shape == (1, 3, 32, 32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=st.integers(1, 300), h=st.integers(1, 300), mode=st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK"]),
       fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]), cut=st.floats(0.0, 1.0), seed=st.integers(0, 9))
def test_fuzz_valid_and_mangled_images(tmp_path, w, h, mode, fmt, cut, seed):
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        mode = "RGB"
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    try:
        Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # Pillow cannot write this mode in this format
        assume(False)
    raw = buf.getvalue()
    path = tmp_path / "img"
    path.write_bytes(raw if cut > 0.5 else raw[: int(len(raw) * cut * 2)])
    try:
        img = open_image(path)
    except ImageLoadError:
        assert cut <= 0.5  # only a mangled file may fail
        return
    assert img.mode == "RGB"
    assert preprocess(img, META).shape == (1, 3, 32, 32)
