"""A vision transformer with registers in the app, in Chromium: timm's DINOv2 with 4 registers (small, random weights:
nothing is fetched). The page's rows of a patch and of each prefix token equal the server's, over the grid and the
prefix tiles together; a click pins a patch, a register's tile pins that register's own row in every layer; layers
past the payload's budget come when their panels show; the head grid draws one map per head; at 390x844 every view opens whole. Screenshots (1440x900, 390x844) go to artifacts/."""

import os

import numpy as np
import pytest

from test_browser import ARTIFACTS, CHROMIUM, click_image_at

timm = pytest.importorskip("timm", reason="timm is the optional extra vggattn[timm] (requirements.txt pins it)")
if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Chromium not installed (apt-get install -y chromium); CI always runs this test", allow_module_level=True)

import torch  # noqa: E402

from server import free_port  # noqa: E402
from vggattn import app  # noqa: E402
from vggattn.analysis import analyze  # noqa: E402
from vggattn.models.byo import describe  # noqa: E402
from vggattn.data import open_image  # noqa: E402
from vggattn.view import hover  # noqa: E402
from vggattn.view.hover import pages  # noqa: E402

CHURCH = app.HERE / "assets" / "church.jpg"
NAME = "vit_small_patch14_reg4_dinov2"


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, img_size=112, depth=3, num_classes=5).eval()
    meta = describe(f"timm:{NAME}", 112, [f"c{i}" for i in range(5)])
    demo = app.build_demo(model, meta)
    port = free_port()
    app.serve(demo, port=port, prevent_thread_lock=True, quiet=True)
    result = analyze(model, meta, open_image(CHURCH))
    yield f"http://127.0.0.1:{port}/", pages(result)
    demo.close()


def open_page(browser, url, width=1440, height=900):
    page = browser.new_page(viewport={"width": width, "height": height})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
    page.locator("#input-image input[type=file]").set_input_files(str(CHURCH))
    page.wait_for_function("window.vggattnHover && window.vggattnHover.ready()", timeout=60_000)
    return page, errors


def tile_weights(page, panel: int) -> dict:
    return page.evaluate(f"Object.fromEntries([...document.querySelectorAll('#panel-{panel} .vggattn-tile')]"
                         ".map(t => [t.dataset.token, Number(t.dataset.weight)]))")


