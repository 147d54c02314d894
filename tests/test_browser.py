"""A real browser: Chromium (Debian's) driven by Playwright, against the app on 127.0.0.1.

Runs in CI (CI=true: .ci/run installs chromium; a missing browser fails there). Elsewhere, without
/usr/bin/chromium, it skips with a one-line reason. Leaves a screenshot in artifacts/.
"""

import os
from pathlib import Path

import pytest

from vggattn import app
from server import running_app

from conftest import CHROMIUM, FLAGS  # noqa: E402,F401  (Debian's Chromium and its flags; the browser fixture)
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Chromium not installed (apt-get install -y chromium); CI always runs this test", allow_module_level=True)


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with running_app(real=True) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(url)
        yield page
        browser.close()


def app_url(page) -> str:
    """The app's address without the link the page keeps in it (a view of an example photo: `vggattn.app.on_link`)."""
    return page.url.split("?")[0]


def jpeg_of(rgb) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=90)
    return out.getvalue()


def panel_sources(page) -> list[str]:
    return [page.locator(f"#panel-{i} img").first.get_attribute("src") or "" for i in range(3)]


def click_image_at(img, fx: float, fy: float) -> None:
    """Click the picture at fractions (fx, fy) of its size (the <img> box letterboxes it: object-fit)."""
    bw, bh, nw, nh, fit = img.evaluate(
        "e => [e.clientWidth, e.clientHeight, e.naturalWidth, e.naturalHeight, getComputedStyle(e).objectFit]")
    scale = min(bw / nw, bh / nh, 1.0 if fit == "scale-down" else float("inf"))
    x0, y0 = (bw - nw * scale) / 2, (bh - nh * scale) / 2
    img.click(position={"x": x0 + fx * nw * scale, "y": y0 + fy * nh * scale})


def settled(view, timeout: int = 60_000) -> None:
    """Wait until no Gradio event is pending: no loading tracker (progress text, eta bar, pending or translucent
    overlay) on the page at two checks 50 ms apart. A condition, not a fixed sleep."""
    view.wait_for_function("""() => {
        const busy = document.querySelectorAll('.progress-text, .eta-bar, .pending, .generating, .wrap.translucent');
        window.__vggattnIdle = busy.length ? 0 : (window.__vggattnIdle || 0) + 1;
        return window.__vggattnIdle >= 2; }""", polling=50, timeout=timeout)


def open_upload_and_click_centre(view, url: str) -> None:
    """A fresh page: open the app, upload the church photo, click its centre, wait for the server's answer."""
    view.goto(url)
    view.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
    view.locator("#input-image input[type=file]").set_input_files(str(app.HERE / "assets" / "church.jpg"))
    view.wait_for_function("document.querySelector('#predictions') && "
                           "document.querySelector('#predictions').innerText.includes('%')", timeout=60_000)
    img = view.locator("#input-image img").first
    img.wait_for(state="visible", timeout=30_000)
    click_image_at(img, 112.5 / 224, 112.5 / 224)  # the middle of pixel (112, 112), not its corner
    view.wait_for_function("document.querySelector('#status').innerText.includes('Pinned: pixel (112, 112)')",
                           timeout=30_000)


def test_upload_click_and_see_three_overlays(page):
    page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
    page.locator("#input-image input[type=file]").set_input_files(str(app.HERE / "assets" / "church.jpg"))
    page.wait_for_function("document.querySelector('#predictions') && "
                           "document.querySelector('#predictions').innerText.includes('%')", timeout=60_000)
    assert "features.30" in page.locator("#gammas").inner_text()

    img = page.locator("#input-image img").first
    img.wait_for(state="visible", timeout=30_000)
    page.wait_for_function("window.vggattnHover && window.vggattnHover.ready()", timeout=30_000)
    click_image_at(img, 0.3, 0.4)
    page.wait_for_function("document.querySelector('#status').innerText.includes('Pinned: pixel (67, 89)')",
                           timeout=30_000)  # 0.3 and 0.4 of the 224 px photo
    # The page drew the pin (three canvases over the panels); the server sent the readouts and no pictures
    first = hover_canvases(page)
    assert all(c and c[2] == "block" for c in first) and len({c[3] for c in first}) == 3
    assert page.evaluate("[0,1,2].every(i => !document.querySelector(`#panel-${i} img`))")
    assert page.evaluate("window.vggattnHover.state().pinned") == [67, 89]
    assert page.locator("#readouts").inner_text().count("features.") >= 3
    for i, layer in enumerate(["features.14", "features.22", "features.30"]):
        assert layer in page.locator(f"#panel-{i}").inner_text()

    click_image_at(img, 0.8, 0.85)
    page.wait_for_function("!document.querySelector('#status').innerText.includes('Pinned: pixel (67, 89)')",
                           timeout=30_000)
    assert all(a[3] != b[3] for a, b in zip(first, hover_canvases(page)))
    # nothing of the session is copied into the browser's storage (Gradio's run history is off: it re-wrote every
    # event's inputs and outputs, the payload included, into localStorage at every event)
    assert page.evaluate("Object.keys(localStorage).filter(k => k.startsWith('gradio:run-history'))") == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)


def move_to(page, img, fx: float, fy: float) -> None:
    """Move the pointer to fractions (fx, fy) of the picture (letterboxed inside the <img> box)."""
    box = img.bounding_box()
    bw, bh, nw, nh, fit = img.evaluate(
        "e => [e.clientWidth, e.clientHeight, e.naturalWidth, e.naturalHeight, getComputedStyle(e).objectFit]")
    scale = min(bw / nw, bh / nh, 1.0 if fit == "scale-down" else float("inf"))
    page.mouse.move(box["x"] + (bw - nw * scale) / 2 + fx * nw * scale, box["y"] + (bh - nh * scale) / 2 + fy * nh * scale)


