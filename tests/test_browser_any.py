"""The app for any CNN with non-local attention, in Chromium: a model with one block of every family (the page's rows,
columns and pictures against the server's, per family), timm's botnet26t_256 (random weights: nothing is
fetched) and the trained non-local ResNet (hover, click, heads, column view, no Error). Screenshots go to artifacts/.
"""

import os
from contextlib import contextmanager

import numpy as np
import pytest

from vggattn import app
from test_browser import ARTIFACTS, CHROMIUM, click_image_at, page_picture

pytest.importorskip("timm", reason="timm is the optional extra vggattn[timm] (requirements.txt pins it)")
if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Chromium not installed (apt-get install -y chromium); CI always runs this test", allow_module_level=True)

import byo_models  # noqa: E402
from server import free_port  # noqa: E402
from vggattn.analysis import analyze  # noqa: E402
from vggattn.models.byo import describe, load_model, load_timm  # noqa: E402
from vggattn.data import open_image  # noqa: E402
from vggattn.view.hover import page_layer  # noqa: E402

CHURCH = app.HERE / "assets" / "church.jpg"
ZOO = app.HERE / "checkpoints" / "nonlocal-resnet-imagenette-128.safetensors"


def models() -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"  # timm's hub is not reachable here: random weights, said on the page
    out = {"every": (byo_models.every_family(), describe("byo_models:every_family", 64, [f"c{i}" for i in range(5)])),
           "botnet": load_timm("botnet26t_256"),
           "zoo": load_model("vggattn.models.zoo:nonlocal_resnet", ZOO)}
    try:  # blocks of other libraries, found by tracing (the test-only extras)
        out["third"] = (byo_models.third_party(), describe("byo_models:third_party", 64, [f"c{i}" for i in range(10)]))
    except ImportError:
        pass
    return out


@pytest.fixture(scope="module")
def served():
    """name -> (url, model, meta): one app per model, started once for the module."""
    apps, out = [], {}
    for name, (model, meta) in models().items():
        demo = app.build_demo(model, meta)
        port = free_port()
        app.serve(demo, port=port, prevent_thread_lock=True, quiet=True)
        apps.append(demo)
        out[name] = (f"http://127.0.0.1:{port}/", model, meta)
    yield out
    for demo in apps:
        demo.close()


@contextmanager
def uploaded(browser, url: str, width: int = 1440, height: int = 900, path=CHURCH):
    page = browser.new_page(viewport={"width": width, "height": height})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(url)
        page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
        page.locator("#input-image input[type=file]").set_input_files(str(path))
        page.wait_for_function("window.vggattnHover && window.vggattnHover.ready()", timeout=60_000)
        yield page, errors
    finally:
        page.close()


def server_layers(model, meta, path=CHURCH):
    result = analyze(model, meta, open_image(path))
    return result, [page_layer(b.name, b.maps, b.family) for b in result.blocks]


def test_page_rows_columns_and_pictures_equal_the_servers_for_every_family(browser, served):
    """Per family (the article's, SAGAN, BigGAN with pooled keys, Non-local embedded and dot product, timm's
    NonLocalAttn, BoTNet's four heads with relative positions, GCNet's one map): the page's rows and columns equal
    the server's (`PageLayer`, the numbers a pinned click shows) to 1e-9, for the mean of heads and single heads,
    and its pictures equal the server's pinned pictures, row and column view, linear and log."""
    url, model, meta = served["every"]
    result, layers = server_layers(model, meta)
    assert [layer.kind for layer in layers] == ["qk"] * 6 + ["rows", "map"]
    with uploaded(browser, url) as (page, errors):
        assert page.evaluate("window.vggattnHover.state().layers") == 8
        worst_row, worst_picture = 0.0, {}
        for li, layer in enumerate(layers):
            for head in ("mean", "0", "3"):
                h = None if head == "mean" else int(head)
                for i in (0, 100, layer.n - 1):
                    js = np.array(page.evaluate("([l, i, h]) => window.vggattnHover.row(l, i, h)", [li, i, head]))
                    np.testing.assert_allclose(js, layer.row(i, h), rtol=1e-9, atol=1e-12, err_msg=f"{layer.name} row")
                    worst_row = max(worst_row, float(np.abs(js - layer.row(i, h)).max()))
                for j in (0, layer.m - 1):
                    js = np.array(page.evaluate("([l, j, h]) => window.vggattnHover.column(l, j, h)", [li, j, head]))
                    np.testing.assert_allclose(js, layer.column(j, h), rtol=1e-9, atol=1e-12, err_msg=f"{layer.name} column")
        for scale, how, head, (x, y) in (("linear", "row", "mean", (112, 80)), ("log", "column", "2", (20, 200)),
                                          ("linear", "column", "mean", (223, 223)), ("log", "row", "1", (0, 0))):
            controls = {"opacity": 0.8, "colormap": "inferno", "mode": "smooth", "mark": True, "scale": scale, "head": head}
            page.evaluate("(c) => window.vggattnHover.setControls(c)", controls)
            for li, layer in enumerate(layers):
                drawn = page_picture(page, li, x, y, how)
                rgb, _, _ = layer.picture(result.display, result.size, (x, y), int(head) if head != "mean" else None, how,
                                          scale=scale, mode="smooth", colormap="inferno", opacity=0.8, top_k=5)
                assert drawn.shape == rgb.shape
                worst_picture[(layer.name, scale, how, head)] = int(np.abs(drawn.astype(int) - rgb.astype(int)).max())
        assert not errors, errors
    print("rows: largest difference", worst_row, "; pictures: largest difference", max(worst_picture.values()))
    assert all(d <= 2 for d in worst_picture.values()), worst_picture


