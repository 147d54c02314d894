"""Images in, tensors out: `preprocess`, dataset transforms, and pixel <-> query mapping.

The model sees the WHOLE image resized to its square input size (no crop), so every pixel of
the original image maps to a query position of every attention layer:

    x = preprocess(pil_image, meta)                    # (1, 3, S, S)
    q = query_index((x_px, y_px), pil_image.size, grid_hw)
    (x0, y0, x1, y1) = cell_box(q, pil_image.size, grid_hw)
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .cli import IMAGE_SUFFIXES

# Deliberate limits: a 8000 x 6000 photo (48 MP) is fine; anything declaring more is refused
# before it is decoded (Pillow's own bomb check, as an error instead of a warning).
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ORIENTATION = 0x0112  # the EXIF tag
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")


class ImageLoadError(ValueError):
    """An upload that is not a usable image; the message is one plain sentence for the user."""


def open_image(path: str | Path) -> Image.Image:
    """Open an image file safely -> RGB PIL image with EXIF orientation applied.

    Only ALLOWED_FORMATS are decoded (SVG, EPS, PDF and the rest are refused unopened), images
    over MAX_IMAGE_PIXELS are refused, and animated images give their first frame.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise ImageLoadError("The image file could not be found or read.") from None
    if size == 0:
        raise ImageLoadError("The file is empty (0 bytes).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=ALLOWED_FORMATS) as im:
                im.seek(0)
                im.load()
                return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(f"The image is too large to process safely (limit: {MAX_IMAGE_PIXELS:,} pixels).") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"The file is not an image in a supported format ({', '.join(ALLOWED_FORMATS)}).") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"The image could not be decoded; it may be truncated or corrupt ({e}).") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, any mode converted to RGB (transparency composited on white). An RGB image
    with no orientation to apply is returned as it is (no copy: a 48 MP photo is not copied again)."""
    if image.getexif().get(ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bit
        import numpy as np

        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


class EvalTransform:
    """Whole PIL image -> (C, S, S) normalised float32 tensor: the same resize the app and evaluation use. Bit for bit
    torchvision's v2 Compose([PILToTensor(), Resize((S, S), antialias=True), ToDtype(float32, scale=True),
    Normalize(mean, std)]) (its uint8 antialiased bilinear resize is this `interpolate`; tests/test_data.py checks),
    without importing torchvision (2 s of `import vggattn`)."""

    def __init__(self, size: int, mean, std):
        self.size = int(size)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image, dtype=np.uint8)
        x = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1).copy()).permute(2, 0, 1)[None]  # (1, C, H, W)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)[0]
        return x.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def eval_transform(meta: dict) -> EvalTransform:
    """Whole image -> (3, S, S) normalised tensor; the same resize the app and evaluation use."""
    return EvalTransform(meta["input_size"], meta["mean"], meta["std"])


def train_transform(input_size: int, mean: list[float], std: list[float]):
    from torchvision.transforms import v2 as T  # (training only: torchvision is 2 s to import)

    return T.Compose([
        T.PILToTensor(),
        T.RandomResizedCrop(input_size, scale=(0.25, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])


def preprocess(image: Image.Image, meta: dict) -> torch.Tensor:
    """PIL image (any mode, size, EXIF orientation) -> (1, 3, S, S) model input."""
    return eval_transform(meta)(to_rgb(image)).unsqueeze(0)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB with EXIF orientation applied (dataset loader)."""
    with Image.open(path) as im:
        im.load()  # the pixels outlive the file (to_rgb may hand this very image back)
        return to_rgb(im)


def query_index(xy: tuple[float, float], image_wh: tuple[int, int], grid_hw: tuple[int, int]) -> int:
    """Pixel (x, y) of the original image -> flat query index (row * W + col) in a layer's grid.

    The image is resized whole to the square input, and a layer's grid of H x W cells tiles that
    input evenly (exact when the input size is a multiple of the layer's stride, as 128 and 224
    are for strides 4, 8, 16). Pixel centres are used; out-of-range pixels are clamped.
    """
    x, y = xy
    (img_w, img_h), (grid_h, grid_w) = image_wh, grid_hw
    col = min(max(int(math.floor((x + 0.5) / img_w * grid_w)), 0), grid_w - 1)
    row = min(max(int(math.floor((y + 0.5) / img_h * grid_h)), 0), grid_h - 1)
    return row * grid_w + col


def cell_box(query: int, image_wh: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """Flat query index -> its cell (x0, y0, x1, y1) in original-image pixel coordinates."""
    (img_w, img_h), (grid_h, grid_w) = image_wh, grid_hw
    if not 0 <= query < grid_h * grid_w:
        raise IndexError(f"query index {query} out of range for a {grid_h}x{grid_w} grid")
    row, col = divmod(query, grid_w)
    cw, ch = img_w / grid_w, img_h / grid_h
    return (col * cw, row * ch, (col + 1) * cw, (row + 1) * ch)


def per_class_subset(ds, n: int):
    """The first n images of each class of an ImageFolder (file order), as a Subset; n <= 0: all of ds."""
    from torch.utils.data import Subset

    if n <= 0:
        return ds
    seen: dict[int, int] = {}
    keep = []
    for i, (_, y) in enumerate(ds.samples):
        if seen.get(y, 0) < n:
            seen[y] = seen.get(y, 0) + 1
            keep.append(i)
    return Subset(ds, keep)


def collect_images(inputs: list[str]) -> list[Path]:
    """The image files named, and those under the folders named (sorted, by IMAGE_SUFFIXES); a missing one raises."""
    found = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return found
