"""The live view as one HTML file (`vggattn.view.live`), opened from file:// in Chromium with the network off: it
follows the pointer and pins clicks as the app does, with the app's pixels, for the article's model (written by
`vggattn-explain --html`) and for a ViT with registers (its prefix tiles); float16 when float32 would be too big."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vggattn
from vggattn.analysis import analyze
from vggattn.view import live
from vggattn.view.hover import pages

from conftest import CHROMIUM

HERE = Path(__file__).resolve().parents[1]
ARTIFACTS = HERE / "artifacts"
browser_needed = pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                                    reason="Chromium not installed (apt-get install -y chromium); CI always runs this")


def opened(browser, path: Path, width: int = 1440, height: int = 900):
    """The file in a fresh offline context where every request other than file: and data: is refused and listed
    -> (page, page errors, refused requests); the file's first point is pinned and drawn."""
    context = browser.new_context(viewport={"width": width, "height": height}, offline=True)
    refused, errors = [], []
    context.route(lambda url: not url.startswith(("file:", "data:")), lambda r: (refused.append(r.request.url), r.abort()))
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_function("window.vggattnHover && window.vggattnHover.ready() && window.vggattnHover.state().pinned "
                           "&& document.querySelectorAll('canvas.vggattn-hover[data-query]').length > 0", timeout=30_000)
    return page, errors, refused


def page_picture(page, layer: int, x: int, y: int, how: str) -> np.ndarray:
    import base64

    w, h, b64 = page.evaluate("([l, x, y, how]) => window.vggattnHover.picture(l, x, y, how)", [layer, x, y, how])
    return np.frombuffer(base64.b64decode(b64), dtype=np.uint8).reshape(h, w, 3)


def test_float16_changes_each_row_by_a_little_and_big_files_use_it(monkeypatch):
    """row_error: 0 at float32, small and not 0 at float16; a file whose float32 arrays pass the limit goes as float16."""
    model, meta = vggattn.load_checkpoint(device="cpu")
    result = analyze(model, meta, Image.open(HERE / "assets" / "church.jpg"))
    layers = pages(result)
    assert live.row_error(layers, "float32") == 0.0
    assert 1e-5 < live.row_error(layers, "float16") < 0.01
    assert '"dtype": "float32"' in live.live_html(result, layers, title="a")
    monkeypatch.setattr(live, "AUTO_FLOAT32", 100_000)
    small = live.live_html(result, layers, title="</script><b>")
    assert '"dtype": "float16"' in small and "</script><b>" not in small  # escaped in the title and the JSON


@browser_needed
def test_the_file_from_explain_follows_the_pointer_offline_with_the_apps_pixels(browser, tmp_path):
    """`vggattn-explain --html` on a 700x450 photo (drawn on a 512x329 copy): opened from disk with no network, the
    explain point is pinned; every layer's picture, row and column, linear and log, equals the app's server render
    within 2/255; the pointer maps to the image's own pixels (query index as the server's) and a click pins it; the
    controls redraw; nothing is fetched and no script error."""
    from vggattn import explain

    Image.open(HERE / "assets" / "parachute.jpg").convert("RGB").resize((700, 450)).save(tmp_path / "wide.png")
    assert explain.main([str(tmp_path / "wide.png"), "--point", "350,225", "--out", str(tmp_path / "out"), "--html",
                         "--no-ablation"]) == 0
    path = tmp_path / "out" / "wide" / "view.html"
    model, meta = vggattn.load_checkpoint(device="cpu")
    result = analyze(model, meta, Image.open(tmp_path / "wide.png"))
    layers = pages(result)
    page, errors, refused = opened(browser, path)
    assert page.evaluate("window.vggattnHover.state().pinned") == [350, 225]
    worst = {}
    for scale in ("linear", "log"):
        page.evaluate("(s) => window.vggattnHover.setControls({scale: s})", scale)
        for how, (x, y) in zip(("row", "column", "row"), [(350, 225), (0, 0), (699, 449)]):
            for li, layer in enumerate(layers):
                want, _, _ = layer.picture(result.display, result.size, (x, y), view=how, scale=scale, mode="smooth",
                                           colormap="inferno", opacity=0.8, top_k=5)
                drawn = page_picture(page, li, x, y, how)
                assert drawn.shape == want.shape == (329, 512, 3)
                worst[(scale, how, li)] = int(np.abs(drawn.astype(int) - want.astype(int)).max())
    assert max(worst.values()) <= 2, worst
    page.evaluate("window.vggattnHover.setControls({scale: 'linear'})")
    img = page.locator("#input-image img")
    box = img.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.25 + 0.4, box["y"] + box["height"] * 0.75 + 0.4)
    page.wait_for_function("window.vggattnHover.state().current !== null", timeout=5_000)
    x, y = page.evaluate("window.vggattnHover.state().current")
    assert abs(x - 175) <= 2 and abs(y - 337) <= 2, (x, y)  # the picture is 700x450 pixels, whatever its size here
    queries = page.evaluate("[...document.querySelectorAll('canvas.vggattn-hover')].map(c => Number(c.dataset.query))")
    assert queries == [b.query_index((x, y)) for b in result.blocks]
    page.mouse.down()
    page.mouse.up()
    assert page.evaluate("window.vggattnHover.state().pinned") == [x, y]
    page.select_option("#colormap", "jet")
    page.wait_for_function("window.vggattnHover.state().controls.colormap === 'jet'", timeout=5_000)
    page.mouse.move(1, 1)  # off the picture: the pinned point stays drawn
    assert page.evaluate("[...document.querySelectorAll('canvas.vggattn-hover')].every(c => c.style.display === 'block')")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "live-view.png"))
    assert not errors and not refused, (errors, refused)
    page.context.close()


@browser_needed
def test_a_vit_with_registers_file_has_its_tiles_and_token_rows(browser, tmp_path):
    """A DINOv2 with 4 registers (random weights) as one file: the prefix tiles are there, a patch's row and a
    register tile's row equal the server's (float32: to 1e-9), clicking the tile pins that register, offline."""
    timm = pytest.importorskip("timm")
    from vggattn.models.byo import describe

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=112, depth=2,
                              num_classes=5).eval()
    meta = describe("timm:vit_small_patch14_reg4_dinov2", 112, [f"c{i}" for i in range(5)])
    result = analyze(model, meta, Image.open(HERE / "assets" / "church.jpg"))
    layers = pages(result)
    path = tmp_path / "vit.html"
    path.write_text(live.live_html(result, layers, title="church", about=live.about_model(meta)))
    page, errors, refused = opened(browser, path, 390, 844)
    n = layers[0].n
    for li, layer in enumerate(layers):
        for i in (0, n // 2, n + 3):  # a patch, another, register 2's own row
            js = np.array(page.evaluate("([l, i]) => window.vggattnHover.fullRow(l, i, 'mean')", [li, i]))
            np.testing.assert_allclose(js, layer.full_row(i), rtol=1e-9, atol=1e-12)
    tile = page.locator("#panel-0 .vggattn-tile[data-token='reg_token[2]']")
    tile.scroll_into_view_if_needed()
    tile.click()
    page.wait_for_function("window.vggattnHover.state().token === 'reg_token[2]'", timeout=5_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "live-view-vit-390.png"))
    assert not errors and not refused, (errors, refused)
    page.context.close()