@pytest.mark.parametrize("name", ["botnet", "zoo"])
def test_hover_click_heads_and_column_view(browser, served, name):
    """timm's botnet26t_256 (3 BoTNet blocks, 4 heads, random weights) and the trained non-local ResNet (one block,
    keys pooled to 8x8): the panels follow the pointer, a click pins them on the server, the head selector and the
    column view reach the page, the page's rows equal the server's, and no Error shows. A click is drawn by the page
    (the server answers with the readouts only)."""
    url, model, meta = served[name]
    result, layers = server_layers(model, meta)
    with uploaded(browser, url) as (page, errors):
        n = len(layers)
        img = page.locator("#input-image img").first
        box = img.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6)
        page.wait_for_function(f"document.querySelectorAll('canvas.vggattn-hover[data-query]').length === {n}",
                               timeout=10_000)
        x, y = page.evaluate("window.vggattnHover.state().current")
        for li, layer in enumerate(layers):  # the rows the page drew are the server's
            q = page.evaluate("([x, y, g]) => window.vggattnHover.queryIndex(x, y, g)", [x, y, list(layer.grid)])
            js = np.array(page.evaluate("([l, i]) => window.vggattnHover.row(l, i, 'mean')", [li, q]))
            np.testing.assert_allclose(js, layer.row(q), rtol=1e-9, atol=1e-12)
        click_image_at(img, 0.5, 0.5)
        page.wait_for_function("document.querySelector('#status').innerText.includes('Pinned: pixel')", timeout=30_000)
        # the page drew the pin on every panel; the server sent the readouts and no pictures (a light click)
        page.wait_for_function(f"window.vggattnHover.state().pinned && document.querySelectorAll("
                               f"'canvas.vggattn-hover[data-query]').length === {n}", timeout=30_000)
        assert page.locator("#panel-0 img").count() == 0
        readouts = page.locator("#readouts").inner_text()
        assert all(layer.name in readouts for layer in layers)
        if name == "botnet":
            assert "random weights" in page.locator("#about").inner_text()
            page.locator("#head").get_by_label("head 2").check()
            page.wait_for_function("window.vggattnHover.state().controls.head === '1'", timeout=10_000)
            page.wait_for_function("[...document.querySelectorAll('.vggattn-legend span')].every("
                                   "s => s.textContent.includes('head 2/4'))", timeout=10_000)
            page.locator("#head").get_by_label("mean of heads").check()
            page.wait_for_function("window.vggattnHover.state().controls.head === 'mean'", timeout=10_000)
        else:
            assert "church" in page.locator("#predictions").inner_text()
            assert page.locator("#head").count() == 0 or not page.locator("#head").is_visible()
        page.locator("input.vggattn-column").check()
        page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.3)
        page.wait_for_function(f"document.querySelectorAll('canvas.vggattn-hover[data-view=column]').length === {n}",
                               timeout=10_000)
        page.locator("input.vggattn-column").uncheck()
        page.get_by_role("tab", name="Ablation").click()
        page.locator("#ablate").scroll_into_view_if_needed()
        page.locator("#layers-off").get_by_label(layers[0].name).check()
        page.locator("#ablate").click()
        page.wait_for_function("document.querySelector('#ablation-verdict').innerText.includes('Top-1')", timeout=30_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ARTIFACTS / f"app-{name}-1440x900.png"))
        body = page.locator("body").inner_text()
        assert "Error" not in body, body[:2000]
        assert not errors, errors


