import os
import shutil
from pathlib import Path

import pytest
import torch

import vggattn  # installed: make installs the checkout (pip install -e .); pytest puts tests/ on sys.path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent

DATA = ROOT.parent / "shared" / "data" / "imagenette2-224"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's: `playwright install` cannot download here
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def tiny_model(num_classes: int = 10, seed: int = 0, **kw) -> vggattn.VGG16WithAttention:
    """A small random model with non-zero gammas (so attention changes the output)."""
    torch.manual_seed(seed)
    kw = {"width": 0.125, "hidden": 32, **kw}
    model = vggattn.vgg16_with_attention(num_classes, **kw)
    for m in model.modules():
        if isinstance(m, vggattn.GlobalAttention):
            m.gamma.data.fill_(0.5)
    return model.eval()


def noise_folder(root: Path, size: int = 56, classes=("a", "b"), per_class: int = 2) -> Path:
    """An ImageFolder of seeded noise pictures (size x size), per_class a class -> root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def tiny_meta(input_size: int = 64, num_classes: int = 10) -> dict:
    return {"config": {"num_classes": num_classes, "width": 0.125, "hidden": 32}, "class_names": [f"c{i}" for i in range(num_classes)], "input_size": input_size,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "training": {}}


@pytest.fixture
def data_root() -> Path:
    """The shared Imagenette copy; skips with a reason when absent (never in CI)."""
    if not DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{DATA} is missing in CI")
        pytest.skip(f"{DATA} not present (../shared is not beside the checkout)")
    return DATA


@pytest.fixture(autouse=True)
def _torch_threads_as_they_were():
    """`vggattn.app.main` sets PyTorch's thread count for the server it starts; a test that calls it must not
    leave that to the tests after it (their float sums, compared with other processes', follow the count)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for a module's browser tests (they skip without it, except in CI)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()