def hover_canvases(page) -> list:
    """Per panel: [query index, view, display, PNG data URL] of its hover canvas."""
    return page.evaluate("[0,1,2].map(i => { const c = document.querySelector(`#panel-${i} canvas.vggattn-hover`);"
                         " return c ? [c.dataset.query, c.dataset.view, c.style.display, c.toDataURL()] : null; })")


def test_hover_follows_the_pointer_with_no_request(page):
    """Runs after the click test (the church is uploaded): three pointer moves redraw all three panels
    in the page, no request reaches the server in between, and leaving the image shows the pinned point."""
    page.wait_for_function("window.vggattnHover && window.vggattnHover.state().layers === 3", timeout=30_000)
    img = page.locator("#input-image img").first
    requests = []
    record = lambda r: requests.append(r.url)  # noqa: E731
    page.on("request", record)
    seen = []
    for fx, fy in [(0.2, 0.3), (0.55, 0.6), (0.85, 0.15)]:
        move_to(page, img, fx, fy)
        page.wait_for_function("(n) => window.vggattnHover.latencies.length > n", arg=len(page.evaluate(
            "window.vggattnHover.latencies")) - 1, timeout=10_000)
        seen.append(hover_canvases(page))
    page.remove_listener("request", record)
    assert requests == [], requests  # nothing asked of the server between moves
    for before, after in zip(seen, seen[1:]):
        for a, b in zip(before, after):
            assert a[2] == b[2] == "block" and a[0] != b[0] and a[3] != b[3]  # every panel changed
    line = page.locator("#hover").inner_text()
    assert "Under the pointer: pixel (190, 33)" in line and "features.30" in line, line  # 0.85, 0.15 of the 224 px photo

    page.mouse.move(2, 2)  # off the image: the page draws the pinned point (the last click) again
    pinned = page.evaluate("window.vggattnHover.state().pinned")
    page.wait_for_function("window.vggattnHover.state().current === null", timeout=10_000)
    assert "Pinned: pixel (%d, %d)" % tuple(pinned) in page.locator("#hover").inner_text()
    queries = [q for q, *_ in hover_canvases(page)]
    assert queries == [str(page.evaluate("([x, y, l]) => window.vggattnHover.queryIndex(x, y, [l, l])", [*pinned, g]))
                       for g in (64, 32, 16)]


def test_hover_pixel_is_the_click_pixel(page):
    """The page maps the pointer to the same pixel as Gradio's click (.select), hence the same queries."""
    img = page.locator("#input-image img").first
    move_to(page, img, 0.37, 0.71)
    page.wait_for_function("window.vggattnHover.state().current !== null", timeout=10_000)
    x, y = page.evaluate("window.vggattnHover.state().current")
    page.mouse.down()
    page.mouse.up()
    page.wait_for_function(f"document.querySelector('#status').innerText.includes('Pinned: pixel ({x}, {y})')", timeout=30_000)
    queries = [int(c[0]) for c in hover_canvases(page)]
    assert f"features.14: {queries[0]}, features.22: {queries[1]}, features.30: {queries[2]}" in \
        page.locator("#status").inner_text()
    assert page.evaluate("window.vggattnHover.state().pinned") == [x, y]