def test_many_blocks_fit_a_1440x900_screen(browser, served):
    """Eight blocks: the picture and the first row of panels above the fold, the rest in a strip that scrolls."""
    url, _, _ = served["every"]
    with uploaded(browser, url) as (page, errors):
        boxes = [page.locator(s).bounding_box() for s in ("#input-image", "#panel-0", "#panel-1", "#panel-2")]
        assert all(b["y"] >= 0 and b["y"] + b["height"] <= 900 for b in boxes), boxes
        strip = page.evaluate("(() => { const s = document.querySelector('#panel-strip'); "
                              "return [s.scrollHeight, s.clientHeight]; })()")
        assert strip[0] > strip[1], strip  # the last panels scroll into view
        page.locator("#panel-7").scroll_into_view_if_needed()
        img = page.locator("#input-image img").first
        click_image_at(img, 0.4, 0.4)
        page.wait_for_function("window.vggattnHover.state().pinned && "
                               "document.querySelector('#panel-7 canvas.vggattn-hover[data-query]')", timeout=30_000)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ARTIFACTS / "app-every-family-1440x900.png"))
        assert not errors, errors


@pytest.mark.parametrize("size", [(1440, 900), (390, 844)])
def test_third_party_blocks_in_the_page(browser, served, size):
    """The classifier of mmcv, timm, diffusers and reference blocks (found by tracing): the page's rows equal the
    server's for every block (the halo's windows and the ContextBlock's one map included), a click pins all five
    panels, the readouts give the halo's share on padding, and a laptop and a phone get their screenshots."""
    if "third" not in served:
        pytest.skip("mmcv-lite and diffusers (test-only extras) are not installed")
    url, model, meta = served["third"]
    result, layers = server_layers(model, meta)
    with uploaded(browser, url, *size) as (page, errors):
        img = page.locator("#input-image img").first
        img.scroll_into_view_if_needed()
        box = img.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.3)
        # a pointer move draws the panels on screen (within 100 px of it) and no other: at phone size some are not
        drawn = "[0,1,2,3,4].map(i => !!document.querySelector(`#panel-${i} canvas.vggattn-hover[data-query]`))"
        shown = ("[0,1,2,3,4].map(i => { const r = document.getElementById(`panel-${i}`).getBoundingClientRect(); "
                 "return r.bottom > -100 && r.top < innerHeight + 100; })")
        page.wait_for_function(f"{drawn}.some(d => d) && JSON.stringify({drawn}) === JSON.stringify({shown})",
                               timeout=10_000)
        assert all(page.evaluate(shown)) == (size[0] > 1000), page.evaluate(shown)
        x, y = page.evaluate("window.vggattnHover.state().current")
        for li, layer in enumerate(layers):
            q = page.evaluate("([x, y, g]) => window.vggattnHover.queryIndex(x, y, g)", [x, y, list(layer.grid)])
            js = np.array(page.evaluate("([l, i]) => window.vggattnHover.row(l, i, 'mean')", [li, q]))
            np.testing.assert_allclose(js, layer.row(q), rtol=1e-9, atol=1e-12, err_msg=layer.name)
            if layer.kind != "map":
                for j in (0, layer.m // 3, layer.m - 1):
                    js = np.array(page.evaluate("([l, j]) => window.vggattnHover.column(l, j, 'mean')", [li, j]))
                    np.testing.assert_allclose(js, layer.column(j), rtol=1e-9, atol=1e-12, err_msg=layer.name)
        assert [layer.kind for layer in layers].count("window") == 1  # the halo's rows: its windows, not N x M
        click_image_at(img, 0.05, 0.05)
        page.wait_for_function("document.querySelector('#status').innerText.includes('Pinned: pixel')", timeout=30_000)
        page.wait_for_function(f"{drawn}.every(d => d)", timeout=10_000)  # a click draws every panel
        assert "of the row on padding" in page.locator("#readouts").inner_text()
        page.evaluate("window.scrollTo(0, 0)")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"app-third-party-{size[0]}x{size[1]}.png"))
        assert "Error" not in page.locator("body").inner_text() and not errors, errors