def test_click_a_patch_and_a_register_tile(browser, served):
    url, layers = served
    page, errors = open_page(browser, url)
    try:
        n, names = layers[0].n, layers[0].prefix_names
        assert names == ["cls_token"] + [f"reg_token[{i}]" for i in range(4)] and layers[0].grid == (8, 8)
        assert page.locator("#panel-0 .vggattn-tile").count() == 5  # the tiles show before any pointing
        img = page.locator("#input-image img").first
        box = img.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6)
        page.wait_for_function("window.vggattnHover.state().current !== null", timeout=10_000)
        x, y = page.evaluate("window.vggattnHover.state().current")
        for li, layer in enumerate(layers):  # the patch's row: on the grid and on each prefix token, as they are
            q = page.evaluate("([x, y, g]) => window.vggattnHover.queryIndex(x, y, g)", [x, y, list(layer.grid)])
            js = np.array(page.evaluate("([l, i]) => window.vggattnHover.fullRow(l, i, 'mean')", [li, q]))
            np.testing.assert_allclose(js, layer.full_row(q), rtol=1e-9, atol=1e-12)
            assert js.sum() == pytest.approx(1.0, abs=1e-9)
            shown = tile_weights(page, li)
            np.testing.assert_allclose([shown[t] for t in names], layer.full_row(q)[n:], rtol=1e-9, atol=1e-12)
        click_image_at(img, 0.5, 0.5)  # pin a patch: the readouts give its weight on each prefix token by name
        page.wait_for_function("document.querySelector('#status').innerText.includes('Pinned: pixel')", timeout=30_000)
        assert "reg_token[3]" in page.locator("#readouts").inner_text()
        page.mouse.move(5, 5)
        page.locator("#panel-1 .vggattn-tile[data-token='reg_token[2]']").click()  # a register's own row
        page.wait_for_function("window.vggattnHover.state().token === 'reg_token[2]'", timeout=10_000)
        page.wait_for_function("[...document.querySelectorAll('.vggattn-legend span')].every("
                               "s => s.textContent.includes(\"reg 2's own row\"))", timeout=10_000)
        for li, layer in enumerate(layers):
            js = np.array(page.evaluate("([l, i]) => window.vggattnHover.fullRow(l, i, 'mean')", [li, n + 3]))
            np.testing.assert_allclose(js, layer.full_row(n + 3), rtol=1e-9, atol=1e-12)
            assert page.evaluate(f"document.querySelector('#panel-{li} canvas.vggattn-hover').dataset.query") == str(n + 3)
            assert tile_weights(page, li)["reg_token[2]"] == pytest.approx(layer.full_row(n + 3)[n + 3], abs=1e-12)
        ARTIFACTS.mkdir(exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ARTIFACTS / "app-vit-registers-1440x900.png"))
        page.locator("input.vggattn-norms").check()  # the token norms entering each block, high-norm patches framed
        page.wait_for_function("[...document.querySelectorAll('.vggattn-legend span')].every("
                               "s => s.textContent.includes('token norms entering the block'))", timeout=10_000)
        for li, layer in enumerate(layers):
            cls = float(layer.norms[n] / np.median(layer.norms[:n]))
            shown = page.locator(f"#panel-{li} .vggattn-tile[data-token='cls_token'] span").inner_text()
            assert shown == f"{cls:.1f}x med", (shown, cls)
        page.screenshot(path=str(ARTIFACTS / "app-vit-norms-1440x900.png"))
        page.locator("input.vggattn-norms").uncheck()
        page.locator("input.vggattn-rollout").check()  # attention rollout up to each block: register 2's row
        page.wait_for_function("[...document.querySelectorAll('.vggattn-legend span')].every("
                               "s => s.textContent.includes('rollout (Abnar'))", timeout=10_000)
        for li, layer in enumerate(layers):
            shown = tile_weights(page, li)
            np.testing.assert_allclose([shown[t] for t in names], layer.rollout[n + 3, n:], atol=1e-3)  # float16
        page.locator("input.vggattn-rollout").uncheck()
        page.locator("input.vggattn-heads").check()  # one small map per head, of the same row
        page.wait_for_function(f"[...document.querySelectorAll('canvas.vggattn-hover')].filter(c => c.dataset.heads "
                               f"=== '6').length === {len(layers)}", timeout=10_000)
        for head in (0, 5):
            js = np.array(page.evaluate("([l, i, h]) => window.vggattnHover.fullRow(l, i, h)", [0, n + 3, str(head)]))
            np.testing.assert_allclose(js, layers[0].full_row(n + 3, head), rtol=1e-9, atol=1e-12)
        page.screenshot(path=str(ARTIFACTS / "app-vit-heads-1440x900.png"))
        page.locator("input.vggattn-heads").uncheck()
        page.locator("#panel-1 .vggattn-tile[data-token='reg_token[2]']").click()  # again: unpinned
        page.wait_for_function("window.vggattnHover.state().token === null", timeout=10_000)
        assert "Error" not in page.locator("body").inner_text()
        assert not errors, errors
    finally:
        page.close()


def test_every_view_of_a_transformers_app_at_a_phones_width(browser, served):
    """test_browser.py's phone test on the transformer's app (its colour scales are longer: the prefix tokens' share,
    the heads): at 390x844 every tab is on screen and a tap opens its view whole; every colour scale is read whole."""
    from test_browser import VIEW_CONTENT, every_view_at_phone_width, phone_page

    url, _ = served
    view = phone_page(browser, url)
    try:
        assert "prefix token" in view.locator("#panel-0 .vggattn-legend").inner_text()
        every_view_at_phone_width(view, set(VIEW_CONTENT) - {"Tokens"})
    finally:
        view.close()


def test_layers_past_the_budget_come_when_shown(browser, served, monkeypatch):
    """With a budget that holds one layer, the others travel when their panels show (fetched from the server by
    the page, as bytes), then draw the same rows; the phone layout shows the tiles too."""
    url, layers = served
    whole = len(__import__("json").dumps({k: v for k, v in layers[0].payload().items() if k not in ("u", "uc")}))
    monkeypatch.setattr(hover, "PAYLOAD_BUDGET", whole + 100_000)  # the picture and one layer
    page, errors = open_page(browser, url, 390, 844)
    try:
        assert page.evaluate("window.vggattnHover.state().sent") < whole + 100_000  # one layer and the picture
        for li in range(len(layers)):
            page.locator(f"#panel-{li}").scroll_into_view_if_needed()
        page.wait_for_function(f"window.vggattnHover.loaded() === {len(layers)}", timeout=30_000)
        assert len(page.evaluate("window.vggattnHover.fetched")) == len(layers) - 1
        for li, layer in enumerate(layers):
            js = np.array(page.evaluate("([l, i]) => window.vggattnHover.fullRow(l, i, 'mean')", [li, 5]))
            np.testing.assert_allclose(js, layer.full_row(5), rtol=1e-9, atol=1e-12)
        page.locator("#input-image").scroll_into_view_if_needed()
        img = page.locator("#input-image img").first
        click_image_at(img, 0.4, 0.4)
        page.wait_for_function("document.querySelector('#status').innerText.includes('Pinned: pixel')", timeout=30_000)
        page.locator("#panel-0").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "app-vit-registers-390x844.png"))
        assert "Error" not in page.locator("body").inner_text()
        assert not errors, errors
    finally:
        page.close()