def test_browser_rows_and_columns_equal_the_servers(page):
    """The page's row of a query equals the article's softmax(q . K) from the block's Q and K to 1e-4, its column
    A[:, j] the full map's."""
    import numpy as np
    from PIL import Image

    import torch

    import vggattn
    from vggattn.analysis import analyze

    result = analyze(*vggattn.load_checkpoint(device="cpu"), Image.open(app.HERE / "assets" / "church.jpg"))
    for li, block in enumerate(result.blocks):
        sink = block.sink[0]
        full = torch.softmax(block.maps.query[0, 0] @ block.maps.key[0, 0].T, dim=-1).numpy()  # (N, N)
        n = len(full)
        for q in sorted({0, n // 3, n - 1, sink}):
            js = np.array(page.evaluate("([l, q]) => window.vggattnHover.row(l, q)", [li, q]))
            np.testing.assert_allclose(js, full[q], atol=1e-4, rtol=0)
        for j in sorted({sink, n // 2}):
            js = np.array(page.evaluate("([l, j]) => window.vggattnHover.column(l, j)", [li, j]))
            np.testing.assert_allclose(js, full[:, j], atol=1e-4, rtol=0)


def test_the_pages_dot_products_in_webassembly_equal_float64_sums(page):
    """The rows' dot products run in WebAssembly SIMD (web/dots.wasm) in Chromium, and equal float64 sums of the
    float32 inputs as the JavaScript loop's do, for every width the kernel takes (c % 4 == 0) and one it leaves
    to the loop."""
    import numpy as np

    assert page.evaluate("window.vggattnHover.simd"), "WebAssembly SIMD did not load in Chromium"
    rng = np.random.default_rng(0)
    for c in (4, 8, 12, 64, 6):
        a = rng.normal(size=c).astype(np.float32)
        b = (rng.normal(size=(37, c)) * 100).astype(np.float32)
        want = b.astype(np.float64) @ a.astype(np.float64)
        for how in ("wasm", "loop"):
            got = np.array(page.evaluate("([a, b, n, c, how]) => window.vggattnHover.dots(a, b, n, c, how)",
                                         [a.tolist(), b.ravel().tolist(), 37, c, how]))
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"c={c} {how}")


def test_scale_control_reaches_the_page(page):
    """The Scale radio sets the page's scale without a request, and back."""
    page.locator("#scale").get_by_label("log").check()
    page.wait_for_function("window.vggattnHover.state().controls.scale === 'log'", timeout=10_000)
    page.locator("#scale").get_by_label("linear").check()
    page.wait_for_function("window.vggattnHover.state().controls.scale === 'linear'", timeout=10_000)


def page_picture(view, layer: int, x: int, y: int, how: str):
    """The page's picture of layer `layer` at pixel (x, y), at the display copy's size: (h, w, 3) uint8."""
    import base64

    import numpy as np

    w, h, b64 = view.evaluate("([l, x, y, how]) => window.vggattnHover.picture(l, x, y, how)", [layer, x, y, how])
    return np.frombuffer(base64.b64decode(b64), dtype=np.uint8).reshape(h, w, 3)


def test_page_and_server_draw_the_same_pictures(page, tmp_path):
    """One picture, two renderers: for a photo the server draws on a smaller copy (700x450 -> 512x329), the page's
    hover render equals the server's pinned render (`PageLayer.picture`) within 2/255 at every pixel, for linear and
    log, smooth and blocky, row and column, numbered or not, in every layer."""
    import itertools

    import numpy as np
    from PIL import Image

    import vggattn
    from vggattn.analysis import analyze
    from vggattn.view.hover import page_layer

    photo = Image.open(app.HERE / "assets" / "parachute.jpg").convert("RGB").resize((700, 450))
    photo.save(tmp_path / "wide.png")
    result = analyze(*vggattn.load_checkpoint(device="cpu"), photo)
    layers = [page_layer(b.name, b.maps, b.family) for b in result.blocks]  # as the app sends them
    view = page.context.browser.new_page(viewport={"width": 1440, "height": 900})
    try:
        view.goto(app_url(page))
        view.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
        view.locator("#input-image input[type=file]").set_input_files(str(tmp_path / "wide.png"))
        view.wait_for_function("window.vggattnHover && window.vggattnHover.ready()", timeout=60_000)
        assert view.evaluate("window.vggattnHover.state().layers") == 3
        worst = {}
        for (scale, mode, how, mark), (x, y) in zip(
                itertools.product(("linear", "log"), ("smooth", "blocky"), ("row", "column"), (True, False)),
                itertools.cycle([(350, 225), (0, 0), (699, 449), (123, 401), (612, 37)])):
            controls = {"opacity": 0.8, "colormap": "inferno" if mark else "jet", "mode": mode, "mark": mark, "scale": scale}
            view.evaluate("(c) => window.vggattnHover.setControls(c)", controls)
            for li, layer in enumerate(layers):
                picture, _, _ = layer.picture(result.display, result.size, (x, y), view=how, scale=scale, mode=mode,
                                              colormap=controls["colormap"], opacity=controls["opacity"],
                                              top_k=5 if mark else 0)
                drawn = page_picture(view, li, x, y, how)
                assert drawn.shape == picture.shape == (329, 512, 3)
                diff = np.abs(drawn.astype(int) - picture.astype(int))
                worst[(scale, mode, how, mark, li)] = (int(diff.max()), int((diff > 0).any(-1).sum()))
        print("largest difference, pixels differing:", sorted(set(worst.values())))
        assert all(d <= 2 for d, _ in worst.values()), {k: v for k, v in worst.items() if v[0] > 2}
    finally:
        view.close()


def test_column_view_of_a_sink_lights_every_query(page):
    """A hand-made layer where every query puts all its attention on one cell: in the "who looks here"
    view, that cell's column lights the whole image; another cell's column stays dark."""
    import types

    import numpy as np
    import torch

    from vggattn.attention.adapters import BlockMaps
    from vggattn.view.hover import page_layer, page_payload
    from vggattn.view.render import palette

    grid, sink = (8, 8), 19
    key = torch.zeros(1, 1, 64, 4)
    key[0, 0, sink, 0] = 10.0
    query = torch.zeros(1, 1, 64, 4)
    query[0, 0, :, 0] = 10.0  # q_i . k_sink = 100, every other logit 0: one-hot rows
    layers = [page_layer(f"l{i}", BlockMaps("test", query, key, grid, grid), "test", "qk") for i in range(3)]
    fake = types.SimpleNamespace(display=np.full((64, 64, 3), 128, np.uint8), size=(64, 64),
                                 display_jpeg=jpeg_of(np.full((64, 64, 3), 128, np.uint8)))
    view = page.context.browser.new_page(viewport={"width": 1440, "height": 900})
    try:
        view.goto(app_url(page))
        view.wait_for_function("window.vggattnHover && document.querySelector('#panel-2')", timeout=60_000)
        view.evaluate("(p) => { window.vggattnHover.load(p); window.vggattnHover.setControls("
                      "{opacity: 1, colormap: 'jet', mark: false}); window.vggattnHover.setView('column'); }",
                      page_payload(fake, layers))
        top = palette("jet")[-1].tolist()
        pick = """([x, y]) => { window.vggattnHover.draw(x, y);
            return [0,1,2].map(i => { const c = document.querySelector(`#panel-${i} canvas.vggattn-hover`);
              const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, top = %s;
              let lit = 0, drawn = 0;
              for (let o = 0; o < d.length; o += 4) { if (d[o + 3] === 0) continue; drawn++;
                if (d[o] === top[0] && d[o + 1] === top[1] && d[o + 2] === top[2]) lit++; }
              return lit / drawn; }); }""" % top
        cell = 64 / 8
        lit = view.evaluate(pick, [int((sink % 8 + 0.5) * cell), int((sink // 8 + 0.5) * cell)])
        assert all(f > 0.95 for f in lit), lit  # every query's position lit (the marks cover the rest)
        assert all(np.array(view.evaluate("window.vggattnHover.column(0, %d)" % sink)) > 0.99)
        dark = view.evaluate(pick, [int(0.5 * cell), int(0.5 * cell)])  # cell 0: nobody looks there
        assert all(f < 0.05 for f in dark), dark
    finally:
        view.close()


def test_controls_reach_the_hover_view(page):
    """Upsampling set to blocky: the page's controls follow, and the same point redraws blocky."""
    img = page.locator("#input-image img").first
    move_to(page, img, 0.4, 0.4)
    page.wait_for_function("window.vggattnHover.state().current !== null", timeout=10_000)
    smooth = hover_canvases(page)
    page.get_by_label("blocky").check()  # the pointer leaves the image for the radio button
    page.wait_for_function("window.vggattnHover.state().controls.mode === 'blocky'", timeout=10_000)
    move_to(page, img, 0.4, 0.4)
    page.wait_for_function("window.vggattnHover.state().current !== null", timeout=10_000)
    blocky = hover_canvases(page)
    assert all(a[0] == b[0] and a[3] != b[3] for a, b in zip(smooth, blocky))  # same queries, drawn anew
    page.get_by_label("smooth").check()
    page.wait_for_function("window.vggattnHover.state().controls.mode === 'smooth'", timeout=10_000)


def test_clicks_render_through_the_server_when_the_hover_script_fails(page):
    """The hover script made to throw on load: no canvases, and a click still fills the three panels."""
    view = page.context.browser.new_page(viewport={"width": 1440, "height": 900})
    errors = []
    view.on("pageerror", lambda e: errors.append(str(e)))

    def broken(route):  # the page's config carries the script: make it throw at its first line
        body = route.fetch().text()
        assert "const K = props;" in body
        route.fulfill(body=body.replace("const K = props;", "throw new Error('hover script blocked');"),
                      headers={"content-type": "text/html; charset=utf-8"})

    try:
        view.route(app_url(page), broken)
        open_upload_and_click_centre(view, app_url(page))
        view.wait_for_function("[0,1,2].every(i => document.querySelector(`#panel-${i} img`))", timeout=30_000)
        assert view.evaluate("document.querySelectorAll('canvas.vggattn-hover').length") == 0
        assert view.evaluate("typeof window.vggattnHover") == "undefined"
    finally:
        view.close()


def test_tabs_contribution_ablation_and_export(page):
    """Runs after the click test on the same page: the readouts and every tab work in a browser."""
    readouts = page.locator("#readouts").inner_text()
    assert all(layer in readouts for layer in ("features.14", "features.22", "features.30")), readouts
    assert "entropy" in readouts
    assert page.locator("#contribution-0 img").first.get_attribute("src")  # first tab, filled at upload

    page.get_by_role("tab", name="Query dependence").click()
    page.wait_for_function("document.querySelector('#mean-map-2 img')", timeout=30_000)
    assert "JSD" in page.locator("#dependence").inner_text()

    page.get_by_role("tab", name="Ablation").click()
    page.locator("#layers-off").get_by_label("features.14").check()
    page.locator("#ablate").click()
    page.wait_for_function("document.querySelector('#ablation-verdict').innerText.includes('Top-1')", timeout=30_000)
    assert "features.14: off" in page.locator("#ablation").inner_text()

    page.get_by_role("tab", name="Grad-CAM").click()
    page.wait_for_function("document.querySelector('#gradcam img')", timeout=30_000)

    page.get_by_role("tab", name="Export").click()
    page.locator("#export-button").click()
    page.wait_for_function("document.querySelector('#export') && document.querySelector('#export').innerText.includes('.zip')",
                           timeout=60_000)
    x, y = page.evaluate("window.vggattnHover.state().pinned")  # the last click of the tests above
    assert f"vggattn-export-x{x}-y{y}" in page.locator("#export").inner_text()
    assert "vggattn-export" in page.locator("#export-html").inner_text()  # the live view as one file beside it

    page.get_by_role("tab", name="Compare").click()  # A/B: this image and model against its Q and K re-initialised
    page.locator("#compare-button").click()
    page.wait_for_function("document.querySelector('#compare-view iframe')", timeout=60_000)
    ab = page.frame_locator("#compare-view iframe")

    def frames():  # the live frames by their element's id
        out = {}
        for f in page.frames:
            if f != page.main_frame and not f.is_detached():
                out[f.frame_element().get_attribute("id")] = f
        return out
    page.wait_for_function("document.querySelector('#compare-view iframe').contentWindow.vggattnCompare"
                           " && document.querySelector('#compare-view iframe').contentWindow.vggattnCompare.ready",
                           timeout=60_000)
    side_a, side_b = frames()["side-a"], frames()["side-b"]
    assert side_a.evaluate("window.vggattnHover.state().pinned") == [x, y] == side_b.evaluate(
        "window.vggattnHover.state().pinned")  # the same image: the same pixel
    picture_a = ab.frame_locator("#side-a").locator("#input-image img")
    picture_a.scroll_into_view_if_needed()
    box = picture_a.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.2)
    page.wait_for_function("() => { const w = document.querySelector('#compare-view iframe').contentWindow; "
                           "return w.document.getElementById('side-b').contentWindow.vggattnHover.state().current; }",
                           timeout=10_000)
    assert side_b.evaluate("window.vggattnHover.state().current") == side_a.evaluate("window.vggattnHover.state().current")
    assert "re-initialised" in ab.locator("h2").nth(1).inner_text()
    assert "compare" in page.locator("#compare-file").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app-compare.png"), full_page=True)
    assert "Error" not in page.locator("body").inner_text()


def test_a_link_opens_the_same_view(page):
    """The address bar carries the view of an example photo: opening ?example=church.jpg&x=60&y=150&... analyses it,
    pins the point (server and page) and sets the controls; a click and a control change rewrite the address, and
    that address opened in a new page gives the same view; a link to a photo the app lacks is a warning."""
    from urllib.parse import parse_qs, urlparse

    base = app_url(page)
    view = page.context.browser.new_page(viewport={"width": 1440, "height": 900})
    try:
        view.goto(base + "?example=church.jpg&x=60&y=150&colormap=jet&scale=log&column=1")
        view.wait_for_function("window.vggattnHover && window.vggattnHover.ready() && window.vggattnHover.state().pinned",
                               timeout=60_000)
        state = view.evaluate("window.vggattnHover.state()")
        assert state["pinned"] == [60, 150] and state["view"] == "column"
        view.wait_for_function("window.vggattnHover.state().controls.colormap === 'jet'", timeout=10_000)
        assert view.evaluate("window.vggattnHover.state().controls.scale") == "log"
        view.wait_for_function("document.querySelector('#status').innerText.includes('Pinned: pixel (60, 150)')",
                               timeout=30_000)
        assert "church" in view.locator("#predictions").inner_text()
        click_image_at(view.locator("#input-image img").first, 0.8, 0.3)
        view.wait_for_function("!location.search.includes('x=60&')", timeout=10_000)
        view.locator("#scale").get_by_label("linear").check()
        view.wait_for_function("location.search.includes('scale=linear')", timeout=10_000)
        link = view.url
        q = {k: v[0] for k, v in parse_qs(urlparse(link).query).items()}
        assert q["example"] == "church.jpg" and [int(q["x"]), int(q["y"])] == view.evaluate(
            "window.vggattnHover.state().pinned") and q["column"] == "1"
        again = page.context.browser.new_page(viewport={"width": 1440, "height": 900})
        again.goto(link)
        again.wait_for_function("window.vggattnHover && window.vggattnHover.ready() && window.vggattnHover.state().pinned",
                                timeout=60_000)
        assert again.evaluate("window.vggattnHover.state().pinned") == [int(q["x"]), int(q["y"])]
        again.wait_for_function("window.vggattnHover.state().controls.scale === 'linear'", timeout=10_000)
        again.close()
        view.goto(base + "?example=nothing-like-it.jpg&x=1&y=1")
        view.wait_for_function("document.body.innerText.includes('which this app does not have')", timeout=30_000)
        assert "Upload an image to begin" in view.locator("#status").inner_text()
        view.goto(base + "?example=church.jpg&x=5&y=5&colormap=plaid")  # a value no control takes: said, not set
        view.wait_for_function("document.body.innerText.includes('could not be read')", timeout=30_000)
        view.wait_for_function("window.vggattnHover && window.vggattnHover.ready()", timeout=60_000)
        assert "Error" not in view.locator("body").inner_text()
    finally:
        view.close()


def test_dataset_tab_shows_the_shipped_study(page):
    """The shipped study in the app: headline, tables and figures."""
    page.get_by_role("tab", name="Dataset").click()
    page.wait_for_function("document.querySelector('#study') && document.querySelector('#study').innerText.includes('Interventions')",
                           timeout=30_000)
    text = page.locator("#study").inner_text()
    assert "features.22" in text and "sink-dominated" in text and "all:mean" in text, text[:500]
    assert "Faithfulness" in text and "sink's anatomy" in text
    for name in ("interventions", "sink_heatmaps", "distributions", "faithfulness"):
        assert page.locator(f"#study-{name} img").first.get_attribute("src")


def test_study_report_opens_offline_with_its_figures(page, tmp_path):
    """The HTML report of a (tiny) study in Chromium from file://: tables there, every figure decoded."""
    from test_study import tiny_checkpoint
    from vggattn import study

    _, _, ckpt, data = tiny_checkpoint(tmp_path, per_class=2)
    assert study.main(["--checkpoint", str(ckpt), "--data", str(data), "--out",
                       str(tmp_path / "study"), "--workers", "0", "--sanity-images", "2", "--bootstrap", "100",
                       "--device", "cpu"]) == 0
    report = page.context.browser.new_page(viewport={"width": 1300, "height": 1000})  # the module's Chromium
    requests = []
    report.on("request", lambda r: requests.append(r.url))
    report.goto((tmp_path / "study" / "report.html").as_uri())
    report.wait_for_load_state("load")
    assert report.locator("table").count() >= 4
    widths = report.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 5 and all(w > 100 for w in widths), widths  # 4 figures + the faithfulness curves
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing fetched from a network
    assert "features.30:uniform" in report.inner_text("body")
    ARTIFACTS.mkdir(exist_ok=True)
    report.screenshot(path=str(ARTIFACTS / "study-report.png"), full_page=True)
    report.close()


@pytest.mark.parametrize("width,height", [(1440, 900), (1366, 768), (390, 844)])
def test_layout_image_and_panels(page, width, height):
    """1440x900: the image and the three panels all above the fold, equally large; 1366x768: none of
    them overlap; a 390 px phone: they stack. Screenshots go to artifacts/."""
    view = page.context.browser.new_page(viewport={"width": width, "height": height})
    try:
        open_upload_and_click_centre(view, app_url(page))
        boxes = [view.locator(s).bounding_box() for s in ("#input-image", "#panel-0", "#panel-1", "#panel-2")]
        ARTIFACTS.mkdir(exist_ok=True)
        view.screenshot(path=str(ARTIFACTS / f"app-{width}x{height}.png"))
    finally:
        view.close()
    for i, a in enumerate(boxes):  # no two overlap, at any size
        for b in boxes[i + 1:]:
            apart = (a["x"] + a["width"] <= b["x"] + 1 or b["x"] + b["width"] <= a["x"] + 1 or
                     a["y"] + a["height"] <= b["y"] + 1 or b["y"] + b["height"] <= a["y"] + 1)
            assert apart, (a, b)
    if width >= 1366:  # one row, as large as the image
        assert all(abs(b["y"] - boxes[0]["y"]) < 2 and abs(b["width"] - boxes[0]["width"]) < 2 for b in boxes), boxes
    if (width, height) == (1440, 900):
        assert all(b["y"] >= 0 and b["y"] + b["height"] <= height for b in boxes), boxes  # no scrolling needed
    if width < 500:  # a phone: one under another
        assert all(abs(b["x"] - boxes[0]["x"]) < 2 for b in boxes) and [b["y"] for b in boxes] == sorted(b["y"] for b in boxes)


PHONE = {"width": 390, "height": 844}
# What each view shows once its tab is tapped, and what it runs there (Ablation, Export and Compare have a button)
VIEW_CONTENT = {"Effective contribution": "#contribution-0", "Query dependence": "#dependence", "Ablation": "#ablate",
                "Grad-CAM": "#gradcam", "Across layers": "#across-note", "Export": "#export-button",
                "Compare": "#compare-button", "Blocks": "#blocks", "Dataset": "#study", "Tokens": "#tokens-note"}
# What keeps a view from being read whole at the page's width, as sentences: the page wider than the screen, a
# "..." menu of tabs, a tab button hidden, cut or past an edge, not one view shown, anything of the view shown past
# an edge (in a table that scrolls sideways is fine) or its text cut, a picture's label under its buttons, a panel's
# colour scale cut or out of its panel
PHONE_PROBLEMS = """() => {
  const out = [], W = innerWidth, name = e => `${e.tagName.toLowerCase()}${e.id ? '#' + e.id : ''} "${(e.innerText || '').trim().slice(0, 40)}"`;
  const shown = e => { const r = e.getBoundingClientRect(), s = getComputedStyle(e);
    return r.width > 1 && r.height > 1 && s.visibility !== 'hidden' && s.display !== 'none'; };
  const scrolled = e => { for (let a = e.parentElement; a && a !== document.body; a = a.parentElement) {
    const o = getComputedStyle(a).overflowX;
    if ((o === 'auto' || o === 'scroll') && (a.tagName === 'TABLE' || a.closest('[data-testid=dataframe], .table-wrap')))
      return true; } return false; };
  const meet = (a, b) => a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1;
  const cut = e => { const s = getComputedStyle(e);
    return (['hidden', 'clip'].includes(s.overflowX) || s.textOverflow === 'ellipsis') && e.scrollWidth > e.clientWidth + 1
      && [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()); };
  const past = (e, left, right) => { const r = e.getBoundingClientRect(); return r.left < left - 1 || r.right > right + 1; };
  if (document.documentElement.scrollWidth > W) out.push(`the page is ${document.documentElement.scrollWidth} px wide`);
  document.querySelectorAll('.overflow-menu, .overflow-dropdown').forEach(m => { if (shown(m)) out.push('a menu of tabs shows'); });
  document.querySelectorAll('[role=tab]').forEach(t => {
    if (!shown(t)) out.push(`tab ${name(t)} hidden`);
    else if (past(t, 0, W)) out.push(`tab ${name(t)} past the edge`);
    if (t.scrollWidth > t.clientWidth + 1) out.push(`tab ${name(t)} cut`); });
  const views = [...document.querySelectorAll('#views [role=tabpanel]')].filter(shown);
  if (views.length !== 1) out.push(`${views.length} views shown`);
  for (const v of views) for (const e of [v, ...v.querySelectorAll('*')]) {
    if (!shown(e)) continue;
    if (past(e, 0, W) && !scrolled(e)) out.push(`${name(e)} past the edge`);
    if (cut(e)) out.push(`${name(e)} cut (${e.scrollWidth} > ${e.clientWidth} px)`);
    if (e.matches('label[data-testid=block-label]')) for (const b of e.parentElement.querySelectorAll('.icon-button-wrapper'))
      if (shown(b) && meet(e.getBoundingClientRect(), b.getBoundingClientRect())) out.push(`${name(e)} under its buttons`); }
  for (const e of document.querySelectorAll('#hover *')) if (shown(e) && past(e, 0, W)) out.push(`${name(e)} past the edge`);
  document.querySelectorAll('.vggattn-legend').forEach(l => {
    if (!shown(l)) return;
    const box = l.closest('[id^=panel-]').getBoundingClientRect(), r = l.getBoundingClientRect(), s = l.querySelector('span');
    if (past(l, Math.max(0, box.left), Math.min(W, box.right)) || r.top < box.top - 1 || r.bottom > box.bottom + 1)
      out.push(`${name(l)} out of its panel`);
    if (l.scrollWidth > l.clientWidth + 1 || l.scrollHeight > l.clientHeight + 1 || s.scrollWidth > s.clientWidth + 1)
      out.push(`${name(l)} cut`); });
  return out; }"""


def open_view(view, name: str, act: bool = True) -> None:
    """Tap the view's tab (Playwright's tap: on screen and nothing over it, or it fails), see it selected and its
    content shown; act: run what it runs (a block ablated, an export, the A/B comparison) and wait for the answer."""
    tab = view.get_by_role("tab", name=name, exact=True)
    tab.tap()
    view.wait_for_function("(t) => [...document.querySelectorAll('[role=tab]')].some(b => b.innerText.trim() === t "
                           "&& b.getAttribute('aria-selected') === 'true')", arg=name, timeout=10_000)
    if name in VIEW_CONTENT:
        view.locator(VIEW_CONTENT[name]).first.wait_for(state="visible", timeout=30_000)
    if act and name == "Ablation":
        view.locator("#layers-off input[type=checkbox]").first.tap()
        view.locator("#ablate").tap()
        view.wait_for_function("/Top-1|Score/.test(document.querySelector('#ablation-verdict').innerText)",
                               timeout=30_000)  # a classifier's top-1, or a model's score (a detector's)
    elif act and name == "Export":
        view.locator("#export-button").tap()
        view.wait_for_function("document.querySelector('#export').innerText.includes('.zip')", timeout=60_000)
    elif act and name == "Compare":
        view.locator("#compare-button").tap()
        view.wait_for_function("(() => { const f = document.querySelector('#compare-view iframe');"
                               " return f && f.contentWindow.vggattnCompare && f.contentWindow.vggattnCompare.ready; })()",
                               timeout=60_000)
    settled(view)


def phone_page(browser, url: str, image=app.HERE / "assets" / "church.jpg"):
    """A page at 390x844 that takes taps, the app at url open, `image` uploaded and its centre tapped (pinned)."""
    view = browser.new_page(viewport=PHONE, has_touch=True)
    view.goto(url)
    view.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
    view.locator("#input-image input[type=file]").set_input_files(str(image))
    view.wait_for_function("window.vggattnHover && window.vggattnHover.ready()", timeout=60_000)
    img = view.locator("#input-image img").first
    box = img.evaluate("e => [e.clientWidth, e.clientHeight]")
    img.tap(position={"x": box[0] / 2, "y": box[1] / 2})
    view.wait_for_function("document.querySelector('#status').innerText.includes('Pinned: pixel')", timeout=30_000)
    settled(view)
    return view


def every_view_at_phone_width(view, expected: set) -> list:
    """Tap every view's tab in turn at the page's (a phone's) width: each one selected and shown whole, no problem
    of PHONE_PROBLEMS before or after -> the views' names (at least `expected`)."""
    names = [n.strip() for n in view.get_by_role("tab").all_inner_texts() if n.strip()]
    assert expected <= set(names), (expected, names)
    problems = view.evaluate(PHONE_PROBLEMS)
    assert view.locator(".vggattn-legend").first.is_visible() and not problems, problems  # the pinned point's legends
    for name in names:
        open_view(view, name)
        problems = view.evaluate(PHONE_PROBLEMS)
        assert not problems, (name, problems)
    assert "Error" not in view.locator("body").inner_text()
    return names


def test_every_view_at_a_phones_width(page):
    """At 390x844, with touch: every tab's button is on screen (none behind a "..." menu) and a tap opens its view,
    shown whole inside the screen's width after it ran (ablation, export, A/B); the panels' colour scales are read
    whole. Screenshots of every view: scripts/phone_screenshots.py (docs/phone/)."""
    view = phone_page(page.context.browser, app_url(page))
    try:
        every_view_at_phone_width(view, set(VIEW_CONTENT) - {"Tokens"})
    finally:
        view.close()


def upload_kinds(folder: Path) -> dict:
    """Photos of many sizes and kinds, written to `folder`: name -> (path, (width, height))."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    church = Image.open(app.HERE / "assets" / "church.jpg").convert("RGB")
    made = {
        "tiny.png": church.resize((7, 5)),
        "panorama.jpg": church.resize((1600, 200)),
        "tall.jpg": church.resize((120, 900)),
        "gray.jpg": church.convert("L").resize((300, 300)),
        "rgba.png": Image.fromarray(np.dstack([np.asarray(church.resize((256, 256))),
                                               rng.integers(0, 256, (256, 256), dtype=np.uint8)]), "RGBA"),
        "large.jpg": church.resize((3000, 2000)),
        "noise.png": Image.fromarray(rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)),
    }
    out = {}
    for name, image in made.items():
        image.save(folder / name)
        out[name] = (folder / name, image.size)
    for name in ("garbage_truck.jpg", "springer.jpg"):
        path = app.HERE / "assets" / name
        out[name] = (path, Image.open(path).size)
    return out


def random_upload(view, kinds: dict, rng, log: list) -> tuple[int, int]:
    """A random walk's upload of one of `upload_kinds`, waited for until the status names its size -> the size."""
    name = rng.choice(sorted(kinds))
    path, size = kinds[name]
    log.append(f"upload {name}")
    view.locator("#input-image input[type=file]").set_input_files(str(path))
    view.wait_for_function("(s) => document.querySelector('#status').innerText.includes(s)",
                           arg=f"Analysed a {size[0]}×{size[1]} image", timeout=60_000)
    return size


def random_click(view, img, rng, log: list) -> None:
    """A random walk's click on the picture, waited for until the status names the pinned pixel."""
    fx, fy = rng.random(), rng.random()
    log.append(f"click {fx:.2f},{fy:.2f}")
    click_image_at(img, fx, fy)
    x, y = view.evaluate("window.vggattnHover.state().pinned")
    view.wait_for_function("(s) => document.querySelector('#status').innerText.includes(s)",
                           arg=f"Pinned: pixel ({x}, {y})", timeout=30_000)


def random_export(view, log: list) -> None:
    """A random walk's export: the zip is offered, named after the pinned point (or none)."""
    log.append("export")
    view.get_by_role("tab", name="Export").click()
    view.locator("#export-button").click()
    view.wait_for_function("document.querySelector('#export').innerText.includes('.zip')", timeout=60_000)
    pinned = view.evaluate("window.vggattnHover.state().pinned")
    name = "".join(view.locator("#export").inner_text().split())  # the file name may wrap
    assert (f"-x{pinned[0]}-y{pinned[1]}" in name) if pinned else ("vggattn-export.zip" in name), (pinned, name)


def random_move(view, img, rng, log: list) -> None:
    """A random walk's pointer move: anywhere on the picture or a little off it."""
    fx, fy = rng.uniform(-0.1, 1.1), rng.uniform(-0.1, 1.1)
    log.append(f"move {fx:.2f},{fy:.2f}")
    move_to(view, img, fx, fy)


def random_control(view, rng, log: list) -> None:
    """A random walk's change of one control: colormap, upsampling, scale, the top-5 marks or the opacity."""
    what = rng.choice(["colormap", "upsampling", "scale", "mark", "opacity"])
    log.append(f"control {what}")
    if what == "colormap":
        view.locator("#colormap input").click()
        view.get_by_role("option", name=rng.choice(["inferno", "viridis", "jet", "hot"]), exact=True).click()
    elif what == "upsampling":
        view.locator("#upsampling").get_by_label(rng.choice(["smooth", "blocky"])).check()
    elif what == "scale":
        view.locator("#scale").get_by_label(rng.choice(["linear", "log"]), exact=False).first.check()
    elif what == "mark":
        view.get_by_label("Number the top-5 attended cells").click()
    else:
        box = view.locator("#opacity input[type=number]")
        box.fill(str(rng.choice([0.0, 0.35, 0.8, 1.0])))
        box.press("Enter")


def test_random_sequences_never_show_an_error(page, tmp_path):
    """A seeded random walk through the app (VGGATTN_RANDOM_STEPS steps, 60 by default): uploads of photos of many
    sizes and kinds, pointer moves, clicks anywhere on the picture, every control, the column view, tabs, ablation
    and export. After every step: no "Error" on the page and no uncaught page error; after a click, the status
    names the clicked pixel; an export names the current image's pinned point, and an upload clears it."""
    import random

    steps = int(os.environ.get("VGGATTN_RANDOM_STEPS", "60"))
    rng = random.Random(0)
    kinds = upload_kinds(tmp_path)
    view = page.context.browser.new_page(viewport={"width": 1440, "height": 900})
    errors, log = [], []
    view.on("pageerror", lambda e: errors.append(str(e)))
    view.goto(app_url(page))
    view.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
    img = view.locator("#input-image img").first
    size = None

    def upload():
        nonlocal size
        size = random_upload(view, kinds, rng, log)
        assert view.evaluate("window.vggattnHover.state().pinned") is None
        exported = view.evaluate("(document.querySelector('#export') || {}).textContent || ''")
        assert ".zip" not in exported  # the previous image's export is gone

    def click():
        random_click(view, img, rng, log)

    def move():
        random_move(view, img, rng, log)

    def control():
        random_control(view, rng, log)

    def column():
        log.append("column view")
        view.locator("#hover input.vggattn-column").click()

    def tab():
        name = rng.choice(["Effective contribution", "Query dependence", "Grad-CAM", "Dataset"])
        log.append(f"tab {name}")
        view.get_by_role("tab", name=name).click()

    def ablation():
        log.append("ablation")
        view.get_by_role("tab", name="Ablation").click()
        view.locator("#layers-off").get_by_label(rng.choice(["features.14", "features.22", "features.30"])).click()
        view.locator("#ablate").click()
        settled(view)

    def export():
        random_export(view, log)

    actions = [upload] * 3 + [click] * 4 + [move] * 4 + [control] * 4 + [column, tab, tab, ablation, export]
    try:
        upload()
        for _ in range(steps - 1):
            rng.choice(actions)()
            settled(view)
            text = view.locator("body").inner_text()
            assert "Error" not in text and not errors, (log[-5:], errors, text[:300])
        settled(view)  # late answers of the last steps
        assert "Error" not in view.locator("body").inner_text() and not errors, (log[-5:], errors)
    finally:
        view.close()


def test_a_new_upload_forgets_the_pinned_point(page, tmp_path):
    """The sequence of issue 19: click near a corner of a large photo, upload a smaller one, change a control:
    no Error (the pinned point belonged to the first photo), and nothing is pinned until the next click."""
    kinds = upload_kinds(tmp_path)
    view = page.context.browser.new_page(viewport={"width": 1440, "height": 900})
    errors = []
    view.on("pageerror", lambda e: errors.append(str(e)))
    try:
        view.goto(app_url(page))
        view.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
        for name in ("large.jpg", "tiny.png"):
            path, (w, h) = kinds[name]
            view.locator("#input-image input[type=file]").set_input_files(str(path))
            view.wait_for_function("(s) => document.querySelector('#status').innerText.includes(s)",
                                   arg=f"Analysed a {w}×{h} image", timeout=60_000)
            if name == "large.jpg":
                click_image_at(view.locator("#input-image img").first, 0.9, 0.9)
                view.wait_for_function("document.querySelector('#status').innerText.includes('Pinned: pixel (27')",
                                       timeout=30_000)
        view.locator("#upsampling").get_by_label("blocky").check()
        box = view.locator("#opacity input[type=number]")
        box.fill("0.3")
        box.press("Enter")
        settled(view)
        assert "Error" not in view.locator("body").inner_text() and not errors
        assert view.evaluate("window.vggattnHover.state().pinned") is None
    finally:
        view.close()


def test_each_panel_has_a_colour_scale_with_real_numbers(page):
    """Under each panel: what the brightest colour is (the row's maximum and its cell), the log scale's decades,
    and the sink warning when the layer is sink-dominated on this image."""
    import numpy as np
    from PIL import Image

    import vggattn
    from vggattn.analysis import analyze

    result = analyze(*vggattn.load_checkpoint(device="cpu"), Image.open(app.HERE / "assets" / "church.jpg"))
    if page.evaluate("!(window.vggattnHover && window.vggattnHover.state().layers === 3)"):  # run alone: upload
        page.locator("#input-image input[type=file]").set_input_files(str(app.HERE / "assets" / "church.jpg"))
        page.wait_for_function("window.vggattnHover && window.vggattnHover.ready()", timeout=60_000)
    page.evaluate("window.vggattnHover.setView('row'); window.vggattnHover.draw(60, 150)")
    legends = page.evaluate("[0,1,2].map(i => document.querySelector(`#panel-${i} .vggattn-legend`).innerText)")
    for text, block in zip(legends, result.blocks):
        row, (_, share) = block.row_map((60, 150))[0], block.sink
        r, c = np.unravel_index(int(row.argmax()), row.shape)
        top = float(row.max())
        shown = f"{top:.2f}" if top >= 0.01 else f"{top:.1e}".replace("e-0", "e-")
        assert text.startswith("0 … max ") and f"at ({r}, {c})" in text, text
        assert float(text.split("max ")[1].split(" ")[0]) == pytest.approx(top, rel=0.06, abs=0.006), (text, shown)
        assert ("⚠ sink" in text) == (share >= 0.5), (text, share)
    page.evaluate("window.vggattnHover.setControls({scale: 'log'})")
    logged = page.evaluate("document.querySelector('#panel-0 .vggattn-legend').innerText")
    assert logged.startswith("log ") and "e-" in logged.split(" … ")[0], logged  # the bottom: 1e-4 of the maximum
    page.evaluate("window.vggattnHover.setControls({scale: 'linear'}); window.vggattnHover.leave()")