def test_a_random_walk_through_a_transformers_app_never_shows_an_error(browser, served, tmp_path):
    """The seeded random walk of test_browser.py on the transformer's app (VGGATTN_RANDOM_STEPS, 30 by default):
    uploads of many sizes and kinds, pointer moves, clicks on the picture and on the prefix tokens' tiles, every
    control, the column view, the token-norm view, every tab, ablation and export. After every step: no "Error" on
    the page and no uncaught page error; a click on the picture is named in the status."""
    import random

    from test_browser import (random_click, random_control, random_export, random_move, random_upload, settled,
                              upload_kinds)

    url, layers = served
    steps = int(os.environ.get("VGGATTN_RANDOM_STEPS", "30"))
    rng = random.Random(1)
    kinds = upload_kinds(tmp_path)
    view, errors = open_page(browser, url)
    img = view.locator("#input-image img").first
    log = []

    def upload():
        random_upload(view, kinds, rng, log)

    def click():
        random_click(view, img, rng, log)

    def tile():
        tiles = view.locator(".vggattn-tile")
        if tiles.count():
            i = rng.randrange(tiles.count())
            log.append(f"tile {i}")
            tiles.nth(i).click()

    def move():
        random_move(view, img, rng, log)

    def control():
        random_control(view, rng, log)

    def switch():
        boxes = view.locator("#hover input[type=checkbox]")
        if boxes.count():
            i = rng.randrange(boxes.count())
            log.append(f"switch {i}")
            boxes.nth(i).click()

    def tab():
        names = [n.strip() for n in view.get_by_role("tab").all_inner_texts() if n.strip()]
        name = rng.choice([n for n in names if n not in ("Dataset", "Compare")] or names)
        log.append(f"tab {name}")
        view.get_by_role("tab", name=name, exact=True).first.click()

    def ablation():
        log.append("ablation")
        view.get_by_role("tab", name="Ablation").click()
        options = view.locator("#layers-off input[type=checkbox]")
        options.nth(rng.randrange(options.count())).click()
        view.locator("#ablate").click()
        settled(view)

    def export():
        random_export(view, log)

    actions = [upload] * 3 + [click] * 3 + [tile] * 2 + [move] * 4 + [control] * 3 + [switch] * 2 + \
        [tab, tab, ablation, export]
    try:
        for _ in range(steps):
            rng.choice(actions)()
            settled(view)
            text = view.locator("body").inner_text()
            assert "Error" not in text and not errors, (log[-5:], errors, text[:300])
        settled(view)
        assert "Error" not in view.locator("body").inner_text() and not errors, (log[-5:], errors)
    finally:
        view.close()


def test_the_transformers_app_answers_bad_api_calls_in_one_sentence_and_keeps_serving(served, tmp_path):
    """The API of the transformer's app under bad input (gradio_client): files that are no image, a truncated one,
    a decompression bomb, points outside the picture; each is one sentence, no traceback, and the next good request
    is answered with the model's classes."""
    from gradio_client import Client, handle_file
    from test_app_hardening import bad_files

    url, _ = served
    client = Client(url, verbose=False)
    for name, words in bad_files(tmp_path).items():
        with pytest.raises(Exception) as e:
            client.predict(handle_file(str(tmp_path / name)), api_name="/analyze")
        msg = str(e.value)
        assert words in msg and "Traceback" not in msg and msg.count("\n") == 0, (name, msg)
        labels, _ = client.predict(handle_file(str(CHURCH)), api_name="/analyze")
        assert {c["label"] for c in labels["confidences"]} <= {f"c{i}" for i in range(5)}
    rng = np.random.default_rng(0)
    for x, y in [(-1, 5), (5, -3), (224, 5), (5, 224), *rng.integers(-50, 400, (6, 2)).tolist()]:
        inside = 0 <= x < 224 and 0 <= y < 224
        try:
            *paths, info = client.predict(handle_file(str(CHURCH)), x, y, api_name="/attention_at")
            assert inside and len(info) == len(served[1]), (x, y)
        except Exception as e:  # noqa: BLE001 (gradio_client raises a plain AppError)
            assert not inside and "outside" in str(e) and "Traceback" not in str(e), (x, y, str(e))
    labels, _ = client.predict(handle_file(str(CHURCH)), api_name="/analyze")
    assert len(labels["confidences"]) == 5
